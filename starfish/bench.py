"""`starfish bench`: every healer x pruner x sparsity, side by side, in one run.

For each pruner and sparsity the masks are computed once and every healer starts from the same
pruned weights and the same calibration images. Reported per cell: top-1, recovery
(top-1 / dense top-1), agreement with the dense predictions, measured sparsity, heal seconds
and heal seconds divided by the time of the same number of plain forward+backward passes
(timed right before each heal, on the same pruned model, images and batch size). Writes bench.json, bench.csv,
bench.md (the table) and recovery_vs_sparsity.png.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from starfish.config import HealConfig, PipelineConfig
from starfish.errors import StarfishError
from starfish.evaluate import check_masks_hold, measured_sparsity, predict
from starfish.healing import heal_
from starfish.models import device_of
from starfish.io import atomic_write_bytes, atomic_write_json
from starfish.plots import save_png, subplots
from starfish.pruning import nm_pattern_for, prune, sparsify_
from starfish.steps import dataset, dense_model
from starfish.calibration import stratified_indices

log = logging.getLogger(__name__)

# Healer variants by bench name: the HealConfig fields each one changes.
VARIANTS: dict[str, dict[str, Any]] = {
    "none": {"method": "none"},
    "bias-correction": {"method": "bias-correction"},
    "layerwise": {"method": "layerwise"},
    "logit-kd": {"method": "logit-kd"},
    "starfish": {"method": "starfish"},
    "starfish+warm": {"method": "starfish", "warm_start": "layerwise"},
}


@dataclass(frozen=True)
class BenchConfig:
    sparsities: tuple[float, ...] = (0.5, 0.75, 0.9, 0.95)
    pruners: tuple[str, ...] = ("magnitude", "wanda", "nm")
    healers: tuple[str, ...] = tuple(VARIANTS)
    eval_samples: int | None = None

    def __post_init__(self) -> None:
        unknown = [h for h in self.healers if h not in VARIANTS]
        if unknown:
            raise StarfishError(f"bench: unknown healer variant(s) {unknown}; use any of {list(VARIANTS)}")


def plain_step_seconds(model: torch.nn.Module, images: torch.Tensor, batch_size: int, steps: int) -> float:
    """Wall time of `steps` plain forward+backward passes (sum of logits) over calibration batches."""
    model = copy.deepcopy(model).eval()
    batches = [images[i : i + batch_size].to(device_of(model)) for i in range(0, images.shape[0], batch_size)]
    model(batches[0]).sum().backward()  # warm-up, untimed
    start = time.perf_counter()
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        model(batches[step % len(batches)]).sum().backward()
    return time.perf_counter() - start


def run_bench(cfg: PipelineConfig, bench: BenchConfig, out: str | Path) -> list[dict[str, Any]]:
    """Run the grid, write its outputs under `out`, log the table; returns one row per cell."""
    out = Path(out)
    dense = dense_model(cfg)
    train = dataset(cfg, "train", dense)
    test = dataset(cfg, "test", dense)
    if bench.eval_samples:
        test = Subset(test, range(min(bench.eval_samples, len(test))))
    indices = stratified_indices(train.targets, cfg.calibration.fraction, cfg.calibration.seed)
    images = torch.stack([train[i][0] for i in indices])
    dense_preds, targets = predict(dense, test, cfg.evaluate.batch_size, desc="evaluate dense")
    dense_top1 = float((dense_preds == targets).float().mean())
    steps = cfg.heal.epochs * math.ceil(images.shape[0] / cfg.heal.batch_size)
    log.info("dense top-1 %.4f on %d test images; %d calibration images; heal budget %d steps",
             dense_top1, len(targets), images.shape[0], steps)
    summary = {"dense_top1": dense_top1, "test_images": len(targets), "calibration_images": images.shape[0],
               "plain_steps": steps, "heal": asdict(cfg.heal),
               "model": cfg.model.name, "torch_threads": torch.get_num_threads()}
    rows: list[dict[str, Any]] = []
    for pruner in bench.pruners:
        for sparsity in bench.sparsities:
            try:
                nm = nm_pattern_for(sparsity) if pruner == "nm" else cfg.prune.nm
                masks = prune(dense, pruner, sparsity, images=images, nm=nm,
                              global_ranking=cfg.prune.global_ranking)
            except StarfishError as exc:
                if pruner != "nm":
                    raise
                log.info("nm at sparsity %g does not fit this model (%s); skipped", sparsity, exc)
                continue
            for healer in bench.healers:
                heal_cfg = HealConfig(**{**asdict(cfg.heal), **VARIANTS[healer]})
                model = sparsify_(copy.deepcopy(dense), masks)
                # The reference is timed right before each heal, so both see the same machine load.
                plain = plain_step_seconds(model, images, cfg.heal.batch_size, steps) if healer != "none" else 0.0
                start = time.perf_counter()
                heal_(model, dense, masks, images, heal_cfg)
                seconds = time.perf_counter() - start
                check_masks_hold(model, masks)
                preds, _ = predict(model, test, cfg.evaluate.batch_size, desc=f"evaluate {healer}")
                top1 = float((preds == targets).float().mean())
                row = {
                    "pruner": pruner if pruner != "nm" else f"nm ({nm})",
                    "sparsity": sparsity,
                    "healer": healer,
                    "top1": top1,
                    "recovery": top1 / dense_top1,
                    "agreement": float((preds == dense_preds).float().mean()),
                    "measured_sparsity": measured_sparsity(model, list(masks))["total"],
                    "heal_seconds": seconds,
                    "plain_fwd_bwd_seconds": plain,
                    "heal_over_plain": seconds / plain if plain else 0.0,
                }
                rows.append(row)
                write_outputs(out, {**summary, "rows": rows}, final=False)
                log.info("%-16s %.2f %-16s top-1 %.4f recovery %.4f heal %.1fs", row["pruner"], sparsity, healer,
                         top1, row["recovery"], seconds)
    if not rows:
        raise StarfishError("bench measured nothing: no pruner fits any requested sparsity; change --sparsities")
    write_outputs(out, {**summary, "rows": rows}, final=True)
    return rows


def markdown_table(summary: dict[str, Any]) -> str:
    """Recovery per pruner/sparsity (rows) and healer (columns), best per row in bold."""
    rows = summary["rows"]
    healers = list(dict.fromkeys(r["healer"] for r in rows))
    lines = [f"Dense top-1 {summary['dense_top1']:.4f} on {summary['test_images']} test images; "
             f"{summary['calibration_images']} unlabeled calibration images. Cells: recovery (healed / dense top-1).",
             "", "| pruner | sparsity | " + " | ".join(healers) + " |", "|---|---|" + "---|" * len(healers)]
    groups: dict[tuple[str, float], dict[str, float]] = {}
    for r in rows:
        groups.setdefault((r["pruner"], r["sparsity"]), {})[r["healer"]] = r["recovery"]
    for (pruner, sparsity), cells in groups.items():
        best = max(cells.values())
        shown = [f"**{cells[h]:.3f}**" if cells.get(h) == best else (f"{cells[h]:.3f}" if h in cells else "")
                 for h in healers]
        lines.append(f"| {pruner} | {sparsity:g} | " + " | ".join(shown) + " |")
    timed = [r for r in rows if r["healer"] != "none"]
    lines += ["", "Heal time, and heal time over the same number of plain forward+backward passes timed just before:",
              "", "| healer | mean heal s | max heal s | median heal / plain | max heal / plain |", "|---|---|---|---|---|"]
    for h in healers:
        cells = [r for r in timed if r["healer"] == h]
        if cells:
            ratios = sorted(r["heal_over_plain"] for r in cells)
            lines.append(f"| {h} | {sum(r['heal_seconds'] for r in cells) / len(cells):.1f} | "
                         f"{max(r['heal_seconds'] for r in cells):.1f} | {statistics.median(ratios):.2f} | "
                         f"{ratios[-1]:.2f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    rows = [{**r, "pruner": r["pruner"].split(" (")[0]} for r in summary["rows"]]  # one panel for all N:M
    pruners = list(dict.fromkeys(r["pruner"] for r in rows))
    fig, axes = subplots(1, len(pruners), figsize=(5 * len(pruners), 4), sharey=True, squeeze=False)
    for ax, pruner in zip(axes[0], pruners):
        for healer in dict.fromkeys(r["healer"] for r in rows):
            cells = sorted((r["sparsity"], r["recovery"]) for r in rows if r["pruner"] == pruner and r["healer"] == healer)
            if cells:
                ax.plot(*zip(*cells), marker="o", label=healer)
        ax.set_title(pruner)
        ax.set_xlabel("sparsity")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("recovery (healed / dense top-1)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{summary['model']}: recovery vs sparsity ({summary['calibration_images']} calibration images)")
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def write_outputs(out: Path, summary: dict[str, Any], final: bool) -> None:
    """JSON and CSV after every cell (a crash keeps what was measured); table and plot at the end."""
    atomic_write_json(out / "bench.json", {**summary, "complete": final})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(summary["rows"][0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(summary["rows"])
    atomic_write_bytes(out / "bench.csv", buffer.getvalue().encode())
    if not final:
        return
    table = markdown_table(summary)
    atomic_write_bytes(out / "bench.md", table.encode())
    plot(summary, out / "recovery_vs_sparsity.png")
    print(table)
