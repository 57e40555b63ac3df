"""Pure mask functions: tensors in, boolean keep-masks out (True = weight kept).

Every function prunes an exact count: `round(sparsity * n)` entries of each group it ranks
(the whole tensor, each output row, or each block of M inputs), but never a whole layer, and
never a whole row where rows are ranked apart: at least one weight stays (`capped_count`).
Ties are broken by position, so the same scores always give the same mask. Weights of any
rank are ranked as (out_features, everything else), which is how both Linear and Conv
weights are laid out; N:M groups run along input channels (the KRSC layout of sparse kernels).
"""

from __future__ import annotations

import torch

from starfish.catalog import check_sparsity
from starfish.errors import StarfishError

Masks = dict[str, torch.Tensor]  # {parameter name: boolean keep-mask of that parameter's shape}


def _prune_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask over a 2-D score tensor pruning the `count` lowest entries of each row."""
    order = torch.argsort(scores, dim=-1, stable=True)
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(-1, order[..., :count], False)
    return keep


def capped_count(sparsity: float, size: int) -> int:
    """`round(sparsity * size)`, less one if that would take all `size` entries of a group."""
    return min(round(sparsity * size), size - 1)


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the smallest-|w| entries of the whole tensor."""
    check_sparsity(sparsity)
    flat = weight.detach().abs().reshape(1, -1)
    return _prune_lowest(flat, capped_count(sparsity, flat.numel())).reshape(weight.shape)


def global_magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float) -> Masks:
    """Prune the smallest-|w| entries over all tensors together: one threshold, per-layer rates vary."""
    check_sparsity(sparsity)
    flat = torch.cat([w.detach().abs().reshape(-1) for w in weights.values()]).reshape(1, -1)
    keep = _prune_lowest(flat, round(sparsity * flat.numel())).reshape(-1)
    masks, start = {}, 0
    for name, weight in weights.items():
        masks[name] = keep[start : start + weight.numel()].reshape(weight.shape)
        if not masks[name].any():  # one threshold can take a whole layer: its largest weight stays
            masks[name].view(-1)[weight.detach().abs().argmax()] = True
        start += weight.numel()
    return masks


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Wanda's importance |W_ij| * ||x_j||_2, as (out, in) even for conv weights. `input_norm` is
    one norm per column, or (out, columns) where rows see different inputs (grouped convs)."""
    rows = weight.detach().reshape(weight.shape[0], -1).abs()
    norms = input_norm if input_norm.ndim == 2 else input_norm.reshape(1, -1)
    if norms.shape[1] != rows.shape[1] or norms.shape[0] not in (1, rows.shape[0]):
        raise StarfishError(f"wanda: {input_norm.numel()} input norms for {rows.shape[1]} weight columns")
    return rows * norms


def row_mask(scores: torch.Tensor, sparsity: float, shape: torch.Size) -> torch.Tensor:
    """Prune the same count of lowest scores in every output row (Wanda's comparison group)."""
    check_sparsity(sparsity)
    rows = scores.reshape(shape[0], -1)
    return _prune_lowest(rows, capped_count(sparsity, rows.shape[1])).reshape(shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N highest of every M consecutive input channels of each output row (semi-structured
    N:M). A conv weight (out, in, kh, kw) is grouped along `in` at each kernel position: the
    channels-last (KRSC) layout that sparse tensor cores read."""
    if not 0 < n < m:
        raise StarfishError(f"N:M pruning needs 0 < N < M, got {n}:{m}")
    if scores.shape[1] % m:
        raise StarfishError(f"N:M pruning needs the input size {scores.shape[1]} to be a multiple of M={m}")
    channels_last = scores.detach().movedim(1, -1) if scores.ndim > 2 else scores.detach()
    keep = _prune_lowest(channels_last.reshape(-1, m), m - n).reshape(channels_last.shape)
    return keep.movedim(-1, 1).contiguous() if scores.ndim > 2 else keep
