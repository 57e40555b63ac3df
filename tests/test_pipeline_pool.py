"""A pool sweep across two real workers, and a calibration change that reruns compress, on loopback.

A Prefect server, an MLflow server and two `prefect worker start` processes on a process-type
work pool (concurrency limit 2, one run per worker). The repository is deployed with
`prefect deploy --all` from a bare git repository, so every point's run clones it (`git_clone`)
and pulls the calibration split from a DVC remote (`dvc pull`), as on a GPU worker. The points'
results go to an `s3-bucket` block on moto's S3 server, the storage the sweep reads them from;
each process keeps a local folder of its own. The sweep has one point that fails the gate's
sparsity check on its worker; the others must not notice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from mlflow import MlflowClient
from servers import AWS, Service, copy_checkout, mlflow_server, s3_keys, s3_server

from flows.session import free_port
from starfish import tracking

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
NAME = "starfish-starfish-vit-fmnist"
DRIFTING = 0.3333  # 1/3 of each layer cannot be pruned exactly: fails a tight drift gate
RESULTS_BUCKET, RESULTS_BLOCK = "starfish-results", "starfish-results"
OVERRIDES = ["heal.steps=8", "evaluate.max_samples=500", "gate.max_sparsity_drift=0.00001"]


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


class Services(dict):
    """The servers and workers by name, all killed at the end."""

    def start(self, service: Service) -> Service:
        self[service.name] = service
        return service.start()

    def kill_all(self) -> None:
        """Killed, not stopped: all they hold is in this test's folder, and a graceful stop takes seconds each."""
        for service in self.values():
            service.kill()


def local_storage(folder: Path, name: str) -> dict[str, str]:
    """A process's own local result folder (cache-key records), as on a machine of its own."""
    return {"PREFECT_LOCAL_STORAGE_PATH": str(folder / name / "results")}


def bare_repository(repo_root: Path, folder: Path, remote: Path, env: dict[str, str]) -> Path:
    """The working tree committed to a bare repository whose DVC remote holds the calibration split."""
    source = copy_checkout(repo_root, folder / "source")
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
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_aws import AwsCredentials, S3Bucket

    folder = tmp_path_factory.mktemp("pool")
    services = Services()
    prefect_port = free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_HOME": str(folder / "home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_EXTRA_LOGGERS": "starfish"}
    try:
        database = f"sqlite+aiosqlite:///{folder / 'prefect.db'}"
        services.start(Service("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                                  "--port", str(prefect_port)], folder,
                               {**env, "PREFECT_SERVER_DATABASE_CONNECTION_URL": database}, url=api,
                               health=f"{api}/health"))
        env["PREFECT_API_URL"] = api
        uri = services.start(mlflow_server(folder, str(folder / "artifacts"), env)).url
        env["MLFLOW_TRACKING_URI"] = uri
        # the result storage workers and sweep share, as docs/pipeline.md sets it up: an S3 bucket block
        s3 = services.start(s3_server(folder, RESULTS_BUCKET)).url
        with temporary_settings(updates={PREFECT_API_URL: api}):
            S3Bucket(bucket_name=RESULTS_BUCKET, credentials=AwsCredentials(
                aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"],
                region_name=AWS["AWS_DEFAULT_REGION"], aws_client_parameters={"endpoint_url": s3})).save(RESULTS_BLOCK)
        env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] = f"s3-bucket/{RESULTS_BLOCK}"
        bare = bare_repository(repo_root, folder, folder / "dvc-remote", env)
        source = folder / "source"
        # the pools as docs/pipeline.md creates them, with its commands (a limit of 2 GPUs here)
        run([str(BIN / "prefect"), "work-pool", "create", "starfish-gpu", "--type", "process"], source, env)
        run([str(BIN / "prefect"), "work-pool", "set-concurrency-limit", "starfish-gpu", "2"], source, env)
        run([str(BIN / "prefect"), "work-pool", "create", "starfish-control", "--type", "process"], source, env)
        run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], source, {**env, "STARFISH_REPO": f"file://{bare}"})
        for worker in ("worker-a", "worker-b"):
            services.start(Service(worker, [str(BIN / "prefect"), "worker", "start", "--pool", "starfish-gpu", "--name",
                                            worker, "--limit", "1", "--type", "process"], folder,
                                   {**env, **local_storage(folder, worker)}))
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            assert client.read_work_pool("starfish-gpu").concurrency_limit == 2
            deadline = time.monotonic() + 60
            while {w.name for w in client.read_workers_for_work_pool("starfish-gpu")} != {"worker-a", "worker-b"}:
                assert time.monotonic() < deadline, "".join(services[w].log()[-2000:] for w in ("worker-a", "worker-b"))
                time.sleep(0.5)
        started = time.monotonic()
        sweep = subprocess.run(
            [sys.executable, "-m", "flows.sweep", "--mode", "pool", "--sparsities", "0.5", "0.75", str(DRIFTING),
             "--healers", "starfish", "--tracking-uri", uri, *(f"--set={item}" for item in OVERRIDES)],
            cwd=source, env={**env, **local_storage(folder, "sweep")}, capture_output=True, text=True, timeout=600)
        yield {"api": api, "uri": uri, "s3": s3, "folder": folder, "env": env, "source": source,
               "services": services, "sweep": sweep, "sweep_seconds": time.monotonic() - started}
    finally:
        services.kill_all()


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
                        "sweep/sweep-structured", "watch-calibration/watch-calibration")}
        [automation] = client.read_automations_by_name("compress-on-calibration-change")
    pools = {name: deployment.work_pool_name for name, deployment in deployments.items()}
    assert pools == {"compress/compress": "starfish-gpu", "compress/nightly-compress": "starfish-gpu",
                     "sweep/sweep": "starfish-control", "sweep/sweep-structured": "starfish-control",
                     "watch-calibration/watch-calibration": "starfish-control"}
    nightly = deployments["compress/nightly-compress"]
    assert nightly.parameters["overrides"] == ["model.device=auto"]
    assert (nightly.schedules[0].schedule.cron, nightly.schedules[0].schedule.timezone) == ("0 2 * * *",
                                                                                          "Europe/Berlin")
    assert deployments["sweep/sweep"].parameters["mode"] == "pool"
    assert deployments["sweep/sweep-structured"].parameters["structures"] == ["neurons+heads"]
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
    assert 0 < failed["healed_top1"] <= 1 and failed["recovery"] > 0  # it failed after evaluating: metrics kept
    client = MlflowClient(pool["uri"])
    versions = sorted(str(v.version) for v in client.search_model_versions(f"name='{NAME}'"))
    assert versions == sorted([rows[0.5]["version"], rows[0.75]["version"]])
    runs = client.search_runs([client.get_experiment_by_name("starfish").experiment_id])
    finished = [run for run in runs if run.info.status == "FINISHED"]
    assert sorted(run.data.tags[tracking.VERSION_TAG].rsplit("/", 1)[1] for run in finished) == versions
    [refused] = [run for run in runs if run.info.status != "FINISHED"]  # each point is a compress run from its start
    assert refused.info.status == "FAILED" and "sparsity drift" in refused.data.tags[tracking.ERROR_TAG]
    assert refused.data.metrics["sparsity_drift"] > 0  # its evaluation is recorded, and it registered nothing

    best = max((rows[0.5], rows[0.75]), key=lambda row: row["recovery"])
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == best["version"]


