"""The registered model: a compressed checkpoint or an ONNX file behind an MLflow pyfunc, logged as code.

`tracking.register` logs this file as the model's code (MLflow's models-from-code, so nothing
is pickled) with one artifact: the compressed checkpoint (`starfish export`) of a masked model,
or the ONNX file (`starfish quantize`, `starfish export --format onnx`) of a slim or int8 one.
Loading it (`mlflow.pyfunc.load_model("models:/<name>@champion")`, `starfish serve`, or `mlflow models serve`)
rebuilds the model from that checkpoint, or opens the ONNX file through `formats.onnx.check_onnx`'s
bounds; `predict` takes a float32 batch of images (N, C, H, W), already normalized as the
calibration images are, and returns the logits (N, classes).

Every answer is valid JSON with one line of reason when it is not the logits:
- the client's fault, HTTP 400 before any compute: not (N, C, H, W), more than
  `STARFISH_SERVE_MAX_BATCH` images (256 by default), more images than an ONNX model's run may
  take within `STARFISH_SERVE_MAX_REQUEST_MB` (1,024 by default; `formats.onnx.bytes_per_image`),
  images of another size than the model takes, NaN or infinite pixels;
- the model's fault, HTTP 500 without a stack trace: the model failed on the request, or gave
  NaN or infinite logits (never served as a 200);
- past `STARFISH_SERVE_DEADLINE_S` seconds (30 by default) of inference, HTTP 504: an ONNX
  model's run is stopped there (onnxruntime's `RunOptions.terminate`), so the core is free for
  the next request. A checkpoint served in torch has no such stop.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INTERNAL_ERROR, INVALID_PARAMETER_VALUE

CHECKPOINT = "checkpoint"
ONNX = "onnx"
MAX_BATCH_ENV = "STARFISH_SERVE_MAX_BATCH"
DEFAULT_MAX_BATCH = 256
DEADLINE_ENV = "STARFISH_SERVE_DEADLINE_S"
DEFAULT_DEADLINE_S = 30.0
MAX_REQUEST_MB_ENV = "STARFISH_SERVE_MAX_REQUEST_MB"
DEFAULT_MAX_REQUEST_MB = 1024.0
THREADS_ENV = "STARFISH_SERVE_THREADS"  # onnxruntime threads per run; 0: its default


class Refusal(MlflowException):
    """An MlflowException whose message stays the one line it was raised with. MLflow's scoring
    server rewrites the message of any MlflowException from `predict` to begin with the whole
    request ("Failed to predict data '<every pixel>' ..."), many lines long; the answer's body
    should be the reason alone."""

    @property
    def message(self) -> str:
        return self._line

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_line"):  # the first assignment, MlflowException's own; the server's is dropped
            self._line = value

    @classmethod
    def client(cls, line: str) -> "Refusal":
        """HTTP 400: the request's fault."""
        return cls(line, error_code=INVALID_PARAMETER_VALUE)


