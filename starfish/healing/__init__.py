"""Healers: functions with one signature, chosen by their entries in `catalog.HEALERS`, that heal a
pruned model in place.

    heal_(model, dense, masks, images, cfg) -> report

`model` is the pruned model (changed in place), `dense` the original, `masks` the keep-masks
of the pruned weights (True = kept), `images` the unlabeled calibration images, `cfg` a
`HealConfig`. `heal_` reads the fields that set how any heal runs (precision, checkpointing,
compile, the int8 scheme) and hands the healer only the parts of `cfg` its entry reads
(config.Training, Alignment, LeastSquares). Every healer keeps each pruned weight exactly zero.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from starfish.capture import block_names
from starfish.catalog import HEALERS
from starfish.errors import StarfishError
from starfish.healing.common import Healer
from starfish.models import device_of
from starfish.precision import numerics
from starfish.pruning.masks import Masks
from starfish.quant import fake_quantized
from starfish.registry import load

if TYPE_CHECKING:
    from starfish.config import HealConfig

log = logging.getLogger(__name__)


def heal_(model: nn.Module, dense: nn.Module, masks: Masks, images: torch.Tensor,
          cfg: "HealConfig") -> dict[str, object]:
    """Heal `model` with the healer `cfg.method`, in place, in `cfg.precision`, with
    `cfg.grad_checkpointing` and `cfg.compile`, and through the int8 scheme `cfg.quant` (its
    Linear and Conv layers fake-quantized, static ranges measured on all of `images`); returns
    its report. The weights it leaves are float: the quantize step makes the int8 model."""
    log.info("heal config: %s", json.dumps(dataclasses.asdict(cfg), separators=(",", ":")))
    with numerics(cfg.precision, device_of(model)), gradient_checkpointing(model, cfg.grad_checkpointing), \
            compiled_blocks(model, cfg.compile), fake_quantized(model, cfg.quant, images, cfg.batch_size):
        spec = HEALERS.get(cfg.method)
        healer: Healer = load(spec.target)
        return healer(model, dense, masks, images, **{part: getattr(cfg, part) for part in spec.reads})


@contextlib.contextmanager
def compiled_blocks(model: nn.Module, enabled: bool) -> Iterator[None]:
    """`torch.compile` of each block's `forward` for the heal: the blocks are where the time goes,
    and compiling `forward` rather than the module call keeps the capture hooks outside the
    graphs. The first steps pay for the compilation; the model is plain again afterwards."""
    if not enabled:
        yield
        return
    try:
        blocks = [model.get_submodule(name) for name in block_names(model)]
    except StarfishError as exc:
        raise StarfishError(f"heal.compile compiles the model's blocks, but {exc}; set heal.compile=false") from None
    for block in blocks:
        block.forward = torch.compile(block.forward)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # the instance attribute: the class's forward again


@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """timm's gradient checkpointing for the block: block activations are recomputed in the
    backward pass instead of kept, for about one more forward pass per step."""
    if not enabled:
        yield
        return
    if not hasattr(model, "set_grad_checkpointing"):
        raise StarfishError(f"{type(model).__name__} has no gradient checkpointing (timm's set_grad_checkpointing); "
                            "set heal.grad_checkpointing=false")
    model.set_grad_checkpointing(True)
    try:
        yield
    finally:
        model.set_grad_checkpointing(False)


__all__ = ["Healer", "heal_"]
