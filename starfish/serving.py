"""The registered model: a compressed checkpoint or an ONNX file behind an MLflow pyfunc, logged as code.

`tracking.register` logs this file as the model's code (MLflow's models-from-code, so nothing
is pickled) with one artifact: the compressed checkpoint (`starfish export`) of a masked model,
or the ONNX export (`starfish export --format onnx`) of a slim one. Loading it
(`mlflow.pyfunc.load_model("models:/<name>@champion")`, or `mlflow models serve`) rebuilds the
model from that checkpoint, or opens an onnxruntime session on the ONNX file; `predict` takes a
float32 batch of images (N, C, H, W), already normalized as the calibration images are, and
returns the logits (N, classes). A request of more than `STARFISH_SERVE_MAX_BATCH` images (256
by default), or with NaN or infinite pixels, is refused with HTTP 400 before any compute: a
served model's memory and time per request stay bounded, and its answers stay valid JSON.
"""

from __future__ import annotations

import os
from typing import Any

import mlflow
import numpy as np
import torch

CHECKPOINT = "checkpoint"
ONNX = "onnx"
MAX_BATCH_ENV = "STARFISH_SERVE_MAX_BATCH"
DEFAULT_MAX_BATCH = 256


def checked_images(model_input: Any, max_batch: int) -> np.ndarray:
    """The request as float32 images, or MLflow's invalid-parameter error (HTTP 400) naming the problem."""
    from mlflow.exceptions import MlflowException

    images = np.asarray(model_input, dtype=np.float32)
    if images.ndim != 4:
        raise MlflowException.invalid_parameter_value(f"expected a batch of images (N, C, H, W), got shape "
                                                      f"{images.shape}")
    if images.shape[0] > max_batch:
        raise MlflowException.invalid_parameter_value(f"{images.shape[0]} images in one request; send at most "
                                                      f"{max_batch} (the server's {MAX_BATCH_ENV})")
    if not np.isfinite(images).all():
        raise MlflowException.invalid_parameter_value("the images hold NaN or infinite values; send finite pixels")
    return images


class StarfishModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        self.max_batch = int(os.environ.get(MAX_BATCH_ENV, DEFAULT_MAX_BATCH))
        if ONNX in context.artifacts:
            from starfish.formats.onnx import session

            self.session, self.model = session(context.artifacts[ONNX]), None
        else:
            from starfish.models import load_checkpoint

            self.model, _, self.name = load_checkpoint(context.artifacts[CHECKPOINT])
            self.model.eval()

    # np.ndarray: a hint MLflow takes without inferring a schema from it (the logged tensor
    # signature stays the schema) and without warning that hints are missing.
    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        images = checked_images(model_input, self.max_batch)
        if self.model is None:
            from starfish.formats.onnx import run_session

            return run_session(self.session, images)
        with torch.no_grad():
            return self.model(torch.as_tensor(images)).numpy()


mlflow.models.set_model(StarfishModel())
