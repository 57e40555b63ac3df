"""Healers: registered functions with one signature that heal a pruned model in place.

    heal_(model, dense, masks, images, cfg) -> report

`model` is the pruned model (changed in place), `dense` the original, `masks` the keep-masks
of the pruned weights (True = kept), `images` the unlabeled calibration images, `cfg` a
`HealConfig`. Every healer keeps each pruned weight exactly zero.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

import torch
from torch import nn

from starfish.errors import StarfishError
from starfish.models import device_of
from starfish.precision import numerics

if TYPE_CHECKING:
    from starfish.config import HealConfig


class Healer(Protocol):
    def __call__(self, model: nn.Module, dense: nn.Module, masks: dict[str, torch.Tensor],
                 images: torch.Tensor, cfg: "HealConfig") -> dict[str, object]: ...


HEALERS: dict[str, Healer] = {}


def register_healer(name: str) -> Callable[[Healer], Healer]:
    def decorate(fn: Healer) -> Healer:
        HEALERS[name] = fn
        return fn

    return decorate


def get_healer(name: str) -> Healer:
    if name not in HEALERS:
        raise StarfishError(f"unknown healer {name!r}; use one of {sorted(HEALERS)}")
    return HEALERS[name]


def heal_(model: nn.Module, dense: nn.Module, masks: dict[str, torch.Tensor], images: torch.Tensor,
          cfg: "HealConfig") -> dict[str, object]:
    """Heal `model` with the registered healer `cfg.method`, in place, in `cfg.precision` and with
    `cfg.grad_checkpointing`; returns its report."""
    with numerics(cfg.precision, device_of(model)), gradient_checkpointing(model, cfg.grad_checkpointing):
        return get_healer(cfg.method)(model, dense, masks, images, cfg)


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


from starfish.healing import baselines, starfish  # noqa: E402,F401  (registers the healers)

__all__ = ["HEALERS", "Healer", "get_healer", "heal_", "register_healer"]
