"""The scale benchmark's cells on a tiny JPEG tree: each measures time and memory for real."""

from __future__ import annotations

from pathlib import Path

import pytest

from starfish.benchmarks import scale
from starfish.io import read_json


@pytest.fixture
def tiny_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(scale, "TREE", {"classes": 3, "train": 6, "val": 2, "pixels": 64})
    monkeypatch.setattr(scale, "HEAL_STEPS", 1)
    scale.make_tree(tmp_path / "tree", classes=3, train=6, val=2, pixels=64)
    (tmp_path / "work").mkdir()
    return tmp_path


def test_the_tree_is_imagenet_layout_jpegs(tiny_tree: Path) -> None:
    files = sorted((tiny_tree / "tree").rglob("*.JPEG"))
    assert len(files) == 3 * (6 + 2) and files[0].read_bytes()[:2] == b"\xff\xd8"
    assert {path.parent.parent.name for path in files} == {"train", "val"}


@pytest.mark.parametrize("cell", [scale.Cell("sample", 6), scale.Cell("heal", 6, "disk"),
                                  scale.Cell("evaluate", workers=2), scale.Cell("dvc", 300),
                                  pytest.param(scale.Cell("flow", 6, "disk"), marks=pytest.mark.slow)],
                         ids=lambda c: c.key)
def test_each_stage_measures_time_and_memory(cell: scale.Cell, tiny_tree: Path) -> None:
    row = scale.measure(cell, tiny_tree / "tree", tiny_tree / "work")
    assert row["seconds"] > 0 and row["peak_rss_mb"] >= row["peak_anon_mb"] > 0
    if cell.stage == "dvc":
        assert row["files"] == 300 and row["first_status_seconds"] > 0
    elif cell.stage == "flow":
        assert row["registered"] and row["flow_peak_rss_mb"] > 100 and row["flow_tree_peak_rss_mb"] > 100
    else:
        assert row["images"] == (6 if cell.stage != "evaluate" else 3 * 2) and row["images_per_s"] > 0
    assert not list((tiny_tree / "work").glob(".starfish-rows-*"))  # scratch files never have a name


def test_sizing_counts_states_activations_and_flops_on_the_model_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scale, "SIZING_MODEL", "deit_tiny_patch16_224")
    row = scale.measure(scale.Cell("sizing"), Path("unused"), Path("unused"))
    assert row["state_bytes_per_image"] == 12 * 197 * 192 * 2  # 12 blocks' (tokens x width) in float16
    assert 2.0e9 < row["forward_flops_per_image"] < 2.8e9  # deit_tiny: 1.3 GMACs
    assert row["activation_bytes_per_image"] > 12 * 197 * 192 * 4 and 5e6 < row["parameters"] < 6e6
    lines = scale.sizing_lines(row, decode_per_core=300.0)
    assert lines[0] == "## Sizing: deit_tiny_patch16_224 on ImageNet, one GPU (extrapolation)"
    assert len([line for line in lines if line.startswith("| ")]) == 1 + 8


def test_the_solve_cell_bounds_memory_and_matches_one_big_solve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scale, "SOLVE_SHAPE", (16, 384))
    monkeypatch.setattr(scale, "VIT_B_LAYERS", ((48, 16), (16, 64)))  # the warm start's layers, narrowed
    monkeypatch.setattr(scale, "SIZING_MODEL", "deit_tiny_patch16_224")  # the heal step timed, on a small DeiT
    row = scale.measure(scale.Cell("solve"), Path("unused"), Path("unused"))
    assert set(row["vit_b_layer_cg_seconds"]) == {"48x16", "16x64"} and row["vit_b_heal_step_seconds"] > 0
    assert row["rows"] == 16 and row["solve_seconds"] >= 0 and row["extra_memory_mb"] >= 0
    assert row["demo_max_abs_difference"] < 1e-5


@pytest.mark.parametrize("mode", scale.CACHE_MODES)
def test_the_cache_cell_times_caching_steps_and_checks_apart(mode: str, tiny_tree: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scale, "CACHE_STEPS", 2)
    monkeypatch.setattr(scale, "CACHE_EVERY", 1)
    row = scale.measure(scale.Cell("cache", 6, mode), tiny_tree / "tree", tiny_tree / "work")
    assert row["images"] == 6 and row["holdout_images"] == 1 and row["state_bytes_per_image"] == 12 * 197 * 192 * 2
    assert row["step_seconds"] > 0 and row["check_seconds"] > 0 and row["dense_seconds_per_image"] > 0
    assert row["cache_seconds"] >= 0 and row["timed_seconds"] >= row["cache_seconds"]
    assert (row["read_seconds_per_byte"] > 0) == (mode == "disk")
    assert scale.measured_totals(row, 400) > scale.measured_totals(row, 100)


def test_auto_picks_the_cache_mode_the_committed_measurements_say_is_cheapest() -> None:
    """On results/scale's cache cells (one run, 5,000 images), `auto`'s cost model ranks the
    modes as their measured totals do, at the fast preset's 400 steps and the authors' 1,570."""
    rows = {row["mode"]: row for row in read_json(Path("results/scale/scale.json"))["rows"] if row["stage"] == "cache"}
    assert set(rows) == set(scale.CACHE_MODES)
    for steps in scale.BUDGETS:
        modelled = scale.modelled_totals(rows, steps)
        measured = {mode: scale.measured_totals(rows[mode], steps) for mode in scale.CACHE_MODES}
        assert min(modelled, key=modelled.get) == min(measured, key=measured.get), steps


def test_the_warm_start_cell_times_each_part_and_the_estimate_adds_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scale, "SIZING_MODEL", "deit_tiny_patch16_224")
    monkeypatch.setattr(scale, "VIT_B_LAYERS", ((48, 16), (16, 64)))
    row = scale.measure(scale.Cell("warmstart"), Path("unused"), Path("unused"))
    stopped = row["stopped_seconds"]
    assert set(stopped) == set(scale.VIT_B_LAYER_NAMES) and min(stopped.values()) > 0 and row["block_seconds"] > 0
    assert {solve["dtype"] for solve in row["solves"].values()} == {"float32"}
    small, large = scale.warm_start_estimate(row, 512, 400), scale.warm_start_estimate(row, 4500, 400)
    assert large["statistics"] == pytest.approx(small["statistics"] * 4500 / 512)
    assert 0 < small["share"] < large["share"]
    assert scale.warm_start_lines(row)[0] == "## The warm start at ViT-B width"
