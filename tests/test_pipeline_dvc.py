"""DVC stages and the data-versioned rerun, in a real git + DVC project in a temp folder.

`dvc repro` runs the five stages through the CLI, then reruns only what a params change
touches. The compress flow takes its calibration split from the `calibrate` stage: a new seed
gives a new split hash and a new MLflow run tagged with it; checking the old commit out
again (`git checkout` + `dvc checkout`) and recomputing every step gives back the same split
hash, byte-identical outputs and the same metrics, so registration finds the first version.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

from flows.compress import compress
from starfish.errors import StarfishError

pytestmark = pytest.mark.slow
SCORES = ("dense_top1", "pruned_top1", "healed_top1", "recovery", "sparsity")


def sh(repo: Path, *command: str) -> str:
    """Run git or dvc in the project; the venv's scripts (`starfish`) first on PATH."""
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    if command[0] == "dvc":
        command = (sys.executable, "-m", *command)
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def set_param(repo: Path, section: str, field: str, value: object) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][field] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def locked_md5(repo: Path, path: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return next(out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", []) if out["path"] == path)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, repo_root: Path, params_path: Path,
            demo_checkpoint: Path) -> Path:
    """A git + DVC project holding this repository's dvc.yaml and params.yaml (the tests' recipe,
    fast settings)."""
    repo = tmp_path_factory.mktemp("project")
    shutil.copy(repo_root / "dvc.yaml", repo / "dvc.yaml")
    (repo / "model").mkdir()
    shutil.copy(demo_checkpoint, repo / "model" / "dense.safetensors")
    shutil.copy(params_path, repo / "params.yaml")
    set_param(repo, "model", "checkpoint", "model/dense.safetensors")
    set_param(repo, "heal", "steps", 8)
    set_param(repo, "evaluate", "max_samples", 500)
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "git", "config", "user.email", "ci@starfish.local")
    sh(repo, "git", "config", "user.name", "ci")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "dvc", "config", "core.analytics", "false")
    sh(repo, "dvc", "remote", "add", "-d", "local", str(tmp_path_factory.mktemp("dvc-remote")))
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", "project")
    return repo


def test_dvc_repro_runs_the_stages_then_only_what_changed(project: Path) -> None:
    first = sh(project, "dvc", "repro")
    stages = ("calibrate", "prune", "heal", "quantize", "evaluate")
    assert [s for s in stages if f"Running stage '{s}'" in first] == list(stages)
    metrics = json.loads(sh(project, "dvc", "metrics", "show", "--json"))
    scores = next(iter(metrics.values()))["data"]["out/dvc/metrics.json"]["data"]
    assert 0 < scores["recovery"] == scores["served_recovery"] and scores["sparsity"] == pytest.approx(0.5)
    assert scores["quant"] == "none"  # the shipped params serve the model in float, as ONNX
    plots = json.loads(sh(project, "dvc", "plots", "show", "--json"))["data"]
    assert list(plots) == ["healing_loss"]  # one plot of the heal curve, not a second stage plot
    [spec] = plots["healing_loss"]
    encoding = json.dumps(spec["content"])
    assert "Adam step" in encoding and "alignment loss (1 - cosine similarity)" in encoding
    assert {row["rev"] for row in spec["content"]["data"]["values"]} and \
        {"calibration_loss", "holdout_loss"} <= {row.get("field") for row in spec["content"]["data"]["values"]}

    assert "Running stage" not in sh(project, "dvc", "repro")
    set_param(project, "evaluate", "max_samples", 400)
    again = sh(project, "dvc", "repro")
    assert "Running stage 'evaluate'" in again and "Running stage 'heal'" not in again
    assert "Running stage 'calibrate'" not in again and "Running stage 'prune'" not in again
    assert "Running stage 'quantize'" not in again
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-q", "-m", "pipeline outputs")
    # every stage run again from scratch writes the same bytes: dvc.lock does not move
    sh(project, "dvc", "repro", "--force")
    assert sh(project, "git", "status", "--porcelain", "dvc.lock") == ""

    sh(project, "dvc", "push")
    split = project / "data" / "calibration.json"
    md5 = locked_md5(project, "data/calibration.json")
    split.unlink()
    shutil.rmtree(project / ".dvc" / "cache")
    sh(project, "dvc", "pull")
    assert locked_md5(project, "data/calibration.json") == md5 and split.is_file()
    assert sh(project, "dvc", "status").strip() == "Data and pipelines are up to date."


