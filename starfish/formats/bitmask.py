"""The compressed checkpoint: starfish's own sparse-bitmask layout, in safetensors.

Each pruned weight `W` (rows = output features, columns = everything else) is stored as
- `W.compressed`: 1-D, its kept values in row-major order, in the weight's dtype;
- `W.bitmask`: uint8 (rows, ceil(columns / 8)), bit j % 8 of byte j // 8 set = column j kept
  (little bit order, as `numpy.packbits(..., bitorder="little")`);
- `W.shape`: int64, the weight's shape.
Every other tensor is stored as it is; the metadata is the checkpoint's plus `"format":
"sparse-bitmask"`. The idea is compressed-tensors' bitmask compression, but the layout is not
theirs and their readers do not take it: their 0.14 release also stores per-row offsets under
other key names and packs conv masks along the last axis, and their current release has no
bitmask compressor. Only starfish reads this format.

The bitmask is the mask, so a kept weight that happens to be zero stays kept. Pruned entries
read back as +0.0, which is what `sparsify_` writes, so the round trip of a pruned or healed
checkpoint is byte for byte.

A pruned weight takes (1 - s) x itemsize + 1/8 bytes per entry: at float32, 0.53x of dense at
50% sparsity, 0.28x at 75%, 0.13x at 90%.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from starfish.errors import StarfishError

FORMAT = "sparse-bitmask"
_PARTS = (".compressed", ".bitmask", ".shape")


def compress(state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of the compressed checkpoint; every masked weight must be zero where pruned."""
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name not in masks:
            tensors[name] = value
            continue
        keep = masks[name].to(torch.bool).reshape(value.shape[0], -1)
        rows = value.reshape(value.shape[0], -1)
        if rows[~keep].any():
            raise StarfishError(f"{name} has nonzero weights where its mask prunes them, so the masks do not hold; "
                                "export the checkpoint that pruning or healing wrote")
        tensors[name + ".compressed"] = rows[keep].contiguous()
        tensors[name + ".bitmask"] = torch.from_numpy(np.packbits(keep.numpy(), axis=-1, bitorder="little"))
        tensors[name + ".shape"] = torch.tensor(value.shape, dtype=torch.int64)
    return tensors


def decompress(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state, masks) from the compressed checkpoint's tensors: exactly what was compressed. Each
    weight's parts are checked against each other before its dense tensor is allocated, so a
    damaged or edited file is an error, never a silent zero or a huge allocation."""
    names = sorted({key.removesuffix(part) for key in tensors for part in _PARTS if key.endswith(part)})
    state = {key: value for key, value in tensors.items() if not key.endswith(_PARTS)}
    masks = {}
    for name in names:
        values, bitmask, shape = _checked_parts(tensors, name)
        if name in state:
            raise StarfishError(f"compressed weight {name} is also stored dense, so the file is ambiguous; "
                                "export the checkpoint again")
        rows, columns = shape[0], math.prod(shape[1:])
        keep = torch.from_numpy(np.unpackbits(bitmask.numpy(), axis=-1, bitorder="little").astype(bool))
        if keep[:, columns:].any():
            raise StarfishError(f"compressed weight {name}: its bitmask sets bits past its {columns} columns; "
                                "the file is damaged, export it again")
        keep = keep[:, :columns]
        if int(keep.sum()) != values.numel():
            raise StarfishError(f"compressed weight {name}: its bitmask keeps {int(keep.sum())} entries but "
                                f"{values.numel()} values are stored; the file is damaged, export it again")
        weight = torch.zeros(rows, columns, dtype=values.dtype)
        weight[keep] = values
        state[name], masks[name] = weight.reshape(shape), keep.reshape(shape)
    return state, masks


def _checked_parts(tensors: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """A compressed weight's (values, bitmask, shape), after the checks that bound what it may
    allocate: the bitmask's own bytes fix the dense size, and the shape must agree with them."""
    def damaged(problem: str) -> StarfishError:
        return StarfishError(f"compressed weight {name}: {problem}; the file is damaged, export it again")

    parts = {part: tensors.get(name + part) for part in _PARTS}
    missing = [name + part for part, value in parts.items() if value is None]
    if missing:
        raise damaged(f"lacks {', '.join(missing)} (a compressed weight needs all of {', '.join(_PARTS)})")
    values, bitmask, shape = parts[".compressed"], parts[".bitmask"], parts[".shape"]
    if shape.dtype != torch.int64 or shape.dim() != 1 or not 2 <= shape.numel() <= 8:
        raise damaged(f".shape must be 2 to 8 int64 sizes, not {shape.dtype} of shape {tuple(shape.shape)}")
    dims = tuple(int(v) for v in shape.tolist())
    if min(dims) < 1:
        raise damaged(f".shape {list(dims)} has a size below 1")
    if bitmask.dtype != torch.uint8 or bitmask.dim() != 2:
        raise damaged(f".bitmask must be 2-D uint8, not {bitmask.dtype} of shape {tuple(bitmask.shape)}")
    columns = math.prod(dims[1:])
    if tuple(bitmask.shape) != (dims[0], -(-columns // 8)):
        raise damaged(f".bitmask is {tuple(bitmask.shape)} but .shape {list(dims)} needs "
                      f"({dims[0]}, {-(-columns // 8)})")
    if values.dim() != 1 or not values.is_floating_point():
        raise damaged(f".compressed must be 1-D floating point, not {values.dtype} of shape {tuple(values.shape)}")
    return values, bitmask, dims  # finite values: `checkpoint.read_checkpoint` checks every tensor it reads


def pruned_bytes(tensors: dict[str, torch.Tensor]) -> tuple[int, float]:
    """(bytes the pruned weights take in `tensors`, the bitmask ideal: kept x itemsize + entries / 8)."""
    actual, ideal = 0, 0.0
    for key, value in tensors.items():
        if key.endswith(_PARTS):
            actual += value.numel() * value.element_size()
        if key.endswith(".compressed"):
            entries = int(np.prod(tensors[key.removesuffix(".compressed") + ".shape"].tolist()))
            ideal += value.numel() * value.element_size() + entries / 8
    return actual, ideal
