"""MLflow artifacts in S3: the compress flow against `mlflow server --artifacts-destination s3://...`.

Both servers are real processes on loopback: moto's standalone S3 server, and an MLflow
tracking server that writes artifacts to it through boto3 (MLFLOW_S3_ENDPOINT_URL and the AWS
variables set for the server only; the client talks HTTP to MLflow).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import boto3
import httpx
import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from flows.compress import compress
from flows.session import free_port

pytestmark = pytest.mark.slow
BUCKET = "starfish-artifacts"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def serve(command: list[str], url: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start a server process and wait until `url` answers."""
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return process
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} never answered:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    logs = tmp_path_factory.mktemp("moto")
    process = serve([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], endpoint,
                    {**os.environ, **AWS}, logs / "moto.log")
    boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in AWS.items() if k != "AWS_DEFAULT_REGION"},
                 region_name=AWS["AWS_DEFAULT_REGION"]).create_bucket(Bucket=BUCKET)
    yield endpoint
    stop(process)


@pytest.fixture(scope="module")
def mlflow_server(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
               "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    env = {**os.environ, **AWS, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    process = serve(command, f"{url}/health", env, folder / "server.log")
    yield url
    stop(process)


def test_compress_through_an_mlflow_server_puts_artifacts_in_s3(
        prefect_harness, mlflow_server: str, s3_endpoint: str, params_path: Path, pipeline_overrides: list[str],
        pipeline_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in (*AWS, "MLFLOW_S3_ENDPOINT_URL"):  # the client needs none of them: the server proxies
        monkeypatch.delenv(key, raising=False)
    result = compress(params=str(params_path), overrides=pipeline_overrides, workdir=str(pipeline_dir / "work"),
                      calibration=str(pipeline_dir / "calibration.json"), tracking_uri=mlflow_server)
    registered = result["registered"]
    assert registered["tracking_uri"] == mlflow_server

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")
    keys = [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for item in page.get("Contents", [])]
    run_keys = [key for key in keys if registered["run_id"] in key]
    for name in ("masks/masks.safetensors", "report/report.md", "report/loss.png", "report/metrics.json"):
        assert any(key.endswith(name) for key in run_keys), (name, run_keys)
    assert any(key.endswith("MLmodel") for key in keys) and any(key.endswith("input_example.json") for key in keys)

    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias(registered["model_name"], "challenger")
    assert str(version.version) == registered["version"]
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/{registered['model_name']}@challenger")
    assert np.asarray(model.predict(np.zeros((2, 1, 28, 28), dtype=np.float32))).shape == (2, 10)
