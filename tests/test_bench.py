"""`starfish bench` on tiny grids: its outputs, equal budgets, seeds, resuming and shared grids."""

from __future__ import annotations

import copy
import csv
import os
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from starfish.benchmarks import bench as bench_module
from starfish.benchmarks.bench import BenchConfig, claim, heal_fingerprint_fields, run_bench
from starfish.config import HealConfig, recipe_config
from starfish.errors import StarfishError
from starfish.healing import heal_
from starfish.io import read_json
from starfish.models import create_model
from starfish.params import load_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_config(params_path: Path, demo_checkpoint: Path, *extra: str):
    return load_config(params_path, [f"model.checkpoint={demo_checkpoint}", "model.device=cpu", "heal.steps=6",
                                     "heal.holdout_every=3", *extra])


def png_size(path: Path) -> tuple[int, int]:
    png = path.read_bytes()
    assert png[:8] == PNG_MAGIC and b"IEND" in png[-12:]
    return struct.unpack(">II", png[16:24])


def test_tiny_bench_writes_every_output(params_path: Path, demo_checkpoint: Path, tmp_path: Path) -> None:
    cfg = tiny_config(params_path, demo_checkpoint)
    bench = BenchConfig(sparsities=(0.5,), pruners=("magnitude",), healers=("none", "logit-kd", "starfish"),
                        eval_samples=200)
    rows = run_bench(cfg, bench, tmp_path)

    assert [(r["pruner"], r["sparsity"], r["healer"]) for r in rows] == [
        ("magnitude", 0.5, "none"), ("magnitude", 0.5, "logit-kd"), ("magnitude", 0.5, "starfish")]
    summary = read_json(tmp_path / "bench.json")
    assert summary["test_images"] == 200 and summary["budget"] == {"steps": 6, "epochs": None}
    none, kd, starfish = rows
    assert kd["steps"] == starfish["steps"] == 6  # equal budgets for every gradient healer
    assert none["steps"] == 0 and none["heal_over_plain"] == 0.0
    for row in rows:
        assert row["calibration_images"] == 240
        assert row["recovery"] == pytest.approx(row["top1"] / summary["dense_top1"])
        assert row["measured_sparsity"] == pytest.approx(0.5, abs=1e-3)
        assert 0 <= row["agreement"] <= 1
    assert starfish["heal_over_plain"] > 0 and starfish["heal_seconds"] > 0
    assert [p["step"] for p in starfish["curve"]] == [0, 3, 6] and starfish["selected_step"] in (0, 3, 6)

    with open(tmp_path / "bench.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["healer"] for r in table] == ["none", "logit-kd", "starfish"]
    assert float(table[2]["recovery"]) == pytest.approx(starfish["recovery"]) and "curve" not in table[0]

    markdown = (tmp_path / "bench.md").read_text()
    assert "| pruner | sparsity | none | logit-kd | starfish |" in markdown
    assert "| magnitude | 0.5 |" in markdown and "**" in markdown and "6 Adam steps" in markdown
    assert png_size(tmp_path / "recovery_vs_sparsity.png") == (600, 480)  # one 5x4 inch panel at 120 dpi
    assert len((tmp_path / "recovery_vs_sparsity.png").read_bytes()) > 10_000  # lines and a legend, not a blank
    assert png_size(tmp_path / "holdout_vs_calibration_loss.png")[0] > 400
    assert not list(tmp_path.glob("**/.*.tmp")) and not list(tmp_path.glob("cells/*.lock"))


def test_a_rerun_resumes_from_the_saved_cells(params_path: Path, demo_checkpoint: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(params_path, demo_checkpoint)
    bench = BenchConfig(sparsities=(0.5,), pruners=("magnitude",), healers=("none", "starfish"), eval_samples=100)
    first = run_bench(cfg, bench, tmp_path)
    (tmp_path / "cells" / "magnitude_s0.5_f0.004_seed0_none.json").unlink()  # as if killed before that cell

    measured: list[str] = []
    original = bench_module.measure_cell

    def counting(*args, **kwargs):
        measured.append(args[6].method)
        return original(*args, **kwargs)

    monkeypatch.setattr(bench_module, "measure_cell", counting)
    again = run_bench(cfg, bench, tmp_path)
    assert measured == ["none"]
    assert again[1] == first[1]  # the saved starfish cell, not a new measurement
    run_bench(cfg.replace(heal={"steps": 4}), bench, tmp_path)  # another budget: nothing reused
    assert measured == ["none", "none", "starfish"]


def test_seeds_and_calibration_sizes(params_path: Path, demo_checkpoint: Path, tmp_path: Path) -> None:
    cfg = tiny_config(params_path, demo_checkpoint)
    bench = BenchConfig(sparsities=(0.75,), pruners=("magnitude",), healers=("none", "layerwise"), seeds=(0, 1),
                        fractions=(0.001, 0.002), eval_samples=100)
    rows = run_bench(cfg, bench, tmp_path)
    assert sorted({(r["fraction"], r["calibration_images"], r["seed"]) for r in rows}) == [
        (0.001, 60, 0), (0.001, 60, 1), (0.002, 120, 0), (0.002, 120, 1)]
    markdown = (tmp_path / "bench.md").read_text()
    assert "mean ± std over seeds [0, 1]" in markdown and "| magnitude | 0.75 | 0.001 |" in markdown
    layerwise = [r["recovery"] for r in rows if r["healer"] == "layerwise" and r["fraction"] == 0.001]
    mean = sum(layerwise) / 2
    std = abs(layerwise[0] - layerwise[1]) / 2 ** 0.5
    assert f"{mean:.3f} ± {std:.3f}" in markdown
    assert png_size(tmp_path / "recovery_vs_calibration_size.png") == (600, 480)


def test_variants_share_the_budget_except_faithful_and_fast() -> None:
    base = HealConfig(steps=300, holdout=0.2, batch_size=16)
    for name in ("logit-kd", "starfish", "recommended"):
        cfg = recipe_config(base, name, seed=2)
        assert (cfg.steps, cfg.epochs, cfg.holdout, cfg.batch_size, cfg.seed) == (300, None, 0.2, 16, 2), name
    faithful = recipe_config(base, "faithful", seed=2)
    assert (faithful.steps, faithful.epochs, faithful.holdout, faithful.batch_size) == (None, 10, 0.0, 16)
    assert recipe_config(base, "starfish-holdout0", seed=0).holdout == 0.0
    fast = recipe_config(base, "fast", seed=2)
    assert (fast.steps, fast.holdout, fast.batch_size, fast.lr) == (400, 0.2, 16, 2e-3)
    with pytest.raises(StarfishError, match="unknown heal recipe 'quick'"):
        recipe_config(base, "quick")


def test_a_budget_grid_gives_every_healer_each_budget_and_a_steps_column(
        params_path: Path, demo_checkpoint: Path, tmp_path: Path) -> None:
    rows = run_bench(tiny_config(params_path, demo_checkpoint), BenchConfig(sparsities=(0.75,), pruners=("magnitude",),
                                               healers=("starfish", "fast"), steps=(2, 4), eval_samples=100), tmp_path)
    assert sorted((r["healer"], r["steps"]) for r in rows) == [("fast", 2), ("fast", 4), ("starfish", 2),
                                                                 ("starfish", 4)]
    assert (tmp_path / "cells" / "magnitude_s0.75_f0.004_seed0_fast_steps2.json").is_file()
    markdown = (tmp_path / "bench.md").read_text()
    assert "| pruner | sparsity | steps | starfish | fast |" in markdown
    assert png_size(tmp_path / "recovery_vs_steps.png")[0] > 0


def test_batchnorm_is_left_out_of_a_cell_fingerprint_only_where_the_model_has_none() -> None:
    heal = HealConfig(batchnorm="train")
    assert "batchnorm" not in heal_fingerprint_fields(heal, create_model("starfish_vit_fmnist"))
    assert heal_fingerprint_fields(heal, create_model("starfish_cnn_fmnist"))["batchnorm"] == "train"
    assert "batchnorm" not in heal_fingerprint_fields(replace(heal, batchnorm="frozen"),
                                                      create_model("starfish_cnn_fmnist"))  # as before the field


def test_a_cell_claimed_by_a_live_process_is_left_to_it(tmp_path: Path) -> None:
    lock = tmp_path / "cells" / "x.lock"
    with claim(lock) as mine:
        assert mine and lock.read_text() == str(os.getpid())
        with claim(lock) as again:
            assert not again  # held by a live process: this one
    assert not lock.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(dead.stdout.strip())  # a lock left by a process that is gone
    with claim(lock) as mine:
        assert mine


def test_bench_rejects_unknown_healer_variants() -> None:
    with pytest.raises(StarfishError, match=r"unknown heal recipe\(s\) \['bogus'\]"):
        BenchConfig(healers=("none", "bogus"))


def test_nm_sparsity_that_does_not_fit_the_model_is_skipped(params_path: Path, demo_checkpoint: Path,
                                                           tmp_path: Path) -> None:
    """1:10 (sparsity 0.9) cannot tile the ViT's 64-wide inputs: that cell is skipped, the rest is measured."""
    cfg = tiny_config(params_path, demo_checkpoint)
    bench = BenchConfig(sparsities=(0.5, 0.9), pruners=("nm",), healers=("none",), eval_samples=100)
    rows = run_bench(cfg, bench, tmp_path)
    assert [(r["pruner"], r["sparsity"]) for r in rows] == [("nm (2:4)", 0.5)]
    with pytest.raises(StarfishError, match="bench measured nothing"):
        run_bench(cfg, BenchConfig(sparsities=(0.9,), pruners=("nm",), healers=("none",), eval_samples=100),
                  tmp_path / "empty")


def test_the_bench_prunes_with_the_params_scope(params_path: Path, demo_checkpoint: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pruned: list = []
    real = bench_module.prune
    monkeypatch.setattr(bench_module, "prune", lambda model, cfg, images: pruned.append(real(model, cfg, images))
                        or pruned[-1])
    cfg = tiny_config(params_path, demo_checkpoint, "prune.scope=mlp")
    run_bench(cfg, BenchConfig(sparsities=(0.5,), pruners=("magnitude",), healers=("none",), eval_samples=50),
              tmp_path)
    [result] = pruned
    assert result.masks and all(".mlp." in name for name in result.masks)  # no attention layer was pruned


def test_staged_pruning_removes_more_at_each_stage_and_keeps_the_step_budget(
        params_path: Path, demo_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pruned and healed in three stages: each stage's masks lie inside the last one's (a removed
    unit stays removed), the stages reach 1/3, 2/3 and all of the target, and the heals share the
    budget (6 steps: 2 each)."""
    import copy

    import torch

    from starfish.calibration import stratified_indices
    from starfish.config import PruneConfig
    from starfish.datasets import load_dataset

    cfg = tiny_config(params_path, demo_checkpoint)
    dense = create_model("starfish_vit_fmnist", checkpoint=demo_checkpoint).eval()
    train = load_dataset("fashion-mnist", cfg.data.root, "train", dense)
    images = torch.stack([train[i][0] for i in stratified_indices(train.targets, 0.004, 0)])
    seen = []
    real_heal = bench_module.heal_

    def heal_and_note(model, dense_model, masks, imgs, heal_cfg):
        seen.append(({k: v.clone() for k, v in masks.items()}, heal_cfg.steps))
        return real_heal(model, dense_model, masks, imgs, heal_cfg)

    monkeypatch.setattr(bench_module, "heal_", heal_and_note)
    model = copy.deepcopy(dense)
    prune_cfg = PruneConfig("contribution", 0.75, structure="neurons+heads")
    masks, report = bench_module.staged_prune_heal_(model, dense, prune_cfg, 3, images, cfg.heal)
    assert [steps for _, steps in seen] == [2, 2, 2] and report["steps"] == 6
    fc1 = "blocks.0.mlp.fc1.weight"
    assert [1 - float(m[fc1].float().mean()) for m, _ in seen] == pytest.approx([0.25, 0.5, 0.75], abs=0.01)
    for (earlier, _), (later, _) in zip(seen, seen[1:]):
        assert all(bool((later[k] <= earlier[k]).all()) for k in later)  # a removed unit stays removed
    assert all(torch.equal(masks[k], seen[-1][0][k]) for k in masks)
    assert all(bool((dict(model.named_parameters())[k][~m] == 0).all()) for k, m in masks.items())


def test_the_plain_reference_reads_the_batches_sizes_the_heal_trains_on() -> None:
    """The reference a heal's time is divided by: as many images a step as the heal's own steps
    (the split less its held-out slice, the last batch of a pass smaller), not the whole split."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    dense = copy.deepcopy(model)
    masks = {"1.weight": torch.rand(3, 12) > 0.5}
    images = torch.randn(240, 3, 2, 2)
    heal = HealConfig(method="logit-kd", steps=7, batch_size=32, holdout=0.1, holdout_every=7)
    trained: list[int] = []
    hook = model.register_forward_pre_hook(lambda _, args: trained.append(len(args[0])) if torch.is_grad_enabled()
                                           else None)
    heal_(model, dense, masks, images, heal)
    hook.remove()
    plain = bench_module.PlainTraining(model, masks, images, heal)
    assert trained == [32] * 6 + [24]  # one pass over the 216 training images
    assert [len(batch) for batch in plain.batches] == trained
