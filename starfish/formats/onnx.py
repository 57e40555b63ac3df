"""ONNX export of a starfish checkpoint, checked before it is kept.

`export_onnx` traces the model (slim or dense) with torch's ONNX exporter, a dynamic batch axis
named `batch`, input `images` and output `logits`; then, before the file is renamed into place,
it must pass `onnx.checker` and onnxruntime's logits on a check batch must be within `TOLERANCE`
of torch's. The file's metadata names the model and carries the checkpoint's sha256 and its
architecture record, so a server can say what it runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
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


def run_session(sess: Any, images: torch.Tensor | np.ndarray) -> np.ndarray:
    data = images.numpy() if isinstance(images, torch.Tensor) else images
    return sess.run([OUTPUT], {INPUT: np.ascontiguousarray(data, dtype=np.float32)})[0]


class OnnxModel(torch.nn.Module):
    """An ONNX file in onnxruntime behind torch's module call, so evaluation runs the served file
    exactly as it runs a torch model (`evaluate.predict_all`): images in, logits out, on the CPU."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        self.path, self.session = Path(path), session(path, threads)

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
    """The `starfish.*` metadata of an ONNX file, without its prefix."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key.removeprefix("starfish."): p.value for p in proto.metadata_props if p.key.startswith("starfish.")}
