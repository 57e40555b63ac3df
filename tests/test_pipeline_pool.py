"""docs/pipeline.md's work-pool block, run as written on loopback: a pool sweep across two real
GPU workers, and a calibration change that reruns compress.

The block's commands run in order (`doc_blocks`), rewritten only where they cannot run here
(`substitutions`): `prefect server start` on a free port, the S3 result block on moto's S3
server (`AWS_ENDPOINT_URL`), `deploy --all` from a bare git repository (so every run clones it
with `git_clone` and pulls the calibration split from a DVC remote with `dvc pull`, as on a GPU
worker), the tracking server an `mlflow server` on loopback, the GPU worker line run once per
GPU of two, each worker with a local result folder of its own (machines of their own), and the
deployment's grid narrowed to three points of a short heal, one of which fails the gate's
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
from doc_blocks import DOC, as_script, kill, shell_blocks, started
from mlflow import MlflowClient
from recipe import recipe_overrides
from servers import AWS, copy_checkout, mlflow_server, s3_keys, s3_server

from starfish import tracking
from starfish.io import free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
NAME = "starfish-starfish-vit-fmnist"
DRIFTING = 0.3333  # 1/3 of each layer cannot be pruned exactly: fails a tight drift gate
BUCKET = "my-bucket"  # the doc's
OVERRIDES = [*recipe_overrides(), "model.device=auto", "heal.steps=8", "evaluate.max_samples=500",
             "gate.max_sparsity_drift=0.00001"]
GPU_WORKER = "CUDA_VISIBLE_DEVICES=0 prefect worker start -p starfish-gpu --limit 1"
CONTROL_WORKER = "prefect worker start -p starfish-control"


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


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


def substitutions(folder: Path, port: int, uri: str, bare: Path) -> list[tuple[str, str]]:
    """(as the doc writes it, as it runs here), applied in order to every command of the block."""
    storage = "PREFECT_LOCAL_STORAGE_PATH={}".format
    grid = [f"sparsities={json.dumps([0.5, 0.75, DRIFTING])}", 'healers=["starfish"]',
            f"overrides={json.dumps(OVERRIDES)}"]
    return [
        ("prefect server start", f"prefect server start --host 127.0.0.1 --port {port}"),
        ("http://127.0.0.1:4200/api", f"http://127.0.0.1:{port}/api"),
        ("https://github.com/<you>/starfish.git", f"file://{bare}"),
        ("http://mlflow.example.com:5000", uri),
        (GPU_WORKER, "\n".join(f"{storage(folder / f'gpu{gpu}' / 'results')} {GPU_WORKER.replace('=0', f'={gpu}')}"
                               for gpu in (0, 1))),  # one per GPU: two
        (CONTROL_WORKER, f"{storage(folder / 'control' / 'results')} {CONTROL_WORKER}"),
        ("prefect deployment run sweep/sweep", "prefect deployment run sweep/sweep "
         + " ".join(f"--param '{item}'" for item in grid) + " --watch --watch-timeout 600"),
    ]


@pytest.fixture(scope="module")
def pool(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The servers, the block run to its end (the sweep has run), and the processes it started."""
    folder = tmp_path_factory.mktemp("pool")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}, **AWS,
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_HOME": str(folder / "home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_EXTRA_LOGGERS": "starfish"}
    services = []
    try:
        s3 = s3_server(folder, BUCKET)
        services.append(s3)
        env["AWS_ENDPOINT_URL"] = s3.url  # where AwsCredentials() and every boto3 client find S3
        tracking_server = mlflow_server(folder, str(folder / "artifacts"), env).start()
        services.append(tracking_server)
        bare = bare_repository(repo_root, folder, folder / "dvc-remote", env)
        source = folder / "source"
        [block] = [lines for lines in shell_blocks((repo_root / DOC).read_text())
                   if lines[0].startswith("prefect server start")]
        script = as_script(block, substitutions(folder, port, tracking_server.url, bare), folder)
        done = subprocess.run(["bash", "-c", script], cwd=source, env=env, capture_output=True, text=True,
                              timeout=900)
        env.update(PREFECT_API_URL=api, MLFLOW_TRACKING_URI=tracking_server.url)
        yield {"api": api, "uri": tracking_server.url, "s3": s3.url, "folder": folder, "env": env, "source": source,
               "script": script, "done": done, "started": started(folder)}
    finally:
        for process in started(folder):
            kill(process.pid)
        for service in services:
            service.kill()


