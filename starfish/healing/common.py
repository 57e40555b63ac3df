"""Shared healing machinery: the healer signature, mask enforcement, alignment losses, and the alignment loop.

The loop is the same for STARFISH (targets: the dense model's block outputs) and logit
distillation (target: the dense model's logits); only the captured modules and the loss differ.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import time
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

import torch
from torch import nn

from starfish.calibration import Images, Rows
from starfish.capture import ActivationCapture
from starfish.errors import StarfishError
from starfish.healing.batchnorm import batchnorm_buffers, evaluation, recalibrate_, set_batchnorm_training_
from starfish.healing.targets import DenseTargets, dense_targets
from starfish.losses import LossFn
from starfish.models import device_of
from starfish.progress import progress
from starfish.pruning import sparsify_
from starfish.pruning.masks import Masks
from starfish.quant import attached

if TYPE_CHECKING:
    from starfish.config import Training

log = logging.getLogger(__name__)

_BETWEEN_CHUNKS: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "starfish_between_chunks", default=None)


@contextlib.contextmanager
def between_chunks(callback: Callable[[], None]) -> Iterator[None]:
    """Call `callback` after each run of steps between held-out checks of the heals inside the
    block, outside their timing: a benchmark's reference steps, interleaved with a heal's so
    that both meet the same load on the machine."""
    token = _BETWEEN_CHUNKS.set(callback)
    try:
        yield
    finally:
        _BETWEEN_CHUNKS.reset(token)


class Healer(Protocol):
    """A healer takes the parts of the heal section its catalog entry reads, by name
    (`training`, `alignment`, `least_squares`: config.Training, Alignment, LeastSquares)."""

    def __call__(self, model: nn.Module, dense: nn.Module, masks: Masks,
                 images: torch.Tensor, **parts: object) -> dict[str, object]: ...


def on_channels(loss: LossFn, channels: torch.Tensor) -> LossFn:
    """`loss` on the dense state's `channels` only: the block outputs that structured pruning
    narrowed. A masked student's state is cut to the same channels; a slim one has only those."""

    def narrowed(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        index = channels.to(teacher.device)
        if student.shape[1] != index.numel():
            student = student.index_select(1, index)
        return loss(student, teacher.index_select(1, index))

    return narrowed


def _zero_pruned(keep: torch.Tensor) -> Callable[[torch.Tensor], None]:
    def hook(param: torch.Tensor) -> None:
        param.grad.mul_(keep)

    return hook


@contextlib.contextmanager
def masked_training(model: nn.Module, masks: Masks) -> Iterator[list[nn.Parameter]]:
    """Train only the masked weights, with pruned entries pinned at zero.

    Inside the block, only the parameters named in `masks` require grad; each whose mask prunes
    anything has its accumulated gradient multiplied by its mask, in place. Adam without weight
    decay then never moves a pruned weight off zero (its moments stay zero), so the weights need
    no re-masking per step (a slim model's all-kept masks cost nothing at all). On exit the hooks
    are removed, the original `requires_grad` flags restored, and the masks re-applied.
    """
    params = dict(model.named_parameters())
    flags = {name: p.requires_grad for name, p in params.items()}
    handles = []
    try:
        for name, p in params.items():
            p.requires_grad_(name in masks)
        trainable = []
        for name, mask in masks.items():
            if not bool(mask.all()):
                handles.append(params[name].register_post_accumulate_grad_hook(
                    _zero_pruned(mask.to(params[name].device, params[name].dtype))))
            trainable.append(params[name])
        yield trainable
    finally:
        for handle in handles:
            handle.remove()
        for name, p in params.items():
            p.requires_grad_(flags[name])
        sparsify_(model, masks)


def split_calibration(images: Images, holdout: float) -> tuple[Images, Images | None]:
    """(training images, held-out images): ceil(holdout * N) evenly spaced images are held out.

    Deterministic and seed-free, so every healer and every seed sees the same held-out slice;
    `holdout=0` trains on everything and returns None for the slice. Both parts are `Rows`
    views of `images`, not copies.
    """
    n = images.shape[0]
    if holdout == 0:
        return images, None
    count = math.ceil(holdout * n)
    if count >= n:
        raise StarfishError(f"heal.holdout={holdout} holds out all {n} calibration images; lower heal.holdout "
                            "or sample a larger split (calibration.fraction)")
    held = torch.linspace(0, n - 1, count).round().long()
    keep = torch.ones(n, dtype=torch.bool)
    keep[held] = False
    return Rows(images, keep.nonzero().squeeze(1)), Rows(images, held)


class Objective:
    """A weighted sum of per-state losses: `{captured module name: (loss, weight)}`.

    STARFISH: every block's state loss with weight 1/blocks (their mean), plus an optional logit
    term on the root module's output (name ""); logit distillation: the logit term alone.
    """

    def __init__(self, terms: dict[str, tuple[LossFn, float]]):
        self.terms = {name: term for name, term in terms.items() if term[1] > 0}
        self.names = list(self.terms)

    def __call__(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(weight * loss(outputs[name], targets[name]) for name, (loss, weight) in self.terms.items())


def snapshot(model: nn.Module, masks: Masks) -> dict[str, torch.Tensor]:
    """A copy of what healing changes: the weights named in `masks`, and BatchNorm's running statistics."""
    params = dict(model.named_parameters())
    return {**{name: params[name].detach().clone() for name in masks},
            **{name: value.clone() for name, value in batchnorm_buffers(model).items()}}


@torch.no_grad()
def restore_(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, value in state.items():
        tensors[name].copy_(value)
    return model


@torch.no_grad()
def _mean_loss(model: nn.Module, capture: ActivationCapture, objective: Objective, images: Images,
               targets: DenseTargets, batch_size: int) -> float:
    """The objective over `images`, batch by batch, weighted by batch size."""
    device, total = device_of(model), 0.0
    for start in range(0, images.shape[0], batch_size):
        index = torch.arange(start, min(start + batch_size, images.shape[0]))
        batch = targets.batch(index, device)  # before the model's pass: recomputing runs the dense model
        model(images[index].to(device))
        total += float(objective(capture.values, batch)) * index.numel()
    return total / images.shape[0]


def _recalibrate(model: nn.Module, masks: Masks, images: Images, held_out_loss: Callable[[], float | None],
                 batch_size: int) -> bool:
    """`recalibrate_` the kept state's BatchNorm statistics on the training images, unless that
    makes the held-out alignment worse (then the statistics stay as they were): whether it did."""
    before, held_before = snapshot(model, masks), held_out_loss()
    recalibrate_(model, images, batch_size)
    held_after = held_out_loss()
    if held_before is not None and held_after > held_before:
        log.warning("recalibrated BatchNorm statistics made the held-out loss worse (%.5f > %.5f): kept the "
                    "statistics as they were", held_after, held_before)
        restore_(model, before)
        return False
    log.info("BatchNorm statistics recalibrated on %d images", images.shape[0])
    return True


def align_(model: nn.Module, dense: nn.Module, masks: Masks, images: Images, holdout: Images | None,
           objective: Objective, cfg: "Training", fallback: dict[str, torch.Tensor] | None = None
           ) -> dict[str, object]:
    """Train the masked weights so the captured outputs match the dense model's, in place.

    Adam with a cosine schedule from `cfg.lr` to `cfg.lr_min` over the step budget; a fresh
    shuffle of `images` every pass. The model is in eval mode (dropout off) but for its
    BatchNorm layers, which heal as `cfg.batchnorm` says (`healing.batchnorm`). With a
    held-out slice, its loss is measured before training, every
    `cfg.holdout_every` steps and at the end; the best of those states (`keep=best`) or of the
    start and the end (`keep=last`) is kept, so the result is never worse on it than the start
    (or than `fallback`, the pruned weights before a warm start). Healing through the quantizer
    (`heal.quant`), the static input ranges are measured again for each state measured and at
    each check. Returns the curve of calibration and held-out losses and what was kept.
    """
    names = objective.names
    steps = cfg.total_steps(images.shape[0])
    checks = 0 if holdout is None else (steps // cfg.holdout_every + 3) * holdout.shape[0]  # start, end, pruned
    start = time.perf_counter()
    with dense_targets(dense, names, [images, holdout], cfg.batch_size, getattr(torch, cfg.cache_dtype),
                       cfg.cache, steps, checks) as (targets, held_targets):
        cache_seconds = time.perf_counter() - start
        report = _align(model, masks, images, holdout, objective, cfg, fallback, targets, held_targets)
    report["seconds"] = {"cache": cache_seconds, **report["seconds"]}
    return report


def _align(model: nn.Module, masks: Masks, images: Images, holdout: Images | None, objective: Objective,
           cfg: "Training", fallback: dict[str, torch.Tensor] | None, targets: DenseTargets,
           held_targets: DenseTargets | None) -> dict[str, object]:
    names = objective.names
    device = device_of(model)
    total_steps = cfg.total_steps(images.shape[0])
    steps_per_epoch = math.ceil(images.shape[0] / cfg.batch_size)
    generator = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    curve: list[dict[str, float | int | None]] = []
    best: dict[str, object] = {"loss": math.inf, "step": None, "state": None}
    recalibrated: bool | None = None
    set_batchnorm_training_(model.eval(), cfg.batchnorm == "train")
    quantizer = attached(model)  # healing through the quantizer: its static ranges follow the weights
    start = time.perf_counter()
    seconds = {"holdout": 0.0, "steps": 0.0}  # the held-out checks, and the steps without them
    with masked_training(model, masks) as trainable, ActivationCapture(model, names) as capture:

        def held_out_loss() -> float | None:
            if holdout is None:
                return None
            begin = time.perf_counter()
            with evaluation(model):
                loss = _mean_loss(model, capture, objective, holdout, held_targets, cfg.batch_size)
            seconds["holdout"] += time.perf_counter() - begin
            return loss

        def keep_if_best(held: float | None, label: int | str) -> None:
            if held is not None and held < best["loss"]:
                best.update(loss=held, step=label, state=snapshot(model, masks))

        def follow_weights() -> None:
            """Through the quantizer: the static ranges of the weights the model has now."""
            if quantizer is not None:
                quantizer.calibrate()

        if fallback is not None and holdout is not None:
            current = snapshot(model, masks)
            restore_(model, fallback)
            follow_weights()
            keep_if_best(held_out_loss(), "pruned")
            restore_(model, current)
        follow_weights()
        start_held = held_out_loss()  # the starting point, before a training pass can move BatchNorm statistics
        keep_if_best(start_held, 0)
        optimizer = torch.optim.Adam(trainable, lr=cfg.lr, foreach=True)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=cfg.lr_min)
        bar = progress(range(total_steps), desc="heal")
        loop_start, held_before_loop, outside = time.perf_counter(), seconds["holdout"], 0.0
        chunk_start, chunk_step, chunks = loop_start, 0, []  # seconds per step between held-out checks
        between = _BETWEEN_CHUNKS.get()
        for step in bar:
            if step % steps_per_epoch == 0:
                order = torch.randperm(images.shape[0], generator=generator)
            offset = (step % steps_per_epoch) * cfg.batch_size
            index = order[offset : offset + cfg.batch_size]
            batch = targets.batch(index, device)  # before the model's pass: recomputing runs the dense model
            model(images[index].to(device))
            loss = objective(capture.values, batch)
            if step == 0:  # the starting point: its first batch, before any update
                curve.append({"step": 0, "calibration_loss": loss.item(), "holdout_loss": start_held})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()  # pruned weights stay zero: their gradients are (`masked_training`)
            scheduler.step()
            losses.append(loss.item())
            if (step + 1) % cfg.holdout_every == 0 or step + 1 == total_steps:
                chunks.append((time.perf_counter() - chunk_start) / (step + 1 - chunk_step))
                if between is not None:
                    begin = time.perf_counter()
                    between()
                    outside += time.perf_counter() - begin
                follow_weights()
                recent = losses[-((step % cfg.holdout_every) + 1):]
                held = held_out_loss()
                curve.append({"step": step + 1, "calibration_loss": sum(recent) / len(recent), "holdout_loss": held})
                if cfg.keep == "best" or step + 1 == total_steps:
                    keep_if_best(held, step + 1)
                bar.set_postfix(loss=f"{curve[-1]['calibration_loss']:.4f}", refresh=False)
                chunk_start, chunk_step = time.perf_counter(), step + 1
        seconds["steps"] = time.perf_counter() - loop_start - (seconds["holdout"] - held_before_loop) - outside
        if best["state"] is not None:
            restore_(model, best["state"])
        model.eval()
        if cfg.batchnorm == "recalibrate" and batchnorm_buffers(model):
            recalibrated = _recalibrate(model, masks, images, held_out_loss, cfg.batch_size)
    report: dict[str, object] = {"steps": total_steps, "train_images": images.shape[0],
                                 "holdout_images": 0 if holdout is None else holdout.shape[0],
                                 "final_loss": curve[-1]["calibration_loss"], "curve": curve, "seconds": seconds,
                                 "step_seconds": chunks}
    if recalibrated is not None:
        report["batchnorm_recalibrated"] = recalibrated
    if holdout is not None:
        start_label = "pruned" if fallback is not None else 0
        report.update(selected_step=best["step"], holdout_loss=best["loss"], kept_pruned=best["step"] == start_label)
        if report["kept_pruned"]:
            log.warning("no healed state beat the pruned model on the held-out slice: returning the pruned weights")
    log.info("aligned %d states over %d steps in %.1fs (selected step %s)", len(names), total_steps,
             time.perf_counter() - start, report.get("selected_step", total_steps))
    return report
