"""Baseline healers STARFISH must beat, on the same calibration images and budget.

- `none`: leave the pruned model as it is.
- `bias-correction`: per layer, in forward order, set the bias so the layer's mean output on
  the calibration set equals the dense network's (Nagel et al., 2019).
- `layerwise`: per layer, in forward order, re-fit the kept weights by least squares so the
  layer reproduces the dense network's output from the inputs it now receives
  (AdaPrune / SparseGPT-style reconstruction, solved exactly per output row).
- `logit-kd`: distill the dense model's logits only, same optimizer and schedule as STARFISH.

The two layer-by-layer baselines keep one layer's statistics in memory at a time, accumulated
from paired forward passes of the dense and the partially healed model.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from starfish.capture import ActivationCapture
from starfish.errors import StarfishError
from starfish.models import device_of
from starfish.healing import register_healer
from starfish.healing.common import align_, kd_loss
from starfish.progress import progress
from starfish.pruning import sparsify_

if TYPE_CHECKING:
    from starfish.config import HealConfig

log = logging.getLogger(__name__)

Masks = dict[str, torch.Tensor]


@register_healer("none")
def no_healing(model: nn.Module, dense: nn.Module, masks: Masks, images: torch.Tensor,
               cfg: "HealConfig") -> dict[str, object]:
    return {}


def _linear_layers(model: nn.Module, masks: Masks, method: str) -> dict[str, nn.Linear]:
    """The masked layers in forward (module registration) order, whatever order `masks` comes in."""
    modules = dict(model.named_modules())
    unknown = [name for name in masks if name.removesuffix(".weight") not in modules]
    if unknown:
        raise StarfishError(f"{method}: masks name {unknown[0]}, which is not a layer of {type(model).__name__}")
    layers = {f"{name}.weight": module for name, module in modules.items() if f"{name}.weight" in masks}
    bad = [name for name, layer in layers.items() if not isinstance(layer, nn.Linear)]
    if bad:
        raise StarfishError(f"{method} heals Linear layers only, not {bad[0]}; heal CNNs with starfish or logit-kd")
    return layers


@torch.no_grad()
def paired_inputs(model: nn.Module, dense: nn.Module, layer: str, images: torch.Tensor, batch_size: int,
                  consume: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
    """Feed `consume(x_model, x_dense)` the inputs of `layer` in both models, batch by batch."""
    with ActivationCapture(model, [layer], inputs=True) as ours, ActivationCapture(dense, [layer], inputs=True) as ref:
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device_of(model))
            model(batch)
            dense(batch)
            x_model, x_dense = ours.values[layer], ref.values[layer]
            consume(x_model.reshape(-1, x_model.shape[-1]).double(), x_dense.reshape(-1, x_dense.shape[-1]).double())


@register_healer("bias-correction")
@torch.no_grad()
def bias_correction(model: nn.Module, dense: nn.Module, masks: Masks, images: torch.Tensor,
                    cfg: "HealConfig") -> dict[str, object]:
    """b <- b_dense + W_dense E[x_dense] - W_pruned E[x_pruned], layer by layer."""
    dense_params = dict(dense.named_parameters())
    corrected = 0
    model.eval(), dense.eval()
    for name, layer in progress(_linear_layers(model, masks, "bias-correction").items(), desc="bias-correction"):
        if layer.bias is None:
            log.warning("%s has no bias; bias-correction skips it", name)
            continue
        sums = {"model": 0.0, "dense": 0.0, "count": 0}

        def consume(x_model: torch.Tensor, x_dense: torch.Tensor) -> None:
            sums["model"] = sums["model"] + x_model.sum(0)
            sums["dense"] = sums["dense"] + x_dense.sum(0)
            sums["count"] += x_model.shape[0]

        layer_name = name.removesuffix(".weight")
        paired_inputs(model, dense, layer_name, images, cfg.batch_size, consume)
        mean_model, mean_dense = sums["model"] / sums["count"], sums["dense"] / sums["count"]
        w_dense = dense_params[name].double()
        b_dense = dense_params[f"{layer_name}.bias"].double()
        target = b_dense + w_dense @ mean_dense - layer.weight.double() @ mean_model
        layer.bias.copy_(target.to(layer.bias.dtype))
        corrected += 1
    return {"layers_corrected": corrected}


def masked_least_squares(gram: torch.Tensor, cross: torch.Tensor, w_dense: torch.Tensor, keep: torch.Tensor,
                         damp: float, chunk: int = 256) -> torch.Tensor:
    """Per output row r, the kept weights minimizing ||X_S w_S - X_dense w_dense[r]||^2 + damping.

    `gram` = X^T X over the pruned model's inputs, `cross` = X^T X_dense. Row r solves
    (G_SS + lambda I) w_S = (C w_dense[r])_S, with lambda = damp * mean(diag G); pruned
    entries come out exactly zero. Rows are solved in batches of `chunk`.
    """
    lam = damp * torch.diagonal(gram).mean().clamp_min(1e-12)
    rhs_all = w_dense @ cross.T  # row r: C w_dense[r]
    out = torch.zeros_like(w_dense)
    for start in range(0, w_dense.shape[0], chunk):
        k = keep[start : start + chunk].to(gram.device, gram.dtype)  # (rows, d)
        system = gram.unsqueeze(0) * (k.unsqueeze(2) * k.unsqueeze(1))
        system = system + torch.diag_embed(k * lam + (1 - k))
        rhs = (rhs_all[start : start + chunk] * k).unsqueeze(-1)
        out[start : start + chunk] = torch.linalg.solve(system, rhs).squeeze(-1) * k
    return out


@register_healer("layerwise")
@torch.no_grad()
def layerwise(model: nn.Module, dense: nn.Module, masks: Masks, images: torch.Tensor,
              cfg: "HealConfig") -> dict[str, object]:
    """Sequential per-layer least-squares reconstruction of the kept weights."""
    dense_params = dict(dense.named_parameters())
    model.eval(), dense.eval()
    errors = {}
    for name, layer in progress(_linear_layers(model, masks, "layerwise").items(), desc="layerwise"):
        d = layer.in_features
        zeros = torch.zeros(d, d, dtype=torch.float64, device=device_of(model))
        stats = {"gram": zeros, "cross": zeros.clone()}

        def consume(x_model: torch.Tensor, x_dense: torch.Tensor) -> None:
            stats["gram"] += x_model.T @ x_model
            stats["cross"] += x_model.T @ x_dense

        paired_inputs(model, dense, name.removesuffix(".weight"), images, cfg.batch_size, consume)
        w_dense = dense_params[name].double()
        solved = masked_least_squares(stats["gram"], stats["cross"], w_dense, masks[name], cfg.damp)
        layer.weight.copy_(solved.to(layer.weight.dtype))
        errors[name] = float(torch.linalg.norm(solved - w_dense) / torch.linalg.norm(w_dense))
    sparsify_(model, masks)
    return {"relative_weight_change": errors}


@register_healer("logit-kd")
def logit_kd(model: nn.Module, dense: nn.Module, masks: Masks, images: torch.Tensor,
             cfg: "HealConfig") -> dict[str, object]:
    """Distill only the final logits (the root module's output), same budget as STARFISH."""
    return align_(model, dense, masks, images, [""], kd_loss(cfg.temperature), cfg)
