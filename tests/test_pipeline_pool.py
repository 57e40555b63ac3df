"""A pool sweep across two real workers, and a calibration change that reruns compress, on loopback.

A Prefect server, an MLflow server and two `prefect worker start` processes on a process-type
work pool (concurrency limit 2, one run per worker). The repository is deployed with
`prefect deploy --all` from a bare git repository, so every point's run clones it (`git_clone`)
and pulls the calibration split from a DVC remote (`dvc pull`), as on a GPU worker. The sweep
has one point that fails the gate's sparsity check on its worker; the others must not notice.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from mlflow import MlflowClient

from flows.session import free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
NAME = "starfish-starfish-vit-fmnist"
DRIFTING = 0.3333  # 1/3 of each layer cannot be pruned exactly: fails a tight drift gate
OVERRIDES = ["heal.steps=8", "evaluate.max_samples=500", "gate.max_sparsity_drift=0.00001"]


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


class Services:
    """Server and worker processes, each in its own session, stopped (and their children) at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.processes = folder, {}

    def start(self, name: str, command: list[str], env: dict[str, str], health: str | None = None) -> None:
        log = (self.folder / f"{name}.log").open("w")
        process = subprocess.Popen(command, env=env, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes[name] = process
        deadline = time.monotonic() + 120
        while health is not None:
            try:
                if httpx.get(health, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, \
                f"{name} did not start:\n{self.log(name)[-3000:]}"
            time.sleep(0.5)

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()

    def stop(self, name: str) -> None:
        process = self.processes.pop(name)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)


def bare_repository(repo_root: Path, folder: Path, remote: Path, env: dict[str, str]) -> Path:
    """The working tree committed to a bare repository whose DVC remote holds the calibration split."""
    source = folder / "source"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo_root,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (repo_root / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo_root / name, source / name)
    git = ["git", "-c", "user.name=starfish", "-c", "user.email=starfish@localhost"]
    run(["git", "init", "-q", "-b", "main"], source, env)
    run([sys.executable, "-m", "dvc", "remote", "modify", "local", "url", str(remote)], source, env)
    run([sys.executable, "-m", "dvc", "repro", "calibrate"], source, env)
    run([sys.executable, "-m", "dvc", "push", "calibrate"], source, env)
    run(["git", "add", "-A"], source, env)
    run([*git, "commit", "-q", "-m", "starfish"], source, env)
    bare = folder / "starfish.git"
    run(["git", "clone", "-q", "--bare", str(source), str(bare)], folder, env)
    return bare


@pytest.fixture(scope="module")
def pool(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Servers, a deployed repository and two workers; the sweep has run when this yields."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    folder = tmp_path_factory.mktemp("pool")
    services = Services(folder)
    prefect_port, mlflow_port = free_port(), free_port()
    api, uri = f"http://127.0.0.1:{prefect_port}/api", f"http://127.0.0.1:{mlflow_port}"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_HOME": str(folder / "home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_LOCAL_STORAGE_PATH": str(folder / "results"),  # the result storage workers and sweep share
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_EXTRA_LOGGERS": "starfish",
           "MLFLOW_TRACKING_URI": uri}
    try:
        database = f"sqlite+aiosqlite:///{folder / 'prefect.db'}"
        services.start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                          str(prefect_port)],
                       {**env, "PREFECT_SERVER_DATABASE_CONNECTION_URL": database}, health=f"{api}/health")
        env["PREFECT_API_URL"] = api
        services.start("mlflow-server", [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                         f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination",
                                         str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(mlflow_port)],
                       env, health=f"{uri}/health")
        bare = bare_repository(repo_root, folder, folder / "dvc-remote", env)
        source = folder / "source"
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            client.create_work_pool(WorkPoolCreate(name="starfish-gpu", type="process", concurrency_limit=2))
            client.create_work_pool(WorkPoolCreate(name="starfish-control", type="process"))
        run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], source, {**env, "STARFISH_REPO": f"file://{bare}"})
        for worker in ("worker-a", "worker-b"):
            services.start(worker, [str(BIN / "prefect"), "worker", "start", "--pool", "starfish-gpu", "--name", worker,
                                    "--limit", "1", "--type", "process"], env)
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            deadline = time.monotonic() + 60
            while {w.name for w in client.read_workers_for_work_pool("starfish-gpu")} != {"worker-a", "worker-b"}:
                assert time.monotonic() < deadline, services.log("worker-a")[-2000:] + services.log("worker-b")[-2000:]
                time.sleep(0.5)
        started = time.monotonic()
        sweep = subprocess.run(
            [sys.executable, "-m", "flows.sweep", "--mode", "pool", "--sparsities", "0.5", "0.75", str(DRIFTING),
             "--healers", "starfish", "--tracking-uri", uri, *(f"--set={item}" for item in OVERRIDES)],
            cwd=source, env=env, capture_output=True, text=True, timeout=600)
        yield {"api": api, "uri": uri, "env": env, "source": source, "services": services, "sweep": sweep,
               "sweep_seconds": time.monotonic() - started}
    finally:
        services.stop_all()


def api_client(pool: dict[str, Any]):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(pool["api"])


