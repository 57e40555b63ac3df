"""The int8 scheme as onnxruntime writes it: `quantize_onnx` turns a float ONNX export into the
int8 model that is served, with `onnxruntime.quantization`.

The steps, in onnxruntime's documented order: `quant_pre_process` (shape inference and the
graph optimizations the quantizer expects), then a Gemm (a Linear on 2-D input) becomes MatMul
and Add, so every Linear reaches the quantizer as the same operator with its bias in float; then
`quantize_dynamic`, or `quantize_static` fed by a `CalibrationDataReader` over the calibration
split, in QDQ format. Exactly the MatMul and Conv nodes with a constant weight are quantized:
the Linear and Conv layers that `starfish.quant.fake` quantizes in torch, one for one.

Choices, each measured on deit_small at 224 px in onnxruntime on 2 threads (docs/frontier.md):
uint8 inputs (int8 inputs ran as fast on the ViT and 3.4x slower on resnet50), MinMax ranges
(Percentile and Entropy gave the same top-1 on the demo ViT), and layer outputs left in float
(quantizing them made deit_small slower: 1.72x over fp32 against 2.09x).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from starfish.errors import StarfishError
from starfish.io import atomic_path

log = logging.getLogger(__name__)

QUANTIZED_OPS = {"int8-dynamic": ("MatMul",), "int8-static": ("MatMul", "Conv")}  # as fake.LAYER_TYPES
CALIBRATION_BATCH = 32


def weight_nodes(proto: Any, mode: str) -> list[str]:
    """Names of the nodes `mode` quantizes: MatMul (and for int8-static Conv) nodes whose weight
    (second input) is a constant initializer."""
    constants = {tensor.name for tensor in proto.graph.initializer}
    return [node.name for node in proto.graph.node
            if node.op_type in QUANTIZED_OPS[mode] and len(node.input) > 1 and node.input[1] in constants]


def gemm_to_matmul(proto: Any) -> int:
    """Rewrite every Gemm with a constant weight (A @ B^T + C, alpha = beta = 1) as MatMul on the
    transposed weight, then Add; returns how many. A Gemm of another form is refused."""
    import onnx
    from onnx import numpy_helper

    constants = {tensor.name: tensor for tensor in proto.graph.initializer}
    nodes, count = [], 0
    for node in proto.graph.node:
        if node.op_type != "Gemm":
            nodes.append(node)
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight = node.input[1] if len(node.input) > 1 else ""
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0) \
                or weight not in constants:
            raise StarfishError(f"the ONNX model's Gemm {node.name!r} is not a Linear layer (alpha, beta, transA "
                                "or a weight that is not constant); quantize a model whose Linear layers export "
                                "plainly")
        array = numpy_helper.to_array(constants[weight])
        if attrs.get("transB", 0):
            array = array.T
        matrix = f"{weight}_matmul"
        proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), matrix))
        product = node.output[0] + "_matmul" if len(node.input) > 2 and node.input[2] else node.output[0]
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], matrix], [product], name=node.name))
        if product != node.output[0]:
            nodes.append(onnx.helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                               name=node.name + "_bias"))
        count += 1
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    used = {name for node in proto.graph.node for name in node.input}
    unused = [tensor for tensor in proto.graph.initializer if tensor.name not in used]
    for tensor in unused:  # the Gemms' own weights, now transposed copies
        proto.graph.initializer.remove(tensor)
    return count


class SplitReader:
    """onnxruntime's CalibrationDataReader over the calibration images, `batch` at a time."""

    def __init__(self, images: Any, input_name: str, batch: int = CALIBRATION_BATCH) -> None:
        self.images, self.input_name, self.batch, self.start = images, input_name, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.start >= self.images.shape[0]:
            return None
        batch = self.images[self.start:self.start + self.batch]
        self.start += self.batch
        return {self.input_name: np.ascontiguousarray(np.asarray(batch, dtype=np.float32))}

    def rewind(self) -> None:
        self.start = 0


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantizer prints its calibration progress and warns about pre-processing on stdout."""
    quantizer_log = logging.getLogger("root")
    level = quantizer_log.level
    quantizer_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        quantizer_log.setLevel(level)


def check_int8_kernels() -> None:
    """Refuse an onnxruntime whose CPU provider lacks the int8 kernels the served model runs on:
    a two-node model of each kind is built and run."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    w = helper.make_tensor("w", TensorProto.INT8, [4, 4], [1] * 16)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
             helper.make_node("MatMulInteger", ["q", "w", "z"], ["i"]),
             helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["f", "s"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "int8-check", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17)])
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        session.run(None, {"x": np.ones((2, 4), np.float32)})
    except Exception as exc:  # onnxruntime raises its own types for a missing kernel
        raise StarfishError(f"this onnxruntime ({ort.__version__}) cannot run int8 models "
                            f"({str(exc).splitlines()[0][:200]}); install onnxruntime's CPU build or set "
                            "quant.mode=none") from None
    del onnx


