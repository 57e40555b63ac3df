"""`starfish frontier`: recovery against speed-up, for structure x int8 x heal, on one frontier.

Two grids, each resumable (a finished cell is a JSON file under `cells/`, claimed with a lock,
so several processes can share the grid, as `starfish bench` does):

- recovery, on the demo models (the ViT with neurons+heads removed, the CNN with channels):
  for each amount removed (0, 25, 50, 75%; `contribution` units) and seed, every heal recipe at
  the same 400 Adam steps, then the model as it is served (float ONNX, or the int8 model of each
  mode), evaluated in onnxruntime on all 10,000 test images;
- speed, on the models the recipes are for (deit_small at 224 px for the ViT, resnet50 for the
  CNN) and on the demo models themselves: each recipe's served ONNX model against its dense
  float ONNX model in onnxruntime, side by side in one run (alternating, medians), at batch 1
  and 32, on 2 threads; random weights (speed does not depend on them), magnitude groups.

Then `frontier.json` (one row per recipe and batch), `frontier.md` and `frontier.png`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from starfish.benchmarks.bench import claim
from starfish.calibration import stratified_indices
from starfish.catalog import QUANT_MODES
from starfish.config import HealConfig, PipelineConfig, PruneConfig
from starfish.errors import StarfishError
from starfish.evaluate import predict
from starfish.io import atomic_write_bytes, atomic_write_json, canonical_json, read_json, sha256_bytes
from starfish.pruning import prune, remove_units_
from starfish.timing import median_ratio, repeats_for

log = logging.getLogger(__name__)

# family: (demo model, its checkpoint, structure, the model its speed is measured on)
FAMILIES = {
    "vit": ("starfish_vit_fmnist", "data/demo/starfish_vit_fmnist.safetensors", "neurons+heads",
            "deit_small_patch16_224"),
    "cnn": ("starfish_cnn_fmnist", "data/demo/starfish_cnn_fmnist.safetensors", "channels", "resnet50"),
}
REMOVED = (0.0, 0.25, 0.5, 0.75)
SEEDS = (0, 1, 2)
STEPS = 400  # every gradient heal's budget: the `fast` preset's
LR = 2e-3  # every gradient heal's peak learning rate: the `fast` preset's
BATCHES = (1, 32)
THREADS = 2
# Heal recipes: (label, heal fields, whether it heals through the quantizer). A float heal is
# served in every quant mode; one through the quantizer only in its own.
RECIPES = {
    "none": ({"method": "none"}, False),
    "layerwise": ({"method": "layerwise", "solver": "cg"}, True),
    "logit-kd": ({"method": "logit-kd", "keep": "last", "lr": LR}, True),
    "starfish": ({"preset": "fast"}, False),  # prune -> heal -> quantize
    "starfish-through-quant": ({"preset": "fast"}, True),  # prune -> heal through the quantizer
    # the same at the default's budget, where a ViT recipe may reach 0.99: outside the equal-budget comparison
    "starfish-1570-through-quant": ({"preset": "recommended", "steps": 1570}, True),
}
# Where a recipe runs, if not everywhere: (families, amounts removed). At 50% removed the
# 1,570-step heal recovers 0.977 in float (results/bench_structured/vit), short of 0.99 before int8.
RECIPE_CELLS = {"starfish-1570-through-quant": (("vit",), (0.25,))}
# The seeds a family's recovery grid runs, if not all: the CNN's rows are measured, not a
# recommendation (its int8 scheme leaves Conv outputs in float), so one seed answers for them.
FAMILY_SEEDS = {"cnn": (0,)}
HEAL_LABELS = {"none": "no heal", "layerwise": "layerwise least squares", "logit-kd": "logit distillation",
               "starfish": "STARFISH, then quantized", "starfish-through-quant": "STARFISH through the quantizer",
               "starfish-1570-through-quant": "STARFISH through the quantizer, 1,570 steps"}


def recipe_config(recipe: str, quant: str, seed: int) -> HealConfig:
    """The heal section of `recipe` for a model served in `quant`: its fields at the shared
    budget (STEPS Adam steps, unless it names its own), through `quant` if the recipe heals
    through the quantizer."""
    fields, through = RECIPES[recipe]
    fields = dict(fields)
    preset = fields.pop("preset", "default")
    budget = {"steps": fields.pop("steps", STEPS), "epochs": None} if fields.get("method") != "none" else {}
    return HealConfig.from_preset(preset, **{**fields, **budget, "seed": seed,
                                             "quant": quant if through else "none"})


def recovery_cells(family: str) -> list[tuple[float, int, str, str]]:
    """(removed, seed, recipe, heal quant) of every heal the recovery grid makes for `family`."""
    cells = []
    for removed, seed, recipe in itertools.product(REMOVED, SEEDS, RECIPES):
        _, through = RECIPES[recipe]
        if recipe == "layerwise" and family == "cnn":
            continue  # its least-squares re-fit is written for Linear layers
        families, amounts = RECIPE_CELLS.get(recipe, (FAMILIES, REMOVED))
        if family not in families or removed not in amounts:
            continue
        if recipe.startswith("starfish") and through:
            cells += [(removed, seed, recipe, mode) for mode in QUANT_MODES[1:]]
        elif through:
            cells += [(removed, seed, recipe, mode) for mode in QUANT_MODES]
        else:
            cells.append((removed, seed, recipe, "none"))
    return cells


def _served_modes(recipe: str, heal_quant: str) -> tuple[str, ...]:
    """The quant modes a healed model is served in: every one for a float heal, else its own."""
    return QUANT_MODES if not RECIPES[recipe][1] else (heal_quant,)


def _served(model: nn.Module, folder: Path, input_size: tuple[int, ...], mode: str, images: torch.Tensor,
            checked: bool = True) -> Path:
    """`model` written as it is served in `mode` (float ONNX, or the int8 model) under `folder`.
    Unchecked (for timing random weights, whose near-flat logits no agreement check can read),
    the int8 model is the same quantizer's output without `write_int8`'s check against torch."""
    from starfish.formats.onnx import export_onnx
    from starfish.quant.fake import quantized_layers
    from starfish.quant.ort import quantize_onnx, write_int8

    path = folder / f"{mode}.onnx"
    model = copy.deepcopy(model).float().cpu().eval()
    if mode == "none":
        export_onnx(model, path, input_size, {"model": "frontier"}, images[:32])
    elif checked:
        write_int8(model, path, input_size, {"model": "frontier"}, mode, images)
    else:
        export_onnx(model, folder / "float.onnx", input_size, {"model": "frontier"}, images[:32])
        quantize_onnx(folder / "float.onnx", path, mode, len(quantized_layers(model, mode)), images)
    return path


def _prunable(dense: nn.Module, structure: str, removed: float, images: torch.Tensor) -> tuple[nn.Module, dict]:
    """The pruned slim model and its masks (all True: the layers a heal trains); at 0 removed the
    dense model itself with all-True masks over the default scope."""
    from starfish.healing import heal_  # noqa: F401  (the healers register on import)

    model = copy.deepcopy(dense)
    if removed == 0:
        masks = prune(dense, PruneConfig("magnitude", 0.0)).masks
        return model, masks
    masks, _, plan = prune(dense, PruneConfig("contribution", removed, structure=structure), images)
    return model, remove_units_(model, masks, plan)[0]


def measure_recovery(cfg: PipelineConfig, family: str, removed: float, seed: int, recipe: str, heal_quant: str,
                     dense: nn.Module, train: Any, test: Any) -> dict[str, Any]:
    """Heal one pruned demo model by `recipe` and evaluate it as served in each of its modes."""
    from starfish.formats.onnx import OnnxModel
    from starfish.healing import heal_

    _, _, structure, _ = FAMILIES[family]
    indices = stratified_indices(train.targets, cfg.calibration.fraction, seed)
    images = torch.stack([train[i][0] for i in indices])
    torch.manual_seed(seed)
    model, masks = _prunable(dense, structure, removed, images)
    heal_cfg = recipe_config(recipe, heal_quant, seed)
    start = time.perf_counter()
    report = heal_(model, dense, masks, images, heal_cfg) if heal_cfg.method != "none" else {}
    seconds = time.perf_counter() - start
    input_size = tuple(images.shape[1:])
    served, refused = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in _served_modes(recipe, heal_quant):
            try:
                path = _served(model, Path(tmp), input_size, mode, images)
            except StarfishError as error:  # the quantize step would refuse it too: a result, not a crash
                refused[mode] = str(error)
                log.warning("%s %g %s seed %d: %s refused: %s", family, removed, recipe, seed, mode, error)
                continue
            preds, targets = predict(OnnxModel(path, THREADS), test, cfg.evaluate.batch_size,
                                     desc=f"{family} {removed:g} {recipe} {mode}")
            served[mode] = float((preds == targets).float().mean())
    return {"family": family, "removed": removed, "seed": seed, "recipe": recipe, "heal_quant": heal_quant,
            "steps": report.get("steps", 0), "heal_seconds": seconds, "served_top1": served, "refused": refused,
            "calibration_images": len(indices)}


def measure_speed(name: str, structure: str, removed: float, mode: str, input_size: tuple[int, ...],
                  dense_path: Path, folder: Path) -> list[dict[str, Any]]:
    """The served model of (structure, removed, mode) against the dense float ONNX model, in
    onnxruntime, alternating, at each batch: one row per batch."""
    from starfish.formats.onnx import run_session, session
    from starfish.models import create_model

    torch.manual_seed(0)
    dense = create_model(name).eval()
    model = copy.deepcopy(dense)
    ratios = {"params_ratio": 1.0, "flops_ratio": 1.0}
    if removed:
        masks, _, plan = prune(dense, PruneConfig("magnitude", removed, structure=structure))
        report = remove_units_(model, masks, plan, image_size=input_size)[1]
        ratios = {key: report[key] for key in ratios}
    images = torch.randn(32, *input_size, generator=torch.Generator().manual_seed(1))
    path = _served(model, folder, input_size, mode, images, checked=False)
    dense_session, served_session = session(dense_path, THREADS), session(path, THREADS)
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(batch)).numpy()
        start = time.perf_counter()
        run_session(dense_session, x)
        repeats = repeats_for(time.perf_counter() - start)
        dense_s, served_s, ratio = median_ratio(lambda: run_session(dense_session, x),
                                                lambda: run_session(served_session, x), repeats, lambda: None)
        rows.append({"latency_model": name, "structure": structure, "removed": removed, "quant": mode,
                     "runtime": "onnxruntime", "device": "cpu", "threads": THREADS, "batch": batch,
                     "dense_ms": round(1e3 * dense_s, 3), "served_ms": round(1e3 * served_s, 3),
                     "speedup": round(ratio, 3), "repeats": repeats, "bytes": path.stat().st_size, **ratios})
        log.info("%s %s %.2f %s batch %d: %.2fx", name, structure, removed, mode, batch, ratio)
    return rows


# The int8 schemes weighed against the one chosen (starfish.quant.ort), each as onnxruntime's
# quantizer options: (label, format, input type, ranges, layer outputs quantized too).
SCHEMES = (
    ("chosen: dynamic uint8 inputs", "dynamic", "QUInt8", None, False),
    ("chosen: static QDQ uint8 inputs, MinMax", "QDQ", "QUInt8", "MinMax", False),
    ("static QDQ int8 inputs, MinMax", "QDQ", "QInt8", "MinMax", False),
    ("static QDQ uint8 inputs and outputs, MinMax", "QDQ", "QUInt8", "MinMax", True),
    ("static QDQ int8 inputs and outputs, MinMax", "QDQ", "QInt8", "MinMax", True),
    ("static QOperator uint8, MinMax", "QOperator", "QUInt8", "MinMax", True),
    ("static QDQ uint8 inputs, Percentile", "QDQ", "QUInt8", "Percentile", False),
    ("static QDQ uint8 inputs, Entropy", "QDQ", "QUInt8", "Entropy", False),
)


def _scheme_model(source: Path, out: Path, scheme: tuple, images: Any) -> None:
    """`source` quantized by one of SCHEMES: the same layers as the chosen scheme's, other options."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from starfish.quant.ort import SplitReader, _quiet, gemm_to_matmul, weight_nodes

    _, fmt, inputs, ranges, outputs = scheme
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))
        proto = onnx.load(str(prepared))
        gemm_to_matmul(proto)
        onnx.save(proto, str(prepared))
        mode = "int8-dynamic" if fmt == "dynamic" else "int8-static"
        common = {"per_channel": True, "weight_type": QuantType.QInt8, "nodes_to_quantize": weight_nodes(proto, mode)}
        if fmt == "dynamic":
            quantize_dynamic(str(prepared), str(out), **common, extra_options={"MatMulConstBOnly": True})
            return
        # Percentile and Entropy collect histograms of equal-sized batches: 16 images each
        batches = SplitReader(images[: len(images) // 16 * 16], proto.graph.input[0].name, batch=16)
        extra = {"ActivationSymmetric": inputs == "QInt8", "WeightSymmetric": True, "QuantizeBias": False}
        if not outputs:
            extra["OpTypesToExcludeOutputQuantization"] = ["MatMul", "Conv"]
        quantize_static(str(prepared), str(out), batches, quant_format=getattr(QuantFormat, fmt),
                        activation_type=getattr(QuantType, inputs), calibrate_method=getattr(CalibrationMethod, ranges),
                        **common, extra_options=extra)


def scheme_rows(cfg: PipelineConfig, out: Path) -> list[dict[str, Any] | None]:
    """Each of SCHEMES on dense deit_small and resnet50 (speed-up over float in onnxruntime, batch
    1 and 32, alternating) and on the trained demo ViT (top-1 on the test set): why the chosen
    scheme is the chosen one."""
    from timm.data import resolve_data_config

    from starfish.formats.onnx import OnnxModel, export_onnx, run_session, session
    from starfish.models import create_model
    from starfish.steps import dataset

    rows: list[dict[str, Any] | None] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("deit_small_patch16_224", "resnet50", "starfish_vit_fmnist"):
            torch.manual_seed(0)
            trained = name == "starfish_vit_fmnist"
            dense = create_model(name, checkpoint=FAMILIES["vit"][1] if trained else None).eval()
            input_size = tuple(resolve_data_config({}, model=dense)["input_size"])
            float_path = Path(tmp) / f"{name}.onnx"
            for scheme in SCHEMES:
                key = f"scheme_{name}_{scheme[0].replace(' ', '-').replace(',', '').replace(':', '')}"
                fingerprint = sha256_bytes(canonical_json({"model": name, "scheme": scheme, "batches": BATCHES}))

                def measure() -> dict[str, Any]:
                    if not float_path.is_file():
                        export_onnx(dense, float_path, input_size, {"model": name})
                    if trained:
                        family_cfg = cfg.replace(model={"name": name, "checkpoint": FAMILIES["vit"][1]})
                        train, test = dataset(family_cfg, "train", dense), dataset(family_cfg, "test", dense)
                        split = torch.stack([train[i][0] for i in stratified_indices(train.targets, 0.004, 0)])
                    else:
                        split = torch.randn(32, *input_size, generator=torch.Generator().manual_seed(1))
                    path = Path(tmp) / "scheme.onnx"
                    _scheme_model(float_path, path, scheme, split.numpy())
                    if trained:
                        preds, targets = predict(OnnxModel(path, THREADS), test, cfg.evaluate.batch_size,
                                                 desc=f"scheme {scheme[0]}")
                        return {"model": name, "scheme": scheme[0], "top1": float((preds == targets).float().mean())}
                    found = {"model": name, "scheme": scheme[0]}
                    dense_session, quant_session = session(float_path, THREADS), session(path, THREADS)
                    for batch in BATCHES:
                        x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(batch)).numpy()
                        start = time.perf_counter()
                        run_session(dense_session, x)
                        repeats = repeats_for(time.perf_counter() - start)
                        *_, ratio = median_ratio(lambda: run_session(dense_session, x),
                                                 lambda: run_session(quant_session, x), repeats, lambda: None)
                        found[f"speedup_batch{batch}"] = round(ratio, 3)
                    log.info("scheme %s on %s: %s", scheme[0], name, found)
                    return found

                cell = _cell(out, key, fingerprint, measure)
                rows.append(None if cell is None else cell["result"])
    return rows


def _cell(out: Path, key: str, fingerprint: str, measure: Any) -> dict[str, Any] | None:
    """The cell's stored result, measured here first if no process has (None if another is on it)."""
    path = out / "cells" / f"{key}.json"
    if path.is_file() and read_json(path).get("fingerprint") == fingerprint:
        return read_json(path)
    with claim(out / "cells" / f"{key}.lock") as mine:
        if not mine:
            return None
        if path.is_file() and read_json(path).get("fingerprint") == fingerprint:
            return read_json(path)
        result = {"fingerprint": fingerprint, "result": measure()}
        atomic_write_json(path, result)
        return result


def run(cfg: PipelineConfig, out: Path, families: tuple[str, ...] = tuple(FAMILIES), seeds: tuple[int, ...] = SEEDS,
        speed: bool = True, eval_samples: int | None = None) -> list[dict[str, Any]]:
    """Measure every cell not yet under `out/cells`, then write the outputs once all are there."""
    from torch.utils.data import Subset

    from starfish.models import create_model
    from starfish.steps import dataset

    torch.set_num_threads(THREADS)
    missing = 0
    recoveries: list[dict[str, Any]] = []
    for family in families:
        name, checkpoint, _, _ = FAMILIES[family]
        family_cfg = cfg.replace(model={"name": name, "checkpoint": checkpoint, "device": "cpu", "kwargs": {}})
        dense = create_model(name, checkpoint=checkpoint).eval()
        train, test = dataset(family_cfg, "train", dense), dataset(family_cfg, "test", dense)
        if eval_samples:
            test = Subset(test, range(min(eval_samples, len(test))))
        dense_preds, targets = predict(dense, test, cfg.evaluate.batch_size, desc=f"evaluate dense {name}")
        dense_top1 = float((dense_preds == targets).float().mean())
        for removed, seed, recipe, heal_quant in recovery_cells(family):
            if seed not in seeds or seed not in FAMILY_SEEDS.get(family, SEEDS):
                continue
            key = f"recovery_{family}_r{removed:g}_seed{seed}_{recipe}_{heal_quant}"
            fingerprint = sha256_bytes(canonical_json({
                "model": name, "checkpoint": checkpoint, "removed": removed, "seed": seed, "images": len(test),
                "fraction": cfg.calibration.fraction,
                "heal": dataclasses.asdict(recipe_config(recipe, heal_quant, seed))}))
            cell = _cell(out, key, fingerprint, lambda: measure_recovery(
                family_cfg, family, removed, seed, recipe, heal_quant, dense, train, test))
            if cell is None:
                missing += 1
                continue
            recoveries.append({**cell["result"], "dense_top1": dense_top1, "model": name, "test_images": len(test)})
    speeds: list[dict[str, Any]] = []
    schemes: list[dict[str, Any]] = []
    if speed:
        measured = _speed_grid(out, families)
        weighed = scheme_rows(cfg, out)
        missing += measured.count(None) + weighed.count(None)
        speeds = [row for row in measured if row is not None]
        schemes = [row for row in weighed if row is not None]
    if missing:
        log.info("%d cells still being measured by another process; it writes the outputs", missing)
        return []
    rows = frontier_rows(recoveries, speeds)
    summary = {"steps": STEPS, "lr": LR, "seeds": list(seeds), "threads": THREADS,
               "calibration_fraction": cfg.calibration.fraction, "rows": rows, "recovery_cells": recoveries,
               "speed_cells": speeds, "schemes": schemes}
    write_outputs(out, summary)
    return rows


def _speed_grid(out: Path, families: tuple[str, ...]) -> list[dict[str, Any] | None]:
    from timm.data import resolve_data_config

    from starfish.formats.onnx import export_onnx
    from starfish.models import create_model

    rows: list[dict[str, Any] | None] = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            demo, _, structure, latency_model = FAMILIES[family]
            for name in (latency_model, demo):
                torch.manual_seed(0)
                dense = create_model(name).eval()
                input_size = tuple(resolve_data_config({}, model=dense)["input_size"])
                dense_path = Path(tmp) / f"{name}-dense.onnx"
                for removed, mode in itertools.product(REMOVED, QUANT_MODES):
                    if removed == 0 and mode == "none":
                        continue  # the dense model against itself
                    key = f"speed_{name}_r{removed:g}_{mode}"
                    fingerprint = sha256_bytes(canonical_json({"model": name, "removed": removed, "quant": mode,
                                                               "batches": BATCHES, "threads": THREADS}))
                    path = out / "cells" / f"{key}.json"
                    if not (path.is_file() and read_json(path).get("fingerprint") == fingerprint) \
                            and not dense_path.is_file():
                        export_onnx(dense, dense_path, input_size, {"model": name})
                    cell = _cell(out, key, fingerprint, lambda: measure_speed(
                        name, structure, removed, mode, input_size, dense_path, Path(tmp)))
                    rows += [None] if cell is None else cell["result"]
    return rows


def frontier_rows(recoveries: list[dict[str, Any]], speeds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per recipe (family, removed, quant, heal) and batch: recovery (mean and std over
    seeds, on the demo model as served) and the speed-up of the same recipe on its latency model
    and on the demo model."""
    recovery: dict[tuple, list[float]] = {}
    steps: dict[tuple, int] = {}
    for cell in recoveries:
        for mode, top1 in cell["served_top1"].items():
            key = (cell["family"], cell["removed"], mode, cell["recipe"])
            recovery.setdefault(key, []).append(top1 / cell["dense_top1"])
            steps[key] = cell["steps"]
    speed = {(r["latency_model"], r["removed"], r["quant"], r["batch"]): r["speedup"] for r in speeds}
    rows = []
    for (family, removed, mode, recipe), values in sorted(recovery.items()):
        demo, _, structure, latency_model = FAMILIES[family]
        for batch in BATCHES:
            rows.append({
                "model": demo, "structure": structure if removed else "none", "removed": removed, "quant": mode,
                "heal": recipe, "steps": steps[(family, removed, mode, recipe)], "recovery": statistics.fmean(values),
                "recovery_std": statistics.stdev(values) if len(values) > 1 else 0.0, "seeds": len(values),
                "latency_model": latency_model, "runtime": "onnxruntime", "batch": batch,
                "speedup": 1.0 if removed == 0 and mode == "none" else speed.get((latency_model, removed, mode, batch)),
                "demo_speedup": 1.0 if removed == 0 and mode == "none" else speed.get((demo, removed, mode, batch)),
            })
    return rows


def best_within(rows: list[dict[str, Any]], floor: float, batch: int = 32) -> dict[str, Any] | None:
    """The fastest recipe (latency-model speed-up at `batch`) whose recovery is at least `floor`."""
    fitting = [r for r in rows if r["batch"] == batch and r["speedup"] is not None and r["recovery"] >= floor]
    return max(fitting, key=lambda r: r["speedup"], default=None)


def markdown(summary: dict[str, Any]) -> str:
    rows = summary["rows"]
    lines = ["# Frontier: recovery against speed-up", "",
             "Generated by `starfish frontier`. Recovery: served top-1 / dense top-1 on the demo model, the model "
             "as served (float ONNX or the int8 model) run in onnxruntime on the whole test set, mean ± std over "
             f"seeds {summary['seeds']} (each its own calibration split and shuffle; the CNN's seed "
             f"{', '.join(map(str, FAMILY_SEEDS['cnn']))} only: its column `seeds`). The recipes compared side by "
             f"side heal for {summary['steps']} Adam steps at peak lr {summary['lr']:g} (layerwise takes no steps); "
             "one more, at the default's 1,570 steps and the recommended preset's lr, says so in its name. "
             "Speed-up: the same recipe on the latency model (random weights, magnitude groups) against its dense "
             f"float ONNX model, onnxruntime on {summary['threads']} CPU threads, alternating in one run, medians; "
             "`demo` the same on the demo model (too small for steady CPU timings).", ""]
    for floor in (0.99, 0.98, 0.95):
        best = best_within(rows, floor)
        if best:
            lines.append(f"- Fastest at recovery ≥ {floor:g} (batch 32): {best['model']} {best['structure']} "
                         f"{best['removed']:g}, {best['quant']}, {best['heal']}: recovery {best['recovery']:.4f} ± "
                         f"{best['recovery_std']:.4f}, {best['latency_model']} {best['speedup']:.2f}x.")
    refusals = [c for c in summary.get("recovery_cells", []) if c.get("refused")]
    for c in refusals:
        for mode, why in c["refused"].items():
            lines.append(f"- Refused, so not in the table: {c['model']} {c['removed']:g} removed, {c['recipe']}, seed "
                         f"{c['seed']}, {mode}: {why}")
    lines += ["", "| model | structure | removed | quant | heal | steps | recovery | seeds | latency model | batch "
              "| speed-up | demo speed-up |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        demo = "-" if r["demo_speedup"] is None else f"{r['demo_speedup']:.2f}x"
        lines.append(f"| {r['model']} | {r['structure']} | {r['removed']:g} | {r['quant']} | {r['heal']} | "
                     f"{r['steps']} | {r['recovery']:.4f} ± {r['recovery_std']:.4f} | {r['seeds']} | "
                     f"{r['latency_model']} | {r['batch']} | {speedup} | {demo} |")
    schemes = summary.get("schemes") or []
    if schemes:
        lines += ["", "## The int8 scheme", "", "Every scheme quantizes the same layers (each Linear, and for static "
                  "ones each Conv) with int8 weights per output channel; they differ in the input type, the "
                  "ranges and whether layer outputs are quantized too. Speed-up over the float ONNX model (random "
                  "weights, onnxruntime, alternating) and the trained demo ViT's top-1 as that int8 model:", "",
                  "| scheme | deit_small b1 | deit_small b32 | resnet50 b1 | resnet50 b32 | demo ViT top-1 |",
                  "|---|---|---|---|---|---|"]
        found = {(r["model"], r["scheme"]): r for r in schemes}
        for label, *_ in SCHEMES:
            cells = [found.get(("deit_small_patch16_224", label), {}), found.get(("resnet50", label), {})]
            speeds = [f"{c[f'speedup_batch{b}']:.2f}x" if f"speedup_batch{b}" in c else "-"
                      for c in cells for b in BATCHES]
            top1 = found.get(("starfish_vit_fmnist", label), {}).get("top1")
            lines.append(f"| {label} | " + " | ".join(speeds) + f" | {'-' if top1 is None else f'{top1:.4f}'} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path, batch: int = 32) -> None:
    """Recovery against the latency model's speed-up at `batch`, one panel per demo model, one
    marker per quant mode, one colour per heal recipe; the labels are the fraction removed."""
    from starfish.plots import save_png, subplots

    rows = [r for r in summary["rows"] if r["batch"] == batch and r["speedup"] is not None]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = subplots(1, max(len(models), 1), figsize=(6.5 * max(len(models), 1), 4.8), squeeze=False)
    markers = {"none": "o", "int8-dynamic": "s", "int8-static": "^"}
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        for i, recipe in enumerate(RECIPES):
            for mode, marker in markers.items():
                points = sorted((r for r in mine if r["heal"] == recipe and r["quant"] == mode),
                                key=lambda r: r["speedup"])
                if not points:
                    continue
                ax.errorbar([p["speedup"] for p in points], [p["recovery"] for p in points],
                            yerr=[p["recovery_std"] for p in points], color=f"C{i}", marker=marker, linestyle=":",
                            capsize=2, label=f"{HEAL_LABELS[recipe]}, {mode}")
                for p in points:
                    ax.annotate(f"{p['removed']:g}", (p["speedup"], p["recovery"]), fontsize=6, xytext=(2, 2),
                                textcoords="offset points")
        ax.axhline(0.99, color="grey", linewidth=0.7, linestyle="--")
        ax.set(xlabel=f"speed-up over dense fp32 ({mine[0]['latency_model']}, onnxruntime, batch {batch})",
               ylabel="recovery (served model, onnxruntime)", title=model)
        ax.set_ylim(max(0.0, min(r["recovery"] for r in mine) - 0.02), 1.005)
        ax.grid(alpha=0.3)
    if rows:
        axes[0][-1].legend(fontsize=6, loc="lower left")
    fig.suptitle("Recovery against measured speed-up (labels: fraction of units removed)")
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def write_outputs(out: Path, summary: dict[str, Any]) -> None:
    atomic_write_json(out / "frontier.json", summary)
    atomic_write_bytes(out / "frontier.md", markdown(summary).encode())
    plot(summary, out / "frontier.png")
    log.info("frontier table:\n%s", markdown(summary))


__all__ = ["FAMILIES", "RECIPES", "best_within", "frontier_rows", "recipe_config", "run"]