def test_the_sweep_read_each_points_record_from_the_shared_s3_result_storage(pool: dict[str, Any]) -> None:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    completed = [row for row in sweep_rows(pool) if row["status"] == "Completed"]
    assert len(completed) == 2 and all(row["healed_top1"] > 0 for row in completed)
    stored = s3_keys(pool["s3"], RESULTS_BUCKET)
    with api_client(pool) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["compress"])))
    records = [run.state.data.storage_key for run in runs if run.state.is_completed()]
    assert len(records) == 2 and set(records) <= stored, (records, sorted(stored)[:20])
    # nothing but cache keys on the machines' own disks: no worker shares a folder with the sweep
    local = [path for name in ("worker-a", "worker-b", "sweep") for path in
             (pool["folder"] / name / "results").glob("**/*") if path.is_file() and "cache-keys" not in path.parts]
    keys = list((pool["folder"] / "worker-a" / "results" / "cache-keys").iterdir())
    assert local == [] and keys


def test_each_run_cloned_the_repository_and_pulled_the_split(pool: dict[str, Any]) -> None:
    logs = pool["services"]["worker-a"].log() + pool["services"]["worker-b"].log()
    steps = [line for line in logs.splitlines() if "Deployment step" in line or line.startswith("A   ")]
    print("\n".join(steps))
    for step in ("git_clone", "set_working_directory", "run_shell_script"):
        assert sum(f"Deployment step '{step}' completed successfully" in line for line in steps) == 3, logs[-3000:]
    # `dvc pull`'s own output, once per run: the split came from the DVC remote into each clone
    assert sum(line.split() == ["A", "data/calibration.json"] for line in steps) == 3


def test_a_changed_calibration_split_fires_the_event_and_the_trigger_starts_compress(pool: dict[str, Any]) -> None:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    for worker in ("worker-a", "worker-b"):  # the triggered run then waits, Scheduled, where the test sees it
        pool["services"][worker].kill()

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
