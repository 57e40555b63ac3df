"""Real servers and workers on loopback for the tests: one way to start, wait for and stop them."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import boto3
import httpx

from starfish.io import free_port

# moto accepts any keys; these keep boto3 from looking for real ones
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class Service:
    """One server or worker process in its own session (so its children stop with it), logging to
    `<folder>/<name>.log`. It can be killed and started again with the same command and log.
    A server has the `url` it answers on and the `health` URL that says it is up."""

    def __init__(self, name: str, command: list[str], folder: Path, env: dict[str, str] | None = None,
                 url: str | None = None, health: str | None = None) -> None:
        self.name, self.command, self.folder, self.env = name, command, folder, env
        self.url, self.health = url, health
        self.process: subprocess.Popen | None = None

    def start(self) -> Service:
        """Start it (if it is not running) and, with a health URL, wait until that answers (a server
        error counts as not yet)."""
        if self.running():
            return self
        with (self.folder / f"{self.name}.log").open("a") as log:
            self.process = subprocess.Popen(self.command, env=self.env, cwd=self.folder, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while self.health is not None:
            try:
                if httpx.get(self.health, timeout=2).status_code < 500:
                    return self
            except httpx.HTTPError:
                pass
            assert self.running() and time.monotonic() < deadline, f"{self.name} did not start:\n{self.log()[-3000:]}"
            time.sleep(0.3)
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return (self.folder / f"{self.name}.log").read_text()

    def kill(self) -> None:
        """SIGKILL, as a crash would: no chance to clean up."""
        if self.running():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        """SIGTERM to the whole session; SIGKILL after 20 s."""
        if self.running():
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def mlflow_server(folder: Path, artifacts: str, env: dict[str, str] | None = None) -> Service:
    """An `mlflow server` (not started yet), its sqlite store in `folder`, its artifacts proxied to `artifacts`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
               "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    return Service("mlflow-server", command, folder, env, url=url, health=f"{url}/health")


def s3_server(folder: Path, *buckets: str) -> Service:
    """A started moto S3 server holding the empty `buckets`; its `url` is the endpoint."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    service = Service("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], folder,
                      {**os.environ, **AWS}, url=url, health=url).start()
    client = s3_client(url)
    for bucket in buckets:
        client.create_bucket(Bucket=bucket)
    return service


def s3_client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"], region_name=AWS["AWS_DEFAULT_REGION"])


def s3_keys(endpoint: str, bucket: str) -> set[str]:
    """Every object key in `bucket`."""
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


@contextlib.contextmanager
def served(tracking_uri: str, model_uri: str, log: Path, max_batch: int = 256) -> Iterator[Any]:
    """`starfish serve` of `model_uri` on a free loopback port, as a user starts it (without
    the environment's bin folder on PATH); yields `post(images) -> (HTTP status, JSON body)`."""
    import json
    import urllib.error
    import urllib.request

    port = free_port()
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if Path(p).resolve() != Path(sys.executable).parent.resolve())
    server = subprocess.Popen([sys.executable, "-m", "starfish.cli", "serve", model_uri, "--port", str(port),
                               "--max-batch", str(max_batch), "--tracking-uri", tracking_uri],
                              env={**os.environ, "PATH": path},
                              stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True)

    def post(images: Any) -> tuple[int, Any]:
        body = json.dumps({"inputs": images.tolist() if hasattr(images, "tolist") else images}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(1)
        yield post
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def served_predictions(tracking_uri: str, model_uri: str, images: Any, log: Path) -> Any:
    """What `starfish serve` of `model_uri` answers for `images`."""
    import numpy as np

    with served(tracking_uri, model_uri, log) as post:
        status, body = post(images)
    assert status == 200, body
    return np.asarray(body["predictions"], dtype=np.float32)


def copy_checkout(repo_root: Path, folder: Path) -> Path:
    """The working tree's files (tracked, and untracked ones git does not ignore) copied to
    `folder`, as a clone of this checkout would have them; `folder`."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo_root,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (repo_root / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo_root / name, folder / name)
    return folder
