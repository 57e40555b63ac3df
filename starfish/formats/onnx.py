"""ONNX export of a starfish checkpoint, checked before it is kept.

`export_onnx` traces the model (slim or dense) with torch's ONNX exporter, a dynamic batch axis
named `batch`, input `images` and output `logits`; then, before the file is renamed into place,
it must pass `onnx.checker` and onnxruntime's logits on a check batch must be within `TOLERANCE`
of torch's. The file's metadata names the model and carries the checkpoint's sha256 and its
architecture record, so a server can say what it runs.

A file to be served or evaluated may be damaged or hostile: `check_onnx` reads it within bounds
(a regular file, a size, a node count, no local functions or control flow, the standard and
onnxruntime operator domains only, no external data) and checks the graph against the file's own
metadata before any session is made; `open_session` is that check, then the session. Every
refusal is one line naming the file, the problem and the fix.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import stat
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from starfish.errors import StarfishError
from starfish.io import atomic_path

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # largest |onnxruntime - torch| logit difference an export may show
CONSTANT_SPREAD = 1e-6  # outputs spread less than this (relative) over the check batch: a check of nothing
INPUT, OUTPUT = "images", "logits"
CHECK_BATCH = 4
MAX_BYTES = 2 << 30  # protobuf's own bound on one message; starfish writes one self-contained file
MAX_NODES = 100_000  # every node, subgraphs included: a DeiT-B int8 export has about 2,500
MAX_METADATA_BYTES = 1 << 20  # the starfish.* properties together
CONTROL_FLOW = ("Loop", "Scan", "If")  # starfish's exports have none; a Loop can run past any deadline
DOMAINS = ("", "ai.onnx", "com.microsoft")  # the standard operators and onnxruntime's own


def session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session on `path` (`threads` intra-op threads; default: onnxruntime's).
    Its worker threads sleep between operators instead of spinning: where the threads are as many
    as the cores, spinning workers take cycles from the operators themselves (results/latency)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_onnx(path: str | Path) -> dict[str, str]:
    """The file's `starfish.*` metadata, once the file is found to be a model starfish can serve:
    checked within the bounds above, before onnxruntime sees it. StarfishError otherwise."""
    return _checked(path)[1]


def describe_onnx(path: str | Path) -> dict[str, Any]:
    """What a checked ONNX file holds, for `starfish info`: its metadata, opset, nodes by
    operator, and the input and output it serves (None for a dynamic size)."""
    proto, metadata = _checked(path)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    initializers = {t.name for t in proto.graph.initializer}
    return {"metadata": metadata, "opset": _opset(proto), "nodes": len(proto.graph.node),
            "operators": dict(sorted(ops.items(), key=lambda item: -item[1])),
            "input": [_dims(i) for i in proto.graph.input if i.name not in initializers][0],
            "output": _dims(proto.graph.output[0]),
            "parameters": sum(int(np.prod(t.dims)) for t in proto.graph.initializer)}


def _opset(proto: Any) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _dims(value: Any) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


def _checked(path: str | Path) -> tuple[Any, dict[str, str]]:
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)

    def bad(problem: str, fix: str = "export it again with starfish export --format onnx or starfish quantize"
            ) -> StarfishError:
        return StarfishError(f"ONNX file {path}: {problem}; {fix}")

    try:
        info = os.stat(path)
    except OSError as exc:
        raise bad(f"cannot be read ({exc.strerror})", "check the path") from None
    if not stat.S_ISREG(info.st_mode):
        raise bad("is not a regular file", "point at the .onnx file itself")
    if info.st_size == 0:
        raise bad("is empty")
    if info.st_size > MAX_BYTES:
        raise bad(f"is {info.st_size / 2**30:.1f} GiB, more than the {MAX_BYTES >> 30} GiB one ONNX file may hold")
    with open(path, "rb") as handle:
        data = handle.read(MAX_BYTES + 1)
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise bad(f"is not an ONNX model (protobuf cannot parse it: {str(exc)[:120] or type(exc).__name__})") \
            from None
    if not proto.HasField("graph") or not proto.graph.node:
        raise bad("holds no graph (a tensor or another message saved as a model?)")
    if proto.functions:
        raise bad(f"defines {len(proto.functions)} local functions, which starfish's exports never hold and whose "
                  "inlining has no bound")
    opset = _opset(proto)
    if opset is None or not 7 <= opset <= onnx.defs.onnx_opset_version():
        raise bad(f"asks for opset {opset}, outside 7..{onnx.defs.onnx_opset_version()} that this onnx knows")
    _check_nodes(proto.graph, bad)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise bad("keeps tensors in external files; starfish serves one self-contained file")
    if sum(len(p.key) + len(p.value) for p in proto.metadata_props) > MAX_METADATA_BYTES:
        raise bad(f"holds more than {MAX_METADATA_BYTES >> 20} MiB of metadata")
    metadata = {p.key.removeprefix("starfish."): p.value for p in proto.metadata_props
                if p.key.startswith("starfish.")}
    if "model" not in metadata:
        raise bad("has no starfish metadata (starfish.model), so nothing says what it is")
    _check_interface(proto.graph, metadata, bad)
    return proto, metadata


def _check_nodes(graph: Any, bad: Any) -> None:
    """Every node, subgraphs included, counted up to MAX_NODES, in known domains, no control flow."""
    import onnx

    pending, count = [graph], 0
    while pending:
        for node in pending.pop().node:
            count += 1
            if count > MAX_NODES:
                raise bad(f"has more than {MAX_NODES:,} nodes; starfish's largest exports have a few thousand")
            if node.op_type in CONTROL_FLOW:
                raise bad(f"runs control flow ({node.op_type} node {node.name!r}), which starfish's exports never "
                          "hold and which can run past any deadline")
            if node.domain not in DOMAINS:
                raise bad(f"uses operator {node.op_type!r} of domain {node.domain!r}; starfish serves the standard "
                          "operators and onnxruntime's own only")
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    pending.append(attribute.g)
                pending.extend(attribute.graphs)


def _check_interface(graph: Any, metadata: dict[str, str], bad: Any) -> None:
    """One input `images` (N, C, H, W) and one output `logits` (N, classes), their fixed sizes
    those the metadata records (input_size, num_classes)."""
    dims = _dims
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if [i.name for i in inputs] != [INPUT] or len(dims(inputs[0])) != 4:
        raise bad(f"takes {[(i.name, len(dims(i))) for i in inputs]} where starfish serves one input {INPUT!r} of "
                  "rank 4 (N, C, H, W)")
    if [o.name for o in graph.output] != [OUTPUT] or len(dims(graph.output[0])) != 2:
        raise bad(f"gives {[o.name for o in graph.output]} where starfish serves one output {OUTPUT!r} of rank 2 "
                  "(N, classes)")
    recorded = {}
    for key in ("input_size", "num_classes"):
        if key in metadata:
            try:
                recorded[key] = json.loads(metadata[key])
            except ValueError:
                raise bad(f"records starfish.{key}={metadata[key][:40]!r}, which is not JSON") from None
    if "input_size" in recorded and dims(inputs[0])[1:] != list(recorded["input_size"]):
        raise bad(f"takes images of {dims(inputs[0])[1:]} but its metadata says {recorded['input_size']}")
    classes = dims(graph.output[0])[1]
    if "num_classes" in recorded and classes is not None and classes != recorded["num_classes"]:
        raise bad(f"gives {classes} logits but its metadata says num_classes={recorded['num_classes']}")


def bytes_per_image(path: str | Path) -> int:
    """What one image adds to a run's memory, at most: the bytes per image of every tensor whose
    first axis is the batch, summed over the graph as onnx's shape inference sizes them. onnxruntime
    reuses buffers, so it holds less at once; a bound on requests, not a prediction."""
    import onnx
    from onnx import shape_inference

    graph = shape_inference.infer_shapes(_checked(path)[0], strict_mode=False).graph
    total = 0
    for value in (*graph.input, *graph.value_info, *graph.output):
        tensor = value.type.tensor_type
        dims = tensor.shape.dim
        if dims and not dims[0].HasField("dim_value") and all(d.HasField("dim_value") for d in dims[1:]):
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).itemsize
            total += int(np.prod([d.dim_value for d in dims[1:]], dtype=np.int64)) * itemsize
    return total


def open_session(path: str | Path, threads: int | None = None) -> tuple[Any, dict[str, str]]:
    """`check_onnx`, then the session: (session, the file's starfish metadata). A file that passes
    the checks and that onnxruntime still refuses is one StarfishError too."""
    metadata = check_onnx(path)
    try:
        return session(path, threads), metadata
    except Exception as exc:  # onnxruntime's own refusals: a bad graph, a shape it cannot infer
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise StarfishError(f"ONNX file {path}: onnxruntime cannot load it ({reason}); export it again with "
                            "starfish export --format onnx or starfish quantize") from None


def run_session(sess: Any, images: torch.Tensor | np.ndarray) -> np.ndarray:
    data = images.numpy() if isinstance(images, torch.Tensor) else images
    return sess.run([OUTPUT], {INPUT: np.ascontiguousarray(data, dtype=np.float32)})[0]


class OnnxModel(torch.nn.Module):
    """An ONNX file in onnxruntime behind torch's module call, so evaluation runs the served file
    exactly as it runs a torch model (`evaluate.predict_all`): images in, logits out, on the CPU."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.session, self.metadata = open_session(path, threads)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(run_session(self.session, images.float().cpu()))


def check_images(input_size: tuple[int, ...], count: int = CHECK_BATCH) -> torch.Tensor:
    """A seeded batch of standard-normal images (normalized inputs are about that scale)."""
    return torch.randn(count, *input_size, generator=torch.Generator().manual_seed(0))


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter's graph passes log every rewrite at INFO: keep them to warnings."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx(model: torch.nn.Module, out: str | Path, input_size: tuple[int, ...],
                metadata: dict[str, Any], images: torch.Tensor | None = None) -> dict[str, Any]:
    """Write `model` (CPU, fp32, eval) as ONNX to `out`, atomically, after the checks above;
    returns the largest logit difference and the opset. A model the exporter cannot trace is a
    StarfishError naming the exporter's reason; nothing is written then."""
    import onnx

    model = model.float().cpu().eval()
    images = check_images(input_size) if images is None else images.float().cpu()
    with torch.no_grad():
        expected = model(images).numpy()
    spread = float(np.ptp(expected, axis=0).max()) if len(expected) > 1 else 0.0
    if not spread > CONSTANT_SPREAD * max(1.0, float(np.abs(expected).max())):
        raise StarfishError(f"the model gives every check image the same outputs (they spread by {spread:.1e}), so "
                            "agreeing with onnxruntime on them would prove nothing; export a trained model (timm "
                            "initializes some heads, such as MLP-Mixer's, to zero)")
    with atomic_path(out) as tmp:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), quiet_exporter():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (images[:2],), str(tmp), dynamo=True, external_data=False,
                                  input_names=[INPUT], output_names=[OUTPUT],
                                  dynamic_shapes=({0: torch.export.Dim("batch")},), optimize=True)
        except Exception as exc:  # the exporter raises many types; its first line says why
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # the exporter colours its messages
            reason = (text.splitlines() or [type(exc).__name__])[0][:300]
            raise StarfishError(f"cannot export {metadata.get('model', 'the model')} to ONNX: torch's exporter "
                                f"could not trace it ({reason}); export a timm model starfish covers") from None
        proto = onnx.load(str(tmp))
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise StarfishError(f"the ONNX export fails onnx.checker ({str(exc).splitlines()[0]}); not written") \
                from None
        set_metadata(proto, metadata)
        onnx.save(proto, str(tmp))
        difference = float(np.abs(run_session(session(tmp), images) - expected).max())
        if not difference <= TOLERANCE:
            raise StarfishError(f"onnxruntime's logits differ from torch's by {difference:.2e} (more than "
                                f"{TOLERANCE:g}) on the check batch; the export is not written")
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"max_abs_difference": difference, "opset": opset}


def set_metadata(proto: Any, metadata: dict[str, Any]) -> None:
    """Record `metadata` in an ONNX model as `starfish.<key>` properties (text, or JSON), replacing
    any of the same keys."""
    keys = {f"starfish.{key}" for key in metadata}
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in keys]
    del proto.metadata_props[:]
    for key, value in kept + [(f"starfish.{k}", v if isinstance(v, str) else json.dumps(v))
                              for k, v in sorted(metadata.items())]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `starfish.*` metadata of an ONNX file, without its prefix, once `check_onnx` passed."""
    return check_onnx(path)