def gpu_workers(pool: dict[str, Any]) -> list:
    return [process for process in pool["started"] if "-p starfish-gpu" in process.command]


def api_client(pool: dict[str, Any]):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(pool["api"])


def flow_runs(pool: dict[str, Any], deployment: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with api_client(pool) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])))


def sweep_rows(pool: dict[str, Any]) -> list[dict[str, Any]]:
    """The table of the sweep the block's `prefect deployment run sweep/sweep` ran on the control worker."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    done = pool["done"]
    assert done.returncode == 0, f"{DOC}'s work-pool block failed here:\n{pool['script']}\n" + \
        (done.stdout + done.stderr)[-5000:]
    [sweep] = flow_runs(pool, "sweep")
    assert sweep.state.is_completed(), sweep.state.message
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
    assert deployments["sweep/sweep-structured"].parameters["pruners"] == ["contribution"]
    assert "CUDA_VISIBLE_DEVICES" not in nightly.job_variables["env"]  # each worker keeps its own GPU
    steps = [next(iter(step)) for step in nightly.pull_steps]
    assert steps == ["prefect.deployments.steps.git_clone", "prefect.deployments.steps.set_working_directory",
                     "prefect.deployments.steps.run_shell_script"]
    assert automation.trigger.expect == {"starfish.calibration.changed"}
    assert automation.actions[0].deployment_id == deployments["compress/compress"].id
    with api_client(pool) as client:  # the pools as the block made them
        assert client.read_work_pool("starfish-gpu").concurrency_limit == 4
        assert client.read_work_pool("starfish-control").type == "process"


def test_points_run_on_both_gpu_workers_one_run_each_at_a_time(pool: dict[str, Any]) -> None:
    rows = sweep_rows(pool)
    completed = [row for row in rows if row["status"] == "Completed"]
    with api_client(pool) as client:
        workers = {worker.name for worker in client.read_workers_for_work_pool("starfish-gpu")}
    assert len(workers) == 2 and {row["ran_on"] for row in completed} == workers
    points = flow_runs(pool, "compress")
    assert len(points) == 3 and all(run.start_time and run.end_time for run in points)
    overlaps = [sum(other.start_time <= run.start_time < other.end_time for other in points) for run in points]
    assert max(overlaps) <= 2  # two workers of --limit 1: never more than one run on each
    [sweep] = flow_runs(pool, "sweep")
    print(f"pool sweep of 3 points on 2 workers: {(sweep.end_time - sweep.start_time).total_seconds():.0f} s")


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
    completed = [row for row in sweep_rows(pool) if row["status"] == "Completed"]
    assert len(completed) == 2 and all(row["healed_top1"] > 0 for row in completed)
    stored = s3_keys(pool["s3"], BUCKET)
    records = [f"prefect-results/{run.state.data.storage_key}" for run in flow_runs(pool, "compress")
               if run.state.is_completed()]  # under the block's bucket_folder
    assert len(records) == 2 and set(records) <= stored, (records, sorted(stored)[:20])
    # nothing but cache keys on the machines' own disks: no worker shares a folder with the sweep
    local = [path for name in ("gpu0", "gpu1", "control") for path in
             (pool["folder"] / name / "results").glob("**/*") if path.is_file() and "cache-keys" not in path.parts]
    keys = [list((pool["folder"] / gpu / "results" / "cache-keys").iterdir()) for gpu in ("gpu0", "gpu1")]
    assert local == [] and all(keys)


def test_each_run_cloned_the_repository_and_pulled_the_split(pool: dict[str, Any]) -> None:
    logs = "".join(worker.log.read_text() for worker in gpu_workers(pool))
    steps = [line for line in logs.splitlines() if "Deployment step" in line or line.startswith("A   ")]
    print("\n".join(steps))
    for step in ("git_clone", "set_working_directory", "run_shell_script"):
        assert sum(f"Deployment step '{step}' completed successfully" in line for line in steps) == 3, logs[-3000:]
    # `dvc pull`'s own output, once per run: the split came from the DVC remote into each clone
    assert sum(line.split() == ["A", "data/calibration.json"] for line in steps) == 3


def test_a_changed_calibration_split_fires_the_event_and_the_trigger_starts_compress(pool: dict[str, Any]) -> None:
    for worker in gpu_workers(pool):  # the triggered run then waits, Scheduled, where the test sees it
        kill(worker.pid)

    def triggered() -> list:
        return [run for run in flow_runs(pool, "compress") if run.created_by and run.created_by.type == "AUTOMATION"]

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
