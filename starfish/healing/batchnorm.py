"""How BatchNorm layers take part in a heal (`heal.batchnorm`).

- `train`: as the authors' code has it, the pruned model's BatchNorm layers normalize each
  training batch with its own statistics and update their running statistics as they go
  (their momentum), so the healed model ends with statistics of its own activations.
- `frozen`: eval mode throughout: the dense model's running statistics, never updated.
- `recalibrate`: frozen during the heal, then the running statistics re-estimated in one pass
  over the calibration training images (a cumulative average, no gradients).

Held-out checks always run in eval mode (running statistics), as the healed model is served,
and never update the statistics. The running statistics are part of every state a heal keeps
or restores (`snapshot`). The dense model is never touched. Models without BatchNorm heal the
same in every mode.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from starfish.calibration import Images
from starfish.models import device_of


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    return bool(batchnorm_layers(model))


def batchnorm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The running statistics of every BatchNorm layer, by buffer name."""
    layers = {id(m) for m in batchnorm_layers(model)}
    return {f"{name}.{buffer}": value for name, module in model.named_modules() if id(module) in layers
            for buffer, value in module.named_buffers(recurse=False)}


def set_batchnorm_training_(model: nn.Module, training: bool) -> nn.Module:
    """Put the BatchNorm layers alone in train (batch statistics) or eval mode."""
    for layer in batchnorm_layers(model):
        layer.train(training)
    return model


@contextlib.contextmanager
def evaluation(model: nn.Module) -> Iterator[None]:
    """Every BatchNorm layer in eval mode inside the block (a held-out check), as it was after."""
    layers = batchnorm_layers(model)
    modes = [layer.training for layer in layers]
    for layer in layers:
        layer.eval()
    try:
        yield
    finally:
        for layer, mode in zip(layers, modes):
            layer.train(mode)


@torch.no_grad()
def recalibrate_(model: nn.Module, images: "Images", batch_size: int) -> nn.Module:
    """Re-estimate every BatchNorm layer's running statistics on `images`: reset, then one pass
    in train mode with a cumulative average (momentum None), so each image counts the same."""
    layers = batchnorm_layers(model)
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
        layer.train()
    try:
        for start in range(0, images.shape[0], batch_size):
            model(images[torch.arange(start, min(start + batch_size, images.shape[0]))].to(device_of(model)))
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
            layer.eval()
    return model