def test_dvc_experiments_set_params_and_a_failed_one_changes_nothing(project: Path) -> None:
    """`dvc exp run -S` rewrites params.yaml with ruamel.yaml, so `nm: 2:4` comes back unquoted
    (YAML 1.1 would read the base-60 integer 124): the stages still read it as the pattern."""
    before = (project / "params.yaml").read_text()
    assert "nm: '2:4'" in before  # written by PyYAML, quoted, before DVC rewrites it
    done = sh(project, "dvc", "exp", "run", "-S", "prune.sparsity=0.75")
    assert "Running stage 'prune'" in done and "Running stage 'calibrate'" not in done
    written = yaml.safe_load((project / "params.yaml").read_text())
    assert "nm: 2:4\n" in (project / "params.yaml").read_text() and written["prune"]["sparsity"] == 0.75
    metrics = json.loads((project / "out" / "dvc" / "metrics.json").read_text())
    assert metrics["sparsity"] == pytest.approx(0.75)
    shown = json.loads(sh(project, "dvc", "exp", "show", "--json"))
    listed = [rev["data"]["params"]["params.yaml"]["data"]["prune"] for commit in shown
              for exp in commit.get("experiments") or [] for rev in exp["revs"]]
    assert {"method": "magnitude", "sparsity": 0.75, "nm": "2:4", "global_ranking": False,
            "structure": "unstructured"} in listed
    sh(project, "git", "checkout", "-q", "--", "params.yaml", "dvc.lock")
    sh(project, "dvc", "checkout", "-q")

    # The model served as onnxruntime's static int8 model: only quantize and evaluate run again.
    done = sh(project, "dvc", "exp", "run", "--temp", "-S", "quant.mode=int8-static")
    assert "Running stage 'quantize'" in done and "Running stage 'evaluate'" in done
    assert "Running stage 'heal'" not in done and "Running stage 'prune'" not in done
    shown = json.loads(sh(project, "dvc", "exp", "show", "--json"))
    served = [rev["data"]["metrics"]["out/dvc/metrics.json"]["data"] for commit in shown
              for exp in commit.get("experiments") or [] for rev in exp["revs"]
              if rev["data"]["params"]["params.yaml"]["data"]["quant"]["mode"] == "int8-static"]
    assert served and served[0]["quant"] == "int8-static" and served[0]["recovery"] == served[0]["served_recovery"]
    assert (project / "params.yaml").read_text() == before

    # As the docs say: an experiment in a temporary copy (--temp) that fails leaves the workspace as it was.
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    failed = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "--temp", "-S", "prune.sparsity=1.5"],
                            cwd=project, env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "prune.sparsity=1.5 must be in [0, 1)" in failed.stdout + failed.stderr
    assert (project / "params.yaml").read_text() == before
    assert sh(project, "git", "status", "--porcelain", "params.yaml", "dvc.lock") == ""


def test_new_seed_new_split_and_old_commit_same_split_and_metrics(
        project: Path, prefect_harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)

    def run() -> tuple[dict, dict]:
        result = compress(params="params.yaml", workdir="out/compress", calibration="data/calibration.json",
                          tracking_uri=uri, promote=False)
        logged = client.get_run(result["registered"]["run_id"])
        return result, logged.data

    first, first_logged = run()
    old_commit = sh(project, "git", "rev-parse", "HEAD").strip()
    split_hash = first["calibration"]["split_hash"]
    assert first_logged.tags["starfish.calibration_split_hash"] == split_hash
    assert first_logged.tags["starfish.calibration_dvc_md5"] == locked_md5(project, "data/calibration.json")
    assert first_logged.tags["mlflow.source.git.commit"] == old_commit

    set_param(project, "calibration", "seed", 1)
    second, second_logged = run()
    assert second["calibration"]["split_hash"] != split_hash
    assert second_logged.tags["starfish.calibration_split_hash"] == second["calibration"]["split_hash"]
    assert second_logged.tags["starfish.calibration_dvc_md5"] == locked_md5(project, "data/calibration.json")
    assert second["registered"]["run_id"] != first["registered"]["run_id"]
    sh(project, "git", "commit", "-q", "-am", "calibration seed 1")

    sh(project, "git", "checkout", "-q", old_commit)
    sh(project, "dvc", "checkout")
    with temporary_settings(updates={PREFECT_TASKS_REFRESH_CACHE: True}):
        third, third_logged = run()
    assert third["states"] == dict.fromkeys(third["states"], "Completed")  # recomputed, not reused
    assert third["calibration"]["split_hash"] == split_hash
    assert third_logged.tags["starfish.calibration_split_hash"] == split_hash
    assert {k: third["evaluation"][k] for k in SCORES} == {k: first["evaluation"][k] for k in SCORES}
    # every output recomputed byte for byte, so registration finds the first run's version again
    assert third["pruned"]["sha256"] == first["pruned"]["sha256"]
    assert third["healed"]["sha256"] == first["healed"]["sha256"]
    assert third["registered"]["version"] == first["registered"]["version"]
    assert third["registered"]["run_id"] == first["registered"]["run_id"] != second["registered"]["run_id"]

    with pytest.raises(StarfishError, match="not as overrides"):
        compress(params="params.yaml", overrides=["calibration.seed=7"], workdir="out/compress",
                 calibration="data/calibration.json", tracking_uri=uri, promote=False)
