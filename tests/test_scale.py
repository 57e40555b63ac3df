"""The scale benchmark's cells on a tiny JPEG tree: each measures time and memory for real."""

from __future__ import annotations

from pathlib import Path

import pytest

from starfish import scale


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
                                  scale.Cell("flow", 6, "disk")], ids=lambda c: c.key)
def test_each_stage_measures_time_and_memory(cell: scale.Cell, tiny_tree: Path) -> None:
    row = scale.measure(cell, tiny_tree / "tree", tiny_tree / "work")
    assert row["seconds"] > 0 and row["peak_rss_mb"] >= row["peak_anon_mb"] > 0
    if cell.stage == "dvc":
        assert row["files"] == 300 and row["first_status_seconds"] > 0
    elif cell.stage == "flow":
        assert row["registered"] and row["flow_tree_peak_rss_mb"] >= row["flow_peak_rss_mb"] > 100
    else:
        assert row["images"] == (6 if cell.stage != "evaluate" else 3 * 2) and row["images_per_s"] > 0
    assert not list((tiny_tree / "work").glob(".starfish-rows-*"))  # scratch files never have a name
