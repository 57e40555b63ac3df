"""The fault matrix: every step of the compress flow meets every fault and ends cleanly.

Each cell runs the flow with one fault injected into one step, checks what it left, then runs
the flow again without the fault. Every cell must show:
- nothing that failed was registered, and no version sits on a run that did not finish;
- no sidecar disagrees with its output, and no temp file is left by a failed write;
- the rerun completes, registers exactly one version for its key, with the reference metrics.

Faults: an exception raised in the step on every attempt; SIGKILL of the flow command at the
step's worst moment (its temporary Prefect server must die with it, and its run is marked
Crashed by the next command); a disk that is full when the step writes (a small tmpfs, filled;
an injected ENOSPC where mounting is not allowed); the tracking server down from the start; and
the tracking server killed at three points inside registration. The matrix the run proved is
written to docs/reliability.md when the module ends: generated, never typed.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
from mlflow import MlflowClient

import tasks
from flows.compress import compress
from flows.session import free_port, mark_orphans_crashed, temporary_server
from starfish import steps, tracking
from starfish.config import GateConfig
from starfish.errors import StarfishError
from starfish.io import SIDECAR_SUFFIX, process_alive, read_json, sha256_file

pytestmark = pytest.mark.slow
STEPS = ["sample_calibration", "prune", "heal", "evaluate", "register"]
SCORES = ("dense_top1", "pruned_top1", "healed_top1", "recovery", "sparsity")
STEP_FUNCTIONS = {"sample_calibration": (steps, "sample"), "prune": (steps, "prune_step"),
                  "heal": (steps, "heal_step"), "evaluate": (steps, "evaluate_step"),
                  "register": (tracking, "log_compress_run")}
REGISTER_POINTS = {"run started": "log_params", "version written": "set_model_version_tag",
                   "alias set": "set_registered_model_alias"}
MATRIX: dict[str, dict[str, str]] = {}
HOW: dict[str, str] = {}
DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"


def record(fault: str, step: str, outcome: str) -> None:
    MATRIX.setdefault(fault, {})[step] = outcome


# --- shared pieces --------------------------------------------------------------------------------


class MlflowServer:
    """A real `mlflow server` on loopback that can be killed and started again on the same port and store."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port, self.process = folder, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                   f"sqlite:///{self.folder / 'server.db'}", "--artifacts-destination",
                   (self.folder / "artifacts").as_uri(), "--host", "127.0.0.1", "--port", str(self.port),
                   "--workers", "1"]
        log = (self.folder / "server.log").open("a")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, (self.folder / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "mlflow server never answered"
            time.sleep(0.3)

    def kill(self) -> None:
        os.killpg(self.process.pid, 9)
        self.process.wait()


@pytest.fixture(scope="module")
def fast_retries() -> Iterator[None]:
    """The tasks keep their two retries, without the backoff waits (faults here never heal by waiting)."""
    saved = {task: task.retry_delay_seconds for task in (tasks.sample_calibration, tasks.prune, tasks.heal,
                                                           tasks.evaluate, tasks.register)}
    for task in saved:
        task.retry_delay_seconds = 0
    yield
    for task, delay in saved.items():
        task.retry_delay_seconds = delay


@pytest.fixture(scope="module")
def reference(prefect_harness, fast_retries, params_path: Path, pipeline_overrides: list[str],
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The scores of a run without faults: every rerun must reproduce them exactly."""
    folder = tmp_path_factory.mktemp("reference")
    result = compress(params=str(params_path), overrides=pipeline_overrides, workdir=str(folder / "work"),
                      calibration=str(folder / "calibration.json"),
                      tracking_uri=f"sqlite:///{folder / 'mlflow.db'}", promote=False)
    return {key: result["evaluation"][key] for key in SCORES}


@pytest.fixture(scope="module", autouse=True)
def write_matrix_doc() -> Iterator[None]:
    """docs/reliability.md from what the module proved; only when every cell ran and passed."""
    yield
    expected = {"exception": STEPS, "SIGKILL": [*STEPS, "the next flow command"], "disk full": [*STEPS, "the CLI"],
                "tracking server down": ["before any step"], "tracking server killed": list(REGISTER_POINTS)}
    if any(set(MATRIX.get(fault, {})) != set(cells) for fault, cells in expected.items()):
        return
    lines = ["# Reliability: the fault matrix", "",
             "Generated by `tests/test_reliability.py` from the cells it proved; do not edit by hand.", "",
             "In every step cell: nothing that failed is registered, no version sits on a run that did not",
             "finish (the gate refuses any left by a killed registration until the rerun removes it), no",
             "sidecar disagrees with its output, and no temp file is left behind (one left by a SIGKILL is",
             "deleted by the next write of that output). The rerun without the fault completes, registers",
             "exactly one version for its key, and gives exactly the metrics of a run that never met a fault.",
             ""]
    for fault, cells in expected.items():
        lines += [f"## {fault}", "", HOW[fault], "", "| step | outcome |", "|---|---|"]
        lines += [f"| {cell} | {MATRIX[fault][cell]} |" for cell in cells]
        lines.append("")
    DOC.write_text("\n".join(lines))


def run_flow(folder: Path, overrides: list[str], uri: str, **options: Any) -> Any:
    """One compress run in `folder`; its final state (never raises)."""
    return compress(params=options.pop("params"), overrides=overrides, workdir=str(folder / "work"),
                    calibration=str(folder / "calibration.json"), tracking_uri=uri, promote=False,
                    return_state=True, **options)


def assert_clean(folder: Path, uri: str, killed: bool = False) -> None:
    """No sidecar disagrees with its output, and no temp file is left (a SIGKILL mid-write may leave
    one, never read, which the next write of that output deletes). A version on a run that did
    not finish (only a killed registration leaves one, until its retry removes it) is refused by
    the gate."""
    for side in folder.rglob("*" + SIDECAR_SUFFIX):
        output = side.with_name(side.name[:-len(SIDECAR_SUFFIX)])
        assert output.is_file() and read_json(side)["sha256"] == sha256_file(output), side
    if not killed:
        assert not list(folder.rglob(".*.tmp")), list(folder.rglob(".*.tmp"))
    client = MlflowClient(uri)
    for version in client.search_model_versions():
        if client.get_run(version.run_id).info.status != "FINISHED":
            decision = tracking.promote(version.name, GateConfig(min_recovery=0.0), uri, str(version.version))
            assert not decision["promoted"], version


def assert_registry_clean(uri: str) -> None:
    """Every version sits on a FINISHED run."""
    client = MlflowClient(uri)
    for version in client.search_model_versions():
        assert client.get_run(version.run_id).info.status == "FINISHED", version


def assert_rerun_completes(folder: Path, overrides: list[str], uri: str, params: str,
                           reference: dict[str, Any]) -> str:
    """The rerun without the fault: completes, one version for its key on a FINISHED run, same scores."""
    state = run_flow(folder, overrides, uri, params=params)
    assert state.is_completed(), state.message
    result = state.result()
    assert {key: result["evaluation"][key] for key in SCORES} == reference
    client = MlflowClient(uri)
    key = client.get_run(result["registered"]["run_id"]).data.tags[tracking.REGISTER_KEY_TAG]
    versions = [v for v in client.search_model_versions() if v.tags.get(tracking.REGISTER_KEY_TAG) == key]
    assert len(versions) == 1
    assert_registry_clean(uri)
    assert_clean(folder, uri)
    return ", ".join(f"{step} {state}" for step, state in result["states"].items())


def states_line(states: dict[str, str]) -> str:
    return ", ".join(f"{step} {state}" for step, state in states.items())


# --- an exception in the step ---------------------------------------------------------------------

@pytest.mark.parametrize("step", STEPS)
def test_an_exception_in_a_step(step: str, reference: dict[str, Any], params_path: Path,
                                pipeline_overrides: list[str], tmp_path: Path) -> None:
    HOW["exception"] = ("A `RuntimeError` raised in the step on every attempt: the task is retried twice, "
                        "then the flow fails.")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    module, name = STEP_FUNCTIONS[step]
    calls = []

    def broken(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        raise RuntimeError(f"injected into {step}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, name, broken)
        state = run_flow(tmp_path, pipeline_overrides, uri, params=str(params_path))
    assert state.is_failed() and len(calls) == 3
    assert MlflowClient(uri).search_model_versions() == []
    assert_clean(tmp_path, uri)
    assert_rerun_completes(tmp_path, pipeline_overrides, uri, str(params_path), reference)
    record("exception", step, "failed after 3 attempts, nothing registered; rerun completed, same metrics")


# --- SIGKILL of the flow command ------------------------------------------------------------------

@pytest.fixture(scope="module")
def kill_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One PREFECT_HOME for every killed command, so one later command sees all their runs."""
    return tmp_path_factory.mktemp("killed-prefect-home")


@pytest.mark.parametrize("step", STEPS)
def test_sigkill_of_the_flow_command(step: str, reference: dict[str, Any], kill_home: Path,
                                     prefect_storage: Path, params_path: Path, pipeline_overrides: list[str],
                                     repo_root: Path, tmp_path: Path) -> None:
    HOW["SIGKILL"] = ("The `python -m flows.compress` process kills itself with SIGKILL: right after the "
                      "step's output is renamed into place and before its sidecar is (for `register`, "
                      "right after the model version row is written). Its temporary Prefect server must "
                      "exit with it, and the next flow command marks its run Crashed.")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pids = tmp_path / "children.txt"
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(kill_home), PREFECT_LOCAL_STORAGE_PATH=str(prefect_storage),
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    command = [sys.executable, str(repo_root / "tests" / "fault_driver.py"), step, str(pids), "--",
               "--params", str(params_path), "--workdir", str(tmp_path / "work"),
               "--calibration", str(tmp_path / "calibration.json"), "--tracking-uri", uri, "--no-promote",
               *(arg for override in pipeline_overrides for arg in ("--set", override))]
    done = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-3000:]
    servers = [int(pid) for pid in pids.read_text().split()]
    assert servers, "the command had no temporary server"
    deadline = time.monotonic() + 15
    while any(process_alive(pid) for pid in servers):
        assert time.monotonic() < deadline, f"temporary server {servers} outlived its command"
        time.sleep(0.2)

    assert_clean(tmp_path, uri, killed=True)
    states = assert_rerun_completes(tmp_path, pipeline_overrides, uri, str(params_path), reference)
    record("SIGKILL", step, f"server exited with the command; rerun: {states}; same metrics")


def test_the_next_command_marks_the_killed_runs_crashed(kill_home: Path) -> None:
    """After the SIGKILL cells: their runs were left RUNNING; the next command's session ends that."""
    from prefect import get_client
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_SERVER_DATABASE_CONNECTION_URL,
        temporary_settings,
    )

    if len(MATRIX.get("SIGKILL", {})) != len(STEPS):
        pytest.skip("needs every SIGKILL cell")
    database = f"sqlite+aiosqlite:///{kill_home / 'prefect.db'}"  # the killed commands' own database
    with temporary_settings(updates={PREFECT_HOME: kill_home, PREFECT_API_URL: None,
                                     PREFECT_SERVER_DATABASE_CONNECTION_URL: database}), temporary_server():
        crashed = mark_orphans_crashed()  # each killed command's successor marked the one before it
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs()
        assert mark_orphans_crashed() == []
    assert len(crashed) == 1 and len(runs) == len(STEPS) and {run.state_type.value for run in runs} == {"CRASHED"}
    record("SIGKILL", "the next flow command", "each killed command's run was left RUNNING; the next command "
                                               f"marked it Crashed, so all {len(runs)} runs end Crashed")


