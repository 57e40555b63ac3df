"""docs/pipeline.md's commands, run as the doc writes them, block by block in its order, in a
copy of the repository whose params.yaml sets a tiny budget, against real servers on loopback.

Only what cannot run here as written is rewritten, in one table (`substitutions`): the example
hosts become the loopback servers, credentials become the S3 stand-in's, fixed ports become free
ones. A server the doc starts in the foreground runs in the background until the test ends. A
block this test does not run names the test that runs it, or why nothing does (`ELSEWHERE`);
every other block runs, so a command added to the doc is a command tested.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from doc_blocks import DOC, as_script, kill, shell_blocks, started
from servers import AWS, Service, copy_checkout, s3_keys, s3_server

from flows.session import free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
# A block's first command -> where it runs instead, or why it does not.
ELSEWHERE = {
    "prefect server start": "tests/test_pipeline_pool.py runs this block as written, with rewrites of its own "
                            "(the deployment run's grid narrowed to three points, the GPU worker line run for two "
                            "GPUs), and checks the sweep, the workers and the trigger it leaves",
}
TINY = {"heal": {"steps": 4}, "evaluate": {"max_samples": 200}}  # the same steps, in seconds


def substitutions(ports: dict[str, int], s3: str, commit: str) -> list[tuple[str, str]]:
    """(as the doc writes it, as it runs here), applied in order to every command."""
    image = json.dumps([[[[0.0] * 28] * 28]])  # one normalized 28 x 28 image, as the served model takes
    return [
        ("https://s3.example.com", s3), ("https://minio.example.com", s3),
        ("AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...",
         f"AWS_ACCESS_KEY_ID={AWS['AWS_ACCESS_KEY_ID']} AWS_SECRET_ACCESS_KEY={AWS['AWS_SECRET_ACCESS_KEY']}"),
        ("--host 0.0.0.0 --port 5000", f"--host 127.0.0.1 --port {ports['mlflow']}"),
        ("http://mlflow.example.com:5000", f"http://127.0.0.1:{ports['mlflow']}"),
        ("mlflow ui --backend-store-uri sqlite:///mlflow.db",
         f"mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port {ports['ui']}"),
        ("--port 5001", f"--port {ports['serve']}"), ("localhost:5001", f"127.0.0.1:{ports['serve']}"),
        ("[[[[0.0, ...]]]]", image), ("<commit>", commit),
        ("make demo", "make -o setup demo"),  # the environment is this one: its setup is done
    ]


def sandbox(repo_root: Path, folder: Path) -> Path:
    """The checkout's files committed to a git repository of their own, its params.yaml
    at the tiny budget, its .venv this environment."""
    copy = copy_checkout(repo_root, folder / "repo")
    params = yaml.safe_load((copy / "params.yaml").read_text())
    for section, fields in TINY.items():
        params.setdefault(section, {}).update(fields)
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (copy / ".venv").symlink_to(Path(sys.prefix))
    commit(copy, "the repository")
    return copy


def commit(repo: Path, message: str) -> str:
    for command in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=starfish", "-c", "user.email=starfish@localhost", "commit", "-q",
                     "--allow-empty", "-m", message]):
        subprocess.run(command, cwd=repo, check=True, capture_output=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()


def test_every_command_in_the_pipeline_doc_runs(repo_root: Path, tmp_path: Path) -> None:
    blocks = shell_blocks((repo_root / DOC).read_text())
    firsts = [lines[0] for lines in blocks]
    assert all(any(first.startswith(key) for first in firsts) for key in ELSEWHERE), "ELSEWHERE names a gone block"
    copy = sandbox(repo_root, tmp_path)
    s3 = s3_server(tmp_path, "my-bucket")
    port = free_port()
    home = {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    prefect = Service("prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                      tmp_path, {**os.environ, **home, "PREFECT_UI_ENABLED": "false",
                                 "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'p.db'}"},
                      health=f"http://127.0.0.1:{port}/api/health")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}, **AWS, **home,
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "prefect-storage"), "STARFISH_CACHE_DIR": str(tmp_path / "c")}
    ports = {"mlflow": free_port(), "ui": free_port(), "serve": free_port()}
    outputs: dict[str, str] = {}
    try:
        s3.start()
        prefect.start()
        for lines in blocks:
            if any(lines[0].startswith(key) for key in ELSEWHERE):
                continue
            # going back to a commit: the one the runs above left, committed as a user would have
            at = commit(copy, "the runs") if lines[0].startswith("git checkout") else ""
            script = as_script(lines, substitutions(ports, s3.url, at), tmp_path)
            done = subprocess.run(["bash", "-c", script], cwd=copy, env=env, capture_output=True, text=True,
                                  timeout=900)
            outputs[lines[0]] = done.stdout + done.stderr
            assert done.returncode == 0, f"{DOC}'s block failed here:\n{script}\n{outputs[lines[0]][-5000:]}"
        pushed = s3_keys(s3.url, "my-bucket")  # what the S3 remote's block pushed
    finally:
        for process in started(tmp_path):
            kill(process.pid)
        prefect.kill()
        s3.kill()
    # what the doc says each one shows
    demo = outputs["make demo"]
    assert "recovery" in demo and "steps: sample_calibration Completed" in demo, demo[-3000:]
    assert "recovery" in outputs["dvc repro"] and "dvc_plots" in outputs["dvc repro"], outputs["dvc repro"][-3000:]
    again = outputs["git checkout <commit> && dvc checkout"]  # the demo's inputs again: its steps, its numbers
    assert "steps: sample_calibration Cached, prune Cached, heal Cached, quantize Cached, evaluate Cached" in again, \
        again[-3000:]
    healed = [re.search(r"\| healed (\S+) \|", output) for output in (again, demo)]
    assert healed[0] and healed[1] and healed[0].group(1) == healed[1].group(1), (again[-2000:], demo[-2000:])
    served = outputs[next(first for first in outputs if first.startswith("starfish serve"))]
    assert json.loads(served.strip().splitlines()[-1])["predictions"][0].__len__() == 10, served[-2000:]
    calibration = yaml.safe_load((copy / "dvc.lock").read_text())["stages"]["calibrate"]["outs"][0]["md5"]  # the split
    assert f"starfish/files/md5/{calibration[:2]}/{calibration[2:]}" in pushed, sorted(pushed)[:20]
    watched = outputs[next(first for first in outputs if first.startswith("python -m flows.watch"))]
    assert "has no champion: nothing to compare" in watched, watched[-2000:]
