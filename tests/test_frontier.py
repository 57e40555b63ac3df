"""`starfish frontier`: its grid as large as its question, its rows from the cells by hand, and
a tiny grid run through the CLI that writes every output and resumes from its cells."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest
import torch

from starfish.benchmarks import frontier
from starfish.cli import main
from starfish.io import read_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_the_recovery_grid_holds_each_recipe_where_it_answers_a_question() -> None:
    vit, cnn = frontier.recovery_cells("vit"), frontier.recovery_cells("cnn")
    assert {c[2] for c in cnn} == set(frontier.RECIPES) - {"layerwise", "starfish-1570-through-quant"}
    long = [c for c in vit if c[2] == "starfish-1570-through-quant"]
    assert {(removed, mode) for removed, _, _, mode in long} == {(0.25, "int8-dynamic"), (0.25, "int8-static")}
    # a float heal is served in every mode from one heal; a heal through the quantizer in its own mode only
    assert {c[3] for c in vit if c[2] == "starfish"} == {"none"}
    assert {c[3] for c in vit if c[2] == "starfish-through-quant"} == {"int8-dynamic", "int8-static"}
    assert {c[3] for c in vit if c[2] == "logit-kd"} == {"none", "int8-dynamic", "int8-static"}
    # every gradient heal compared side by side takes the same steps at the same peak lr
    budgets = {(cfg.steps, cfg.lr) for cfg in (frontier.recipe_config(r, "int8-static", 0)
                                               for r in ("logit-kd", "starfish", "starfish-through-quant"))}
    assert budgets == {(frontier.STEPS, frontier.LR)}
    assert frontier.recipe_config("starfish-through-quant", "int8-static", 0).quant == "int8-static"
    assert frontier.recipe_config("starfish", "int8-static", 0).quant == "none"


def cell(family: str, removed: float, seed: int, recipe: str, top1: dict[str, float]) -> dict:
    return {"family": family, "removed": removed, "seed": seed, "recipe": recipe, "steps": 400,
            "served_top1": top1, "dense_top1": 0.8}


def speed(model: str, removed: float, quant: str, batch: int, ratio: float) -> dict:
    return {"latency_model": model, "removed": removed, "quant": quant, "batch": batch, "speedup": ratio}


def test_rows_are_served_recovery_over_seeds_beside_the_measured_speed() -> None:
    cells = [cell("vit", 0.5, 0, "starfish", {"none": 0.79, "int8-static": 0.76}),
             cell("vit", 0.5, 1, "starfish", {"none": 0.798, "int8-static": 0.78}),
             cell("vit", 0.0, 0, "none", {"none": 0.8})]
    speeds = [speed(m, 0.5, q, b, r) for m, base in (("deit_small_patch16_224", 1.0), ("starfish_vit_fmnist", 0.5))
              for q, b, r in (("none", 1, 1.5), ("none", 32, 1.9), ("int8-static", 1, 2.9), ("int8-static", 32, 3.4))
              for r in [r * base]]
    rows = frontier.frontier_rows(cells, speeds)
    by = {(r["removed"], r["quant"], r["heal"], r["batch"]): r for r in rows}
    assert len(rows) == 3 * 2
    static = by[(0.5, "int8-static", "starfish", 32)]
    assert static["recovery"] == pytest.approx(0.9625) and static["recovery_std"] == pytest.approx(0.025 / 2 ** 0.5)
    assert static["seeds"] == 2 and static["speedup"] == 3.4 and static["demo_speedup"] == 1.7
    assert static["structure"] == "neurons+heads" and by[(0.0, "none", "none", 1)]["structure"] == "none"
    assert by[(0.0, "none", "none", 32)]["speedup"] == 1.0  # the dense float model is the baseline itself
    assert by[(0.5, "none", "starfish", 1)]["recovery"] == pytest.approx(0.9925)
    # the fastest recipe at or above a floor, at batch 32
    assert frontier.best_within(rows, 0.99)["quant"] == "none"
    assert frontier.best_within(rows, 0.95)["quant"] == "int8-static"
    assert frontier.best_within(rows, 1.01) is None
    text = frontier.markdown({"rows": rows, "seeds": [0, 1], "steps": 400, "lr": 2e-3, "threads": 2})
    assert "Fastest at recovery ≥ 0.95 (batch 32): starfish_vit_fmnist neurons+heads 0.5, int8-static" in text
    assert "| starfish_vit_fmnist | neurons+heads | 0.5 | int8-static | starfish | 400 | 0.9625 ± 0.0177 | 2 |" \
        in text


@pytest.fixture
def torch_threads() -> Iterator[None]:
    """The frontier times on its own thread count; the suite's other tests keep theirs."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.usefixtures("torch_threads")
def test_a_tiny_frontier_through_the_cli_writes_every_output_and_resumes(
        repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One amount removed, two recipes, four steps, 200 test images, the recovery grid only: a
    real heal, real int8 models evaluated in onnxruntime, and a second run that measures nothing."""
    monkeypatch.chdir(repo_root)
    monkeypatch.setattr(frontier, "REMOVED", (0.5,))
    monkeypatch.setattr(frontier, "STEPS", 4)
    monkeypatch.setattr(frontier, "RECIPES", {k: frontier.RECIPES[k] for k in ("none", "starfish-through-quant")})
    out = tmp_path / "frontier"
    main(["frontier", "--families", "vit", "--seeds", "0", "--no-speed", "--eval-samples", "200", "--out", str(out)])

    summary = read_json(out / "frontier.json")
    cells = sorted(path.name for path in (out / "cells").iterdir())
    assert cells == ["recovery_vit_r0.5_seed0_none_none.json",
                     "recovery_vit_r0.5_seed0_starfish-through-quant_int8-dynamic.json",
                     "recovery_vit_r0.5_seed0_starfish-through-quant_int8-static.json"]
    healed = [c for c in summary["recovery_cells"] if c["recipe"] == "starfish-through-quant"]
    assert {c["steps"] for c in healed} == {4} and all(c["test_images"] == 200 for c in summary["recovery_cells"])
    unhealed = next(c for c in summary["recovery_cells"] if c["recipe"] == "none")
    assert set(unhealed["served_top1"]) == {"none", "int8-dynamic", "int8-static"}  # one model, every mode
    assert {(r["quant"], r["heal"]) for r in summary["rows"]} == {
        ("none", "none"), ("int8-dynamic", "none"), ("int8-static", "none"),
        ("int8-dynamic", "starfish-through-quant"), ("int8-static", "starfish-through-quant")}
    assert all(0 < r["recovery"] <= 1.2 and r["speedup"] is None for r in summary["rows"])
    assert (out / "frontier.png").read_bytes()[:8] == PNG_MAGIC
    assert "| starfish_vit_fmnist | neurons+heads | 0.5 | int8-static | starfish-through-quant | 4 |" in \
        (out / "frontier.md").read_text()

    stamps = {path.name: os.stat(path).st_mtime_ns for path in (out / "cells").iterdir()}
    main(["frontier", "--families", "vit", "--seeds", "0", "--no-speed", "--eval-samples", "200", "--out", str(out)])
    assert {path.name: os.stat(path).st_mtime_ns for path in (out / "cells").iterdir()} == stamps
    assert read_json(out / "frontier.json")["rows"] == summary["rows"]