def sweep_rows(pool: dict[str, Any]) -> list[dict[str, Any]]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    assert pool["sweep"].returncode == 0, pool["sweep"].stdout[-3000:] + pool["sweep"].stderr[-5000:]
    with api_client(pool) as client:
        [table] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sweep-table"])))
    return json.loads(table.data) if isinstance(table.data, str) else table.data


def test_prefect_yaml_deploys_every_flow_with_its_pool_schedule_and_trigger(pool: dict[str, Any]) -> None:
    with api_client(pool) as client:
        deployments = {name: client.read_deployment_by_name(name) for name in
                       ("compress/compress", "compress/nightly-compress", "sweep/sweep",
                        "watch-calibration/watch-calibration")}
        [automation] = client.read_automations_by_name("compress-on-calibration-change")
    pools = {name: deployment.work_pool_name for name, deployment in deployments.items()}
    assert pools == {"compress/compress": "starfish-gpu", "compress/nightly-compress": "starfish-gpu",
                     "sweep/sweep": "starfish-control", "watch-calibration/watch-calibration": "starfish-control"}
    nightly = deployments["compress/nightly-compress"]
    assert nightly.parameters["overrides"] == ["model.device=cuda"]
    assert (nightly.schedules[0].schedule.cron, nightly.schedules[0].schedule.timezone) == ("0 2 * * *",
                                                                                          "Europe/Berlin")
    assert deployments["sweep/sweep"].parameters["mode"] == "pool"
    assert "CUDA_VISIBLE_DEVICES" not in nightly.job_variables["env"]  # each worker keeps its own GPU
    steps = [next(iter(step)) for step in nightly.pull_steps]
    assert steps == ["prefect.deployments.steps.git_clone", "prefect.deployments.steps.set_working_directory",
                     "prefect.deployments.steps.run_shell_script"]
    assert automation.trigger.expect == {"starfish.calibration.changed"}
    assert automation.actions[0].deployment_id == deployments["compress/compress"].id


def test_points_run_on_both_workers_within_the_pools_limit(pool: dict[str, Any]) -> None:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    rows = sweep_rows(pool)
    completed = [row for row in rows if row["status"] == "Completed"]
    assert {row["ran_on"] for row in completed} == {"worker-a", "worker-b"}
    with api_client(pool) as client:
        points = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["compress"])))
    assert len(points) == 3 and all(run.start_time and run.end_time for run in points)
    overlaps = [sum(other.start_time <= run.start_time < other.end_time for other in points) for run in points]
    assert max(overlaps) <= 2  # the pool's concurrency limit: never more than one run per worker
    print(f"pool sweep of 3 points on 2 workers: {pool['sweep_seconds']:.0f} s")


def test_every_passing_point_is_registered_once_and_the_failure_stays_a_row(pool: dict[str, Any]) -> None:
    rows = {row["sparsity"]: row for row in sweep_rows(pool)}
    assert set(rows) == {0.5, 0.75, DRIFTING}
    failed = rows[DRIFTING]
    assert failed["version"] == "" and failed["status"].startswith("Failed") and "sparsity drift" in failed["status"]
    client = MlflowClient(pool["uri"])
    versions = sorted(str(v.version) for v in client.search_model_versions(f"name='{NAME}'"))
    assert versions == sorted([rows[0.5]["version"], rows[0.75]["version"]])
    runs = client.search_runs([client.get_experiment_by_name("starfish").experiment_id])
    assert len(runs) == 2  # one registration per passing point; the failed point left no run

    best = max((rows[0.5], rows[0.75]), key=lambda row: row["recovery"])
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == best["version"]


def test_each_run_cloned_the_repository_and_pulled_the_split(pool: dict[str, Any]) -> None:
    logs = pool["services"].log("worker-a") + pool["services"].log("worker-b")
    steps = [line for line in logs.splitlines() if "Deployment step" in line or line.startswith("A   ")]
    print("\n".join(steps))
    for step in ("git_clone", "set_working_directory", "run_shell_script"):
        assert sum(f"Deployment step '{step}' completed successfully" in line for line in steps) == 3, logs[-3000:]
    # `dvc pull`'s own output, once per run: the split came from the DVC remote into each clone
    assert sum(line.split() == ["A", "data/calibration.json"] for line in steps) == 3


def test_a_changed_calibration_split_fires_the_event_and_the_trigger_starts_compress(pool: dict[str, Any]) -> None:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    for worker in ("worker-a", "worker-b"):  # the triggered run then waits, Scheduled, where the test sees it
        pool["services"].stop(worker)

    def triggered() -> list:
        with api_client(pool) as client:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["compress"])))
        return [run for run in runs if run.created_by and run.created_by.type == "AUTOMATION"]

    watch = [sys.executable, "-m", "flows.watch", "--tracking-uri", pool["uri"]]
    same = run(watch, pool["source"], pool["env"])
    assert "unchanged" in same
    changed = run([*watch, "--set", "calibration.seed=1", "--calibration", str(pool["source"] / "resampled.json")],
                  pool["source"], pool["env"])
    assert "changed: emitted starfish.calibration.changed" in changed
    deadline = time.monotonic() + 60
    while not triggered():
        assert time.monotonic() < deadline, "no compress run was started by the calibration trigger"
        time.sleep(1)
    [rerun] = triggered()
    assert rerun.parameters["model_name"] == NAME and rerun.state.is_scheduled()
