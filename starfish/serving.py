"""The registered model: a compressed checkpoint or an ONNX file behind an MLflow pyfunc, logged as code.

`tracking.register` logs this file as the model's code (MLflow's models-from-code, so nothing
is pickled) with one artifact: the compressed checkpoint (`starfish export`) of a masked model,
or the ONNX export (`starfish export --format onnx`) of a slim one. Loading it
(`mlflow.pyfunc.load_model("models:/<name>@champion")`, or `mlflow models serve`) rebuilds the
model from that checkpoint, or opens an onnxruntime session on the ONNX file; `predict` takes a
float32 batch of images (N, C, H, W), already normalized as the calibration images are, and
returns the logits (N, classes).
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch

CHECKPOINT = "checkpoint"
ONNX = "onnx"


class StarfishModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        if ONNX in context.artifacts:
            from starfish.formats.onnx import session

            self.session, self.model = session(context.artifacts[ONNX]), None
        else:
            from starfish.models import load_checkpoint

            self.model, _, self.name = load_checkpoint(context.artifacts[CHECKPOINT])
            self.model.eval()

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as the schema
        images = np.asarray(model_input, dtype=np.float32)
        if self.model is None:
            from starfish.formats.onnx import run_session

            return run_session(self.session, images)
        with torch.no_grad():
            return self.model(torch.as_tensor(images)).numpy()


mlflow.models.set_model(StarfishModel())