def quantize_onnx(source: str | Path, out: str | Path, mode: str, layers: int, images: Any = None) -> dict[str, Any]:
    """Write the int8 model of the float ONNX model `source` to `out` (not atomically: the caller
    renames it into place after its checks). `layers` is how many layers the torch side
    quantizes; a graph with another number of weight nodes is refused, since the two would not
    be the same scheme. `images`: the calibration split, for `int8-static`."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode not in QUANTIZED_OPS:
        raise StarfishError(f"quant.mode={mode!r} writes no int8 model; use one of {list(QUANTIZED_OPS)}")
    check_int8_kernels()
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))
        proto = onnx.load(str(prepared))
        gemms = gemm_to_matmul(proto)
        nodes = weight_nodes(proto, mode)
        if len(nodes) != layers:
            raise StarfishError(f"the ONNX graph has {len(nodes)} {'/'.join(QUANTIZED_OPS[mode])} nodes with a "
                                f"constant weight, but the model has {layers} layers that {mode} quantizes, so the "
                                "int8 model would not be the scheme the heal trained against; this model cannot be "
                                "quantized as it exports")
        onnx.save(proto, str(prepared))
        common = {"per_channel": True, "weight_type": QuantType.QInt8, "nodes_to_quantize": nodes}
        if mode == "int8-dynamic":
            quantize_dynamic(str(prepared), str(out), **common, extra_options={"MatMulConstBOnly": True})
        else:
            reader = SplitReader(images, proto.graph.input[0].name)
            quantize_static(str(prepared), str(out), reader, quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax,
                            **common, extra_options={
                                "ActivationSymmetric": False, "WeightSymmetric": True,
                                "QuantizeBias": False,  # biases stay float, as in torch
                                "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS[mode])})
    return {"quantized_layers": len(nodes), "gemm_rewritten": gemms}


# The int8 model must be the scheme torch simulates. Layer by layer the two agree to float noise
# (tests/test_quant.py: within 5% of the layer's own int8 error, measured at most 3%); through a
# whole network that noise moves the roundings near a boundary, and each one moved moves the
# layers after it, so logit by logit they agree only as far as the roundings do. The check: on
# the check images the int8 model is nearer the fake-quant model than the float one, its mean
# |logit difference| at most AGREEMENT of its error from float (measured: 0.16 on the demo CNN,
# 0.39 to 0.47 on the demo ViT, which int8 rounding moves most).
AGREEMENT = 0.75
CHECK_IMAGES = 32


def write_int8(model: nn.Module, out: str | Path, input_size: tuple[int, ...], metadata: dict[str, Any],
               mode: str, images: Any) -> dict[str, Any]:
    """Write `model` (CPU, float, eval) as its int8 ONNX model in `mode` to `out`, atomically: the
    float export (checked against torch, `formats.onnx.export_onnx`), quantized by `quantize_onnx`
    with ranges from `images` (the calibration split), then checked on the split's first images
    against the torch fake-quant model (`AGREEMENT`). Returns the measured differences."""
    import onnx

    from starfish.formats.onnx import export_onnx, run_session, session, set_metadata
    from starfish.quant.fake import FakeQuant, quantized_layers

    model = model.float().cpu().eval()
    check = torch.as_tensor(np.asarray(images[:CHECK_IMAGES], dtype=np.float32))
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory() as work:
        exported = Path(work) / "float.onnx"
        float_check = export_onnx(model, exported, input_size, metadata, check)
        info = quantize_onnx(exported, tmp, mode, len(quantized_layers(model, mode)), images)
        proto = onnx.load(str(tmp))
        set_metadata(proto, {**metadata, "quant": mode})
        onnx.save(proto, str(tmp))
        with torch.no_grad():
            expected = model(check).numpy()
            with FakeQuant(model, mode, images):
                simulated = model(check).numpy()
        served = run_session(session(tmp), check)
        int8_error = float(np.abs(served - expected).mean())
        mismatch = float(np.abs(served - simulated).mean())
        if not mismatch <= AGREEMENT * int8_error + 1e-5:
            raise StarfishError(f"the int8 model differs from torch's fake-quant model by {mismatch:.2e} on average, "
                                f"more than {AGREEMENT:g} of its difference from float ({int8_error:.2e}); it is not "
                                "the scheme the heal simulates, and is not written")
    return {**info, "float_max_abs_difference": float_check["max_abs_difference"], "opset": float_check["opset"],
            "int8_mean_abs_error": int8_error, "fake_quant_mean_abs_difference": mismatch,
            "fake_quant_max_abs_difference": float(np.abs(served - simulated).max()),
            "check_images": int(check.shape[0])}
