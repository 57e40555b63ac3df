"""The scale benchmark: the pipeline's stages on an ImageNet-layout JPEG tree with a DeiT.

`starfish scale --out results/scale` makes (once) a tree of 256 px JPEGs under `<out>/tree`
(100 classes; 80 train and 10 val images each), then measures, each cell in its own process:
- `sample`: drawing and decode-checking 500, 2,000 and 5,000 calibration images;
- `heal`: `deit_tiny_patch16_224` at 224 px (random weights: accuracy is not the point), with
  each `heal.cache` mode at each calibration size, for a reduced number of steps;
- `evaluate`: the 1,000 val images through the dense model with 0 and 2 loader workers;
- `dvc`: `dvc status` on a stage that depends on a 100,000-file folder, first and second time.
Per cell: wall time, images/s, and peak memory, both resident (VmHWM) and anonymous (RssAnon,
sampled): a memory-mapped disk cache shows up in the first but only the second must fit in RAM.
Cells are saved as they finish, so a stopped run resumes; `scale.md`, `scale.json` and
`scale.png` are written when every cell is there.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from starfish.io import atomic_write_json, read_json

log = logging.getLogger(__name__)
MODEL = "deit_tiny_patch16_224"
SIZES = (500, 2000, 5000)
CACHE_MODES = ("memory", "disk", "recompute")
HEAL_STEPS = 4
TREE = {"classes": 100, "train": 80, "val": 10, "pixels": 256}
DVC_FILES = 100_000


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


class MemorySampler:
    """Peak anonymous memory (RssAnon) of this process, sampled every 50 ms in a thread."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kb("RssAnon"))
            time.sleep(0.05)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_kb("RssAnon"))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


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
            + [Cell("evaluate", workers=w) for w in (0, 2)] + [Cell("dvc", DVC_FILES)])


def _config(tree: Path, **sections: dict[str, Any]) -> Any:
    from starfish.config import from_dict

    values = {"data": {"kind": "imagefolder", "root": str(tree), "num_workers": 0},
              "model": {"name": MODEL, "checkpoint": None, "device": "cpu", "num_classes": TREE["classes"]}}
    for name, fields in sections.items():
        values[name] = {**values.get(name, {}), **fields}
    return from_dict(values)


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
           "seconds": round(seconds, 2), "peak_rss_mb": round(_status_kb("VmHWM") / 1024),
           "peak_anon_mb": round(memory.peak / 1024), **counts}
    if "images" in counts:
        row["images_per_s"] = round(counts["images"] / counts.get("timed_seconds", seconds), 1)
    return row


def _sample(cell: Cell, tree: Path, work: Path) -> dict[str, Any]:
    from starfish.steps import sample

    info = sample(_config(tree, calibration={"fraction": _fraction(cell.size)}), work / f"{cell.key}.json")
    return {"images": info["num_samples"]}


def _heal(cell: Cell, tree: Path, work: Path) -> dict[str, Any]:
    from starfish.healing import heal_
    from starfish.healing.targets import cache_folder
    from starfish.pruning import prune, sparsify_
    from starfish.steps import calibration_images, dense_model, sample

    cfg = _config(tree, calibration={"fraction": _fraction(cell.size)},
                  heal={"steps": HEAL_STEPS, "cache": cell.mode, "holdout_every": HEAL_STEPS})
    manifest = work / f"split_{cell.size}.json"
    if not manifest.is_file():
        sample(cfg, manifest)
    dense = dense_model(cfg)
    start = time.perf_counter()
    images = calibration_images(cfg, manifest, dense)
    load_seconds = time.perf_counter() - start
    masks = prune(dense, "magnitude", 0.5)
    model = sparsify_(dense_copy(dense), masks)
    start = time.perf_counter()
    with cache_folder(work):
        report = heal_(model, dense, masks, images, cfg.heal)
    heal_seconds = time.perf_counter() - start
    return {"images": len(images), "load_seconds": round(load_seconds, 2), "heal_seconds": round(heal_seconds, 2),
            "steps": report["steps"], "timed_seconds": heal_seconds}


def dense_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def _evaluate(cell: Cell, tree: Path, work: Path) -> dict[str, Any]:
    from starfish.evaluate import predict
    from starfish.steps import dataset, dense_model

    cfg = _config(tree, data={"num_workers": cell.workers})
    dense = dense_model(cfg)
    val = dataset(cfg, "val", dense)
    start = time.perf_counter()
    predict(dense, val, batch_size=100, num_workers=cell.workers)
    seconds = time.perf_counter() - start
    return {"images": len(val), "timed_seconds": seconds}


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


STAGES: dict[str, Callable[[Cell, Path, Path], dict[str, Any]]] = {
    "sample": _sample, "heal": _heal, "evaluate": _evaluate, "dvc": _dvc}


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
        done = subprocess.run([sys.executable, "-m", "starfish.scale", "--cell", json.dumps(cell.__dict__),
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
    lines = [f"# Scale: {MODEL} at 224 px on a {TREE['classes']}-class JPEG tree (CPU, "
             f"{torch.get_num_threads()} threads)", "",
             "Generated by `starfish scale`; random weights, so only time and memory mean anything.", "",
             "## Heal (reduced to %d steps): each `heal.cache` mode" % HEAL_STEPS, "",
             "| images | cache | load s | heal s | total s | peak RSS MB | peak anon MB |", "|---|---|---|---|---|---|---|"]
    for n in SIZES:
        for mode in CACHE_MODES:
            row = by[("heal", n, mode, 0)]
            lines.append(f"| {n} | {mode} | {row['load_seconds']} | {row['heal_seconds']} | {row['seconds']} | "
                         f"{row['peak_rss_mb']} | {row['peak_anon_mb']} |")
    lines += ["", "## Sample (draw and decode-check)", "", "| images | seconds | images/s | peak RSS MB |",
              "|---|---|---|---|"]
    lines += [f"| {n} | {by[('sample', n, '', 0)]['seconds']} | {by[('sample', n, '', 0)]['images_per_s']} | "
              f"{by[('sample', n, '', 0)]['peak_rss_mb']} |" for n in SIZES]
    lines += ["", "## Evaluate (val split, dense model)", "", "| loader workers | images | images/s | peak RSS MB |",
              "|---|---|---|---|"]
    for workers in (0, 2):
        row = by[("evaluate", 0, "", workers)]
        lines.append(f"| {workers} | {row['images']} | {row['images_per_s']} | {row['peak_rss_mb']} |")
    dvc = by[("dvc", DVC_FILES, "", 0)]
    lines += ["", "## DVC", "", f"`dvc status` on a stage depending on a folder of {dvc['files']:,} files: "
              f"{dvc['first_status_seconds']} s the first time (every file hashed), "
              f"{dvc['second_status_seconds']} s the second.", ""]
    (out / "scale.md").write_text("\n".join(lines))

    figure, axes = subplots(1, 2, figsize=(10, 3.6))
    for mode in CACHE_MODES:
        axes[0].plot(SIZES, [by[("heal", n, mode, 0)]["peak_anon_mb"] for n in SIZES], marker="o", label=mode)
        axes[1].plot(SIZES, [by[("heal", n, mode, 0)]["heal_seconds"] for n in SIZES], marker="o", label=mode)
    axes[0].set(xlabel="calibration images", ylabel="peak anonymous memory (MB)", title="heal memory by heal.cache")
    axes[1].set(xlabel="calibration images", ylabel=f"heal seconds ({HEAL_STEPS} steps)", title="heal time by heal.cache")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    save_png(figure, out / "scale.png", dpi=100)


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
