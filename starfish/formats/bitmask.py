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
    """(state, masks) from the compressed checkpoint's tensors: exactly what was compressed."""
    names = sorted(key.removesuffix(".bitmask") for key in tensors if key.endswith(".bitmask"))
    state = {key: value for key, value in tensors.items() if not key.endswith(_PARTS)}
    masks = {}
    for name in names:
        parts = [tensors.get(name + part) for part in _PARTS]
        if any(part is None for part in parts):
            raise StarfishError(f"compressed weight {name} lacks one of {', '.join(_PARTS)}; export it again")
        values, bitmask, shape = parts
        shape = tuple(int(v) for v in shape.tolist())
        rows, columns = shape[0], int(np.prod(shape[1:]))
        keep = torch.from_numpy(np.unpackbits(bitmask.numpy(), axis=-1, count=columns, bitorder="little").astype(bool))
        if keep.shape != (rows, columns) or int(keep.sum()) != values.numel():
            raise StarfishError(f"compressed weight {name}: its bitmask and values do not match; export it again")
        weight = torch.zeros(rows, columns, dtype=values.dtype)
        weight[keep] = values
        state[name], masks[name] = weight.reshape(shape), keep.reshape(shape)
    return state, masks


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
