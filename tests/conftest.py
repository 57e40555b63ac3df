"""Shared fixtures: the repository's params and demo checkpoint, real Fashion-MNIST, small models."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import yaml
from recipe import TEST_RECIPE
from served_models import CLASSES, SIZE, write

from starfish.datasets import FASHION_MNIST_ROOT, FashionMNIST, load_dataset
from starfish.models import create_model

REPO_ROOT = Path(__file__).resolve().parent.parent
PARAMS = REPO_ROOT / "params.yaml"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules marked slow (real servers, flows, many models) first, those with more tests
    earlier; then the rest, likewise. With `--dist loadfile --no-loadscope-reorder` (make test)
    each worker takes the next module in this order, so the long modules start early and the
    many short ones even out the end (xdist's own order, by test count alone, left a slow
    module of one test for last)."""
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)

    def weight(module: str) -> tuple[bool, int]:
        return (not any(item.get_closest_marker("slow") for item in modules[module]), -len(modules[module]))

    items[:] = [item for module in sorted(modules, key=weight) for item in modules[module]]


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread() -> None:
    """One intra-op thread: the test models are tiny, and on a shared CPU extra threads only spin."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def patient_temporary_servers() -> None:
    """Flow commands start Prefect's temporary server with its 20 s deadline; beside the suite's
    other worker on two cores it can take longer, so they get the 120 s the harness gets."""
    os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Derived-data caches (dense predictions) in a session folder, for flow subprocesses too."""
    os.environ["STARFISH_CACHE_DIR"] = str(tmp_path_factory.mktemp("starfish-cache"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shipped_params() -> Path:
    return PARAMS


@pytest.fixture(scope="session")
def params_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped params.yaml with TEST_RECIPE in place of its recipe, every other line as shipped."""
    params = yaml.safe_load(PARAMS.read_text())
    for section, fields in TEST_RECIPE.items():
        params[section] = fields if section == "heal" else {**params[section], **fields}  # the preset alone
    params["model"]["checkpoint"] = str(REPO_ROOT / params["model"]["checkpoint"])
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def demo_checkpoint() -> Path:
    """The trained demo checkpoint named by params.yaml (STARFISH_DEMO_CHECKPOINT overrides it)."""
    override = os.environ.get("STARFISH_DEMO_CHECKPOINT")
    if override:
        path = Path(override)
    else:
        path = REPO_ROOT / yaml.safe_load(PARAMS.read_text())["model"]["checkpoint"]
    if not path.is_file():
        pytest.fail(f"demo checkpoint {path} is missing; train it with `starfish train --out {path}`")
    return path


@pytest.fixture(scope="session")
def fmnist_root() -> Path:
    root = Path(FASHION_MNIST_ROOT)
    if not root.is_dir():
        pytest.fail(f"{root} is missing; install it with `apt-get install dataset-fashion-mnist`")
    return root


@pytest.fixture(scope="session")
def fmnist_train(fmnist_root: Path) -> FashionMNIST:
    """The real Fashion-MNIST training split, transformed for the demo ViT."""
    return load_dataset("fashion-mnist", fmnist_root, "train", create_model("starfish_vit_fmnist"))


@pytest.fixture
def vit() -> torch.nn.Module:
    """The demo ViT architecture with seeded random weights, in eval mode."""
    torch.manual_seed(0)
    return create_model("starfish_vit_fmnist")


# --- Pipeline (Prefect, MLflow, DVC) fixtures -------------------------------------------------

PIPELINE_TEST_OVERRIDES = ["heal.steps=8", "evaluate.max_samples=500"]


@pytest.fixture(scope="session")
def prefect_storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where persisted task results live for the whole session (shared with flow subprocesses)."""
    return tmp_path_factory.mktemp("prefect-storage")


@pytest.fixture(scope="session")
def prefect_harness(prefect_storage: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real Prefect API on a temporary database; results persisted under `prefect_storage`."""
    from prefect.settings import (
        PREFECT_HOME,
        PREFECT_LOCAL_STORAGE_PATH,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings(updates={PREFECT_HOME: home, PREFECT_LOCAL_STORAGE_PATH: prefect_storage,
                                     PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture(scope="session")
def pipeline_overrides(demo_checkpoint: Path) -> list[str]:
    """The demo checkpoint by absolute path, one healing epoch, 500 test images: fast but real."""
    return [f"model.checkpoint={demo_checkpoint}", *PIPELINE_TEST_OVERRIDES]


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One workdir and calibration path for the session, so equal steps are computed once."""
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture
def scoring_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """The app `starfish serve` runs (MLflow's own scoring app, its errors one line) around the
    pyfunc of a given ONNX model, through HTTP calls in this process (fastapi's TestClient)."""
    import mlflow
    from fastapi.testclient import TestClient
    from mlflow.models import infer_signature

    import starfish.serving as serving
    from starfish import serving_app

    def make(proto: Any, deadline: float = 30.0) -> TestClient:
        monkeypatch.setenv(serving.DEADLINE_ENV, str(deadline))
        path = write(tmp_path / f"m{time.monotonic_ns()}.onnx", proto)
        example = np.zeros((1, *SIZE), np.float32)
        folder = tmp_path / f"model{time.monotonic_ns()}"
        mlflow.pyfunc.save_model(str(folder), python_model=serving.__file__, artifacts={"onnx": str(path)},
                                 signature=infer_signature(example, np.zeros((1, CLASSES), np.float32)),
                                 code_paths=[str(Path(serving.__file__).parent)])
        return TestClient(serving_app.build(mlflow.pyfunc.load_model(str(folder))))

    return make
