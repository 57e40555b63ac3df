"""The device (`model.device`) and the numerics on it for healing and evaluation
(`heal.precision`, `evaluate.precision`).

- `fp32`: float32 matmuls and convolutions throughout (TF32 off on CUDA).
- `tf32`: TF32 tensor-core matmuls and convolutions on CUDA; weights, activations and the
  optimizer stay float32. On a CPU it is plain fp32.
- `bf16`: autocast to bfloat16 on the device; weights and optimizer state stay float32.
- `auto` (the default): `tf32` on CUDA, `fp32` elsewhere. TF32 keeps float32's range and a
  10-bit mantissa in the matmuls only, far below the noise of a 240-image alignment loss, for
  several times the matmul throughput of fp32 on Ampere and later GPUs. bf16 halves activation
  memory as well but rounds every activation; it is opt-in. The faithful preset pins `fp32`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from starfish.errors import StarfishError

PRECISIONS = ("auto", "fp32", "tf32", "bf16")


def resolve_device(spec: str) -> torch.device:
    """`auto` -> the GPU when there is one, else the CPU; `cuda` without a GPU is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise StarfishError(f"model.device={spec!r} but no CUDA device is visible; use cpu or auto")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise StarfishError(f"model.device={spec!r} is not a torch device; use auto, cpu or cuda") from None


def resolve_precision(precision: str, device: torch.device) -> str:
    return ("tf32" if device.type == "cuda" else "fp32") if precision == "auto" else precision


@contextlib.contextmanager
def numerics(precision: str, device: torch.device) -> Iterator[str]:
    """Run the block with `precision` on `device`; yields the resolved name. The TF32 switches are
    process-wide in PyTorch: they are restored on exit."""
    resolved = resolve_precision(precision, device)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = resolved == "tf32"
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolved == "bf16"):
            yield resolved
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
