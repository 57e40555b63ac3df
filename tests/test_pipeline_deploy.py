"""prefect.yaml deploys as written: `prefect deploy --all` against a real (test) Prefect API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.settings import PREFECT_API_URL

pytestmark = pytest.mark.slow


def test_prefect_yaml_deploys_nightly_compress_and_sweep_on_the_gpu_pool(prefect_harness, repo_root: Path) -> None:
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="starfish-gpu", type="process"))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "STARFISH_REPO": "https://example.com/starfish.git"}
    done = subprocess.run([str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--all"],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("compress/nightly-compress")
        sweep = client.read_deployment_by_name("sweep/sweep")
    assert nightly.work_pool_name == sweep.work_pool_name == "starfish-gpu"
    assert nightly.job_variables["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert nightly.parameters["overrides"] == ["model.device=cuda"]
    schedule = nightly.schedules[0].schedule
    assert schedule.cron == "0 2 * * *" and schedule.timezone == "Europe/Berlin"
    steps = [next(iter(step)) for step in nightly.pull_steps]
    assert steps == ["prefect.deployments.steps.git_clone", "prefect.deployments.steps.set_working_directory",
                     "prefect.deployments.steps.run_shell_script"]
    assert nightly.pull_steps[0]["prefect.deployments.steps.git_clone"]["repository"] == \
        "https://example.com/starfish.git"
    assert nightly.pull_steps[2]["prefect.deployments.steps.run_shell_script"]["script"].startswith("dvc pull")
    assert sweep.parameters["healers"] == ["none", "layerwise", "starfish"]
