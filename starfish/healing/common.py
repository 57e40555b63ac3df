"""Shared healing machinery: mask enforcement, alignment losses, and the alignment loop.

The loop is the same for STARFISH (targets: the dense model's block outputs) and logit
distillation (target: the dense model's logits); only the captured modules and the loss differ.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from starfish.capture import ActivationCapture
from starfish.models import device_of
from starfish.progress import progress
from starfish.pruning import sparsify_

if TYPE_CHECKING:
    from starfish.config import HealConfig

log = logging.getLogger(__name__)

Masks = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _groups(x: torch.Tensor) -> torch.Tensor:
    """Rows to compare: per token for (B, T, D) states, per sample (flattened) otherwise."""
    return x.reshape(-1, x.shape[-1]) if x.ndim == 3 else x.reshape(x.shape[0], -1)


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(student, teacher): over the hidden dim per token, or per flattened sample."""
    return (1.0 - F.cosine_similarity(_groups(student), _groups(teacher), dim=-1)).mean()


def nmse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean of ||s - t||^2 / ||t||^2 over the same groups as `cosine_loss`."""
    s, t = _groups(student), _groups(teacher)
    return ((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)).mean()


def kd_loss(temperature: float) -> LossFn:
    """KL(dense || student) on temperature-softened logits, scaled by T^2 (Hinton et al.)."""

    def loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                        reduction="batchmean", log_target=True) * temperature**2

    return loss


STATE_LOSSES: dict[str, LossFn] = {"cosine": cosine_loss, "nmse": nmse_loss}


@contextlib.contextmanager
def masked_training(model: nn.Module, masks: Masks) -> Iterator[list[nn.Parameter]]:
    """Train only the masked weights, with pruned entries pinned at zero.

    Inside the block, only the parameters named in `masks` require grad; each has a gradient
    hook that multiplies by its mask. On exit the hooks are removed, the original
    `requires_grad` flags restored, and the masks re-applied (so zeros are exact).
    """
    params = dict(model.named_parameters())
    flags = {name: p.requires_grad for name, p in params.items()}
    handles = []
    try:
        for name, p in params.items():
            p.requires_grad_(name in masks)
        trainable = []
        for name, mask in masks.items():
            keep = mask.to(params[name].device, params[name].dtype)
            handles.append(params[name].register_hook(lambda grad, keep=keep: grad * keep))
            trainable.append(params[name])
        yield trainable
    finally:
        for handle in handles:
            handle.remove()
        for name, p in params.items():
            p.requires_grad_(flags[name])
        sparsify_(model, masks)


@torch.no_grad()
def cache_outputs(dense: nn.Module, names: list[str], images: torch.Tensor, batch_size: int,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The dense model's outputs at `names` for every calibration image, stored in `dtype` on CPU."""
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    dense.eval()
    with ActivationCapture(dense, names) as capture:
        for start in progress(range(0, images.shape[0], batch_size), desc="cache dense states",
                              total=math.ceil(images.shape[0] / batch_size)):
            dense(images[start : start + batch_size].to(device_of(dense)))
            for name in names:
                chunks[name].append(capture.values[name].detach().to("cpu", dtype))
    return {name: torch.cat(parts) for name, parts in chunks.items()}


def align_(model: nn.Module, dense: nn.Module, masks: Masks, images: torch.Tensor, names: list[str],
           loss_fn: LossFn, cfg: "HealConfig") -> dict[str, object]:
    """Train the masked weights so the outputs at `names` match the dense model's, in place.

    Adam with a cosine schedule from `cfg.lr` to `cfg.lr_min` over every step; the model stays
    in eval mode (norm statistics and dropout frozen). Returns the per-epoch mean loss.
    """
    dtype = getattr(torch, cfg.cache_dtype)
    targets = cache_outputs(dense, names, images, cfg.batch_size, dtype)
    device = device_of(model)
    steps_per_epoch = math.ceil(images.shape[0] / cfg.batch_size)
    total_steps = max(1, cfg.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(cfg.seed)
    epoch_losses: list[float] = []
    model.eval()
    start = time.perf_counter()
    with masked_training(model, masks) as trainable, ActivationCapture(model, names) as capture:
        optimizer = torch.optim.Adam(trainable, lr=cfg.lr, foreach=True)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=cfg.lr_min)
        bar = progress(range(cfg.epochs), desc="heal")
        for _ in bar:
            order = torch.randperm(images.shape[0], generator=generator)
            running = 0.0
            for step in range(steps_per_epoch):
                index = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                model(images[index].to(device))
                loss = sum(loss_fn(capture.values[name], targets[name][index].to(device, torch.float32))
                           for name in names) / len(names)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                sparsify_(model, masks)
                scheduler.step()
                running += loss.item()
            epoch_losses.append(running / steps_per_epoch)
            bar.set_postfix(loss=f"{epoch_losses[-1]:.4f}", refresh=False)
    log.info("aligned %d states over %d steps in %.1fs", len(names), total_steps, time.perf_counter() - start)
    return {"epoch_losses": epoch_losses, "steps": cfg.epochs * steps_per_epoch}
