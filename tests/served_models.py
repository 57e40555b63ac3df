"""Small ONNX models of the shape starfish serves, and damaged or hostile variants of them, for
the serving tests (tests/test_serving_hostile.py) and the fault matrix (tests/test_reliability.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from starfish.formats.onnx import set_metadata

SIZE = (1, 2, 2)
CLASSES = 3


def small_model(bias: np.ndarray | None = None, hidden: int = 0, layers: int = 0) -> onnx.ModelProto:
    """images (N, 1, 2, 2) -> flatten -> [to width `hidden`, then `layers` MatMuls by one shared
    (hidden, hidden) weight] -> logits (N, 3), with starfish's metadata: a model of the shape
    starfish serves, small to store however long it runs."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Flatten", ["images"], ["x0"])]
    inits, width, name = [], 4, "x0"
    if layers:
        for weight, rows in (("wide", 4), ("square", hidden)):
            values = (rng.standard_normal((rows, hidden)) / np.sqrt(rows)).astype(np.float32)
            inits.append(numpy_helper.from_array(values, weight))
        nodes.append(helper.make_node("MatMul", [name, "wide"], ["y0"]))
        nodes += [helper.make_node("MatMul", [f"y{i}", "square"], [f"y{i + 1}"]) for i in range(layers)]
        width, name = hidden, f"y{layers}"
    inits += [numpy_helper.from_array(rng.standard_normal((width, CLASSES)).astype(np.float32), "head"),
              numpy_helper.from_array(np.zeros(CLASSES, np.float32) if bias is None else bias, "bias")]
    nodes += [helper.make_node("MatMul", [name, "head"], ["h"]), helper.make_node("Add", ["h", "bias"], ["logits"])]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                              ["batch", *SIZE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    set_metadata(proto, {"model": "small", "input_size": list(SIZE), "num_classes": CLASSES})
    return proto


def write(path: Path, proto: onnx.ModelProto) -> Path:
    path.write_bytes(proto.SerializeToString())
    return path


def with_node(node: onnx.NodeProto) -> onnx.ModelProto:
    proto = small_model()
    proto.graph.node.insert(0, node)
    return proto


def custom_domain() -> onnx.ModelProto:
    return with_node(helper.make_node("Evil", ["images"], ["unused"], domain="my.ops"))


def loop() -> onnx.ModelProto:
    body = helper.make_graph([helper.make_node("Identity", ["cond"], ["cond_out"])], "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])])
    return with_node(helper.make_node("Loop", ["", ""], [], body=body))


def local_function() -> onnx.ModelProto:
    proto = small_model()
    proto.functions.append(helper.make_function("my.fn", "F", ["a"], ["b"], [helper.make_node("Identity", ["a"],
                                                                                              ["b"])],
                                                [helper.make_opsetid("", 17)]))
    return proto


def opset(version: int) -> onnx.ModelProto:
    proto = small_model()
    proto.opset_import[0].version = version
    return proto


def metadata(**changes: object) -> onnx.ModelProto:
    proto = small_model()
    set_metadata(proto, changes)
    return proto


def no_metadata() -> onnx.ModelProto:
    proto = small_model()
    del proto.metadata_props[:]
    return proto


def renamed_output() -> onnx.ModelProto:
    proto = small_model()
    proto.graph.node[-1].output[0] = "scores"
    proto.graph.output[0].name = "scores"
    return proto


def external_data() -> onnx.ModelProto:
    proto = small_model()
    head = proto.graph.initializer[0]
    head.data_location = TensorProto.EXTERNAL
    head.external_data.add(key="location", value="../../etc/passwd")
    return proto


def raw(data: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        (folder / "m.onnx").write_bytes(data)
        return folder / "m.onnx"
    return make


def special(create: Callable[[Path], None]) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        create(folder / "m.onnx")
        return folder / "m.onnx"
    return make


# (name, how the file is made in a folder, the refusal's words)
HOSTILE: list[tuple[str, Callable[[Path], Path], str]] = [
    ("truncated", raw(small_model().SerializeToString()[:-40]), "is not an ONNX model"),
    ("empty", raw(b""), "is empty"),
    ("random bytes", raw(np.random.default_rng(1).bytes(4096)), "ONNX file"),
    ("a tensor saved as a model", raw(numpy_helper.from_array(np.ones((4, 4), np.float32)).SerializeToString()),
     "holds no graph"),
    ("a directory", special(Path.mkdir), "is not a regular file"),
    ("a fifo that reads forever", special(os.mkfifo), "is not a regular file"),
    ("a custom-op domain", lambda d: write(d / "m.onnx", custom_domain()), "of domain 'my.ops'"),
    ("an absurd opset", lambda d: write(d / "m.onnx", opset(999)), "asks for opset 999"),
    ("a Loop", lambda d: write(d / "m.onnx", loop()), "runs control flow (Loop"),
    ("local functions", lambda d: write(d / "m.onnx", local_function()), "defines 1 local functions"),
    ("an input size the metadata does not say", lambda d: write(d / "m.onnx", metadata(input_size=[3, 224, 224])),
     "takes images of [1, 2, 2] but its metadata says [3, 224, 224]"),
    ("a class count the metadata does not say", lambda d: write(d / "m.onnx", metadata(num_classes=1000)),
     "gives 3 logits but its metadata says num_classes=1000"),
    ("an output not named logits", lambda d: write(d / "m.onnx", renamed_output()), "gives ['scores']"),
    ("no starfish metadata", lambda d: write(d / "m.onnx", no_metadata()), "has no starfish metadata"),
    ("external data leaving the folder", lambda d: write(d / "m.onnx", external_data()),
     "keeps tensors in external files"),
]


def post(client: object, images: object) -> tuple[int, dict]:
    response = client.post("/invocations", content=json.dumps({"inputs": images}),
                           headers={"Content-Type": "application/json"})
    return response.status_code, json.loads(response.text)  # every body is valid JSON
