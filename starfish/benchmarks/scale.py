"""The scale benchmark: the pipeline's stages on an ImageNet-layout JPEG tree with a DeiT.

`starfish scale --out results/scale` makes (once) a tree of 256 px JPEGs under `<out>/tree`
(100 classes; 80 train and 10 val images each), then measures, each cell in its own process:
- `sample`: drawing and decode-checking 500, 2,000 and 5,000 calibration images;
- `heal`: `deit_tiny_patch16_224` at 224 px (random weights: accuracy is not the point), with
  each `heal.cache` mode at each calibration size, for a reduced number of steps;
- `evaluate`: the 1,000 val images through the dense model with 0 and 2 loader workers (and
  the loader and the model apart);
- `flow`: the whole compress flow with 5,000 calibration images and `heal.cache=disk`;
- `dvc`: `dvc status` on a stage that depends on a 100,000-file folder, first and second time;
- `solve`: `layerwise`'s solve at ViT-B's fc2 width with each `heal.solver`, the cost of a
  ViT-B's warm start against its heal, and a small budget's result against one big solve;
- `sizing`: DeiT-B's constants for the sizing formulas (states, activations, FLOPs per image).
Per cell: wall time, images/s, and peak memory, both resident (VmHWM) and anonymous (RssAnon,
sampled); scratch files are read with pread, so they are in neither.
Cells are saved as they finish, so a stopped run resumes; `scale.md`, `scale.json` and
`scale.png` are written when every cell is there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from starfish.benchmarks.memory import MemorySampler, TreeMemorySampler, status_kb
from starfish.io import atomic_write_json, read_json

log = logging.getLogger(__name__)
MODEL = "deit_tiny_patch16_224"
SIZES = (500, 2000, 5000)
CACHE_MODES = ("memory", "disk", "recompute")
HEAL_STEPS = 4
TREE = {"classes": 100, "train": 80, "val": 10, "pixels": 256}
DVC_FILES = 100_000
FLOW_SIZE = 5000


def make_tree(root: Path, classes: int = TREE["classes"], train: int = TREE["train"], val: int = TREE["val"],
              pixels: int = TREE["pixels"]) -> None:
    """Write `root/{train,val}/cNNN/*.JPEG`: smooth random colour fields, seeded, as JPEG (q=90)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"c{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
                image = Image.fromarray(small).resize((pixels, pixels), Image.BILINEAR)
                image.save(folder / f"{split}_{c:03d}_{i:04d}.JPEG", quality=90)
    (root / "COMPLETE").write_text(json.dumps(TREE))


@dataclass(frozen=True)
class Cell:
    stage: str
    size: int = 0
    mode: str = ""
    workers: int = 0

    @property
    def key(self) -> str:
        return "_".join(str(part) for part in (self.stage, self.size, self.mode, self.workers) if part != "")


def cells() -> list[Cell]:
    return ([Cell("sample", n) for n in SIZES] + [Cell("heal", n, mode) for n in SIZES for mode in CACHE_MODES]
            + [Cell("evaluate", workers=w) for w in (0, 2)] + [Cell("dvc", DVC_FILES)]
            + [Cell("flow", FLOW_SIZE, "disk"), Cell("sizing"), Cell("solve")]
            + [Cell("cache", FLOW_SIZE, mode) for mode in CACHE_MODES] + [Cell("warmstart")])


def _config(tree: Path, **sections: dict[str, Any]) -> Any:
    from starfish.config import from_dict

    values = {"data": {"kind": "imagefolder", "root": str(tree), "num_workers": 0},
              "model": {"name": MODEL, "checkpoint": None, "device": "cpu", "num_classes": TREE["classes"]}}
    for name, fields in sections.items():
        values[name] = {**values.get(name, {}), **fields}
    return from_dict(values)


def _pixels_mb(images: int) -> float:
    """The uint8 calibration pixels of `images` 224 px RGB crops."""
    return images * 3 * 224 * 224 / 2**20


def _fraction(size: int) -> float:
    return size / (TREE["classes"] * TREE["train"])


def measure(cell: Cell, tree: Path, work: Path) -> dict[str, Any]:
    """Run one cell in this process; its measurements."""
    torch.manual_seed(0)
    started = time.perf_counter()
    with MemorySampler() as memory:
        counts = STAGES[cell.stage](cell, tree, work)
    seconds = time.perf_counter() - started
    row = {"stage": cell.stage, "size": cell.size, "mode": cell.mode, "workers": cell.workers,
           "seconds": round(seconds, 2), "peak_rss_mb": round(status_kb("VmHWM") / 1024),
           "peak_anon_mb": round(memory.peak / 1024), **counts}
    if "images" in counts:
        row["images_per_s"] = round(counts["images"] / counts.get("timed_seconds", seconds), 1)
    return row


def _sample(cell: Cell, tree: Path, work: Path) -> dict[str, Any]:
    from starfish.steps import sample

    info = sample(_config(tree, calibration={"fraction": _fraction(cell.size)}), work / f"{cell.key}.json")
    return {"images": info["num_samples"]}