# --- a full disk ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path | None]:
    """A 32 MiB tmpfs, or None where this machine does not allow mounting one."""
    mount = tmp_path_factory.mktemp("tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        yield None
        return
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write zeros until the disk is full; the file to delete to free it."""
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * (1 << 20))
                handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


@pytest.mark.parametrize("step", STEPS)
def test_a_full_disk_at_a_step(step: str, reference: dict[str, Any], small_disk: Path | None,
                               params_path: Path, pipeline_overrides: list[str], tmp_path: Path) -> None:
    folder = (small_disk / step) if small_disk else tmp_path
    folder.mkdir(exist_ok=True)
    HOW["disk full"] = (
        "The step's folder is on a 32 MiB tmpfs that is filled with zeros as the step starts, so its "
        "writes meet the kernel's real ENOSPC on every attempt; the filler is then deleted and the flow "
        "run again." if small_disk else
        "This machine does not allow mounting a tmpfs: each write of the step raises `OSError(ENOSPC)` "
        "(injected); the flow is then run again without it.")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the tracking store stays on a disk with room
    module, name = STEP_FUNCTIONS[step]
    real = getattr(module, name)
    fillers = []

    def on_a_full_disk(*args: Any, **kwargs: Any) -> Any:
        if small_disk:
            fillers.append(fill(small_disk))
            return real(*args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, name, on_a_full_disk)
        state = run_flow(folder, pipeline_overrides, uri, params=str(params_path))
    assert state.is_failed()
    with pytest.raises(OSError) as failure:
        state.result()
    assert failure.value.errno == errno.ENOSPC
    for filler in fillers:
        filler.unlink(missing_ok=True)
    assert MlflowClient(uri).search_model_versions() == []
    assert_clean(folder, uri)
    assert_rerun_completes(folder, pipeline_overrides, uri, str(params_path), reference)
    record("disk full", step, "failed with ENOSPC, no partial file, nothing registered; rerun completed, "
                              "same metrics")


def test_a_full_disk_is_one_line_and_exit_2_on_the_command_line(small_disk: Path | None, params_path: Path,
                                                                 repo_root: Path) -> None:
    if small_disk is None:
        pytest.skip("this machine does not allow mounting a tmpfs")
    filler = fill(small_disk)
    try:
        done = subprocess.run([sys.executable, "-m", "starfish.cli", "sample", "--params", str(params_path),
                               "--out", str(small_disk / "cli" / "calibration.json")],
                              cwd=repo_root, capture_output=True, text=True, timeout=120)
    finally:
        filler.unlink()
    lines = [line for line in done.stderr.splitlines() if line.startswith("starfish: error:")]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "No space left on device; free space there or write elsewhere" in lines[0]
    assert not list((small_disk / "cli").glob("*"))
    record("disk full", "the CLI", "`starfish sample` on a full disk: exit 2, one line naming the file and the fix, "
                                   "nothing written")


# --- the tracking server --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    if server.process.poll() is None:
        server.kill()


def test_the_tracking_server_down_from_the_start(reference: dict[str, Any], params_path: Path,
                                                 pipeline_overrides: list[str], tmp_path: Path) -> None:
    HOW["tracking server down"] = "Nothing listens at the tracking URI when the flow starts."
    start = time.monotonic()
    with pytest.raises(StarfishError, match="cannot be reached"):
        compress(params=str(params_path), overrides=pipeline_overrides, workdir=str(tmp_path / "work"),
                 calibration=str(tmp_path / "calibration.json"), tracking_uri=f"http://127.0.0.1:{free_port()}",
                 promote=False)
    seconds = time.monotonic() - start
    assert seconds < 60 and not (tmp_path / "work").exists() and not (tmp_path / "calibration.json").exists()
    record("tracking server down", "before any step",
           "the flow stops at its preflight in under 60 s, before any step runs or writes, with a "
           "`StarfishError` that names the URI")


@pytest.mark.parametrize("point", list(REGISTER_POINTS))
def test_the_tracking_server_killed_during_registration(point: str, reference: dict[str, Any],
                                                        mlflow_server: MlflowServer, params_path: Path,
                                                        pipeline_overrides: list[str], tmp_path: Path) -> None:
    HOW["tracking server killed"] = (
        "A real `mlflow server` is SIGKILLed from inside `register`: just before the run's params are "
        "logged (the run exists), just before the new version is tagged (its row exists), or just before "
        "the alias is set; it is started again on the same port and store before the rerun. The "
        "gate's side: a version whose run did not finish can never be promoted "
        "(`test_the_gate_refuses_a_version_whose_run_did_not_finish`).")
    uri = mlflow_server.uri
    before = {(v.name, v.version) for v in MlflowClient(uri).search_model_versions()}
    target = REGISTER_POINTS[point]
    import mlflow

    owner = mlflow if target == "log_params" else MlflowClient
    real: Callable = getattr(owner, target)
    kills = []

    def kill_first(*args: Any, **kwargs: Any) -> Any:
        if not kills:
            kills.append(1)
            mlflow_server.kill()
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the server stays down: waiting cannot help
        patch.setattr(owner, target, kill_first)
        state = run_flow(tmp_path, pipeline_overrides, uri, params=str(params_path))
    assert kills and state.is_failed()
    mlflow_server.start()
    assert_clean(tmp_path, uri, killed=True)
    assert_rerun_completes(tmp_path, pipeline_overrides, uri, str(params_path), reference)
    new = {(v.name, v.version) for v in MlflowClient(uri).search_model_versions()} - before
    assert len(new) == 1, new
    record("tracking server killed", point, "register failed, the server came back; the rerun removed the "
                                            "unfinished attempt and left exactly one version, same metrics")
