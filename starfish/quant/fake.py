"""The int8 scheme in torch: fake-quantized Linear and Conv layers, as onnxruntime computes them.

`fake_quantized(model, mode, images)` swaps each layer's forward for one that quantizes its
input and weight and dequantizes them again (torch's own `fake_quantize_per_*_affine`, whose
gradient is the straight-through estimator: identity inside the range, zero outside), so a heal
trains the float weights against the error the served int8 model will make. The scale and zero
point formulas are onnxruntime's (`quantization.quant_utils.compute_scale_zp` for weights and
static ranges, the DynamicQuantizeLinear kernel for dynamic ones), including where they compute
in float64 before storing float32.

Lifecycle (`FakeQuant`): entering patches the layers (static: after measuring every layer
input's range over `images` on the float model); `calibrate()` measures the ranges again (a heal
calls it before each held-out check, as the weights have moved); leaving restores each layer's
own forward. The parameters are never replaced, so masks and optimizers see the same tensors.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from starfish.catalog import QUANT_MODES
from starfish.errors import StarfishError

log = logging.getLogger(__name__)

WEIGHT_QMIN, WEIGHT_QMAX = -127, 127  # int8, symmetric: onnxruntime's symmetric int8 range
INPUT_QMIN, INPUT_QMAX = 0, 255  # uint8, asymmetric
# What each mode quantizes: the layers exported as MatMul (or Gemm) and Conv with a constant
# weight. Dynamic quantization leaves Conv in float: onnxruntime's ConvInteger takes one weight
# scale per tensor and ran resnet50 at 0.17x its float speed.
LAYER_TYPES = {"int8-dynamic": (nn.Linear,), "int8-static": (nn.Linear, nn.Conv1d, nn.Conv2d)}
_TINY = torch.finfo(torch.float32).tiny
_ATTRIBUTE = "_starfish_fake_quant"


def quantized_layers(model: nn.Module, mode: str) -> list[str]:
    """The layers `mode` quantizes, by name: every Linear, and for int8-static every Conv too; not
    the weightless ones of a block `prune.depth` removed, which never run."""
    return [name for name, module in model.named_modules()
            if isinstance(module, LAYER_TYPES[mode]) and module.weight.numel()]


def weight_scale(weight: torch.Tensor) -> torch.Tensor:
    """Per output channel (dim 0): max |w| / 127, computed in float64 and stored in float32; 1 for
    an all-zero channel (onnxruntime's fallback below the smallest normal float)."""
    absmax = weight.detach().float().abs().reshape(weight.shape[0], -1).amax(dim=1)
    scale = (absmax.double() * 2 / (WEIGHT_QMAX - WEIGHT_QMIN)).float()
    return torch.where(scale < _TINY, torch.ones_like(scale), scale)


def fake_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the int8 model holds it: round(w / scale) clamped to [-127, 127], times scale."""
    scale = weight_scale(weight)
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight.float(), scale, zero, 0, WEIGHT_QMIN,
                                                  WEIGHT_QMAX).to(weight.dtype)


def activation_qparams(low: float, high: float) -> tuple[float, int]:
    """(scale, zero point) of a uint8 range [low, high] widened to hold 0, as onnxruntime's
    `compute_scale_zp` sets them for a static range: float64 arithmetic, scale stored float32."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / (INPUT_QMAX - INPUT_QMIN)
    if scale < _TINY:
        return 1.0, 0
    return float(np.float32(scale)), round(INPUT_QMIN - low / scale)  # round: half to even, as numpy's


def _fake_input(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, INPUT_QMIN, INPUT_QMAX).to(x.dtype)


def dynamic_input(x: torch.Tensor) -> torch.Tensor:
    """The input as DynamicQuantizeLinear quantizes it: its own range, widened to hold 0, in
    float32 arithmetic; the zero point rounded half to even."""
    values = x.detach().float()
    low, high = values.min().clamp(max=0), values.max().clamp(min=0)
    scale = (high - low) / (INPUT_QMAX - INPUT_QMIN)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = (INPUT_QMIN - low / scale).round().clamp(INPUT_QMIN, INPUT_QMAX).to(torch.int32)
    return _fake_input(x, scale.reshape(1), zero.reshape(1))


class FakeQuant:
    """The scheme applied to `model`'s Linear and Conv layers while it is entered (see the module
    docstring). `images` (N, C, H, W, indexable by slices) are the calibration split; static
    ranges are measured over all of them, `batch_size` at a time."""

    def __init__(self, model: nn.Module, mode: str, images: Any = None, batch_size: int = 32) -> None:
        if mode not in QUANT_MODES[1:]:
            raise StarfishError(f"quantization mode {mode!r}: use one of {list(QUANT_MODES[1:])}")
        if mode == "int8-static" and images is None:
            raise StarfishError("int8-static quantization measures its ranges on calibration images; pass them")
        self.model, self.mode, self.images, self.batch_size = model, mode, images, batch_size
        self.layers = {name: model.get_submodule(name) for name in quantized_layers(model, mode)}
        if not self.layers:
            raise StarfishError(f"{type(model).__name__} has no layer that {mode} quantizes; set quant.mode=none")
        self.ranges: dict[str, tuple[float, float]] = {}
        self._qparams: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.enabled = False

    def __enter__(self) -> "FakeQuant":
        if self.mode == "int8-static":
            self.calibrate()
        for name, layer in self.layers.items():
            layer.forward = self._forward(name, layer)
        setattr(self.model, _ATTRIBUTE, self)
        self.enabled = True
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers.values():
            layer.__dict__.pop("forward", None)  # the instance attribute: the class's forward again
        self.model.__dict__.pop(_ATTRIBUTE, None)
        self.enabled = False

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The float model for the block (what static ranges are measured on)."""
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled

    @torch.no_grad()
    def calibrate(self) -> dict[str, tuple[float, float]]:
        """Every layer input's min and max over the calibration images, on the float model in
        eval mode (BatchNorm's statistics untouched), as onnxruntime's MinMax calibration measures
        them on the float ONNX model; sets the static scales and zero points from them."""
        if self.mode != "int8-static":
            return {}
        seen: dict[str, list[float]] = {}

        def record(name: str):
            def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
                x = inputs[0].detach()
                low, high = float(x.min()), float(x.max())
                if name in seen:
                    seen[name] = [min(seen[name][0], low), max(seen[name][1], high)]
                else:
                    seen[name] = [low, high]
            return hook

        modes = {module: module.training for module in self.model.modules()}
        handles = [layer.register_forward_pre_hook(record(name)) for name, layer in self.layers.items()]
        device = next(self.model.parameters()).device
        try:
            self.model.eval()
            with self.disabled():
                for start in range(0, self.images.shape[0], self.batch_size):
                    self.model(self.images[start:start + self.batch_size].to(device))
        finally:
            for handle in handles:
                handle.remove()
            for module, training in modes.items():
                module.training = training
        missing = sorted(set(self.layers) - set(seen))
        if missing:
            raise StarfishError(f"{missing[0]} and {len(missing) - 1} more layers never ran on the calibration "
                                "images, so they have no range to quantize with; set quant.mode=int8-dynamic")
        self.ranges = {name: (low, high) for name, (low, high) in seen.items()}
        self._qparams = {}
        for name, (low, high) in self.ranges.items():
            scale, zero = activation_qparams(low, high)
            self._qparams[name] = (torch.tensor([scale], device=device), torch.tensor([zero], dtype=torch.int32,
                                                                                        device=device))
        return self.ranges

    def _forward(self, name: str, layer: nn.Module):
        forward = type(layer).forward.__get__(layer)

        def quantized(x: torch.Tensor) -> torch.Tensor:
            if not self.enabled:
                return forward(x)
            if self.mode == "int8-dynamic":
                x = dynamic_input(x)
            else:
                x = _fake_input(x, *self._qparams[name])
            weight = fake_weight(layer.weight)
            if isinstance(layer, nn.Linear):
                return F.linear(x, weight, layer.bias)
            return layer._conv_forward(x, weight, layer.bias)

        return quantized


def fake_quantized(model: nn.Module, mode: str, images: Any = None, batch_size: int = 32
                   ) -> contextlib.AbstractContextManager[FakeQuant | None]:
    """`FakeQuant(model, mode, images, batch_size)` entered, or nothing for mode `none`."""
    return contextlib.nullcontext() if mode == "none" else FakeQuant(model, mode, images, batch_size)


def attached(model: nn.Module) -> FakeQuant | None:
    """The FakeQuant `model` is entered in, if any: how a heal finds the ranges to measure again."""
    return model.__dict__.get(_ATTRIBUTE)
