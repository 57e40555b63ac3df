"""MLflow artifacts in S3: the compress flow against `mlflow server --artifacts-destination s3://...`.

Both servers are real processes on loopback: moto's standalone S3 server, and an MLflow
tracking server that writes artifacts to it through boto3 (MLFLOW_S3_ENDPOINT_URL and the AWS
variables set for the server only; the client talks HTTP to MLflow).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
import pytest
import servers
from mlflow import MlflowClient
from servers import AWS, s3_keys, s3_server

from flows.compress import compress

pytestmark = pytest.mark.slow
BUCKET = "starfish-artifacts"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    service = s3_server(tmp_path_factory.mktemp("moto"), BUCKET)
    yield service.url
    service.stop()


@pytest.fixture(scope="module")
def mlflow_server(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {**os.environ, **AWS, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    service = servers.mlflow_server(tmp_path_factory.mktemp("mlflow-server"), f"s3://{BUCKET}/mlflow", env).start()
    yield service.url
    service.stop()


def test_compress_through_an_mlflow_server_puts_artifacts_in_s3(
        prefect_harness, mlflow_server: str, s3_endpoint: str, params_path: Path, pipeline_overrides: list[str],
        pipeline_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in (*AWS, "MLFLOW_S3_ENDPOINT_URL"):  # the client needs none of them: the server proxies
        monkeypatch.delenv(key, raising=False)
    result = compress(params=str(params_path), overrides=pipeline_overrides, workdir=str(pipeline_dir / "work"),
                      calibration=str(pipeline_dir / "calibration.json"), tracking_uri=mlflow_server)
    registered = result["registered"]
    assert registered["tracking_uri"] == mlflow_server

    keys = s3_keys(s3_endpoint, BUCKET)
    run_keys = [key for key in keys if registered["run_id"] in key]
    for name in ("masks/masks.safetensors", "report/report.md", "report/report.html", "report/loss.png",
                 "report/metrics.json"):
        assert any(key.endswith(name) for key in run_keys), (name, run_keys)
    assert any(key.endswith("MLmodel") for key in keys) and any(key.endswith("input_example.json") for key in keys)

    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias(registered["model_name"], "challenger")
    assert str(version.version) == registered["version"]
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/{registered['model_name']}@challenger")
    assert np.asarray(model.predict(np.zeros((2, 1, 28, 28), dtype=np.float32))).shape == (2, 10)
