"""`starfish bench`: healers x pruners x sparsities (x calibration sizes x seeds), side by side.

For each pruner, sparsity, calibration fraction and seed the split and the masks are computed
once, and every healer starts from the same pruned weights and the same calibration images.
Every gradient healer gets the same budget in Adam steps (`heal.steps`); only the `faithful`
recipe keeps the authors' epoch count, which is the point of showing it. A seed picks both the
calibration split and the healing shuffle.

Each finished cell is saved at once as its own JSON file under `cells/`, so an interrupted run
resumes where it stopped, and several `starfish bench` processes on the same folder share the
grid (a cell is claimed with an exclusive lock file). Reported per cell: top-1, recovery
(top-1 / dense top-1), agreement with the dense predictions, measured sparsity, heal seconds
and, for gradient healers, heal seconds over the time of as many plain training steps of the
same weights as the heal took (`PlainTraining`: 10 of them timed after each run of the heal's
steps between held-out checks, outside its time, so both meet the same load), with the heal's
own parts (caching, warm start, held-out checks, steps) apart.
Once the grid is complete: bench.json,
bench.csv, bench.md and plots.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import itertools
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import Subset

from starfish.calibration import stratified_indices
from starfish.catalog import PRUNERS, parse_structure
from starfish.config import HealConfig, PipelineConfig, recipe_config
from starfish.errors import StarfishError
from starfish.evaluate import check_masks_hold, measured_sparsity, predict
from starfish.fingerprints import result_fields
from starfish.healing import heal_
from starfish.healing.batchnorm import has_batchnorm
from starfish.healing.common import between_chunks, split_calibration
from starfish.io import atomic_write_bytes, atomic_write_json, canonical_json, read_json, sha256_bytes
from starfish.models import device_of
from starfish.plots import save_png, subplots
from starfish.pruning import nm_pattern_for, prune, remove_units_, sparsify_
from starfish.pruning.groups import StructurePlan
from starfish.pruning.masks import Masks
from starfish.recipes import RECIPES
from starfish.steps import dataset, dense_model

log = logging.getLogger(__name__)

DEFAULT_HEALERS = ("none", "bias-correction", "layerwise", "logit-kd", "faithful", "starfish", "recommended")
PLAIN_STEPS_PER_RUN = 10  # plain training steps timed after each run of a heal's steps between checks


@dataclass(frozen=True)
class BenchConfig:
    sparsities: tuple[float, ...] = (0.5, 0.75, 0.9, 0.95)
    pruners: tuple[str, ...] = ("magnitude", "wanda", "nm")
    healers: tuple[str, ...] = DEFAULT_HEALERS
    fractions: tuple[float, ...] | None = None  # calibration fractions; None: calibration.fraction
    steps: tuple[int, ...] | None = None  # step budgets for every healer (presets' own too); None: heal.steps
    seeds: tuple[int, ...] = (0,)
    eval_samples: int | None = None
    structures: tuple[str, ...] | None = None  # prune.structure values; None: the params' prune.structure
    masked: bool = False  # structured cells heal the masked model instead of the slim one
    stages: int = 1  # prune -> heal in this many equal steps of sparsity, the step budget split among them

    def __post_init__(self) -> None:
        unknown = [h for h in self.healers if h not in RECIPES.names()]
        if unknown:
            raise StarfishError(f"bench: unknown heal recipe(s) {unknown}; use any of {RECIPES.names()}")
        if not (self.sparsities and self.pruners and self.healers and self.seeds):
            raise StarfishError("bench: --sparsities, --pruners, --healers and --seeds each need a value")
        if self.steps is not None and (not self.steps or min(self.steps) < 1):
            raise StarfishError(f"bench: --steps {list(self.steps or [])}: give step budgets >= 1")
        for structure in self.structures or ():
            parse_structure(structure)
        if self.stages < 1:
            raise StarfishError(f"bench: --stages {self.stages}: give 1 (prune once) or more")


class PlainTraining:
    """Plain training steps of the weights a heal trains (those in `masks`), on a copy of
    `model`: forward, backward of the sum of the logits, Adam; no targets, no states, no
    held-out checks. The reference a heal's time is measured against.

    Its batches are the heal's sizes: the heal's training images (the split less its held-out
    slice) in `heal.batch_size`, the last batch of each pass smaller, as the heal draws them, so
    a plain step reads as many images as a heal step on average. (Batches of the whole 240-image
    split, a 16-image one in eight, read 3% fewer images a step than the heal's 216 in 32s.)"""

    def __init__(self, model: torch.nn.Module, masks: Masks, images: torch.Tensor, heal: HealConfig) -> None:
        self.model = copy.deepcopy(model).eval()
        params = dict(self.model.named_parameters())
        for name, param in params.items():
            param.requires_grad_(name in masks)
        self.optimizer = torch.optim.Adam([params[name] for name in masks], lr=1e-6, foreach=True)
        train, _ = split_calibration(images, heal.holdout)
        self.batches = [train[i : i + heal.batch_size].to(device_of(self.model))
                        for i in range(0, train.shape[0], heal.batch_size)]
        self.done = 0
        self.model(self.batches[0]).sum().backward()  # warm-up, untimed

    def seconds_per_step(self, steps: int) -> float:
        """Wall time of the next `steps` steps, per step."""
        start = time.perf_counter()
        for _ in range(steps):
            self.optimizer.zero_grad(set_to_none=True)
            self.model(self.batches[self.done % len(self.batches)]).sum().backward()
            self.optimizer.step()
            self.done += 1
        return (time.perf_counter() - start) / steps


@contextlib.contextmanager
def claim(lock: Path) -> Iterator[bool]:
    """Yield True if this process may measure the cell: its lock file is new, or its owner is gone."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(lock.read_text() or 0)
                os.kill(owner, 0)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # left by a process that died: take it over
                continue
            except PermissionError:
                pass
            yield False
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        try:
            yield True
        finally:
            lock.unlink(missing_ok=True)
        return
    yield False


def cell_key(pruner: str, sparsity: float, fraction: float, seed: int, healer: str, steps: int | None = None,
             structure: str = "unstructured", masked: bool = False, stages: int = 1) -> str:
    return (f"{pruner}_s{sparsity:g}_f{fraction:g}_seed{seed}_{healer}" + (f"_steps{steps}" if steps else "")
            + (f"_{structure}" + ("_masked" if masked else "") if structure != "unstructured" else "")
            + (f"_stages{stages}" if stages > 1 else ""))


def heal_fingerprint_fields(heal: HealConfig, dense: torch.nn.Module) -> dict[str, Any]:
    """The heal fields that decide a cell's result: `result_fields`, less `batchnorm` on a model
    without BatchNorm, where every mode heals the same (so no ViT cell goes stale with its default)."""
    fields = result_fields("heal", asdict(heal))
    if not has_batchnorm(dense):
        fields.pop("batchnorm", None)
    return fields


def run_bench(cfg: PipelineConfig, bench: BenchConfig, out: str | Path) -> list[dict[str, Any]]:
    """Measure every cell not yet in `out/cells`, then write the outputs if the grid is complete."""
    out = Path(out)
    dense = dense_model(cfg)
    train = dataset(cfg, "train", dense)
    test = dataset(cfg, "test", dense)
    if bench.eval_samples:
        test = Subset(test, range(min(bench.eval_samples, len(test))))
    dense_preds, targets = predict(dense, test, cfg.evaluate.batch_size, desc="evaluate dense")
    dense_top1 = float((dense_preds == targets).float().mean())
    fractions = bench.fractions or (cfg.calibration.fraction,)
    budgets = bench.steps or (None,)
    structures = bench.structures or (cfg.prune.structure,)
    context = {name: result_fields(name, asdict(getattr(cfg, name))) for name in ("model", "data", "prune")}
    context.update(test_images=len(targets), dense_top1=dense_top1)
    log.info("dense top-1 %.4f on %d test images", dense_top1, len(targets))
    expected: list[str] = []
    for seed in bench.seeds:
        for fraction in fractions:
            indices = stratified_indices(train.targets, fraction, seed)
            images = torch.stack([train[i][0] for i in indices])
            for pruner, sparsity, budget, structure in itertools.product(bench.pruners, bench.sparsities, budgets,
                                                                         structures):
                nm = nm_pattern_for(sparsity) if pruner == "nm" else cfg.prune.nm
                structured = structure != "unstructured"
                if structured and not PRUNERS.get(pruner).removes_units:
                    log.info("%s prunes single weights; no %s cells", pruner, structure)
                    continue
                slim = structured and not bench.masked
                keys = {h: cell_key(pruner, sparsity, fraction, seed, h, budget, structure, bench.masked, bench.stages)
                        for h in bench.healers}
                configs = {h: recipe_config(cfg.heal, h, seed=seed, steps=budget) for h in bench.healers}
                fingerprints = {h: sha256_bytes(canonical_json({**context,
                                                                "heal": heal_fingerprint_fields(configs[h], dense),
                                                                "nm": nm, "calibration_images": len(indices),
                                                                **({"structure": structure, "slim": slim}
                                                                   if structured else {}),
                                                                **({"stages": bench.stages}
                                                                   if bench.stages > 1 else {})}))
                                for h in bench.healers}
                todo = [h for h in bench.healers if not _done(out, keys[h], fingerprints[h])]
                if not todo:
                    expected += list(keys.values())
                    continue
                try:
                    # the params' other prune settings (scope, global ranking) hold, as the fingerprint says
                    masks, _, plan = prune(dense, replace(cfg.prune, method=pruner, sparsity=sparsity, nm=nm,
                                                          structure=structure), images)
                except StarfishError as exc:
                    if pruner != "nm":
                        raise
                    log.info("nm at sparsity %g does not fit this model (%s); skipped", sparsity, exc)
                    continue
                expected += list(keys.values())
                for healer in todo:
                    with claim(out / "cells" / f"{keys[healer]}.lock") as mine:
                        if not mine or _done(out, keys[healer], fingerprints[healer]):
                            continue
                        stage_cfg = replace(cfg.prune, method=pruner, sparsity=sparsity, nm=nm, structure=structure)
                        row = measure_cell(dense, masks, images, test, targets, dense_preds, configs[healer],
                                           cfg.evaluate.batch_size, plan, slim,
                                           stages=(stage_cfg, bench.stages) if bench.stages > 1 else None)
                        row.update(pruner=pruner if pruner != "nm" else f"nm ({nm})", sparsity=sparsity,
                                   structure=structure,
                                   fraction=fraction, seed=seed, healer=healer,
                                   calibration_images=len(indices), fingerprint=fingerprints[healer])
                        atomic_write_json(out / "cells" / f"{keys[healer]}.json", row)
                        log.info("%-10s %.2f f=%g seed %d %-18s recovery %.4f heal %.1fs", row["pruner"],
                                 sparsity, fraction, seed, healer, row["top1"] / dense_top1, row["heal_seconds"])
    if not expected:
        raise StarfishError("bench measured nothing: no pruner fits any requested sparsity; change --sparsities")
    missing = [key for key in expected if not (out / "cells" / f"{key}.json").is_file()]
    if missing:
        log.info("%d cells still being measured by another process; it writes the summary", len(missing))
        return []
    rows = [read_json(out / "cells" / f"{key}.json") for key in expected]
    for row in rows:
        row["recovery"] = row["top1"] / dense_top1
    summary = {"dense_top1": dense_top1, "test_images": len(targets), "model": cfg.model.name,
               "budget": {"steps": cfg.heal.steps, "epochs": cfg.heal.epochs}, "seeds": list(bench.seeds),
               "fractions": list(fractions), "steps_grid": list(bench.steps or []),
               "torch_threads": torch.get_num_threads(), "rows": rows}
    write_outputs(out, summary)
    return rows


def _done(out: Path, key: str, fingerprint: str) -> bool:
    path = out / "cells" / f"{key}.json"
    return path.is_file() and read_json(path).get("fingerprint") == fingerprint


def staged_prune_heal_(model: torch.nn.Module, dense: torch.nn.Module, prune_cfg: Any, stages: int,
                       images: torch.Tensor, heal_cfg: HealConfig) -> tuple[Masks, dict[str, Any]]:
    """Prune `model` (a copy of `dense`) to `prune_cfg.sparsity` in `stages` equal steps, healing
    the masked model after each with its share of `heal_cfg`'s step budget; a unit removed stays
    removed (its score is zero after, and the masks only shrink). Returns the final masks and the
    last heal's report, with the steps of all of them."""
    masks: Masks = {}
    total = heal_cfg.total_steps(len(images))
    reports, done = [], 0
    for stage in range(1, stages + 1):
        target = prune_cfg.sparsity * stage / stages
        found = prune(model, replace(prune_cfg, sparsity=target), images).masks
        masks = {key: found[key] & masks[key] if key in masks else found[key] for key in found}
        sparsify_(model, masks)
        share = total * stage // stages - done
        done += share
        reports.append(heal_(model, dense, masks, images, replace(heal_cfg, steps=share, epochs=None)))
    report = dict(reports[-1])
    report["steps"] = sum(r.get("steps", 0) for r in reports)
    report["warm_start_seconds"] = sum(r.get("warm_start_seconds", 0.0) for r in reports)
    return masks, report


def _slimmed(model: torch.nn.Module, masks: Masks, plan: StructurePlan | None, slim: bool
             ) -> tuple[dict[str, Any], Masks]:
    """What a structured cell removed (the fraction of units, whether slim, the cost ratios), the
    model slimmed in place when `slim`: (those fields, the masks the model has now)."""
    if plan is None:
        return {}, masks
    masks, report = remove_units_(model, masks, plan, slim)
    return {"removed": report["removed"], "slim": slim, "params_ratio": report["params_ratio"],
            "flops_ratio": report["flops_ratio"]}, masks


def measure_cell(dense: torch.nn.Module, masks: Masks, images: torch.Tensor, test: Any,
                 targets: torch.Tensor, dense_preds: torch.Tensor, heal_cfg: HealConfig,
                 eval_batch_size: int, plan: StructurePlan | None = None, slim: bool = False,
                 stages: tuple[Any, int] | None = None) -> dict[str, Any]:
    """Heal one copy of the pruned model and evaluate it: one bench row (without its grid keys).
    Structured masks (from `plan`) heal as the slim model when `slim`, else masked. With
    `stages` (the prune config and a count), the copy is pruned and healed in that many steps
    (`staged_prune_heal_`) instead of from `masks` at once, then slimmed for evaluation."""
    if stages is not None:
        start = time.perf_counter()
        model = copy.deepcopy(dense)
        masks, report = staged_prune_heal_(model, dense, *stages, images, heal_cfg)
        seconds = time.perf_counter() - start
        check_masks_hold(model, masks)
        fields, masks = _slimmed(model, masks, plan, slim)
        return _evaluated(model, masks, report, seconds, 0.0, test, targets, dense_preds, eval_batch_size, fields)
    model = sparsify_(copy.deepcopy(dense), masks)
    fields, masks = _slimmed(model, masks, plan, slim)
    # The reference is timed in runs of PLAIN_STEPS_PER_RUN steps, one after each run of the heal's
    # steps between held-out checks and outside its time, so both meet the same load on the machine.
    plain, runs = None, []
    if heal_cfg.method != "none":
        plain = PlainTraining(model, masks, images, heal_cfg)
    start = time.perf_counter()
    with between_chunks(lambda: runs.append(plain.seconds_per_step(PLAIN_STEPS_PER_RUN)) if plain else None):
        report = heal_(model, dense, masks, images, heal_cfg)
    seconds = time.perf_counter() - start - sum(runs) * PLAIN_STEPS_PER_RUN
    report["plain_chunk_seconds"] = runs
    per_step = statistics.fmean(runs) if runs else 0.0
    check_masks_hold(model, masks)
    return _evaluated(model, masks, report, seconds, per_step, test, targets, dense_preds, eval_batch_size, fields)


def _evaluated(model: torch.nn.Module, masks: Masks, report: dict[str, Any], seconds: float, per_step: float,
               test: Any, targets: torch.Tensor, dense_preds: torch.Tensor, eval_batch_size: int,
               structure_fields: dict[str, Any]) -> dict[str, Any]:
    """The bench row of a healed model: its top-1, agreement, sparsity and times."""
    preds, _ = predict(model, test, eval_batch_size, desc="evaluate")
    plain = per_step * report.get("steps", 0)  # gradient healers only: the others take no steps
    parts = {"warm_start": report.get("warm_start_seconds", 0.0), **report.get("seconds", {})}
    return {
        "top1": float((preds == targets).float().mean()),
        "agreement": float((preds == dense_preds).float().mean()),
        "measured_sparsity": measured_sparsity(model, list(masks))["total"],
        "steps": report.get("steps", 0),
        "heal_seconds": seconds,
        "plain_step_seconds": per_step,
        "plain_train_seconds": plain,  # plain training steps (`plain_step_seconds`); older cells: fwd+bwd
        "heal_over_plain": seconds / plain if plain else 0.0,
        "steps_over_plain": parts.get("steps", 0.0) / plain if plain else 0.0,
        # a run of the heal's steps over the plain steps timed right after it, the median of those
        "median_step_over_plain": (statistics.median(heal / plain for heal, plain in
                                                     zip(report["step_seconds"], report["plain_chunk_seconds"]))
                                   if report.get("step_seconds") and report.get("plain_chunk_seconds") else 0.0),
        "heal_part_seconds": parts,
        "warm_start_seconds": report.get("warm_start_seconds", 0.0),
        "selected_step": report.get("selected_step"),
        "kept_pruned": report.get("kept_pruned"),
        "curve": report.get("curve", []),
        **structure_fields,
    }


CSV_FIELDS = ("pruner", "structure", "sparsity", "fraction", "calibration_images", "seed", "healer", "steps", "top1",
              "recovery", "agreement", "measured_sparsity", "heal_seconds", "plain_train_seconds", "heal_over_plain",
              "steps_over_plain", "median_step_over_plain", "plain_fwd_bwd_seconds", "selected_step",
              "kept_pruned")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def grouped(rows: list[dict[str, Any]], by_steps: bool = False) -> dict[tuple, dict[str, list[float]]]:
    """Recovery per (pruner, sparsity, fraction, steps if `by_steps` else None) and healer, one value per seed."""
    groups: dict[tuple, dict[str, list[float]]] = {}
    for r in rows:
        key = (_pruner_label(r), r["sparsity"], r["fraction"], r["steps"] if by_steps else None)
        groups.setdefault(key, {}).setdefault(r["healer"], []).append(r["recovery"])
    return groups


def _pruner_label(row: dict[str, Any]) -> str:
    """The pruner, and the structure it removed when not single weights."""
    structure = row.get("structure", "unstructured")
    return row["pruner"] if structure == "unstructured" else f"{row['pruner']} {structure}"


def markdown_table(summary: dict[str, Any]) -> str:
    """Recovery per pruner/sparsity/fraction (rows) and healer (columns), mean ± std over seeds, best in bold."""
    rows = summary["rows"]
    healers = list(dict.fromkeys(r["healer"] for r in rows))
    seeds = summary["seeds"]
    several_fractions = len(summary["fractions"]) > 1
    by_steps = bool(summary.get("steps_grid"))
    sizes = sorted({(r["fraction"], r["calibration_images"]) for r in rows})
    budget = summary["budget"]
    budget_text = f"{budget['steps']} Adam steps" if budget["steps"] else f"{budget['epochs']} epochs"
    if by_steps:
        budget_text = f"each budget of {summary['steps_grid']} Adam steps, with the cosine schedule over it"
    own = {h: sorted({r["steps"] for r in rows if r["healer"] == h}) for h in healers}
    own = {h: steps for h, steps in own.items() if steps and 0 not in steps and not by_steps
           and steps != [budget["steps"]]}  # presets with a budget of their own
    if own:
        budget_text += " (" + ", ".join(f"{h}: {'/'.join(map(str, steps))} steps, its preset's own"
                                        for h, steps in own.items()) + ")"
    lines = [f"Dense top-1 {summary['dense_top1']:.4f} on {summary['test_images']} test images; calibration "
             + ", ".join(f"{n} images ({f:g})" for f, n in sizes) + f"; every gradient healer gets {budget_text}"
             ". Cells: recovery (healed / dense top-1)"
             + (f", mean ± std over seeds {seeds}." if len(seeds) > 1 else f", seed {seeds[0]}."), "",
             "| pruner | sparsity | " + ("calibration | " if several_fractions else "")
             + ("steps | " if by_steps else "") + " | ".join(healers) + " |",
             "|---|---|" + ("---|" if several_fractions else "") + ("---|" if by_steps else "") + "---|" * len(healers)]
    for (pruner, sparsity, fraction, steps), cells in grouped(rows, by_steps).items():
        means = {h: _mean_std(v) for h, v in cells.items()}
        best = max(m for m, _ in means.values())

        def show(h: str) -> str:
            if h not in means:
                return ""
            mean, std = means[h]
            text = f"{mean:.3f} ± {std:.3f}" if len(cells[h]) > 1 else f"{mean:.3f}"
            return f"**{text}**" if mean == best else text

        lines.append(f"| {pruner} | {sparsity:g} | " + (f"{fraction:g} | " if several_fractions else "")
                     + (f"{steps} | " if by_steps else "") + " | ".join(show(h) for h in healers) + " |")
    timed = [r for r in rows if r["healer"] != "none"]
    lines += ["", "Heal time over the time of as many plain steps as the heal takes: `training` steps "
              "(forward, backward and Adam on the weights the heal trains; 10 timed after each run of the "
              "heal's steps between held-out checks, outside its time), or, in cells measured before those, "
              "`fwd+bwd` passes (every weight, no Adam, timed just before). `heal` is the whole heal "
              "(caching, warm start, held-out checks); `steps` its training steps alone; `step` a run of "
              "its steps over the plain steps right after it, the median over the runs:", "",
              "| healer | plain | steps | mean heal s | max heal s | median heal / plain | max heal / plain "
              "| median steps / plain | median step / plain step |",
              "|---|---|---|---|---|---|---|---|---|"]
    for h in healers:
        for reference in ("training", "fwd+bwd"):
            cells = [r for r in timed if r["healer"] == h
                     and ("plain_train_seconds" in r) == (reference == "training")]
            if not cells:
                continue
            ratios = sorted(r["heal_over_plain"] for r in cells)
            steps = sorted({r["steps"] for r in cells})
            alone = sorted(r["steps_over_plain"] for r in cells if r.get("steps_over_plain"))
            step = sorted(r["median_step_over_plain"] for r in cells if r.get("median_step_over_plain"))
            lines.append(f"| {h} | {reference} | {'/'.join(map(str, steps))} | "
                         f"{statistics.fmean(r['heal_seconds'] for r in cells):.1f}"
                         f" | {max(r['heal_seconds'] for r in cells):.1f} | "
                         + (f"{statistics.median(ratios):.2f} | {ratios[-1]:.2f} |" if ratios[-1] else "- | - |")
                         + (f" {statistics.median(alone):.2f} |" if alone else " - |")
                         + (f" {statistics.median(step):.2f} |" if step else " - |"))
    kept = [r for r in rows if r.get("kept_pruned")]
    lines += ["", f"Cells where no healed state beat the pruned model on the held-out slice (pruned weights "
              f"returned): {len(kept)}" + (": " + ", ".join(f"{r['pruner']} {r['sparsity']:g} {r['healer']} seed "
                                                            f"{r['seed']}" for r in kept) if kept else "") + "."]
    return "\n".join(lines) + "\n"


def _errorbar_series(ax: Any, rows: list[dict[str, Any]], x_key: str, label: str) -> None:
    """One line of mean recovery against `x_key`, with the std over the rows at each x as error bars."""
    points: dict[float, list[float]] = {}
    for r in rows:
        points.setdefault(r[x_key], []).append(r["recovery"])
    if points:
        xs = sorted(points)
        stats = [_mean_std(points[x]) for x in xs]
        ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=label)