@contextlib.contextmanager
def _pruned_heal_inputs(cell: Cell, tree: Path, work: Path, heal: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """What a heal cell heals, inside the scratch folder its `disk` files go to: the config (with
    `heal`), the dense model, the cell's calibration images (and the seconds loading them took),
    the masks of magnitude 50% and the pruned copy; and the dense states' bytes per image."""
    from starfish.capture import state_names
    from starfish.config import PruneConfig
    from starfish.healing.targets import state_bytes_per_image
    from starfish.pruning import prune, sparsify_
    from starfish.rows import scratch_folder
    from starfish.steps import calibration_images, dense_model, sample

    cfg = _config(tree, calibration={"fraction": _fraction(cell.size)}, heal=heal)
    manifest = work / f"split_{cell.size}.json"
    if not manifest.is_file():
        sample(cfg, manifest)
    dense = dense_model(cfg)
    with scratch_folder(work):
        start = time.perf_counter()
        images = calibration_images(cfg, manifest, dense)
        load_seconds = time.perf_counter() - start
        masks = prune(dense, PruneConfig("magnitude", 0.5)).masks
        per_image = state_bytes_per_image(dense, state_names(dense, cfg.heal.states), images[:1],
                                          getattr(torch, cfg.heal.cache_dtype))
        yield {"cfg": cfg, "dense": dense, "images": images, "load_seconds": load_seconds, "masks": masks,
               "model": sparsify_(dense_copy(dense), masks), "state_bytes_per_image": per_image}


def _heal(cell: Cell, tree: Path, work: Path) -> dict[str, Any]:
    from starfish.healing import heal_

    with _pruned_heal_inputs(cell, tree, work, {"steps": HEAL_STEPS, "cache": cell.mode,
                                                "holdout_every": HEAL_STEPS}) as run:
        start = time.perf_counter()
        report = heal_(run["model"], run["dense"], run["masks"], run["images"], run["cfg"].heal)
        heal_seconds = time.perf_counter() - start
    images = len(run["images"])
    return {"images": images, "load_seconds": round(run["load_seconds"], 2), "heal_seconds": round(heal_seconds, 2),
            "steps": report["steps"], "timed_seconds": heal_seconds,
            "estimate_mb": round(run["state_bytes_per_image"] * images / 2**20)}


CACHE_STEPS, CACHE_EVERY = 20, 10  # steps timed per cache mode, and held-out checks every 10 of them
BUDGETS = (400, 1570)  # the fast preset's steps and the authors'
HOLDOUT_EVERY = 50  # heal.holdout_every's default: the checks a heal of a budget makes


def _cache(cell: Cell, tree: Path, work: Path) -> dict[str, Any]:
    """One `heal.cache` mode's costs apart, at 5,000 images: the one-off caching pass, one step,
    one held-out check, and the unit costs `auto` estimates with (a dense forward per image, a
    scratch file's write and read rates), in the same process."""
    from starfish.healing import heal_
    from starfish.healing.targets import dense_seconds_per_image, disk_seconds_per_byte

    with _pruned_heal_inputs(cell, tree, work, {"steps": CACHE_STEPS, "cache": cell.mode,
                                                "holdout_every": CACHE_EVERY}) as run:
        cfg, dense, images = run["cfg"], run["dense"], run["images"]
        report = heal_(run["model"], dense, run["masks"], images, cfg.heal)
        forward = statistics.median(dense_seconds_per_image(dense, images, cfg.heal.batch_size) for _ in range(3))
        write, read = disk_seconds_per_byte(work) if cell.mode == "disk" else (0.0, 0.0)
    parts = report["seconds"]
    checks = CACHE_STEPS // CACHE_EVERY + 1  # the start's, then one every CACHE_EVERY steps
    return {"images": len(images), "train_images": report["train_images"],
            "holdout_images": report["holdout_images"], "batch_size": cfg.heal.batch_size,
            "cache_seconds": round(parts["cache"], 3), "step_seconds": parts["steps"] / CACHE_STEPS,
            "check_seconds": parts["holdout"] / checks, "timed_seconds": parts["cache"] + parts["steps"],
            "dense_seconds_per_image": forward, "write_seconds_per_byte": write, "read_seconds_per_byte": read,
            "state_bytes_per_image": run["state_bytes_per_image"]}


def measured_totals(row: dict[str, Any], steps: int) -> float:
    """A cache cell's whole heal at `steps`, from its measured parts: caching, the steps, and a
    held-out check at the start and every `HOLDOUT_EVERY` steps."""
    return row["cache_seconds"] + steps * row["step_seconds"] + (steps // HOLDOUT_EVERY + 1) * row["check_seconds"]


def modelled_totals(rows: dict[str, dict[str, Any]], steps: int) -> dict[str, float]:
    """`auto`'s estimate (`ModeCosts`) for the same heal, from the unit costs the cells measured:
    the dense forward per image of the `memory` cell, the scratch rates of the `disk` one."""
    from starfish.healing.targets import ModeCosts

    memory, disk = rows["memory"], rows["disk"]
    costs = ModeCosts(memory["dense_seconds_per_image"], memory["state_bytes_per_image"],
                      disk["write_seconds_per_byte"], disk["read_seconds_per_byte"])
    checked = (steps // HOLDOUT_EVERY + 1) * memory["holdout_images"]
    return costs.totals(memory["images"], steps, memory["batch_size"], checked)


def dense_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def _evaluate(cell: Cell, tree: Path, work: Path) -> dict[str, Any]:
    """The val split through the dense model; and its two halves apart: the loader alone (decode,
    resize, normalize) and the model alone (on batches decoded beforehand)."""
    from starfish.datasets import make_loader
    from starfish.evaluate import predict
    from starfish.steps import dataset, dense_model

    cfg = _config(tree, data={"num_workers": cell.workers})
    dense = dense_model(cfg)
    val = dataset(cfg, "val", dense)
    start = time.perf_counter()
    batches = [images for images, _ in make_loader(val, batch_size=100, num_workers=cell.workers)]
    loader_seconds = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        for images in batches:
            dense(images)
    model_seconds = time.perf_counter() - start
    del batches
    start = time.perf_counter()
    predict(dense, val, batch_size=100, num_workers=cell.workers)
    seconds = time.perf_counter() - start
    return {"images": len(val), "timed_seconds": seconds,
            "loader_images_per_s": round(len(val) / loader_seconds, 1),
            "model_images_per_s": round(len(val) / model_seconds, 1)}


def _flow(cell: Cell, tree: Path, work: Path) -> dict[str, Any]:
    """The whole compress flow (`python -m flows.compress`, Prefect and MLflow included) on the
    tree, with `cell.size` calibration images and `heal.cache=cell.mode`; memory is that of the
    flow's process tree (its Prefect server and loader workers too), sampled."""
    import os
    import shutil

    from starfish.models import create_model, save_checkpoint

    folder = work / cell.key
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    checkpoint = folder / "dense.safetensors"  # one random-weight dense model for every step
    save_checkpoint(checkpoint, create_model(MODEL, num_classes=TREE["classes"]), MODEL)
    # the recipe its committed rows were measured with: single weights, the default heal, served in
    # float (a random-weight model's int8 file would fail the int8 check, its logits nearly flat)
    overrides = {"data.kind": "imagefolder", "data.root": tree, "model.name": MODEL, "model.checkpoint": checkpoint,
                 "model.num_classes": TREE["classes"], "model.device": "cpu",
                 "calibration.fraction": _fraction(cell.size), "prune.method": "magnitude", "prune.sparsity": 0.5,
                 "prune.structure": "unstructured", "heal.preset": "default", "heal.quant": "none",
                 "quant.mode": "none", "heal.steps": HEAL_STEPS,
                 "heal.holdout_every": HEAL_STEPS, "heal.cache": cell.mode, "evaluate.split": "val"}
    command = [sys.executable, "-m", "flows.compress", "--workdir", str(folder / "out"),
               "--calibration", str(folder / "calibration.json"), "--tracking-uri", f"sqlite:///{folder}/mlflow.db",
               "--no-promote"] + [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    env = {**os.environ, "PREFECT_HOME": str(folder / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log_path = folder / "flow.log"
    with open(log_path, "w") as log_file, TreeMemorySampler() as memory:
        child = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                 cwd=Path(__file__).resolve().parents[2])
        memory.root = child.pid
        code = child.wait()
    if code != 0:
        raise RuntimeError(f"the compress flow failed (exit {code}):\n{log_path.read_text()[-3000:]}")
    summary = log_path.read_text()
    return {"images": cell.size, "flow_peak_rss_mb": round(memory.peak_single / 1024),
            "flow_tree_peak_rss_mb": round(memory.peak_total / 1024),
            "registered": "registered " in summary and "version 1" in summary}


def _dvc(cell: Cell, tree: Path, work: Path) -> dict[str, Any]:
    """`dvc status` on a stage depending on a folder of `cell.size` small files: the first run
    hashes every file, the second reads DVC's state (sizes and mtimes) instead."""
    project = work / "dvc-project"
    files = project / "data"
    if not (files / "COMPLETE").is_file():
        for i in range(cell.size):
            folder = files / f"c{i % 1000:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:06d}.JPEG").write_bytes(i.to_bytes(4, "little") * 256)
        (files / "COMPLETE").write_text("")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--force"], cwd=project, check=True)
    (project / "dvc.yaml").write_text("stages:\n  calibrate:\n    cmd: echo made > out.txt\n    deps:\n"
                                      "      - data\n    outs:\n      - out.txt\n")
    timings = []
    for _ in range(2):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dvc", "status", "-q"], cwd=project, capture_output=True)
        timings.append(time.perf_counter() - start)
    return {"files": cell.size, "first_status_seconds": round(timings[0], 2),
            "second_status_seconds": round(timings[1], 2)}


SOLVE_SHAPE = (768, 3072)  # ViT-B's fc2: 768 outputs, 3,072 inputs
# Every masked layer of one ViT-B block, (outputs, inputs): qkv, proj, fc1, fc2; 12 blocks.
VIT_B_LAYERS = ((2304, 768), (768, 768), (3072, 768), (768, 3072))
VIT_B_BLOCKS = 12
HEAL_BATCH, HEAL_TIMED_BATCH = 32, 8


def _random_layer(rows: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's statistics from 4,096 random inputs, its dense weights and a 50% mask."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, width, generator=generator, dtype=torch.float64)
    gram = x.T @ x
    w_dense = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    return gram, w_dense, torch.rand(rows, width, generator=generator) < 0.5


def _solve(cell: Cell, tree: Path, work: Path) -> dict[str, Any]:
    """`layerwise`'s least-squares solve on a layer of ViT-B's fc2 shape (random inputs, 50% kept)
    with each `heal.solver`, side by side: time, the extra memory of the exact one, and how far
    apart their weights are. Then what the warm start costs a ViT-B against its heal on this
    machine: the `cg` solve of every layer shape of a ViT-B block (x 12 blocks), against 1,570
    steps at batch 32 of DeiT-B's forward+backward (timed at batch 8, scaled by 4). And on the
    demo model, the exact solve with the smallest budget (1 MB: 1 row per solve at width 256,
    16 at width 64) against every row at once (the solver before `heal.solve_memory_mb`)."""
    import copy

    from starfish.config import HealConfig, PruneConfig
    from starfish.healing import heal_
    from starfish.healing.baselines import cg_least_squares, masked_least_squares
    from starfish.models import DEMO_CHECKPOINT, DEMO_MODEL, create_model
    from starfish.pruning import prune, sparsify_
    from starfish.recipes import AUTHORS_STEPS

    rows, width = SOLVE_SHAPE
    gram, w_dense, keep = _random_layer(rows, width)
    before = status_kb("RssAnon")
    start = time.perf_counter()
    with MemorySampler() as memory:
        exact = masked_least_squares(gram, gram, w_dense, keep, damp=0.01)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    solved = cg_least_squares(gram, gram, w_dense, keep, damp=0.01)
    cg_seconds = time.perf_counter() - start
    cg_difference = float((solved - exact).abs().max() / exact.abs().max())
    del gram, exact, solved

    layer_seconds = {}
    for shape in VIT_B_LAYERS:
        layer = _random_layer(*shape)
        start = time.perf_counter()
        cg_least_squares(layer[0], layer[0], layer[1], layer[2], damp=0.01)
        layer_seconds["x".join(map(str, shape))] = round(time.perf_counter() - start, 2)
    model = create_model(SIZING_MODEL, num_classes=1000).train()
    images = torch.randn(HEAL_TIMED_BATCH, 3, 224, 224)
    model(images).sum().backward()  # warm-up, untimed
    start = time.perf_counter()
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        model(images).sum().backward()
    step_seconds = (time.perf_counter() - start) / 2 * HEAL_BATCH / HEAL_TIMED_BATCH
    del model

    dense = create_model(DEMO_MODEL, checkpoint=DEMO_CHECKPOINT)
    masks = prune(dense, PruneConfig("magnitude", 0.75)).masks
    images = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    results = []
    for budget in (1, 1e9):  # the smallest budget (a row or a few per solve); every row of a layer at once
        model = sparsify_(copy.deepcopy(dense), masks)
        heal_(model, dense, masks, images, HealConfig(method="layerwise", batch_size=32, solve_memory_mb=budget))
        results.append(model.state_dict())
    difference = max(float((results[0][k] - results[1][k]).abs().max()) for k in results[0])
    return {"rows": rows, "width": width, "solve_seconds": round(seconds, 1), "cg_seconds": round(cg_seconds, 2),
            "cg_max_difference_over_max_weight": cg_difference,
            "extra_memory_mb": round((memory.peak - before) / 1024), "demo_max_abs_difference": difference,
            "vit_b_layer_cg_seconds": layer_seconds, "vit_b_blocks": VIT_B_BLOCKS,
            "vit_b_heal_step_seconds": round(step_seconds, 2), "heal_steps": AUTHORS_STEPS}


SIZING_MODEL = "deit_base_patch16_224"
VIT_B_LAYER_NAMES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
STAT_BATCH = 32


def _timed(run: Callable[[], object], repeats: int = 2) -> float:
    run()  # warm-up, untimed
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def _warmstart(cell: Cell, tree: Path, work: Path) -> dict[str, Any]:
    """What the layerwise warm start costs at ViT-B width, part by part, in one process: on
    DeiT-B (random weights, batch 32) the pass of one block, the pass stopped at each of its
    layers (`InputOf`, as the statistics run), the pass up to the first block, a whole forward
    (the caching pass, per image) and a training step (forward+backward at batch 8, x 4); and
    the float32 `cg` solve of each layer shape, with its fallback checks."""
    from starfish.config import HealConfig
    from starfish.healing.baselines import InputOf, solve_layer
    from starfish.models import create_model

    model = create_model(SIZING_MODEL, num_classes=1000).eval()
    images = torch.randn(STAT_BATCH, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with InputOf(model, "blocks.0") as first:
            embed_seconds = _timed(lambda: first(images))
            tokens = first(images)
        block = model.blocks[0]
        block_seconds = _timed(lambda: block(tokens))
        stopped = {}
        for name in VIT_B_LAYER_NAMES:
            with InputOf(block, name) as layer_input:
                stopped[name] = _timed(lambda: layer_input(tokens))
        forward_seconds = _timed(lambda: model(images), repeats=1)
    model.train()
    batch = images[:HEAL_TIMED_BATCH]

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(batch).sum().backward()

    step_seconds = _timed(step, repeats=1) * HEAL_BATCH / HEAL_TIMED_BATCH
    least_squares = HealConfig(solver="cg").least_squares
    solves = {}
    for shape in VIT_B_LAYERS:
        gram, w_dense, keep = (part.float() if part.is_floating_point() else part for part in _random_layer(*shape))
        start = time.perf_counter()
        _, dtype = solve_layer(gram, gram, w_dense, keep, least_squares)
        solves["x".join(map(str, shape))] = {"seconds": round(time.perf_counter() - start, 2), "dtype": dtype}
    return {"model": SIZING_MODEL, "batch": STAT_BATCH, "blocks": VIT_B_BLOCKS, "embed_seconds": embed_seconds,
            "block_seconds": block_seconds, "stopped_seconds": stopped, "forward_seconds": forward_seconds,
            "step_seconds": step_seconds, "solves": solves}


def warm_start_estimate(warm: dict[str, Any], statistics_images: int, steps: int, images: int = 5000,
                        holdout: float = 0.1) -> dict[str, float]:
    """Seconds of a ViT-B warm start (statistics on `statistics_images` images + the solves) and
    of the heal after it (`steps` steps at batch 32, caching `images` images' states, a held-out
    check every `HOLDOUT_EVERY` steps), from `_warmstart`'s measured times. Per block, the
    statistics run both models to each layer and each through the block once (moving the
    inputs on); the first block's inputs cost a pass up to it in both."""
    per_batch = warm["blocks"] * (2 * sum(warm["stopped_seconds"].values()) + 2 * warm["block_seconds"]) \
        + 2 * warm["embed_seconds"]
    statistics_seconds = per_batch * statistics_images / warm["batch"]
    solve_seconds = warm["blocks"] * sum(solve["seconds"] for solve in warm["solves"].values())
    forward_per_image = warm["forward_seconds"] / warm["batch"]
    held_out = round(holdout * images)
    heal_seconds = (steps * warm["step_seconds"] + images * forward_per_image
                    + (steps // HOLDOUT_EVERY + 3) * held_out * forward_per_image)
    return {"statistics": statistics_seconds, "solves": solve_seconds, "heal": heal_seconds,
            "share": (statistics_seconds + solve_seconds) / heal_seconds}


def _sizing(cell: Cell, tree: Path, work: Path) -> dict[str, Any]:
    """What the sizing formulas need, counted on DeiT-B itself (random weights, one CPU pass):
    parameters, the bytes of one image's block states (as `heal.cache_dtype` float16 keeps
    them), the activation bytes one image adds to a training step (autograd's saved tensors,
    batch 2 minus batch 1, so the weights cancel) and its forward FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from starfish.capture import block_names
    from starfish.healing.targets import state_bytes_per_image
    from starfish.models import create_model

    model = create_model(SIZING_MODEL, num_classes=1000)
    image = torch.randn(2, 3, 224, 224)
    states = state_bytes_per_image(model, block_names(model), image, torch.float16)
    saved = []
    for batch in (1, 2):
        total = [0]

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            total[0] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(image[:batch]).sum().backward()
        saved.append(total[0])
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        model(image[:1])
    return {"model": SIZING_MODEL, "parameters": sum(p.numel() for p in model.parameters()),
            "state_bytes_per_image": states, "activation_bytes_per_image": saved[1] - saved[0],
            "forward_flops_per_image": flops.get_total_flops(), "pixel_bytes_per_image": 3 * 224 * 224}


STAGES: dict[str, Callable[[Cell, Path, Path], dict[str, Any]]] = {
    "sample": _sample, "heal": _heal, "evaluate": _evaluate, "dvc": _dvc, "flow": _flow,
    "sizing": _sizing, "solve": _solve, "cache": _cache, "warmstart": _warmstart}


def run(out: Path) -> list[dict[str, Any]]:
    """Every cell not yet measured, each in a fresh process (peak memory is per process)."""
    tree, work = out / "tree", out / "work"
    if not (tree / "COMPLETE").is_file():
        log.info("writing the JPEG tree under %s", tree)
        make_tree(tree)
    work.mkdir(parents=True, exist_ok=True)
    for cell in cells():
        path = out / "cells" / f"{cell.key}.json"
        if path.is_file():
            continue
        log.info("measuring %s", cell.key)
        done = subprocess.run([sys.executable, "-m", "starfish.benchmarks.scale", "--cell", json.dumps(cell.__dict__),
                               "--out", str(out)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"cell {cell.key} failed:\n{done.stderr[-3000:]}")
        atomic_write_json(path, json.loads(done.stdout.strip().splitlines()[-1]))
    rows = [read_json(out / "cells" / f"{cell.key}.json") for cell in cells()]
    write_outputs(out, rows)
    return rows


def write_outputs(out: Path, rows: list[dict[str, Any]]) -> None:
    from starfish.plots import save_png, subplots

    atomic_write_json(out / "scale.json", {"model": MODEL, "tree": TREE, "heal_steps": HEAL_STEPS,
                                            "torch_threads": torch.get_num_threads(), "rows": rows})
    by = {(row["stage"], row["size"], row["mode"], row["workers"]): row for row in rows}
    heal = {(n, mode): by[("heal", n, mode, 0)] for n in SIZES for mode in CACHE_MODES}
    lines = [f"# Scale: {MODEL} at 224 px on a {TREE['classes']}-class JPEG tree (CPU, "
             f"{torch.get_num_threads()} threads)", "",
             "Generated by `starfish scale`; random weights, so only time and memory mean anything.", "",
             "## Heal (reduced to %d steps): each `heal.cache` mode" % HEAL_STEPS, "",
             "`states MB` is the dense states' size that `heal.cache=auto` decides by; `pixels MB` the uint8 "
             "calibration images. `memory` keeps both in RAM; `disk` and `recompute` keep one batch.", "",
             "| images | cache | load s | heal s | total s | peak RSS MB | peak anon MB | states MB | pixels MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n in SIZES:
        for mode in CACHE_MODES:
            row = heal[n, mode]
            lines.append(f"| {n} | {mode} | {row['load_seconds']} | {row['heal_seconds']} | {row['seconds']} | "
                         f"{row['peak_rss_mb']} | {row['peak_anon_mb']} | {row['estimate_mb']} | "
                         f"{round(_pixels_mb(n))} |")
    small, large = SIZES[0], SIZES[-1]
    lines += ["", f"From {small} to {large} images:", ""]
    for mode in ("disk", "recompute"):
        change = heal[large, mode]["peak_rss_mb"] / heal[small, mode]["peak_rss_mb"] - 1
        lines.append(f"- `{mode}`: peak RSS changes by {change:+.1%}.")
    for low, high in zip(SIZES, SIZES[1:]):
        grown = heal[high, "memory"]["peak_anon_mb"] - heal[low, "memory"]["peak_anon_mb"]
        predicted = heal[high, "memory"]["estimate_mb"] - heal[low, "memory"]["estimate_mb"] \
            + _pixels_mb(high) - _pixels_mb(low)
        lines.append(f"- `memory`, {low} to {high} images: peak anonymous memory grows by {grown} MB, states + pixels "
                     f"by {predicted:.0f} MB ({grown / predicted:.2f}x).")
    ratios = ", ".join(f"{heal[n, 'disk']['heal_seconds'] / heal[n, 'memory']['heal_seconds']:.2f}x at {n}"
                       for n in SIZES)
    lines.append(f"- heal time with `disk` over `memory`: {ratios}.")
    lines += ["", "## Sample (draw and decode-check)", "", "| images | seconds | images/s | peak RSS MB |",
              "|---|---|---|---|"]
    lines += [f"| {n} | {by[('sample', n, '', 0)]['seconds']} | {by[('sample', n, '', 0)]['images_per_s']} | "
              f"{by[('sample', n, '', 0)]['peak_rss_mb']} |" for n in SIZES]
    serial, pooled = by[("evaluate", 0, "", 0)], by[("evaluate", 0, "", 2)]
    lines += ["", "## Evaluate (val split, dense model)", "",
              "Whole evaluation, and its two halves measured apart: the loader alone (decode, resize, normalize) "
              "and the model alone (on batches decoded beforehand).", "",
              "| loader workers | images | evaluate images/s | loader alone images/s | model alone images/s | "
              "peak RSS MB |", "|---|---|---|---|---|---|"]
    for row in (serial, pooled):
        lines.append(f"| {row['workers']} | {row['images']} | {row['images_per_s']} | {row['loader_images_per_s']} | "
                     f"{row['model_images_per_s']} | {row['peak_rss_mb']} |")
    lines += ["", f"2 workers over 0: evaluate {pooled['images_per_s'] / serial['images_per_s']:.2f}x, loader alone "
              f"{pooled['loader_images_per_s'] / serial['loader_images_per_s']:.2f}x.", ""]
    dvc = by[("dvc", DVC_FILES, "", 0)]
    lines += ["## DVC", "", f"`dvc status` on a stage depending on a folder of {dvc['files']:,} files: "
              f"{dvc['first_status_seconds']} s the first time (every file hashed), "
              f"{dvc['second_status_seconds']} s the second.", ""]
    flow = by[("flow", FLOW_SIZE, "disk", 0)]
    lines += ["## The compress flow", "", f"`python -m flows.compress` (sample, prune, heal with `heal.cache=disk` "
              f"for {HEAL_STEPS} steps, evaluate, register in MLflow) with {flow['images']} calibration images: "
              f"{flow['seconds']} s; peak RSS {flow['flow_peak_rss_mb']} MB for its largest process, and "
              f"{flow['flow_tree_peak_rss_mb']} MB peak proportional set size for its whole process tree (Prefect "
              f"server and loader workers included); registered: {'yes' if flow['registered'] else 'no'}.", ""]
    solve = by[("solve", 0, "", 0)]
    warm = sum(solve["vit_b_layer_cg_seconds"].values()) * solve["vit_b_blocks"]
    heal_seconds = solve["vit_b_heal_step_seconds"] * solve["heal_steps"]
    lines += ["## layerwise at ViT-B width", "", f"The least-squares solve of a {solve['rows']} x {solve['width']} "
              f"layer (ViT-B's fc2; random inputs, half the weights kept), each `heal.solver` in this run: `exact` "
              f"(one system per output row, `heal.solve_memory_mb=1024`) {solve['solve_seconds']} s and "
              f"{solve['extra_memory_mb']} MB of memory beyond the layer's statistics; `cg` (one Hessian per layer) "
              f"{solve['cg_seconds']} s, {solve['solve_seconds'] / solve['cg_seconds']:.0f}x faster, its weights "
              f"within {solve['cg_max_difference_over_max_weight']:.1e} of the largest weight of the exact ones.", "",
              f"A whole ViT-B's warm start solves {solve['vit_b_blocks']} blocks of these layers; `cg` per layer "
              f"(outputs x inputs, seconds): "
              + ", ".join(f"{shape} {sec}" for shape, sec in solve["vit_b_layer_cg_seconds"].items())
              + f": {warm:.0f} s for the model. DeiT-B's forward+backward at batch {HEAL_BATCH} takes "
              f"{solve['vit_b_heal_step_seconds']} s on this machine (timed at batch {HEAL_TIMED_BATCH}), so a "
              f"{solve['heal_steps']:,}-step heal about {heal_seconds / 3600:.1f} h: the solves are "
              f"{warm / heal_seconds:.2%} of it (estimated from these measured times, not a whole run; these "
              "solves are float64, as before `heal.solve_dtype`). The passes that gather the layers' statistics "
              "are counted in the next section, with the float32 solves.", "",
              "On the demo model at 75% sparsity, `heal.solve_memory_mb=1` (1 to 16 rows per solve) against every "
              f"row of a layer at once: largest weight difference {solve['demo_max_abs_difference']:.1e}.", ""]
    lines += warm_start_lines(by[("warmstart", 0, "", 0)])
    lines += cache_lines({mode: by[("cache", FLOW_SIZE, mode, 0)] for mode in CACHE_MODES})
    lines += sizing_lines(by[("sizing", 0, "", 0)], serial["loader_images_per_s"])
    (out / "scale.md").write_text("\n".join(lines))

    figure, axes = subplots(1, 2, figsize=(10, 3.6))
    for mode in CACHE_MODES:
        axes[0].plot(SIZES, [by[("heal", n, mode, 0)]["peak_anon_mb"] for n in SIZES], marker="o", label=mode)
        axes[1].plot(SIZES, [by[("heal", n, mode, 0)]["heal_seconds"] for n in SIZES], marker="o", label=mode)
    axes[0].set(xlabel="calibration images", ylabel="peak anonymous memory (MB)", title="heal memory by heal.cache")
    axes[1].set(xlabel="calibration images", ylabel=f"heal seconds ({HEAL_STEPS} steps)",
                title="heal time by heal.cache")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    save_png(figure, out / "scale.png", dpi=100)

    figure, axis = subplots(1, 1, figsize=(5.5, 3.6))
    budgets = list(range(0, BUDGETS[-1] + 1, 10))
    for mode in CACHE_MODES:
        row = by[("cache", FLOW_SIZE, mode, 0)]
        axis.plot(budgets, [measured_totals(row, steps) / 60 for steps in budgets], label=mode)
    for steps in BUDGETS:
        axis.axvline(steps, color="grey", linewidth=0.8, linestyle=":")
    axis.set(xlabel="heal steps", ylabel="heal minutes (from measured parts)",
             title=f"heal.cache modes at {FLOW_SIZE:,} images")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    save_png(figure, out / "cache_modes.png", dpi=100)


def warm_start_lines(warm: dict[str, Any]) -> list[str]:
    """The warm start at ViT-B width against the heal it warms up, from `_warmstart`'s times."""
    block = warm["block_seconds"]
    fast, full = warm_start_estimate(warm, 512, 400), warm_start_estimate(warm, 4500, 1570)
    fallbacks = [shape for shape, solve in warm["solves"].items() if solve["dtype"] != "float32"]
    return ["## The warm start at ViT-B width", "",
            f"Measured in one process on {warm['model']} (random weights, batch {warm['batch']}): a block's pass "
            f"{block:.2f} s; the pass stopped at each of its layers, as the statistics run it (`InputOf`): "
            + ", ".join(f"{name} {warm['stopped_seconds'][name] / block:.2f}" for name in VIT_B_LAYER_NAMES)
            + f" of a block pass; the pass up to the first block {warm['embed_seconds']:.2f} s; a whole forward "
            f"{warm['forward_seconds']:.1f} s; a training step {warm['step_seconds']:.1f} s (at batch "
            f"{HEAL_TIMED_BATCH}, x {HEAL_BATCH // HEAL_TIMED_BATCH}). Per block the statistics run both models "
            f"to each layer and through the block once: "
            f"{2 * sum(warm['stopped_seconds'].values()) / block + 2:.1f} block passes, where a pass per layer "
            f"and model was {2 * len(VIT_B_LAYERS) + 2}. The float32 `cg` solve per layer (outputs x inputs): "
            + ", ".join(f"{shape} {solve['seconds']} s" for shape, solve in warm["solves"].items())
            + (f"; redone in float64: {', '.join(fallbacks)}" if fallbacks else "; none fell back to float64")
            + ".", "",
            "Estimated from those times for 5,000 calibration images (a tenth held out), not a whole run:", "",
            "| heal | statistics images | statistics s | solves s | heal after it s | warm start / heal |",
            "|---|---|---|---|---|---|",
            f"| `fast` (400 steps, `statistics_images=512`) | 512 | {fast['statistics']:.0f} | {fast['solves']:.0f} "
            f"| {fast['heal']:.0f} | {fast['share']:.1%} |",
            f"| `recommended` (1,570 steps, every training image) | 4,500 | {full['statistics']:.0f} | "
            f"{full['solves']:.0f} | {full['heal']:.0f} | {full['share']:.1%} |", "",
            "The heal after it: its steps, caching the dense states (a forward per image) and its held-out "
            "checks (a forward per held-out image, every 50 steps).", ""]


def cache_lines(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Each `heal.cache` mode's one-off and per-step costs, totals at the real budgets, and what
    `auto`'s estimate picks among them."""
    memory = rows["memory"]
    lines = ["## `heal.cache` modes by their whole cost", "",
             f"A heal of {memory['images']:,} images ({memory['holdout_images']} held out) for {CACHE_STEPS} steps "
             f"per mode, its parts timed apart: caching the dense states (once), a step, a held-out check. Totals "
             f"at the real budgets from those, with a check every {HOLDOUT_EVERY} steps; `auto`'s estimate is what "
             "it decides by (`ModeCosts`: the dense states' part only, from a timed dense forward and the scratch "
             "file's write and read rates). `cache_modes.png` draws the totals against the budget.", "",
             "| cache | caching s | step s | check s | total at 400 s | total at 1,570 s | auto's estimate at 400 "
             "| at 1,570 |", "|---|---|---|---|---|---|---|---|"]
    estimates = {steps: modelled_totals(rows, steps) for steps in BUDGETS}
    for mode in CACHE_MODES:
        row = rows[mode]
        lines.append(f"| {mode} | {row['cache_seconds']:.1f} | {row['step_seconds']:.2f} | "
                     f"{row['check_seconds']:.2f} | "
                     + " | ".join(f"{measured_totals(row, steps):.0f}" for steps in BUDGETS) + " | "
                     + " | ".join(f"{estimates[steps][mode]:.0f}" for steps in BUDGETS) + " |")
    lines.append("")
    for steps in BUDGETS:
        best = min(CACHE_MODES, key=lambda mode: measured_totals(rows[mode], steps))
        picked = min(CACHE_MODES, key=lambda mode: estimates[steps][mode])
        lines.append(f"- At {steps:,} steps the lowest measured total is `{best}`; `auto`'s estimate picks "
                     f"`{picked}` when every mode fits.")
    return lines + [""]


def sizing_lines(sizing: dict[str, Any], decode_per_core: float, images: int = 5000, batch: int = 32,
                 steps: int = 1570, val: int = 50_000, sustained_tflops: float = 100.0) -> list[str]:
    """The memory and time formulas, with the sizing model's counted constants, at the paper's scale."""
    p, s, a, f = (sizing[key] for key in ("parameters", "state_bytes_per_image", "activation_bytes_per_image",
                                          "forward_flops_per_image"))
    gb = 1e9
    heal_flops = steps * batch * f * 3 + images * f  # forward + backward (2 forwards) per step; caching once
    recompute_flops = heal_flops - images * f + steps * batch * f  # one dense forward per step instead
    eval_flops = 2 * val * f  # pruned and healed; the dense predictions are cached
    rows = [
        ("dense states (`memory`: host RAM; `disk`: scratch disk; `recompute`: none)", "N x state bytes",
         f"{images * s / gb:.1f} GB"),
        ("calibration pixels (host RAM with `memory`, else scratch disk)", "N x 3 x 224 x 224 B",
         f"{images * sizing['pixel_bytes_per_image'] / gb:.2f} GB"),
        ("weights, gradients, Adam moments (GPU, fp32)", "5 x params x 4 B", f"{5 * p * 4 / gb:.1f} GB"),
        ("activations of one step (GPU, fp32)", "batch x activation bytes", f"{batch * a / gb:.1f} GB"),
        ("one heal, `memory` or `disk`", "(3 x steps x batch + N) x FLOPs", f"{heal_flops / 1e15:.0f} PFLOP, "
         f"{heal_flops / (sustained_tflops * 1e12):.0f} s"),
        ("one heal, `recompute`", "(4 x steps x batch) x FLOPs", f"{recompute_flops / 1e15:.0f} PFLOP, "
         f"{recompute_flops / (sustained_tflops * 1e12):.0f} s"),
        ("evaluate on ImageNet val, model", "2 x 50,000 x FLOPs", f"{eval_flops / 1e15:.1f} PFLOP, "
         f"{eval_flops / (sustained_tflops * 1e12):.0f} s"),
        ("evaluate on ImageNet val, decoding", "50,000 / (per-core rate x workers)",
         f"{val / (decode_per_core * 16):.0f} s with 16 workers"),
    ]
    return [f"## Sizing: {sizing['model']} on ImageNet, one GPU (extrapolation)", "",
            f"Constants counted on `{sizing['model']}` by this benchmark: {p / 1e6:.1f}M parameters; one image's "
            f"block states {s / 2**20:.2f} MiB in float16; {a / 2**20:.0f} MiB of saved activations per image in a "
            f"training step; {f / 1e9:.1f} GFLOPs per image forward; decoding {decode_per_core:g} images/s per core "
            "(the loader alone above, on this tree's 256 px JPEGs: ImageNet's larger ones decode slower). "
            f"Extrapolated with N = {images:,} calibration images, batch {batch}, {steps:,} steps, and an assumed "
            f"{sustained_tflops:g} TFLOP/s sustained (TF32 "
            "on an H100-class GPU, about a fifth of its peak): an extrapolation, not a measurement.", "",
            f"| quantity | formula | {images:,} images |", "|---|---|---|",
            *[f"| {name} | {formula} | {value} |" for name, formula, value in rows], ""]


def main() -> None:
    parser = argparse.ArgumentParser(description="one scale-benchmark cell (used by `starfish scale`)")
    parser.add_argument("--cell", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    print(json.dumps(measure(Cell(**json.loads(args.cell)), out / "tree", out / "work")))


if __name__ == "__main__":
    main()
