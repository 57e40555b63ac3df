"""INT8 quantization: one scheme, computed twice. `fake` simulates it in torch (for healing
through the quantizer, gradients by the straight-through estimator); `ort` writes it as an
onnxruntime int8 model. Both quantize the same layers the same way, so the healed model's
fake-quant logits are the served model's (tests/test_quant.py measures by how much they differ).

The scheme (measured in docs/frontier.md):
- every Linear and Conv layer: its input to uint8, asymmetric, per tensor; its weight to int8,
  symmetric in [-127, 127], per output channel; the product accumulated in int32, the bias in fp32;
- `int8-dynamic`: the input's range is its own min and max at every call (onnxruntime's
  DynamicQuantizeLinear);
- `int8-static`: the input's range is its min and max over the calibration split (MinMax),
  fixed in the served model (QDQ format, layer outputs left in float).
"""

from starfish.quant.fake import (
    FakeQuant,
    activation_qparams,
    attached,
    fake_quantized,
    fake_weight,
    quantized_layers,
)

__all__ = ["FakeQuant", "activation_qparams", "attached", "fake_quantized", "fake_weight",
           "quantized_layers"]