def plot_recovery(summary: dict[str, Any], path: Path) -> None:
    """Recovery vs sparsity, one panel per pruner (all N:M patterns share one), error bars over seeds."""
    rows = [{**r, "pruner": _pruner_label(r).split(" (")[0]} for r in summary["rows"]
            if r["fraction"] == summary["fractions"][0]]
    pruners = list(dict.fromkeys(r["pruner"] for r in rows))
    fig, axes = subplots(1, len(pruners), figsize=(5 * len(pruners), 4), sharey=True, squeeze=False)
    for ax, pruner in zip(axes[0], pruners):
        for healer in dict.fromkeys(r["healer"] for r in rows):
            _errorbar_series(ax, [r for r in rows if (r["pruner"], r["healer"]) == (pruner, healer)], "sparsity",
                             healer)
        ax.set_title(pruner)
        ax.set_xlabel("sparsity")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("recovery (healed / dense top-1)")
    axes[0][-1].legend(fontsize=8)
    n = rows[0]["calibration_images"]
    fig.suptitle(f"{summary['model']}: recovery vs sparsity ({n} calibration images, seeds {summary['seeds']})")
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def plot_recovery_against(summary: dict[str, Any], path: Path, x_key: str, x_label: str, title: str) -> None:
    """Recovery vs `x_key` (log axis), one panel per (pruner, sparsity), one line per healer:
    how much calibration data, or how many steps, each healer needs."""
    rows = summary["rows"]
    panels = list(dict.fromkeys((r["pruner"], r["sparsity"]) for r in rows))
    fig, axes = subplots(1, len(panels), figsize=(5 * len(panels), 4), sharey=False, squeeze=False)
    for ax, (pruner, sparsity) in zip(axes[0], panels):
        for healer in dict.fromkeys(r["healer"] for r in rows):
            _errorbar_series(ax, [r for r in rows if (r["pruner"], r["sparsity"], r["healer"]) ==
                                  (pruner, sparsity, healer)], x_key, healer)
        ax.set_xscale("log")
        ax.set_title(f"{pruner}, sparsity {sparsity:g}")
        ax.set_xlabel(f"{x_label} (log)")
        ax.set_ylabel("recovery")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{summary['model']}: {title}")
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def plot_curves(summary: dict[str, Any], path: Path) -> bool:
    """Calibration vs held-out alignment loss over the steps: the first pruner, seed and calibration
    size, one panel per gradient healer, one colour per sparsity."""
    rows = [r for r in summary["rows"] if r.get("curve") and r["curve"][-1]["holdout_loss"] is not None
            and r["seed"] == summary["seeds"][0] and r["fraction"] == summary["fractions"][0]]
    if not rows:
        return False
    rows = [r for r in rows if r["pruner"] == rows[0]["pruner"]]
    panels = list(dict.fromkeys((r["pruner"], r["healer"]) for r in rows))
    fig, axes = subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (pruner, healer) in zip(axes[0], panels):
        for i, r in enumerate(x for x in rows if (x["pruner"], x["healer"]) == (pruner, healer)):
            steps = [p["step"] for p in r["curve"]]
            color = f"C{i}"
            ax.plot(steps, [p["calibration_loss"] for p in r["curve"]], color=color, alpha=0.6,
                    label=f"{r['sparsity']:g} calibration")
            ax.plot(steps, [p["holdout_loss"] for p in r["curve"]], color=color, linestyle="--",
                    label=f"{r['sparsity']:g} held-out")
        ax.set_yscale("log")
        ax.set_title(f"{healer}, {pruner}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("alignment loss (log)")
    fig.legend(*axes[0][-1].get_legend_handles_labels(), loc="center right", fontsize=8)
    fig.suptitle("Calibration (training batches) vs held-out alignment loss")
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    save_png(fig, path, dpi=110)
    return True


def write_outputs(out: Path, summary: dict[str, Any]) -> None:
    """bench.json, bench.csv, bench.md and the plots; the table is also logged."""
    atomic_write_json(out / "bench.json", summary)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(summary["rows"])
    atomic_write_bytes(out / "bench.csv", buffer.getvalue().encode())
    table = markdown_table(summary)
    atomic_write_bytes(out / "bench.md", table.encode())
    if len(summary["fractions"]) > 1:
        plot_recovery_against(summary, out / "recovery_vs_calibration_size.png", "calibration_images",
                              "calibration images", "recovery vs calibration size at an equal step budget")
    elif summary.get("steps_grid"):
        plot_recovery_against(summary, out / "recovery_vs_steps.png", "steps", "Adam steps",
                              "recovery vs step budget (cosine schedule over each budget)")
    else:
        plot_recovery(summary, out / "recovery_vs_sparsity.png")
    plot_curves(summary, out / "holdout_vs_calibration_loss.png")
    log.info("bench table:\n%s", table)
