"""The compress flow end to end: real Prefect runs (test harness), a real MLflow sqlite store.

One run with a transient fault injected into registration shows the retry; running it again
shows every step `Cached`; a run killed mid-way and started again skips what it finished; a
deterministic error is never retried and leaves nothing registered.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId
from servers import served_predictions

from flows.compress import compress
from starfish import gate, steps, tracking
from starfish.config import GateConfig, HealConfig
from starfish.errors import StarfishError
from starfish.io import read_json, sha256_file, sidecar_path

pytestmark = pytest.mark.slow
STEPS = ["sample_calibration", "prune", "heal", "quantize", "evaluate", "register"]


@dataclass
class FlowRun:
    id: str
    result: dict[str, Any]


def run_compress(params: Path, overrides: list[str], folder: Path, uri: str, **options: Any) -> FlowRun:
    """One real flow run; raises if the flow failed."""
    state = compress(params=str(params), overrides=overrides, workdir=str(folder / "work"),
                     calibration=str(folder / "calibration.json"), tracking_uri=uri, return_state=True, **options)
    return FlowRun(str(state.state_details.flow_run_id), state.result())


def task_runs(flow_run_id: str) -> dict[str, Any]:
    """The flow run's own task runs by task name, read back from the Prefect API."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run for run in runs}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def first_run(prefect_harness, params_path: Path, pipeline_overrides: list[str], pipeline_dir: Path,
              store: str) -> tuple[FlowRun, int]:
    """The flow on the shared workdir, with the tracking store failing once (ConnectionError)."""
    calls = []
    real = tracking.log_compress_run

    def flaky(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("injected: tracking server unreachable")
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tracking, "log_compress_run", flaky)
        patch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # samples within the short test heal
        run = run_compress(params_path, pipeline_overrides, pipeline_dir, store)
    return run, len(calls)


def test_transient_fault_is_retried_and_the_flow_completes(first_run: tuple[FlowRun, int]) -> None:
    run, calls = first_run
    runs = task_runs(run.id)
    assert calls == 2
    assert runs["register"].run_count == 2 and runs["register"].state.name == "Completed"
    assert {name: runs[name].state.name for name in STEPS} == dict.fromkeys(STEPS, "Completed")


