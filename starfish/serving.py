"""The registered model: a compressed checkpoint behind an MLflow pyfunc, logged as code.

`tracking.register` logs this file as the model's code (MLflow's models-from-code, so nothing
is pickled) with the compressed checkpoint (`starfish export`) as its one artifact. Loading it
(`mlflow.pyfunc.load_model("models:/<name>@champion")`, or `mlflow models serve`) rebuilds the
model from that checkpoint; `predict` takes a float32 batch of images (N, C, H, W), already
normalized as the calibration images are, and returns the logits (N, classes).
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch

CHECKPOINT = "checkpoint"


class CompressedCheckpointModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from starfish.models import load_checkpoint

        self.model, _, self.name = load_checkpoint(context.artifacts[CHECKPOINT])
        self.model.eval()

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as the schema
        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model(images).numpy()


mlflow.models.set_model(CompressedCheckpointModel())
