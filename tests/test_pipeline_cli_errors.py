"""The flows' command lines end a StarfishError in one line and exit 2, before or inside a flow run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.session import free_port


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