def test_compress_logs_and_registers_everything(first_run: tuple[FlowRun, int], store: str,
                                                 repo_root: Path) -> None:
    run, _ = first_run
    split, evaluation, registered = run.result["calibration"], run.result["evaluation"], run.result["registered"]
    client = MlflowClient(store)
    logged = client.get_run(registered["run_id"])

    manifest = read_json(split["path"])
    assert split["split_hash"] == manifest["content_sha256"]
    assert split["md5"] == hashlib.md5(Path(split["path"]).read_bytes()).hexdigest()
    tags = logged.data.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root, capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head and tags["starfish.git_dirty"] in ("true", "false")
    assert tags["mlflow.note.content"].startswith("# starfish_vit_fmnist: magnitude 0.5 + starfish")
    assert "| recovery |" in tags["mlflow.note.content"] and "data:image" not in tags["mlflow.note.content"]
    assert tags["starfish.calibration_split_hash"] == split["split_hash"]
    assert tags["starfish.calibration_dvc_md5"] == split["md5"]
    assert tags["starfish.model_name"] == "starfish_vit_fmnist"
    assert tags["prefect.flow_run_id"] == run.id
    assert logged.data.params["heal.steps"] == "8" and logged.data.params["prune.sparsity"] == "0.5"
    # the heal ran, and recorded, exactly the shipped params' preset with the one field the run set
    effective = asdict(HealConfig.from_preset("default", steps=8))
    assert read_json(sidecar_path(run.result["healed"]["path"]))["config"]["heal"] == effective
    assert {key: logged.data.params[f"heal.{key}"] for key in effective} == {k: str(v) for k, v in effective.items()}
    for key in gate.METRICS:
        assert logged.data.metrics[key] == pytest.approx(evaluation[key])
    assert logged.data.metrics["heal_seconds"] == pytest.approx(run.result["healed"]["heal_seconds"])
    assert logged.data.metrics["heal_seconds"] > 0
    assert 0 < logged.data.metrics["healed_top1"] <= 1 and logged.data.metrics["sparsity"] == pytest.approx(0.5)
    with get_client(sync_client=True) as prefect:  # the run lasts from the flow's start: the heal is inside it
        flow_started = prefect.read_flow_run(run.id).start_time.timestamp()
    assert logged.info.start_time / 1000 == pytest.approx(flow_started, abs=0.01)
    assert (logged.info.end_time - logged.info.start_time) / 1000 > logged.data.metrics["heal_seconds"]
    # one run for the flow: each step's state tagged as it ended, the machine sampled while it ran
    assert logged.info.status == "FINISHED" and tracking.ERROR_TAG not in tags
    assert {step: tags[tracking.STEP_TAG + step] for step in STEPS} == dict.fromkeys(STEPS, "Completed")
    assert tags[tracking.VERSION_TAG] == f"{registered['model_name']}/{registered['version']}"
    system = {key for key in logged.data.metrics if key.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
    assert [run.info.run_id for run in client.search_runs([logged.info.experiment_id])] == [logged.info.run_id]

    inputs = {tag.value: item.dataset for item in logged.inputs.dataset_inputs for tag in item.tags
              if tag.key == "mlflow.data.context"}
    assert inputs["calibration"].name == "calibration" and inputs["calibration"].digest == split["split_hash"][:32]
    assert inputs["evaluation"].name == "fashion-mnist-test" and '"num_rows": 500' in inputs["evaluation"].profile
    artifacts = {a.path for folder in ("masks", "report") for a in client.list_artifacts(logged.info.run_id, folder)}
    assert {"masks/masks.safetensors", "report/report.md", "report/report.html", "report/loss.png",
            "report/metrics.json"} <= artifacts
    report = Path(registered["report"]).read_text()
    assert "recovery" in report and "![healing loss](data:image/png;base64," in report  # the plot travels inside
    page = Path(registered["report"]).with_suffix(".html").read_text()  # as MLflow's viewer shows it
    assert "<td>recovery</td>" in page and "<img alt='healing loss' src='data:image/png;base64," in page

    name = registered["model_name"]
    challenger = client.get_model_version_by_alias(name, "challenger")
    assert str(challenger.version) == registered["version"] and challenger.run_id == logged.info.run_id
    assert challenger.description == tags["mlflow.note.content"]  # the model card
    assert client.get_registered_model(name).description.startswith("starfish_vit_fmnist compressed by starfish")
    promotion = run.result["promotion"]
    assert promotion["promoted"] == (evaluation["recovery"] >= 0.95)

    mlflow.set_tracking_uri(store)
    model = mlflow.pyfunc.load_model(f"models:/{name}@challenger")
    assert model.metadata.signature is not None
    images = np.zeros((3, 1, 28, 28), dtype=np.float32)
    assert np.asarray(model.predict(images)).shape == (3, 10)

    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    # the two summaries under stable keys, beside Prefect's record of the persisted flow result (no key)
    assert {artifact.key for artifact in artifacts if artifact.key} == {"compress-table", "compress-summary"}


def test_the_champion_is_the_compressed_model_and_serves_what_the_healed_model_predicts(
        first_run: tuple[FlowRun, int], params_path: Path, pipeline_overrides: list[str], store: str,
        tmp_path: Path) -> None:
    """Registered as the compressed export (no pickle), loaded by alias, and served over HTTP on loopback."""
    import torch

    from flows.promote import promote
    from starfish.models import load_checkpoint

    run, _ = first_run
    registered, healed = run.result["registered"], run.result["healed"]
    name, client = registered["model_name"], MlflowClient(store)
    decision = promote(name, registered["version"], str(params_path), [*pipeline_overrides, "gate.min_recovery=0"],
                       store)
    assert decision["promoted"] or decision["reasons"] == []
    version = client.get_model_version_by_alias(name, "champion")
    ratio = float(version.tags["size_ratio"])
    assert 0 < ratio < 1 and int(version.tags["size_bytes"]) > 0
    refused = promote(name, registered["version"], str(params_path),
                      [*pipeline_overrides, "gate.min_recovery=0", f"gate.max_size_ratio={ratio / 2}"], store)
    assert not refused["promoted"] and any("gate.max_size_ratio" in reason for reason in refused["reasons"])

    files = {f.path for f in client.list_artifacts(version.run_id, "model")}
    artifacts = {f.path for f in client.list_artifacts(version.run_id, "model/artifacts")}
    assert "model/MLmodel" in files and not any(path.endswith((".pkl", ".pth")) for path in files | artifacts)
    assert artifacts == {"model/artifacts/model.sparse.safetensors"}

    healed_model, _, _ = load_checkpoint(healed["path"])
    images = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        expected = healed_model(torch.from_numpy(images)).numpy()
    mlflow.set_tracking_uri(store)
    champion = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert np.array_equal(np.asarray(champion.predict(images)), expected)

    served = served_predictions(store, f"models:/{name}@champion", images, tmp_path / "serve.log")
    assert served.shape == expected.shape and np.array_equal(served, expected)


def test_same_inputs_again_skip_every_step(first_run: tuple[FlowRun, int], params_path: Path,
                                           pipeline_overrides: list[str], pipeline_dir: Path, store: str) -> None:
    again = run_compress(params_path, pipeline_overrides, pipeline_dir, store)
    runs = task_runs(again.id)
    assert {name: runs[name].state.name for name in STEPS} == dict.fromkeys(STEPS, "Cached")
    assert again.result["states"] == dict.fromkeys(STEPS, "Cached")
    assert again.result["registered"]["run_id"] == first_run[0].result["registered"]["run_id"]


def test_a_tampered_pickle_result_record_is_refused_and_rewritten(
        first_run: tuple[FlowRun, int], prefect_storage: Path, params_path: Path, pipeline_overrides: list[str],
        pipeline_dir: Path, store: str, tmp_path: Path) -> None:
    """Results are stored as plain JSON; a record swapped for a pickle payload never runs: the step
    is recomputed and its record written again as plain JSON."""
    from prefect.serializers import PickleSerializer

    key = Path(first_run[0].result["pruned"]["path"]).parent.name.split("-", 1)[1]
    metadata_path = next((prefect_storage / "cache-keys").glob(key + "*"))  # it names the result's file
    metadata = json.loads(metadata_path.read_bytes())
    assert metadata["serializer"] == {"type": "starfish-json"}
    result_path = Path(metadata["storage_key"])
    assert json.loads(result_path.read_bytes()) == first_run[0].result["pruned"]

    marker = tmp_path / "code-ran"
    metadata["serializer"] = {"type": "pickle", "picklelib": "pickle"}
    metadata_path.write_text(json.dumps(metadata))
    result_path.write_bytes(PickleSerializer(picklelib="pickle").dumps(Payload(str(marker))))
    again = run_compress(params_path, pipeline_overrides, pipeline_dir, store, promote=False)
    assert not marker.exists()
    assert again.result["states"]["prune"] == "Completed" and again.result["pruned"] == first_run[0].result["pruned"]
    assert json.loads(metadata_path.read_bytes())["serializer"] == {"type": "starfish-json"}


class Payload:
    """Unpickling this creates a file: proof that a record was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.path}",))


def test_a_cached_step_whose_file_is_gone_is_rebuilt(first_run: tuple[FlowRun, int], params_path: Path,
                                                       pipeline_overrides: list[str], pipeline_dir: Path,
                                                       store: str) -> None:
    healed = Path(first_run[0].result["healed"]["path"])
    digest = sha256_file(healed)
    healed.unlink()
    again = run_compress(params_path, pipeline_overrides, pipeline_dir, store, promote=False)
    states = again.result["states"]
    assert states["heal"] == "Completed" and healed.is_file() and sha256_file(healed) == digest
    assert states["sample_calibration"] == states["prune"] == "Cached"
    assert states["evaluate"] == states["register"] == "Cached"  # the rebuilt file has the same bytes
    assert again.result["evaluation"]["recovery"] == first_run[0].result["evaluation"]["recovery"]


def test_killed_run_resumes_with_finished_steps_skipped(first_run: tuple[FlowRun, int], prefect_storage: Path,
                                                        params_path: Path, pipeline_overrides: list[str],
                                                        tmp_path: Path, store: str, repo_root: Path) -> None:
    """Kill a run (SIGKILL, in its own process) while it heals; the next run reuses sample and prune."""
    command = [sys.executable, "-m", "flows.compress", "--params", str(params_path), "--workdir",
               str(tmp_path / "work"), "--calibration", str(tmp_path / "calibration.json"), "--tracking-uri", store,
               "--no-promote", *(arg for override in pipeline_overrides for arg in ("--set", override))]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_LOCAL_STORAGE_PATH": str(prefect_storage), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log = (tmp_path / "killed.log").open("w")
    process = subprocess.Popen(command, cwd=repo_root, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        pruned_record = None
        while pruned_record is None:
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "prune never finished"
            dirs = list((tmp_path / "work").glob("prune-*"))
            records = [p for d in dirs for p in prefect_storage.glob(d.name.split("-", 1)[1] + "*")]
            pruned_record = records[0] if records else None
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not list((tmp_path / "work").glob("evaluate-*")), "the run got past healing before the kill"

    resumed = run_compress(params_path, pipeline_overrides, tmp_path, store, promote=False)
    runs = task_runs(resumed.id)
    assert runs["sample_calibration"].state.name == "Cached" and runs["prune"].state.name == "Cached"
    assert {runs[name].state.name for name in ("heal", "evaluate", "register")} == {"Completed"}
    reference = first_run[0].result["evaluation"]
    for key in ("dense_top1", "pruned_top1", "healed_top1", "recovery", "sparsity"):
        assert resumed.result["evaluation"][key] == reference[key]


def test_failed_evaluation_is_not_retried_and_nothing_is_registered(
        prefect_harness, params_path: Path, pipeline_overrides: list[str], pipeline_dir: Path,
        tmp_path: Path) -> None:
    calls = []

    def broken(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(1)
        raise StarfishError("injected: healed weights at pruned positions are non-zero")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(steps, "evaluate_step", broken)
        state = compress(params=str(params_path), overrides=[*pipeline_overrides, "evaluate.batch_size=250"],
                         workdir=str(pipeline_dir / "work"), calibration=str(pipeline_dir / "calibration.json"),
                         tracking_uri=uri, return_state=True)
    assert state.is_failed() and calls == [1]
    runs = task_runs(str(state.state_details.flow_run_id))
    assert runs["evaluate"].run_count == 1 and runs["evaluate"].state.name == "Failed"
    assert "register" not in runs
    client = MlflowClient(uri)
    assert client.search_model_versions() == []
    # the flow's run ended FAILED with the line the failure printed, its finished steps tagged
    [failed] = client.search_runs([client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id])
    assert failed.info.status == "FAILED" and failed.info.end_time
    assert failed.data.tags[tracking.ERROR_TAG] == "injected: healed weights at pruned positions are non-zero"
    assert failed.data.tags[tracking.STEP_TAG + "heal"] in ("Completed", "Cached")
    assert failed.data.tags[tracking.STEP_TAG + "evaluate"] == "Failed"


def test_a_registration_that_dies_part_way_leaves_one_version_and_no_orphan(
        first_run: tuple[FlowRun, int], params_path: Path, pipeline_overrides: list[str], pipeline_dir: Path,
        tmp_path: Path) -> None:
    """The tracking store fails right after the version row is written; the retry cleans up and
    registers once, and only a version of a FINISHED run can become champion."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    attempts: list[str] = []
    real = MlflowClient.set_registered_model_alias

    def dying(self: MlflowClient, name: str, alias: str, version: str) -> None:
        if alias == tracking.CHALLENGER:
            attempts.append(str(version))
            if len(attempts) == 1:
                raise ConnectionError("injected: the tracking server went away after the version was written")
        real(self, name, alias, version)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MlflowClient, "set_registered_model_alias", dying)
        result = run_compress(params_path, pipeline_overrides, pipeline_dir, uri)
    client = MlflowClient(uri)
    versions = client.search_model_versions()
    assert attempts == ["1", "2"] and [str(v.version) for v in versions] == ["2"]
    assert result.result["registered"]["version"] == "2" and result.result["promotion"]["promoted"]
    assert client.get_run(versions[0].run_id).info.status == "FINISHED"
    assert versions[0].tags[tracking.REGISTER_KEY_TAG]

    again = run_compress(params_path, pipeline_overrides, pipeline_dir, uri)  # cached: nothing new
    assert again.result["registered"]["version"] == "2" and len(client.search_model_versions()) == 1


def test_the_gate_refuses_a_version_whose_run_did_not_finish(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    with mlflow.start_run(experiment_id=client.create_experiment("gate")) as run:
        mlflow.log_metrics({key: 1.0 for key in gate.METRICS} | {"sparsity_drift": 0.0})
    client.set_terminated(run.info.run_id, "FAILED")
    client.create_registered_model("orphan")
    client.create_model_version("orphan", source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    decision = tracking.promote("orphan", GateConfig(min_recovery=0.5), uri, version="1")
    assert not decision["promoted"] and decision["champion"] is None
    assert any("is FAILED, not FINISHED" in reason for reason in decision["reasons"])
    assert any(tracking.REGISTER_KEY_TAG in reason for reason in decision["reasons"])
