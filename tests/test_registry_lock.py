"""Two writers on one registry: promotions and registrations of a model take turns under its lock.

A real sqlite MLflow store, written by separate processes at once, as two compress flows or the
points of a pool sweep write it."""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from starfish import gate, tracking
from starfish.config import GateConfig
from starfish.errors import StarfishError

pytestmark = pytest.mark.slow

MODEL = "m"
RECOVERIES = {"1": 0.96, "2": 0.99, "3": 0.97}  # version -> recovery; v1 starts as champion
TRIALS = int(os.environ.get("STARFISH_RACE_TRIALS", "5"))  # 50 for the record; 5 in the suite


def make_store(folder: Path) -> str:
    """A store with three complete versions of MODEL, v1 champion."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("e", artifact_location=(folder / "artifacts").as_uri())
    client.create_registered_model(MODEL)
    for version, recovery in RECOVERIES.items():
        run = client.create_run(experiment, tags={tracking.REGISTER_KEY_TAG: f"key-{version}"})
        for key in gate.METRICS:
            client.log_metric(run.info.run_id, key, recovery if key == "recovery" else 0.0)
        client.set_terminated(run.info.run_id)
        made = client.create_model_version(MODEL, f"runs:/{run.info.run_id}/model", run.info.run_id,
                                           tags={tracking.REGISTER_KEY_TAG: f"key-{version}"})
        assert str(made.version) == version
    client.set_registered_model_alias(MODEL, tracking.CHAMPION, "1")
    return uri


def promoter(uri: str, version: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    for _ in range(TRIALS):
        barrier.wait()  # both promoters start together
        tracking.promote(MODEL, GateConfig(min_recovery=0.5), uri, version)
        barrier.wait()  # the parent checks and resets


def test_a_flow_whose_experiment_another_flow_created_meanwhile_uses_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two flows opening their runs at once on a fresh store both find no experiment and both
    create it: the second create meets the first's, and that flow uses it instead of failing."""
    import mlflow

    from starfish.config import PipelineConfig

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    with tracking.flow_run(PipelineConfig(), uri) as first:
        pass
    monkeypatch.setattr(mlflow, "get_experiment_by_name", lambda name: None)  # looked before the first created it
    with tracking.flow_run(PipelineConfig(), uri) as second:
        pass
    client = MlflowClient(uri)
    runs = [client.get_run(run_id) for run_id in (first, second)]
    assert runs[0].info.experiment_id == runs[1].info.experiment_id
    assert [run.info.status for run in runs] == ["FINISHED", "FINISHED"]
    # runs are made in the experiment by id: nothing for a child process on another store to inherit
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ


def test_of_two_promotions_at_once_the_better_one_ends_champion(tmp_path: Path) -> None:
    """Without the lock, both read champion v1 (0.96) and both pass; the later write wins, and v3
    (0.97) ended champion over v2 (0.99) in 5 of 12 trials."""
    uri = make_store(tmp_path)
    client = MlflowClient(uri)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(3)
    workers = [context.Process(target=promoter, args=(uri, version, barrier)) for version in ("3", "2")]
    for worker in workers:
        worker.start()
    champions = []
    try:
        for _ in range(TRIALS):
            barrier.wait(timeout=300)
            barrier.wait(timeout=300)
            champions.append(str(client.get_model_version_by_alias(MODEL, tracking.CHAMPION).version))
            client.set_registered_model_alias(MODEL, tracking.CHAMPION, "1")
    finally:
        for worker in workers:
            worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert champions == ["2"] * TRIALS
    assert [m.name for m in client.search_registered_models()] == [MODEL]  # no lock left behind


def hold(uri: str, seconds: float) -> None:
    with tracking.registry_lock(MlflowClient(uri), MODEL):
        time.sleep(seconds)


def test_a_held_lock_makes_the_next_writer_wait_then_times_out_in_one_line(tmp_path: Path) -> None:
    uri = make_store(tmp_path)
    holder = multiprocessing.get_context("spawn").Process(target=hold, args=(uri, 8.0))
    holder.start()
    client = MlflowClient(uri)
    deadline = time.monotonic() + 60
    while MODEL + tracking.LOCK_SUFFIX not in {m.name for m in client.search_registered_models()}:
        assert time.monotonic() < deadline and holder.is_alive()
        time.sleep(0.2)
    with pytest.raises(StarfishError, match="has been held for over 1 s by another registration or promotion"):
        with tracking.registry_lock(client, MODEL, timeout=1.0):
            pass
    start = time.monotonic()
    with tracking.registry_lock(client, MODEL, timeout=60.0):  # waits for the holder, then holds it
        waited = time.monotonic() - start
    holder.join(timeout=30)
    assert holder.exitcode == 0 and waited > 2


def test_a_lock_left_by_a_dead_process_is_broken(tmp_path: Path) -> None:
    uri = make_store(tmp_path)
    client = MlflowClient(uri)
    dead = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    client.create_registered_model(MODEL + tracking.LOCK_SUFFIX,
                                   tags={"starfish.lock.host": socket.gethostname(), "starfish.lock.pid": str(dead.pid),
                                         "starfish.lock.token": "gone"})
    start = time.monotonic()
    with tracking.registry_lock(client, MODEL, timeout=30.0):
        pass
    assert time.monotonic() - start < 10
    assert [m.name for m in client.search_registered_models()] == [MODEL]


def test_two_compress_flows_at_once_on_one_store_register_one_version_and_leave_no_orphan(
        tmp_path: Path, params_path: Path, pipeline_overrides: list[str], repo_root: Path) -> None:
    """Two flow commands with the same inputs, started together on one tracking store, one
    PREFECT_HOME and one workdir (each starts its own temporary Prefect server): both succeed,
    and the register key has exactly one version, whose run is the only one left with that key."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [sys.executable, "-m", "flows.compress", "--params", str(params_path), "--workdir",
               str(tmp_path / "work"), "--calibration", str(tmp_path / "calibration.json"), "--tracking-uri", uri,
               *(arg for override in pipeline_overrides for arg in ("--set", override))]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "prefect-storage")}
    env.pop("PREFECT_API_URL", None)
    logs = [(tmp_path / f"flow{i}.log").open("w") for i in (1, 2)]
    flows = [subprocess.Popen(command, cwd=repo_root, env=env, stdout=log, stderr=subprocess.STDOUT) for log in logs]
    codes = [flow.wait(timeout=900) for flow in flows]
    assert codes == [0, 0], [(tmp_path / f"flow{i}.log").read_text()[-3000:] for i in (1, 2)]
    client = MlflowClient(uri)
    [registered] = [m.name for m in client.search_registered_models()]  # and no lock left behind
    versions = client.search_model_versions(f"name = '{registered}'")
    assert len(versions) == 1, [v.version for v in versions]
    key = versions[0].tags[tracking.REGISTER_KEY_TAG]
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`{tracking.REGISTER_KEY_TAG}` = '{key}'")
    assert [run.info.run_id for run in runs] == [versions[0].run_id] and runs[0].info.status == "FINISHED"
    assert client.get_model_version_by_alias(registered, tracking.CHAMPION).version == versions[0].version
