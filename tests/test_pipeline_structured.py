"""Structured pruning through the compress flow: a real Prefect run and MLflow store, the slim
model registered as ONNX with its cost against dense, gated on FLOPs, and served on loopback."""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from servers import served

from flows.compress import compress
from flows.promote import promote
from starfish.io import read_json
from starfish.models import load_checkpoint
from starfish.params import load_config
from starfish.pruning.slim import architecture_of

pytestmark = pytest.mark.slow


def test_the_compress_flow_takes_typed_settings_that_prefect_offers_as_a_form() -> None:
    from prefect.utilities.callables import parameter_schema

    from flows.parameters import Settings, as_overrides

    definitions = parameter_schema(compress.fn).model_dump()["definitions"]
    prune, heal = definitions["PruneSettings"]["properties"], definitions["HealSettings"]["properties"]
    assert prune["sparsity"]["anyOf"][0] == {"type": "number"}
    assert heal["preset"]["anyOf"][0]["enum"] == ["default", "faithful", "recommended", "fast"]
    assert as_overrides(Settings(prune={"sparsity": 0.75, "structure": "neurons+heads"}, heal={"steps": 8})) == \
        ["prune.sparsity=0.75", 'prune.structure="neurons+heads"', "heal.steps=8"]
    assert as_overrides(Settings()) == []  # the form's default sets nothing
    kwargs = Settings(model={"kwargs": {"img_size": 64}})
    assert load_config(None, as_overrides(kwargs)).model.kwargs == {"img_size": 64}
    with pytest.raises(ValueError, match="heal.preset"):
        Settings(heal={"preset": "fastest"})