def checked_images(model_input: Any, max_batch: int, size: tuple[int | None, ...] | None = None,
                   image_bytes: int = 0, max_request_mb: float = DEFAULT_MAX_REQUEST_MB) -> np.ndarray:
    """The request as float32 images, or MLflow's invalid-parameter error (HTTP 400) naming the problem."""
    try:
        images = np.asarray(model_input, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise Refusal.client(f"the request is not an array of numbers ({exc}); send a batch of images "
                             "(N, C, H, W)") from None
    if images.ndim != 4:
        raise Refusal.client(f"expected a batch of images (N, C, H, W), got shape {images.shape}")
    if images.shape[0] > max_batch:
        raise Refusal.client(f"{images.shape[0]} images in one request; send at most "
                             f"{max_batch} (the server's {MAX_BATCH_ENV})")
    if image_bytes and images.shape[0] * image_bytes > max_request_mb * 2**20:
        fits = max(int(max_request_mb * 2**20 // image_bytes), 1)
        raise Refusal.client(f"{images.shape[0]} images would take up to {images.shape[0] * image_bytes / 2**20:.3g} "
                             f"MB in the model's run, over the server's {max_request_mb:g} MB "
                             f"({MAX_REQUEST_MB_ENV}); send at most {fits}")
    if size is not None and any(want is not None and got != want for got, want in zip(images.shape[1:], size)):
        raise Refusal.client(f"images of {list(images.shape[1:])}, but the model takes {list(size)} (C, H, W)")
    if not np.isfinite(images).all():
        raise Refusal.client("the images hold NaN or infinite values; send finite pixels")
    return images


def model_fault(why: str) -> Refusal:
    """HTTP 500 with one line and no stack trace: the served model, not the request, failed."""
    return Refusal(f"the served model failed: {why}", error_code=INTERNAL_ERROR)


def checked_logits(logits: np.ndarray) -> np.ndarray:
    if not np.isfinite(logits).all():
        raise model_fault("it gave NaN or infinite logits")
    return logits


class StarfishModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        self.max_batch = int(os.environ.get(MAX_BATCH_ENV, DEFAULT_MAX_BATCH))
        self.deadline = float(os.environ.get(DEADLINE_ENV, DEFAULT_DEADLINE_S))
        self.max_request_mb = float(os.environ.get(MAX_REQUEST_MB_ENV, DEFAULT_MAX_REQUEST_MB))
        self.image_bytes = 0  # a checkpoint served in torch is bounded by the batch alone
        self.one_run = threading.Lock()
        if ONNX in context.artifacts:
            from starfish.formats.onnx import bytes_per_image, open_session

            self.path = context.artifacts[ONNX]
            self.session, self.metadata = open_session(self.path, int(os.environ.get(THREADS_ENV, 0)) or None)
            self.image_bytes = bytes_per_image(self.path)
            self.name = self.metadata["model"]
            self.model = None
            shape = self.session.get_inputs()[0].shape  # (N, C, H, W): check_onnx found one input, rank 4
            self.size = tuple(d if isinstance(d, int) else None for d in shape[1:])
        else:
            from starfish.models import load_checkpoint

            self.path = context.artifacts[CHECKPOINT]
            self.model, _, self.name = load_checkpoint(self.path)
            self.model.eval()
            self.size = None

    # np.ndarray: a hint MLflow takes without inferring a schema from it (the logged tensor
    # signature stays the schema) and without warning that hints are missing.
    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        images = checked_images(model_input, self.max_batch, self.size, self.image_bytes, self.max_request_mb)
        if self.model is None:
            return checked_logits(self._run_onnx(images))
        try:
            with torch.no_grad():
                logits = self.model(torch.as_tensor(images)).numpy()
        except Exception as exc:  # the model's own failure on an accepted request
            raise model_fault(_first_line(exc)) from None
        return checked_logits(logits)

    def _run_onnx(self, images: np.ndarray) -> np.ndarray:
        """One run, stopped at the deadline: onnxruntime checks `terminate` between operators. Runs
        go one at a time (onnxruntime's threads already use every core for one), so the deadline
        counts a run's own time, not its wait behind another request's."""
        import onnxruntime as ort

        from starfish.formats.onnx import INPUT, OUTPUT

        options = ort.RunOptions()
        timer = threading.Timer(self.deadline, lambda: setattr(options, "terminate", True))
        with self.one_run:
            timer.start()
            try:
                return self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(images)}, options)[0]
            except Exception as exc:
                if options.terminate:
                    raise Refusal(f"inference ran past the server's deadline of {self.deadline:g} s "
                                  f"({DEADLINE_ENV}) and was stopped; send fewer images",
                                  error_code=DEADLINE_EXCEEDED) from None
                raise model_fault(_first_line(exc)) from None
            finally:
                timer.cancel()


def _first_line(exc: BaseException) -> str:
    return ((str(exc).strip().splitlines() or [type(exc).__name__])[0])[:300]


def registry_problems(model_uri: str, model: Any, logits: np.ndarray) -> list[str]:
    """Where the model that loaded differs from what was registered: the sizes its signature
    records, and for a registry version (`models:/name/N`, `models:/name@alias`) the served file's
    hash and the model name its run compressed."""
    from starfish.gate import MODEL_NAME_TAG, SERVED_SHA256_TAG
    from starfish.io import sha256_file

    served, problems = model.unwrap_python_model(), []
    signature = model.metadata.signature
    if signature is not None:
        takes, gives = list(signature.inputs.inputs[0].shape[1:]), signature.outputs.inputs[0].shape[-1]
        if served.size is not None and list(served.size) != takes:
            problems.append(f"the file takes images of {list(served.size)} but the signature records {takes}")
        if logits.shape[1] != gives:
            problems.append(f"the file gives {logits.shape[1]} logits but the signature records {gives}")
    version = _registry_version(model_uri)
    if version is not None:
        recorded = (version.tags or {}).get(SERVED_SHA256_TAG)
        if recorded is not None and recorded != sha256_file(served.path):
            problems.append(f"the file's sha256 is not the {recorded[:12]}... registered for version "
                            f"{version.version}")
        compressed = mlflow.MlflowClient().get_run(version.run_id).data.tags.get(MODEL_NAME_TAG)
        if compressed is not None and compressed != served.name:
            problems.append(f"the file holds {served.name!r} but version {version.version}'s run compressed "
                            f"{compressed!r}")
    return problems


def _registry_version(model_uri: str) -> Any:
    """The registry's record of `models:/name/N` or `models:/name@alias`; None for other URIs."""
    if not model_uri.startswith("models:/"):
        return None
    client, path = mlflow.MlflowClient(), model_uri.removeprefix("models:/")
    if "@" in path:
        return client.get_model_version_by_alias(*path.split("@", 1))
    name, _, number = path.rpartition("/")
    return client.get_model_version(name, number) if number.isdigit() else None


def preflight(model_uri: str) -> None:
    """Load the model as the server will and predict its logged input example, in this process:
    exit 0 when it answers finite logits of the right batch and matches what was registered
    (`registry_problems`), else print one line and exit 2. `starfish serve` runs this in a child
    process with a time bound before starting the server."""
    try:
        model = mlflow.pyfunc.load_model(model_uri)
        example = model.input_example
        if example is None:
            raise ValueError("the registered model has no input example to check it on")
        logits = np.asarray(model.predict(np.asarray(example, dtype=np.float32)))
        if logits.ndim != 2 or logits.shape[0] != len(example) or not np.isfinite(logits).all():
            raise ValueError(f"its logits on the input example are {logits.shape}, not finite (N, classes)")
        problems = registry_problems(model_uri, model, logits)
        if problems:
            raise ValueError("it is not what was registered: " + "; ".join(problems))
    except Exception as exc:  # one line for the parent, whatever failed
        message = exc.message if isinstance(exc, MlflowException) else _first_line(exc)
        print(message.splitlines()[0] if message else type(exc).__name__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--preflight":
    preflight(sys.argv[2])
else:
    mlflow.models.set_model(StarfishModel())
