"""Baseline healers STARFISH must beat, on the same calibration images and budget.

- `none`: leave the pruned model as it is.
- `bias-correction`: per layer, in forward order, set the bias so the layer's mean output on
  the calibration set equals the dense network's (Nagel et al., 2019).
- `layerwise`: per layer, in forward order, re-fit the kept weights by least squares so the
  layer reproduces the dense network's output from the inputs it now receives
  (AdaPrune / SparseGPT-style reconstruction): solved exactly per output row
  (`heal.solver=exact`, one d x d system per row), or with one damped Hessian per layer
  (`heal.solver=cg`: SparseGPT's column pass with the masks fixed, then conjugate gradients).
- `logit-kd`: distill the dense model's logits only, same optimizer and schedule as STARFISH.

The two layer-by-layer baselines keep one layer's statistics in memory at a time, accumulated
from paired forward passes of the dense and the partially healed model.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import nn

from starfish.calibration import Images, Rows
from starfish.capture import ActivationCapture, stage_names
from starfish.errors import StarfishError
from starfish.healing.common import Objective, align_, split_calibration
from starfish.healing.targets import choose_mode
from starfish.losses import kd_loss
from starfish.models import device_of
from starfish.progress import progress
from starfish.pruning import sparsify_
from starfish.pruning.masks import Masks
from starfish.pruning.slim import dense_rows
from starfish.rows import RowStore, current_scratch_folder, row_store

if TYPE_CHECKING:
    from starfish.config import Alignment, LeastSquares, Training

log = logging.getLogger(__name__)


def no_healing(model: nn.Module, dense: nn.Module, masks: Masks, images: torch.Tensor) -> dict[str, object]:
    """The pruned weights as they are: the floor every healer is measured against."""
    return {}


def non_linear_layers(model: nn.Module, masks: Masks) -> list[str]:
    """The masked weights that are not Linear layers' (convs): what the least-squares methods cannot re-fit."""
    modules = dict(model.named_modules())
    return [name for name in masks if not isinstance(modules.get(name.removesuffix(".weight")), nn.Linear)]


def _linear_layers(model: nn.Module, masks: Masks, method: str) -> dict[str, nn.Linear]:
    """The masked layers in forward (module registration) order, whatever order `masks` comes in."""
    modules = dict(model.named_modules())
    unknown = [name for name in masks if name.removesuffix(".weight") not in modules]
    if unknown:
        raise StarfishError(f"{method}: masks name {unknown[0]}, which is not a layer of {type(model).__name__}")
    layers = {f"{name}.weight": module for name, module in modules.items() if f"{name}.weight" in masks}
    bad = non_linear_layers(model, masks)
    if bad:
        raise StarfishError(f"{method} heals Linear layers only, not {bad[0]}; heal CNNs with starfish or logit-kd")
    return layers


