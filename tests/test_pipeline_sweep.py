"""The sweep and promote flows on real Prefect runs and a real MLflow registry.

A 2 x 2 grid where one sparsity (1/3, rounded per layer) drifts past a tight gate: those
points are never logged or registered. Promotion then never lets a worse challenger replace
the champion, nor one below gate.min_recovery.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.promote import promote
from flows.sweep import sweep
from starfish import steps
from starfish.evaluate import predict
from starfish.io import read_json, sha256_file, sidecar_path

pytestmark = pytest.mark.slow
DRIFTING = 0.3333


def test_sweep_registers_what_passes_and_promotion_keeps_the_best(
        prefect_harness, params_path: Path, pipeline_overrides: list[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("STARFISH_CACHE_DIR", str(tmp_path / "cache"))
    dense_passes = []

    def counted(model, dataset, *args, **kwargs):  # the dense model's passes over the test split
        dense_passes.append(len(dataset))
        return predict(model, dataset, *args, **kwargs)

    monkeypatch.setattr(steps, "predict", counted)
    overrides = [*pipeline_overrides, "gate.max_sparsity_drift=0.00001"]
    result = sweep(sparsities=[0.5, DRIFTING], healers=["none", "starfish"], params=str(params_path),
                   overrides=overrides, workdir=str(tmp_path / "work"), calibration=str(tmp_path / "calibration.json"),
                   tracking_uri=uri)
    rows = {(row["sparsity"], row["healer"]): row for row in result["rows"]}
    assert len(rows) == 4
    assert len(dense_passes) == 1  # four points evaluated (two at a time), the dense model's predictions once

    for healer in ("none", "starfish"):
        drifted = rows[(DRIFTING, healer)]
        assert drifted["version"] == "" and "sparsity drift" in drifted["status"]
        assert rows[(0.5, healer)]["version"] and rows[(0.5, healer)]["status"] == "Completed"
    client = MlflowClient(uri)
    name = "starfish-starfish-vit-fmnist"
    versions = {str(v.version) for v in client.search_model_versions(f"name='{name}'")}
    assert versions == {rows[(0.5, "none")]["version"], rows[(0.5, "starfish")]["version"]}
    experiment = client.get_experiment_by_name("starfish")
    assert len(client.search_runs([experiment.experiment_id])) == 2  # drifted points left no run

    best, worse = sorted((rows[(0.5, h)] for h in ("none", "starfish")), key=lambda r: r["recovery"], reverse=True)
    assert result["best"]["version"] == best["version"]
    assert result["promotion"]["version"] == best["version"]

    def promote_with(version: str, min_recovery: float) -> dict:
        return promote(name, version, str(params_path), [*overrides, f"gate.min_recovery={min_recovery}"], uri)

    assert promote_with(best["version"], 0.0)["promoted"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == best["version"]

    assert worse["recovery"] < best["recovery"]
    refused = promote_with(worse["version"], 0.0)
    assert not refused["promoted"] and any("champion" in reason for reason in refused["reasons"])
    below = promote_with(worse["version"], 2.0)
    assert not below["promoted"] and any("min_recovery" in reason for reason in below["reasons"])
    assert str(client.get_model_version_by_alias(name, "champion").version) == best["version"]

    # a cached point whose files were deleted is rebuilt, not trusted: same bytes, same versions
    # (files of steps that are bitwise reproducible: two heals sharing the CPU's threads are not)
    healed_none = [path for path in (tmp_path / "work").glob("heal-*/healed.safetensors")
                   if read_json(sidecar_path(path))["config"]["heal"]["method"] == "none"]
    deleted = {path: sha256_file(path) for path in [*(tmp_path / "work").glob("prune-*/pruned.safetensors"),
                                                     *healed_none]}
    assert len(deleted) == 2 + 2
    for path in deleted:
        path.unlink()
    again = sweep(sparsities=[0.5, DRIFTING], healers=["none", "starfish"], params=str(params_path),
                  overrides=overrides, workdir=str(tmp_path / "work"), calibration=str(tmp_path / "calibration.json"),
                  tracking_uri=uri, promote=False)
    assert {path: sha256_file(path) for path in deleted if path.is_file()} == deleted
    assert len(dense_passes) == 1
    assert [(row["sparsity"], row["healer"], row["version"]) for row in again["rows"]] == \
        [(row["sparsity"], row["healer"], row["version"]) for row in result["rows"]]
