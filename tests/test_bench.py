"""`starfish bench` on a one-cell grid: its table, CSV, JSON and plot."""

from __future__ import annotations

import csv
import struct
from pathlib import Path

import pytest

from starfish.bench import BenchConfig, run_bench
from starfish.config import load_config
from starfish.errors import StarfishError
from starfish.io import read_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_tiny_bench_writes_every_output(params_path: Path, demo_checkpoint: Path, tmp_path: Path) -> None:
    cfg = load_config(params_path, [f"model.checkpoint={demo_checkpoint}", "model.device=cpu", "heal.epochs=1"])
    bench = BenchConfig(sparsities=(0.5,), pruners=("magnitude",), healers=("none", "starfish"), eval_samples=200)
    rows = run_bench(cfg, bench, tmp_path)

    assert [(r["pruner"], r["sparsity"], r["healer"]) for r in rows] == [("magnitude", 0.5, "none"),
                                                                         ("magnitude", 0.5, "starfish")]
    summary = read_json(tmp_path / "bench.json")
    assert summary["test_images"] == 200 and summary["calibration_images"] == 240
    assert summary["rows"] == rows
    for row in rows:
        assert row["recovery"] == pytest.approx(row["top1"] / summary["dense_top1"])
        assert row["measured_sparsity"] == pytest.approx(0.5, abs=1e-3)
        assert 0 <= row["agreement"] <= 1
    none, starfish = rows
    assert none["heal_over_plain"] == 0.0
    assert starfish["heal_over_plain"] > 0 and starfish["heal_seconds"] > 0

    with open(tmp_path / "bench.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["healer"] for r in table] == ["none", "starfish"]
    assert {"recovery", "heal_over_plain"} <= set(table[0])
    assert float(table[1]["recovery"]) == pytest.approx(starfish["recovery"])

    markdown = (tmp_path / "bench.md").read_text()
    assert "| pruner | sparsity | none | starfish |" in markdown
    assert "| magnitude | 0.5 |" in markdown and "**" in markdown

    png = (tmp_path / "recovery_vs_sparsity.png").read_bytes()
    assert png[:8] == PNG_MAGIC
    assert len(png) > 10_000  # axes, a line per healer, a legend and a title, not an empty canvas
    assert b"IEND" in png[-12:]
    width, height = struct.unpack(">II", png[16:24])  # IHDR: one 5x4 inch panel at 120 dpi
    assert (width, height) == (600, 480)
    assert not list(tmp_path.glob(".*.tmp"))


def test_bench_rejects_unknown_healer_variants() -> None:
    with pytest.raises(StarfishError, match=r"unknown healer variant\(s\) \['bogus'\]"):
        BenchConfig(healers=("none", "bogus"))


def test_nm_sparsity_that_does_not_fit_the_model_is_skipped(params_path: Path, demo_checkpoint: Path,
                                                           tmp_path: Path) -> None:
    """1:10 (sparsity 0.9) cannot tile the ViT's 64-wide inputs: that cell is skipped, the rest is measured."""
    cfg = load_config(params_path, [f"model.checkpoint={demo_checkpoint}", "model.device=cpu", "heal.epochs=1"])
    bench = BenchConfig(sparsities=(0.5, 0.9), pruners=("nm",), healers=("none",), eval_samples=100)
    rows = run_bench(cfg, bench, tmp_path)
    assert [(r["pruner"], r["sparsity"]) for r in rows] == [("nm (2:4)", 0.5)]
    assert read_json(tmp_path / "bench.json")["complete"] is True
    with pytest.raises(StarfishError, match="bench measured nothing"):
        run_bench(cfg, BenchConfig(sparsities=(0.9,), pruners=("nm",), healers=("none",), eval_samples=100),
                  tmp_path / "empty")