def test_a_slim_model_is_registered_as_onnx_gated_on_flops_and_served(
        prefect_harness, params_path: Path, pipeline_overrides: list[str], tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [*pipeline_overrides, "prune.structure=neurons+heads"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the structure set as a typed parameter, as Prefect's form sets it
        state = compress(params=str(params_path), overrides=pipeline_overrides, workdir=str(tmp_path / "work"),
                         calibration=str(tmp_path / "calibration.json"), tracking_uri=store, return_state=True,
                         settings={"prune": {"structure": "neurons+heads"}})
    assert not [w for w in caught if "type hint" in str(w.message).lower()]  # the pyfunc's hints are taken
    assert not [w for w in caught if "integer column" in str(w.message)]  # nor schema hints on the inputs
    result = state.result()
    registered, healed = result["registered"], result["healed"]
    metrics = read_json(result["evaluation"]["path"])
    assert metrics["sparsity"] == pytest.approx(0.5) and metrics["sparsity_drift"] == 0
    assert 0.4 < metrics["flops_ratio"] < 0.6 and 0.4 < metrics["params_ratio"] < 0.6

    report = Path(registered["report"]).read_text()
    assert "neurons+heads" in report.splitlines()[0] and "| flops_ratio |" in report and "| recovery |" in report
    client, name = MlflowClient(store), registered["model_name"]
    version = client.get_model_version(name, registered["version"])
    assert version.tags["format"] == "onnx"
    assert {key: version.tags[key] for key in ("pruner", "structure", "sparsity", "healer", "preset")} == \
        {"pruner": "magnitude", "structure": "neurons+heads", "sparsity": "0.5", "healer": "starfish",
         "preset": "default"}
    assert len(version.tags["dense_state_sha256"]) == 64
    [found] = client.search_model_versions(f"name = '{name}' and tags.structure = 'neurons+heads'")
    assert found.version == version.version
    assert float(version.tags["flops_ratio"]) == pytest.approx(metrics["flops_ratio"])
    assert float(version.tags["latency_ratio"]) > 0 and float(version.tags["params_ratio"]) < 0.6
    run = client.get_run(version.run_id)
    assert run.data.params["prune.structure"] == "neurons+heads"
    assert {"flops_ratio", "params_ratio", "latency_ratio"} <= set(run.data.metrics)
    artifacts = {f.path for f in client.list_artifacts(version.run_id, "model/artifacts")}
    assert artifacts == {"model/artifacts/model.onnx"}

    refused = promote(name, registered["version"], str(params_path),
                      [*overrides, "gate.min_recovery=0", "gate.max_flops_ratio=0.3"], store)
    assert not refused["promoted"] and any("gate.max_flops_ratio" in reason for reason in refused["reasons"])
    assert promote(name, registered["version"], str(params_path),
                   [*overrides, "gate.min_recovery=0", "gate.max_flops_ratio=0.6"], store)["promoted"]

    healed_model, _, _ = load_checkpoint(healed["path"])
    assert architecture_of(healed_model) is not None
    images = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        expected = healed_model(torch.from_numpy(images)).numpy()
    mlflow.set_tracking_uri(store)
    champion = np.asarray(mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(images))
    assert np.abs(champion - expected).max() <= 1e-4
    with served(store, f"models:/{name}@champion", tmp_path / "serve.log", max_batch=len(images)) as post:
        status, body = post(images)
        assert status == 200 and np.array_equal(np.asarray(body["predictions"], dtype=np.float32), champion)
        status, body = post(np.concatenate([images, images[:1]]))  # one image over the bound: refused, no compute
        assert status == 400 and "send at most 4" in body["message"], body
        poisoned = images.copy()
        poisoned[0, 0, 0, 0] = np.nan
        status, body = post(poisoned)
        assert status == 400 and "NaN or infinite" in body["message"], body
        status, body = post(images)  # and it stays up
        assert status == 200 and np.array_equal(np.asarray(body["predictions"], dtype=np.float32), champion)


def test_the_shipped_recipe_is_an_int8_champion_served(
        prefect_harness, shipped_params: Path, pipeline_overrides: list[str], tmp_path: Path) -> None:
    """The compress flow on the shipped params.yaml as `make demo` runs it (at 8 steps): a quarter
    of the units removed, healed through the static int8 quantizer; the registered artifact is the
    quantize step's int8 file, its recovery (the gate's number) is the served file's in
    onnxruntime, the version records its speed-up, and `starfish serve` of the champion answers
    with exactly that file's logits."""
    from starfish.formats.onnx import run_session, session
    from starfish.io import sha256_file

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [*pipeline_overrides, "gate.min_recovery=0"]
    result = compress(params=str(shipped_params), overrides=overrides, workdir=str(tmp_path / "work"),
                      calibration=str(tmp_path / "calibration.json"), tracking_uri=store)
    assert result["promotion"]["promoted"] and result["states"]["quantize"] == "Completed"
    metrics = read_json(result["evaluation"]["path"])
    assert metrics["quant"] == "int8-static" and metrics["recovery"] == metrics["served_recovery"]
    assert metrics["sparsity"] == pytest.approx(0.25) and metrics["sparsity_drift"] == 0
    client, name = MlflowClient(store), result["registered"]["model_name"]
    version = client.get_model_version(name, result["registered"]["version"])
    assert version.tags["quant"] == "int8-static" and float(version.tags["speedup"]) > 0
    assert {key: version.tags[key] for key in ("pruner", "structure", "sparsity", "preset")} == \
        {"pruner": "contribution", "structure": "neurons+heads", "sparsity": "0.25", "preset": "recommended"}
    assert float(version.tags["recovery"]) == pytest.approx(metrics["served_recovery"], abs=1e-6)
    run = client.get_run(version.run_id)
    assert run.data.metrics["served_top1"] == pytest.approx(metrics["served_top1"])
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{version.run_id}/model/artifacts/model.onnx",
                                                     tracking_uri=store, dst_path=str(tmp_path / "dl")))
    assert sha256_file(local) == result["served"]["sha256"]  # the file evaluated is the file registered
    images = np.random.default_rng(1).standard_normal((3, 1, 28, 28)).astype(np.float32)
    expected = run_session(session(result["served"]["path"]), images)
    with served(store, f"models:/{name}@champion", tmp_path / "serve.log", max_batch=8) as post:
        status, body = post(images)
        assert status == 200 and np.array_equal(np.asarray(body["predictions"], dtype=np.float32), expected)
