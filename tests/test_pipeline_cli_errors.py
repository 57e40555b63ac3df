"""The flows' command lines end a StarfishError in one line and exit 2, before or inside a flow run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.session import free_port

pytestmark = pytest.mark.slow


def run_flow(module: str, args: list[str], cwd: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PYTHONPATH": str(cwd)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("starfish: error:")]


@pytest.mark.parametrize("module", ["flows.compress", "flows.sweep", "flows.promote", "flows.watch"])
def test_a_bad_config_ends_in_one_line_before_the_flow(module: str, repo_root: Path, params_path: Path,
                                                       tmp_path: Path) -> None:
    result = run_flow(module, ["--params", str(params_path), "--set", "prune.sparsity=abc",
                               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], repo_root, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == ["starfish: error: prune.sparsity='abc' must be a number (float)"]
    assert result.stdout == "" and not (tmp_path / "mlflow.db").exists()


def test_a_pool_sweep_with_a_store_on_one_machine_ends_in_one_line(repo_root: Path, params_path: Path,
                                                                   tmp_path: Path) -> None:
    result = run_flow("flows.sweep", ["--params", str(params_path), "--mode", "pool",
                                      "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], repo_root, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("starfish: error: a pool sweep registers from every worker") and "http://" in line
    assert not (tmp_path / "mlflow.db").exists()


def test_a_starfish_error_inside_a_flow_run_ends_in_one_line_without_a_traceback(repo_root: Path, params_path: Path,
                                                                                 tmp_path: Path) -> None:
    """`promote --version 999` fails inside the flow's task: Prefect logs the failure, without a traceback."""
    result = run_flow("flows.promote", ["--params", str(params_path), "--version", "999",
                                        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], repo_root, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "no version 999 of starfish-starfish-vit-fmnist" in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout


def test_an_unreachable_tracking_server_fails_fast_before_any_compute(repo_root: Path, params_path: Path,
                                                                     tmp_path: Path) -> None:
    port = free_port()
    start = time.monotonic()
    result = run_flow("flows.compress", ["--params", str(params_path), "--workdir", str(tmp_path / "work"),
                                         "--calibration", str(tmp_path / "calibration.json"),
                                         "--tracking-uri", f"http://127.0.0.1:{port}"], repo_root, tmp_path)
    assert time.monotonic() - start < 60
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and f"MLflow tracking server http://127.0.0.1:{port} cannot be reached" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "calibration.json").exists()


def test_ctrl_c_during_a_flow_is_one_line_and_exit_130(repo_root: Path, params_path: Path,
                                                       pipeline_overrides: list[str], tmp_path: Path) -> None:
    """SIGINT to the command's process group, as a terminal sends it, while the heal runs: the
    run is marked crashed, no healed checkpoint is left, and the user reads one line."""
    import signal

    work = tmp_path / "work"
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PYTHONPATH=str(repo_root))
    overrides = [*pipeline_overrides, "heal.steps=100000"]
    process = subprocess.Popen([sys.executable, "-m", "flows.compress", "--params", str(params_path),
                                "--workdir", str(work), "--calibration", str(tmp_path / "calibration.json"),
                                "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-promote",
                                *(arg for override in overrides for arg in ("--set", override))],
                               cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True,  # as from a terminal, even under a shell that ignores it:
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while not list(work.glob("prune-*/pruned.safetensors")):
            assert process.poll() is None and time.monotonic() < deadline, "the flow never reached the heal"
            time.sleep(0.5)
        time.sleep(5)  # inside the heal
        os.killpg(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr + stdout, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("interrupted: the flow run is marked crashed")
    assert len([line for line in stderr.splitlines() if "KeyboardInterrupt" in line]) <= 1, stderr[-3000:]
    assert list(work.glob("heal-*")) and not list(work.glob("heal-*/healed.safetensors"))
    assert not list(work.rglob(".*.tmp"))