Consume = Callable[[torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def _stages_take_x_alone(model: nn.Module, stages: list[str], image: torch.Tensor) -> bool:
    """Whether the model calls each stage as `stage(x)` and feeds it the previous stage's output,
    so a stage can be run on its own (XCiT passes H and W, EVA its rotary embedding: they cannot)."""
    calls: list[tuple[tuple, dict, object]] = []

    def seen(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        calls.append((args, kwargs, output))

    handles = [model.get_submodule(name).register_forward_hook(seen, with_kwargs=True) for name in stages]
    try:
        model(image)
    finally:
        for handle in handles:
            handle.remove()
    if len(calls) != len(stages):
        return False
    chained = all(len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) for args, kwargs, _ in calls)
    return chained and all(after[0][0] is before[2] for before, after in zip(calls, calls[1:]))


class _Stop(Exception):
    """Ends a forward pass once the input `InputOf` waits for is recorded."""


class InputOf:
    """`InputOf(root, name)(x)`: the input of `root`'s submodule `name` when `root` runs on `x`,
    the pass stopped where `name` is called, since nothing after it is needed.

    A Linear layer whose parent reads its weight directly never runs (`ActivationCapture`): its
    input is the parent's, recorded when the parent returns, so that pass runs to the end."""

    def __init__(self, root: nn.Module, name: str) -> None:
        self.root, self.name, self._seen = root, name, None
        self._capture = ActivationCapture(root, [name], inputs=True)
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _stop(self, module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            self._seen = args[0]
            raise _Stop

    def __enter__(self) -> "InputOf":
        self._capture.__enter__()
        self._handle = self.root.get_submodule(self.name).register_forward_pre_hook(self._stop)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
        self._capture.__exit__(*exc)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._seen = None
        try:
            self.root(x)
        except _Stop:
            return self._seen
        return self._capture.values[self.name]


class PairedInputs:
    """Feeds `consume(x_model, x_dense)`: the inputs of one layer in both models, batch by batch.

    Layers must be asked for in forward order. When every layer sits inside the model's stages
    (which run back to back: ViT blocks, CNN and Swin stages), the inputs of the current stage
    are kept (both models, all calibration images) and each layer costs a pass of its own
    stage, not of the whole model, stopped where the layer is called (`InputOf`); the kept
    inputs move one stage on, through the stage as healed so far, when a later stage is asked
    for. Otherwise each layer costs a forward pass of both whole models, stopped at the layer.
    The kept inputs (float32, 2 x N x tokens x width: 6 GB for ViT-B at
    5,000 images) live where `cache` (`heal.cache`) says: RAM, or scratch files for `disk` and
    `recompute`, `auto` choosing as for the dense states.
    """

    def __init__(self, model: nn.Module, dense: nn.Module, layers: list[str], images: "Images",
                 batch_size: int, cache: str = "memory"):
        self.model, self.dense, self.images, self.batch_size, self.cache = model, dense, images, batch_size, cache
        try:
            blocks = stage_names(model)
        except StarfishError:
            blocks = []
        self.block_of = {layer: next((b for b in blocks if layer.startswith(b + ".")), None) for layer in layers}
        self.blockwise = bool(layers) and all(self.block_of.values()) and \
            _stages_take_x_alone(model, blocks, images[:1].to(device_of(model)))
        self.blocks = blocks
        self.position = -1  # index in self.blocks of the block whose inputs are kept
        self.x_model: RowStore | None = None
        self.x_dense: RowStore | None = None
        self.on_disk: bool | None = None  # decided when the first inputs' size is known

    def _batches(self, x: "Images | RowStore") -> Iterator[torch.Tensor]:
        for start in range(0, len(x), self.batch_size):
            yield x[start : start + self.batch_size].to(device_of(self.model))

    def _store(self, first: torch.Tensor) -> RowStore:
        """Rows for every image's input to a block, shaped like `first` (one batch of them)."""
        count = len(self.images)
        if self.on_disk is None:
            needed = 2 * count * first[0].numel() * first.element_size()
            self.on_disk = choose_mode(self.cache, needed, current_scratch_folder()) != "memory"
        return row_store((count, *first.shape[1:]), first.dtype, self.on_disk)

    def _run_to(self, target: int) -> None:
        """Keep the inputs of block `target`: captured from the images, or moved on from the current block."""
        if self.position < 0:
            first = self.blocks[target]
            with InputOf(self.model, first) as ours, InputOf(self.dense, first) as ref:
                for start, batch in zip(range(0, len(self.images), self.batch_size), self._batches(self.images)):
                    x_model, x_dense = ours(batch), ref(batch)
                    if start == 0:
                        self.x_model, self.x_dense = self._store(x_model), self._store(x_dense)
                    self.x_model.write(start, x_model.cpu())
                    self.x_dense.write(start, x_dense.cpu())
            self.position = target
        while self.position < target:
            name = self.blocks[self.position]
            self.x_model = self._through(self.model.get_submodule(name), self.x_model)
            self.x_dense = self._through(self.dense.get_submodule(name), self.x_dense)
            self.position += 1

    def _through(self, block: nn.Module, inputs: RowStore) -> RowStore:
        """`block`'s outputs for every kept input, batch by batch, in a new store (the old one is freed)."""
        outputs: RowStore | None = None
        for start, x in zip(range(0, len(inputs), self.batch_size), self._batches(inputs)):
            y = block(x).cpu()
            if outputs is None:
                outputs = self._store(y)
            outputs.write(start, y)
        inputs.close()
        return outputs

    def feed(self, layer: str, consume: Consume) -> None:
        """`consume(x_model, x_dense)` for each batch: `layer`'s inputs, flattened to rows. Each
        pass stops where the layer is called (`InputOf`), so a layer early in its block is cheap."""
        if self.blockwise:
            self._run_to(self.blocks.index(self.block_of[layer]))
            name = self.blocks[self.position]
            model, dense = self.model.get_submodule(name), self.dense.get_submodule(name)
            inner = layer[len(name) + 1:]
            pairs = zip(self._batches(self.x_model), self._batches(self.x_dense))
        else:
            model, dense, inner = self.model, self.dense, layer
            pairs = ((x, x) for x in self._batches(self.images))
        with InputOf(model, inner) as ours, InputOf(dense, inner) as ref:
            for x, x_dense in pairs:
                x_ours, x_ref = ours(x), ref(x_dense)
                consume(x_ours.reshape(-1, x_ours.shape[-1]), x_ref.reshape(-1, x_ref.shape[-1]))


@torch.no_grad()
def bias_correction(model: nn.Module, dense: nn.Module, masks: Masks, images: torch.Tensor,
                    least_squares: "LeastSquares") -> dict[str, object]:
    """b <- b_dense + W_dense E[x_dense] - W_pruned E[x_pruned], layer by layer."""
    dense_params = dict(dense.named_parameters())
    corrected = 0
    model.eval(), dense.eval()
    layers = _linear_layers(model, masks, "bias-correction")
    rows = dense_rows(model, dense)  # a slim model's layers are some of the dense rows
    inputs = PairedInputs(model, dense, [name.removesuffix(".weight") for name in layers], images,
                          least_squares.batch_size, least_squares.cache)
    for name, layer in progress(layers.items(), desc="bias-correction"):
        if layer.bias is None:
            log.warning("%s has no bias; bias-correction skips it", name)
            continue
        sums = {"model": 0.0, "dense": 0.0, "count": 0}

        def consume(x_model: torch.Tensor, x_dense: torch.Tensor) -> None:
            sums["model"] = sums["model"] + x_model.double().sum(0)
            sums["dense"] = sums["dense"] + x_dense.double().sum(0)
            sums["count"] += x_model.shape[0]

        layer_name = name.removesuffix(".weight")
        inputs.feed(layer_name, consume)
        mean_model, mean_dense = sums["model"] / sums["count"], sums["dense"] / sums["count"]
        w_dense = dense_params[name].double()
        if name in rows:
            w_dense = w_dense.index_select(0, rows[name].to(w_dense.device))
        b_dense = dense_params[f"{layer_name}.bias"].double()
        if name in rows:
            b_dense = b_dense.index_select(0, rows[name].to(b_dense.device))
        target = b_dense + w_dense @ mean_dense - layer.weight.double() @ mean_model
        layer.bias.copy_(target.to(layer.bias.dtype))
        corrected += 1
    return {"layers_corrected": corrected}


def solve_rows(width: int, memory_mb: float, itemsize: int = 8) -> int:
    """How many rows' (width x width) systems to solve at once within `memory_mb`: each takes two
    copies (the system and its LU factors). At least one row, whatever the budget."""
    return max(1, int(memory_mb * 2**20) // (2 * width * width * itemsize))


def damping(gram: torch.Tensor, damp: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """lambda = damp * the mean of diag G over the inputs the layer still reads (the columns `keep`
    has a kept entry in; all without `keep`): the ridge every least-squares solve adds to its kept
    weights. Inputs no row reads any more (an MLP's removed neurons, which still output GELU of
    their bias) do not set it, so a masked layer and its slim counterpart get the same ridge."""
    diagonal = torch.diagonal(gram)
    if keep is not None:
        read = keep.reshape(keep.shape[0], -1).any(0).to(diagonal.device)
        diagonal = diagonal[read] if read.any() else diagonal
    return damp * diagonal.mean().clamp_min(1e-12)


def damped_hessian(gram: torch.Tensor, damp: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """G + lambda I: every row's Hessian when all weights are free (`damping`)."""
    return gram + damping(gram, damp, keep) * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


def masked_least_squares(gram: torch.Tensor, cross: torch.Tensor, w_dense: torch.Tensor, keep: torch.Tensor,
                         damp: float, memory_mb: float = 1024) -> torch.Tensor:
    """Per output row r, the kept weights minimizing ||X_S w_S - X_dense w_dense[r]||^2 + damping.

    `gram` = X^T X over the pruned model's inputs, `cross` = X^T X_dense. Row r solves
    (G_SS + lambda I) w_S = (C w_dense[r])_S, with lambda from `damping`; pruned
    entries come out exactly zero. Rows are solved in batches sized by `memory_mb` (`solve_rows`),
    so memory is bounded by configuration, not by the layer's width; each row's solve is the
    same whatever the batch.
    """
    lam = damping(gram, damp, keep)
    rhs_all = w_dense @ cross.T  # row r: C w_dense[r]
    out = w_dense.new_zeros(w_dense.shape[0], gram.shape[0])  # a slim layer reads fewer inputs than dense's
    rows = solve_rows(gram.shape[0], memory_mb, gram.element_size())
    for start in range(0, w_dense.shape[0], rows):
        k = keep[start : start + rows].to(gram.device, gram.dtype)  # (rows, d)
        system = gram.unsqueeze(0) * k.unsqueeze(2)
        system *= k.unsqueeze(1)
        system.diagonal(dim1=1, dim2=2).add_(k * lam + (1 - k))
        rhs = (rhs_all[start : start + rows] * k).unsqueeze(-1)
        out[start : start + rows] = torch.linalg.solve(system, rhs).squeeze(-1) * k
        del system
    return out


def sparsegpt_least_squares(gram: torch.Tensor, cross: torch.Tensor, w_dense: torch.Tensor, keep: torch.Tensor,
                            damp: float, block: int = 128) -> torch.Tensor:
    """The objective of `masked_least_squares`, solved SparseGPT's way (Frantar & Alistarh,
    2023) with the masks given: one factorization per layer, not one solve per row.

    With H = G + lambda I, every row's objective is (w - w*)^T H (w - w*) + const, where
    w* = H^-1 C w_dense is its unconstrained optimum. Starting from w*, the columns are taken
    in order, `block` at a time: column i's pruned entries are zeroed and their error spread
    over the columns after it through the upper Cholesky factor U of H^-1 (the optimal
    compensation with the columns before i fixed), kept entries stay. Cost O(d^3 + rows d^2)
    per layer instead of O(rows d^3); pruned entries come out exactly zero.
    """
    d = gram.shape[0]
    factor = torch.linalg.cholesky(damped_hessian(gram, damp, keep))
    weights = torch.cholesky_solve(cross @ w_dense.T, factor).T.contiguous()  # row r: H^-1 C w_dense[r]
    upper = torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
    keep = keep.to(gram.device, gram.dtype)
    for start in range(0, d, block):
        end = min(start + block, d)
        part, corner = weights[:, start:end].clone(), upper[start:end, start:end]
        errors = torch.zeros_like(part)
        for i in range(end - start):
            column = part[:, i]
            error = column * (1 - keep[:, start + i]) / corner[i, i]
            part[:, i:] -= error.unsqueeze(1) * corner[i, i:].unsqueeze(0)
            errors[:, i] = error
        weights[:, start:end] = part
        weights[:, end:] -= errors @ upper[start:end, end:]
    return weights * keep


def cg_least_squares(gram: torch.Tensor, cross: torch.Tensor, w_dense: torch.Tensor, keep: torch.Tensor,
                     damp: float, tol: float | None = None, max_iterations: int = 1000) -> torch.Tensor:
    """`masked_least_squares`'s solution at the cost of matrix products with one Hessian per layer.

    SparseGPT's pass (`sparsegpt_least_squares`) is a start, not the optimum: it never moves a
    kept weight to make up for a pruned one to its right (on the demo ViT at 90% sparsity its
    re-fit alone recovers 0.54 of dense accuracy, the exact one 0.73). From there, Jacobi-
    preconditioned conjugate gradients on every row at once, each iteration one
    (rows x d) @ (d x d) product, until the residual is `tol` of the right-hand side (both
    Frobenius norms; by default 1e-6 in float64, 1e-5 in float32, near what its rounding
    allows) or `max_iterations`; the damping bounds the systems' condition number.
    Pruned entries stay exactly zero.
    """
    tol = (1e-6 if gram.dtype == torch.float64 else 1e-5) if tol is None else tol
    hessian = damped_hessian(gram, damp, keep)
    mask = keep.to(gram.device, gram.dtype)
    rhs = (w_dense @ cross.T) * mask  # row r: (C w_dense[r]) on the kept entries
    weights = sparsegpt_least_squares(gram, cross, w_dense, keep, damp)
    residual = rhs - (weights @ hessian) * mask
    inverse_diagonal = mask / torch.diagonal(hessian)
    z = residual * inverse_diagonal
    direction, rz = z.clone(), (residual * z).sum(1, keepdim=True)
    target, iterations = tol * torch.linalg.norm(rhs), 0
    while iterations < max_iterations and torch.linalg.norm(residual) > target:
        product = (direction @ hessian) * mask
        step = rz / (direction * product).sum(1, keepdim=True).clamp_min(torch.finfo(gram.dtype).tiny)
        weights += step * direction
        residual -= step * product
        z = residual * inverse_diagonal
        rz, previous = (residual * z).sum(1, keepdim=True), rz
        direction = z + rz / previous.clamp_min(torch.finfo(gram.dtype).tiny) * direction
        iterations += 1
    log.debug("cg: %d iterations, relative residual %.1e", iterations,
              float(torch.linalg.norm(residual) / torch.linalg.norm(rhs).clamp_min(1e-300)))
    return weights * mask


FLOAT32_RESIDUAL = 1e-4  # the largest relative residual a float32 solve may leave; above it, float64
# the largest condition number of a damped Hessian solved in float32: its unit roundoff times it is
# 1e-2, the worst relative error in the weights that rounding can cause before the fallback
FLOAT32_CONDITION = 1e-2 / torch.finfo(torch.float32).eps


def condition_estimate(gram: torch.Tensor, damp: float, keep: torch.Tensor, iterations: int = 50) -> float:
    """(largest eigenvalue of G, by power iteration, + lambda) / lambda: the condition number of
    G + lambda I, which bounds every row's masked system's (G is positive semi-definite)."""
    lam = float(damping(gram.double(), damp, keep))
    vector = torch.ones(gram.shape[0], 1, dtype=torch.float64, device=gram.device)
    gram, top = gram.double(), 0.0
    for _ in range(iterations):
        vector = gram @ vector
        top = float(torch.linalg.norm(vector))
        if top == 0:
            break
        vector /= top
    return math.inf if lam <= 0 else (top + lam) / lam


def relative_residual(weights: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, w_dense: torch.Tensor,
                      keep: torch.Tensor, damp: float) -> float:
    """How far `weights` are from solving every row's masked system, in float64:
    ||(W H - C w_dense) on the kept entries|| / ||C w_dense on them|| (Frobenius), H = G + lambda I."""
    gram, mask = gram.double(), keep.to(gram.device, torch.float64)
    rhs = (w_dense.double() @ cross.double().T) * mask
    residual = rhs - (weights.double() @ damped_hessian(gram, damp, keep)) * mask
    return float(torch.linalg.norm(residual) / torch.linalg.norm(rhs).clamp_min(1e-300))


class _Unsuited(Exception):
    """A float32 solve that need not be tried."""


def solve_layer(gram: torch.Tensor, cross: torch.Tensor, w_dense: torch.Tensor, keep: torch.Tensor,
                least_squares: "LeastSquares", name: str = "") -> tuple[torch.Tensor, str]:
    """A layer's masked least squares with `least_squares.solver`, in the statistics' dtype:
    (the weights, the dtype that gave them). Float32 is not tried where the damped Hessian's
    condition number (`condition_estimate`) is over `FLOAT32_CONDITION`, and a float32 solve whose
    factorization fails or whose residual (`relative_residual`) is over `FLOAT32_RESIDUAL` is done
    again: both in float64, and logged."""

    def solve(g: torch.Tensor, c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if least_squares.solver == "exact":
            return masked_least_squares(g, c, w, keep, least_squares.damp, least_squares.solve_memory_mb)
        return cg_least_squares(g, c, w, keep, least_squares.damp)

    if gram.dtype == torch.float32:
        condition = condition_estimate(gram, least_squares.damp, keep)
        try:
            if condition > FLOAT32_CONDITION:
                raise _Unsuited(f"the damped Hessian's condition number is about {condition:.1e} "
                                f"(over {FLOAT32_CONDITION:.1e})")
            solved = solve(gram, cross, w_dense.float())
            residual = relative_residual(solved, gram, cross, w_dense, keep, least_squares.damp)
            if residual <= FLOAT32_RESIDUAL:  # False for NaN too
                return solved, "float32"
            why = f"its relative residual is {residual:.1e} (over {FLOAT32_RESIDUAL:g})"
        except _Unsuited as exc:
            why = str(exc)
        except torch.linalg.LinAlgError as exc:
            why = f"its factorization failed ({str(exc).splitlines()[0]})"
        log.warning("layerwise %s: the float32 solve is not accurate enough, %s: solved again in float64", name, why)
    return solve(gram.double(), cross.double(), w_dense.double()), "float64"


def statistics_subset(images: "Images", count: int | None) -> "Images":
    """At most `count` of `images`, evenly spaced (all of them when `count` is None or not smaller)."""
    if count is None or count >= len(images):
        return images
    return Rows(images, torch.linspace(0, len(images) - 1, count).round().long())


@torch.no_grad()
def layerwise(model: nn.Module, dense: nn.Module, masks: Masks, images: torch.Tensor,
              least_squares: "LeastSquares") -> dict[str, object]:
    """Sequential per-layer least-squares reconstruction of the kept weights, from statistics
    gathered in `least_squares.solve_dtype` on at most `statistics_images` images."""
    dense_params = dict(dense.named_parameters())
    model.eval(), dense.eval()
    errors, float64_layers = {}, []
    layers = {name: layer for name, layer in _linear_layers(model, masks, "layerwise").items()
              if layer.weight.numel()}  # a removed block's layers have no weights left to solve for
    rows = dense_rows(model, dense)  # a slim model's layers are some of the dense rows
    dtype = getattr(torch, least_squares.solve_dtype)
    images = statistics_subset(images, least_squares.statistics_images)
    inputs = PairedInputs(model, dense, [name.removesuffix(".weight") for name in layers], images,
                          least_squares.batch_size, least_squares.cache)
    for name, layer in progress(layers.items(), desc="layerwise"):
        d, d_dense = layer.in_features, dense_params[name].shape[1]
        zeros = torch.zeros(d, d, dtype=dtype, device=device_of(model))
        stats = {"gram": zeros, "cross": torch.zeros(d, d_dense, dtype=dtype, device=zeros.device)}

        def consume(x_model: torch.Tensor, x_dense: torch.Tensor) -> None:
            x_model, x_dense = x_model.to(dtype), x_dense.to(dtype)
            stats["gram"] += x_model.T @ x_model
            stats["cross"] += x_model.T @ x_dense

        inputs.feed(name.removesuffix(".weight"), consume)
        w_dense = dense_params[name].to(dtype)
        if name in rows:
            w_dense = w_dense.index_select(0, rows[name].to(w_dense.device))
        solved, solved_in = solve_layer(stats["gram"], stats["cross"], w_dense, masks[name], least_squares, name)
        if solved_in != least_squares.solve_dtype:
            float64_layers.append(name)
        before = layer.weight.double()
        layer.weight.copy_(solved.to(layer.weight.dtype))
        errors[name] = float(torch.linalg.norm(solved.double() - before) / torch.linalg.norm(before).clamp_min(1e-300))
    sparsify_(model, masks)
    return {"relative_weight_change": errors, "statistics_images": len(images), "float64_fallbacks": float64_layers}


def logit_kd(model: nn.Module, dense: nn.Module, masks: Masks, images: torch.Tensor, training: "Training",
             alignment: "Alignment") -> dict[str, object]:
    """Distill only the final logits (the root module's output), same budget as STARFISH."""
    train, holdout = split_calibration(images, training.holdout)
    return align_(model, dense, masks, train, holdout, Objective({"": (kd_loss(alignment.temperature), 1.0)}),
                  training)
