"""Registered pruners: each turns a model, its scope and a target sparsity into keep-masks.

A pruner never changes the model; `sparsify_` applies the masks. Scope is chosen by a
`(module name, module) -> bool` predicate; the default keeps to the Linear layers inside the
blocks (attn.qkv, attn.proj, mlp.fc1, mlp.fc2) and the convolutions inside CNN stages, never
the patch embedding, the stem or the head.
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol

import torch
from torch import nn

from starfish.capture import ActivationCapture, stage_names
from starfish.errors import StarfishError
from starfish.models import device_of
from starfish.pruning import masks as M

log = logging.getLogger(__name__)

Masks = dict[str, torch.Tensor]
ScopePredicate = Callable[[str, nn.Module], bool]
TRANSFORMER_LEAVES = ("qkv", "proj", "fc1", "fc2")
NM_GROUP_SIZES = (4, 8, 10, 16, 20)


def default_scope(model: nn.Module) -> ScopePredicate:
    """The predicate for `model`'s default scope: prunable layers inside its stages.

    Stages, not blocks: a stage may hold layers outside its blocks (ConvNeXt's downsample conv).
    Convolutions are in unless depthwise (`groups == in_channels`, the authors' rule), so grouped
    convolutions (RegNet's) are pruned too.
    """
    try:
        prefixes = tuple(f"{name}." for name in stage_names(model))
    except StarfishError as exc:
        raise StarfishError(f"{exc}, so the default pruning scope (the layers inside its stages) is empty") from None

    def in_scope(name: str, module: nn.Module) -> bool:
        if not name.startswith(prefixes):
            return False
        if isinstance(module, nn.Linear):
            return name.rsplit(".", 1)[-1] in TRANSFORMER_LEAVES
        return isinstance(module, nn.Conv2d) and (module.groups != module.in_channels or module.in_channels == 1)

    return in_scope


def scope_weights(model: nn.Module, predicate: ScopePredicate | None = None) -> dict[str, nn.Parameter]:
    """`{parameter name: weight}` of every module the predicate selects, in forward order."""
    predicate = predicate or default_scope(model)
    weights = {f"{name}.weight": module.weight for name, module in model.named_modules()
               if name and predicate(name, module) and isinstance(getattr(module, "weight", None), nn.Parameter)}
    if not weights:
        raise StarfishError(f"the pruning scope selects no layers of {type(model).__name__}")
    return weights


@torch.no_grad()
def sparsify_(model: nn.Module, masks: Masks) -> nn.Module:
    """Zero every weight whose mask is False, in place."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].device, params[name].dtype))
    return model


class Pruner(Protocol):
    def __call__(self, model: nn.Module, weights: dict[str, nn.Parameter], sparsity: float,
                 images: torch.Tensor | None, *, nm: str, global_ranking: bool) -> Masks: ...


PRUNERS: dict[str, Pruner] = {}


def register_pruner(name: str) -> Callable[[Pruner], Pruner]:
    def decorate(fn: Pruner) -> Pruner:
        PRUNERS[name] = fn
        return fn

    return decorate


def get_pruner(name: str) -> Pruner:
    if name not in PRUNERS:
        raise StarfishError(f"unknown pruner {name!r}; use one of {sorted(PRUNERS)}")
    return PRUNERS[name]


@register_pruner("magnitude")
def magnitude(model: nn.Module, weights: dict[str, nn.Parameter], sparsity: float,
              images: torch.Tensor | None, *, nm: str = "2:4", global_ranking: bool = False) -> Masks:
    """Smallest |w| first, per layer (every layer at exactly `sparsity`) or globally over the scope."""
    if global_ranking:
        return M.global_magnitude_masks(dict(weights), sparsity)
    _warn_capped(weights, sparsity, per_row=False)
    return {name: M.magnitude_mask(weight, sparsity) for name, weight in weights.items()}


class InputNormAccumulator:
    """Running sum of squared inputs per input feature of each layer (Wanda's ||x_j||_2).

    Linear inputs are (..., features), whatever their rank: ConvNeXt feeds its MLP Linears
    channels-last (N, H, W, C) maps. Conv inputs (N, C, H, W), the layers named in
    `channels_first`, count per channel.
    """

    def __init__(self, channels_first: set[str] = frozenset()) -> None:
        self.sq_sums: dict[str, torch.Tensor] = {}
        self.channels_first = channels_first

    def __call__(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().float()
        flat = x.movedim(1, -1).reshape(-1, x.shape[1]) if name in self.channels_first else x.reshape(-1, x.shape[-1])
        self.sq_sums[name] = self.sq_sums.get(name, 0) + flat.pow(2).sum(dim=0)

    def norms(self, name: str) -> torch.Tensor:
        return self.sq_sums[name].sqrt()


@torch.no_grad()
def input_norms(model: nn.Module, layer_names: list[str], images: torch.Tensor,
                batch_size: int = 64) -> dict[str, torch.Tensor]:
    """||x_j||_2 over all calibration tokens of the inputs to each named layer."""
    modules = dict(model.named_modules())
    accumulator = InputNormAccumulator({name for name in layer_names if isinstance(modules[name], nn.Conv2d)})
    with ActivationCapture(model, layer_names, inputs=True, on_value=accumulator):
        for start in range(0, images.shape[0], batch_size):
            model(images[start : start + batch_size].to(device_of(model)))
    return {name: accumulator.norms(name) for name in layer_names}


@register_pruner("wanda")
def wanda(model: nn.Module, weights: dict[str, nn.Parameter], sparsity: float,
          images: torch.Tensor | None, *, nm: str = "2:4", global_ranking: bool = False) -> Masks:
    """Wanda: |W| * ||x|| ranked within each output row, norms from the calibration images.

    For a conv weight (out, in, kh, kw) each input channel's norm covers its kh*kw columns.
    """
    if images is None:
        raise StarfishError("wanda needs calibration images; pass a calibration manifest")
    layers = [name.removesuffix(".weight") for name in weights]
    norms = input_norms(model, layers, images)
    masks = {}
    for (name, weight), layer in zip(weights.items(), layers):
        norm = norms[layer].repeat_interleave(weight[0, 0].numel()) if weight.ndim == 4 else norms[layer]
        masks[name] = M.row_mask(M.wanda_scores(weight, norm), sparsity, weight.shape)
    _warn_capped(weights, sparsity, per_row=True)
    return masks


def _warn_capped(weights: dict[str, nn.Parameter], sparsity: float, per_row: bool) -> None:
    """Name the layers held below `sparsity` because it would have pruned whole rows or the layer."""
    capped = [name for name, weight in weights.items()
              if round(sparsity * (weight[0].numel() if per_row else weight.numel()))
              >= (weight[0].numel() if per_row else weight.numel())]
    if capped:
        log.warning("prune.sparsity=%g would prune every weight of %s%s: each keeps one weight per %s",
                    sparsity, capped[0], f" and {len(capped) - 1} more layers" if len(capped) > 1 else "",
                    "row" if per_row else "layer")


@register_pruner("nm")
def n_of_m(model: nn.Module, weights: dict[str, nn.Parameter], sparsity: float,
           images: torch.Tensor | None, *, nm: str = "2:4", global_ranking: bool = False) -> Masks:
    """Semi-structured N:M by magnitude; `sparsity` must equal 1 - N/M."""
    n, m = M.parse_nm(nm)
    if abs(sparsity - (1 - n / m)) > 1e-9:
        raise StarfishError(f"prune.nm={nm} gives sparsity {1 - n / m:g}, not prune.sparsity={sparsity:g}; "
                            f"set prune.sparsity={1 - n / m:g} or pick another N:M")
    tiled = {name: weight for name, weight in weights.items() if weight.shape[1] % m == 0}
    if not tiled:
        raise StarfishError(f"prune.nm={nm}: no layer of the pruning scope has a multiple of {m} input channels; "
                            "pick another M")
    if len(tiled) < len(weights):
        skipped = [f"{name} ({weight.shape[1]} inputs)" for name, weight in weights.items() if name not in tiled]
        log.warning("prune.nm=%s leaves %d layers dense, whose input channels do not tile by %d: %s", nm, len(skipped),
                    m, ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    return {name: M.nm_mask(weight.detach().abs(), n, m) for name, weight in tiled.items()}


def nm_pattern_for(sparsity: float) -> str:
    """The N:M pattern with the smallest group size in NM_GROUP_SIZES that gives `sparsity` exactly."""
    for m in NM_GROUP_SIZES:
        n = (1 - sparsity) * m
        if abs(n - round(n)) < 1e-9 and 0 < round(n) < m:
            return f"{round(n)}:{m}"
    raise StarfishError(f"no N:M pattern with M in {NM_GROUP_SIZES} gives sparsity {sparsity:g}")


def prune(model: nn.Module, method: str, sparsity: float, images: torch.Tensor | None = None,
          predicate: ScopePredicate | None = None, nm: str = "2:4", global_ranking: bool = False) -> Masks:
    """Masks for `model`'s scope from the registered pruner `method` (the model is not changed)."""
    M.check_sparsity(sparsity)
    pruner = get_pruner(method)
    weights = scope_weights(model, predicate)
    masks = pruner(model, weights, sparsity, images, nm=nm, global_ranking=global_ranking)
    log.info("%s pruned %d layers to %.3f", method, len(masks), sparsity)
    return masks
