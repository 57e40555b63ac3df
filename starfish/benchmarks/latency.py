"""What sparsity buys at inference: `starfish latency --out results/latency`.

- On CUDA: 2:4-pruned Linear layers as PyTorch's semi-structured sparse tensors
  (`to_semi_structured_`, sparse tensor cores on Ampere and later), timed against the dense
  model at batch 1, 32 and 256 in fp16 and bf16.
- On a CPU: one Linear layer of ViT-B's fc1 shape (768 -> 3,072) with unstructured sparsity
  as a CSR tensor (`torch.sparse.mm`), timed against the dense matmul at 50, 75 and 90%.
Each row times both sides in the same process, alternating, and reports the median ratio.
- Structured pruning (`structured_rows`): dense against the slim model at 25, 50 and 75% of
  each structure removed, for deit_small and resnet50 at 224 px and the two demo models, in
  torch eager and onnxruntime on the CPU at batch 1 and 32 (random weights: speed does not
  depend on them); CUDA eager in bf16 where a GPU exists.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from starfish.errors import StarfishError
from starfish.io import atomic_write_bytes, atomic_write_json, read_json
from starfish.timing import median_ratio, repeats_for

if TYPE_CHECKING:  # the model and pruning stack loads only for the CUDA rows
    from starfish.pruning.masks import Masks

log = logging.getLogger(__name__)
BATCHES = (1, 32, 256)
CPU_SPARSITIES = (0.5, 0.75, 0.9)
CPU_SHAPE = (3072, 768)  # ViT-B's fc1: 3,072 outputs, 768 inputs
CPU_TOKENS = 197 * 8  # 8 images' tokens


def is_two_four(mask: torch.Tensor) -> bool:
    """Whether a Linear weight's mask keeps exactly 2 of every 4 consecutive inputs."""
    return mask.ndim == 2 and mask.shape[1] % 4 == 0 and bool(mask.reshape(-1, 4).sum(1).eq(2).all())


def to_semi_structured_(model: nn.Module, masks: Masks) -> dict[str, str]:
    """Swap every 2:4-masked Linear weight of a CUDA fp16/bf16 model for a semi-structured sparse
    tensor, in place; `{weight name: why it stayed dense}` for the others."""
    from torch.sparse import to_sparse_semi_structured

    skipped: dict[str, str] = {}
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        layer = modules.get(name.removesuffix(".weight"))
        weight = getattr(layer, "weight", None)
        if not isinstance(layer, nn.Linear):
            skipped[name] = "not a Linear layer"
        elif weight.device.type != "cuda" or weight.dtype not in (torch.float16, torch.bfloat16):
            skipped[name] = "needs a CUDA fp16 or bf16 weight"
        elif not is_two_four(mask):
            skipped[name] = "its mask is not 2:4"
        else:
            try:
                layer.weight = nn.Parameter(to_sparse_semi_structured(weight.detach()), requires_grad=False)
            except (RuntimeError, ValueError) as exc:  # shapes the kernels do not take
                skipped[name] = str(exc).splitlines()[0]
    return skipped


def cpu_rows(repeats: int = 20) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*CPU_SHAPE, generator=generator)
    x = torch.randn(CPU_TOKENS, CPU_SHAPE[1], generator=generator)
    rows = []
    for sparsity in CPU_SPARSITIES:
        keep = torch.rand(CPU_SHAPE, generator=generator) >= sparsity
        pruned = weight * keep
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            csr = pruned.to_sparse_csr()
        with torch.no_grad():
            if not torch.allclose(torch.sparse.mm(csr, x.T).T, x @ pruned.T, atol=1e-3):
                raise StarfishError("the CSR product does not match the dense one")
            dense_s, sparse_s, ratio = median_ratio(lambda: x @ pruned.T, lambda: torch.sparse.mm(csr, x.T),
                                                    repeats, lambda: None)
        rows.append({"model": "Linear 768->3072", "structure": "unstructured", "amount": sparsity,
                     "runtime": "torch sparse CSR", "batch": CPU_TOKENS // 197,
                     "device": "cpu", "kind": "unstructured CSR", "sparsity": sparsity, "batch_tokens": CPU_TOKENS,
                     "dense_ms": round(1e3 * dense_s, 3), "sparse_ms": round(1e3 * sparse_s, 3),
                     "speedup": round(ratio, 3), "threads": torch.get_num_threads()})
    return rows


def cuda_rows(repeats: int = 50) -> list[dict[str, Any]]:
    import copy

    from starfish.config import PruneConfig
    from starfish.models import create_model
    from starfish.pruning import prune, sparsify_

    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        torch.manual_seed(0)
        dense = create_model("deit_base_patch16_224", num_classes=1000).eval()
        masks = prune(dense, PruneConfig("nm", 0.5, "2:4")).masks
        dense = sparsify_(dense, masks).to("cuda", dtype)
        sparse = copy.deepcopy(dense)
        skipped = to_semi_structured_(sparse, masks)
        for batch in BATCHES:
            x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype)
            with torch.no_grad():
                dense_s, sparse_s, ratio = median_ratio(lambda: dense(x), lambda: sparse(x), repeats,
                                                        torch.cuda.synchronize)
            rows.append({"structure": "2:4", "amount": 0.5, "runtime": "torch eager semi-structured",
                         "device": torch.cuda.get_device_name(), "kind": "2:4 semi-structured",
                         "dtype": str(dtype).removeprefix("torch."), "batch": batch, "model": "deit_base_patch16_224",
                         "dense_ms": round(1e3 * dense_s, 3), "sparse_ms": round(1e3 * sparse_s, 3),
                         "speedup": round(ratio, 3), "layers_dense": len(skipped),
                         "layers_sparse": len(masks) - len(skipped)})
    return rows


# (model, structure, input size): what `structured_rows` times by default
STRUCTURED_MODELS = (
    ("deit_small_patch16_224", "neurons+heads", (3, 224, 224)),
    ("resnet50", "channels", (3, 224, 224)),
    ("starfish_vit_fmnist", "neurons+heads", (1, 28, 28)),
    ("starfish_cnn_fmnist", "channels", (1, 28, 28)),
)
STRUCTURED_AMOUNTS = (0.25, 0.5, 0.75)
STRUCTURED_BATCHES = (1, 32)
# What single-weight sparsity buys in the same runtimes: the masked model, timed the same way
UNSTRUCTURED = {"unstructured": (0.5, 0.75, 0.9, 0.95), "2:4": (0.5,)}
MASKED_MODELS = tuple((name, structure, size) for name, _, size in STRUCTURED_MODELS[2:] for structure in UNSTRUCTURED)


def _amounts(structure: str, amounts: tuple[float, ...]) -> tuple[float, ...]:
    """The amounts to time: a masked structure's own sparsities, else `amounts`."""
    return UNSTRUCTURED.get(structure, amounts)


def structured_rows(models: tuple = STRUCTURED_MODELS, amounts: tuple[float, ...] = STRUCTURED_AMOUNTS,
                    batches: tuple[int, ...] = STRUCTURED_BATCHES, threads: int = 2,
                    onnx_dir: Path | None = None) -> list[dict[str, Any]]:
    """Dense against slim, side by side, alternating, in every runtime: one row per (model,
    amount, runtime, batch) with both medians and `speedup` = dense / slim."""
    import copy
    import tempfile

    from starfish.config import PruneConfig
    from starfish.formats.onnx import export_onnx, run_session, session
    from starfish.models import create_model
    from starfish.pruning import prune, remove_units_, sparsify_
    from starfish.pruning.slim import size_ratios

    torch.set_num_threads(threads)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=onnx_dir) as tmp:
        for name, structure, size in models:
            torch.manual_seed(0)
            dense = create_model(name).eval()
            export_onnx(dense, Path(tmp) / "dense.onnx", size, {"model": name})
            dense_session = session(Path(tmp) / "dense.onnx", threads)
            for amount in _amounts(structure, amounts):
                method = "nm" if structure == "2:4" else "magnitude"
                cfg = PruneConfig(method, amount, structure="unstructured" if structure in UNSTRUCTURED else structure)
                masks, _, plan = prune(dense, cfg)
                slim = sparsify_(copy.deepcopy(dense), masks)
                if plan is None:  # single weights: the shapes and FLOPs stay dense's
                    ratios = size_ratios(slim, dense, size)
                else:
                    report = remove_units_(slim, masks, plan, image_size=size)[1]
                    ratios = {key: report[key] for key in ("params_ratio", "flops_ratio")}
                export_onnx(slim, Path(tmp) / "slim.onnx", size, {"model": name})
                slim_session = session(Path(tmp) / "slim.onnx", threads)
                for batch in batches:
                    x = torch.randn(batch, *size, generator=torch.Generator().manual_seed(batch))
                    array = x.numpy()
                    runtimes = {
                        "torch eager": (lambda: dense(x), lambda: slim(x)),
                        "onnxruntime": (lambda: run_session(dense_session, array),
                                        lambda: run_session(slim_session, array)),
                    }
                    for runtime, (dense_fn, slim_fn) in runtimes.items():
                        with torch.no_grad():
                            start = time.perf_counter()
                            dense_fn()
                            repeats = repeats_for(time.perf_counter() - start)
                            dense_s, slim_s, ratio = median_ratio(dense_fn, slim_fn, repeats, lambda: None)
                        rows.append(_structured_row(name, structure, amount, runtime, "cpu", batch, dense_s, slim_s,
                                                    ratio, repeats, ratios, threads))
                        log.info("%s %s %.2f %s batch %d: %.2fx", name, structure, amount, runtime, batch, ratio)
                if torch.cuda.is_available():
                    rows += _cuda_structured(name, structure, amount, dense, slim, size, batches, ratios)
    return rows


def _structured_row(name: str, structure: str, amount: float, runtime: str, device: str, batch: int,
                    dense_s: float, slim_s: float, ratio: float, repeats: int, ratios: dict[str, float],
                    threads: int | None) -> dict[str, Any]:
    return {"model": name, "structure": structure, "amount": amount, "runtime": runtime, "device": device,
            "batch": batch, "dense_ms": round(1e3 * dense_s, 3), "pruned_ms": round(1e3 * slim_s, 3),
            "speedup": round(ratio, 3), "repeats": repeats, "threads": threads, **ratios}


def _cuda_structured(name: str, structure: str, amount: float, dense: nn.Module, slim: nn.Module,
                     size: tuple[int, ...], batches: tuple[int, ...], ratios: dict[str, float]) -> list[dict[str, Any]]:
    import copy

    rows = []
    dense_gpu = copy.deepcopy(dense).to("cuda", torch.bfloat16)
    slim_gpu = copy.deepcopy(slim).to("cuda", torch.bfloat16)
    for batch in batches:
        x = torch.randn(batch, *size, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            dense_s, slim_s, ratio = median_ratio(lambda: dense_gpu(x), lambda: slim_gpu(x), 50,
                                                  torch.cuda.synchronize)
        rows.append(_structured_row(name, structure, amount, "torch eager bf16", torch.cuda.get_device_name(), batch,
                                    dense_s, slim_s, ratio, 50, ratios, None))
    return rows


def run(out: Path) -> list[dict[str, Any]]:
    rows = cpu_rows() + (cuda_rows() if torch.cuda.is_available() else []) + structured_rows() \
        + structured_rows(MASKED_MODELS, batches=(32,))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "latency.json", {"rows": rows})
    lines = ["# Latency: dense against sparse", "",
             "Generated by `starfish latency`; median of alternating timings.", ""]
    lines += ["## CPU: one 768 -> 3,072 Linear layer, unstructured sparsity as CSR", "",
              f"{CPU_TOKENS} tokens (8 images of 197) per call; {torch.get_num_threads()} threads.", "",
              "| sparsity | dense ms | CSR ms | dense / CSR |", "|---|---|---|---|"]
    lines += [f"| {r['sparsity']:g} | {r['dense_ms']} | {r['sparse_ms']} | {r['speedup']}x |"
              for r in rows if r.get("kind") == "unstructured CSR"]
    gpu = [r for r in rows if r.get("kind") == "2:4 semi-structured"]
    lines += ["", "## CUDA: DeiT-B with 2:4 Linear layers as semi-structured sparse tensors", ""]
    if gpu:
        lines += [f"On {gpu[0]['device']}.", "", "| dtype | batch | dense ms | 2:4 ms | dense / 2:4 |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['dtype']} | {r['batch']} | {r['dense_ms']} | {r['sparse_ms']} | {r['speedup']}x |"
                  for r in gpu]
    else:
        lines.append("Not measured: no CUDA device where this ran.")
    structured = [r for r in rows if "pruned_ms" in r]  # pruned: the slim model, or the masked one
    lines += ["", "## Whole models: dense against the slim model (structured) or the masked one (unstructured, "
              "2:4)", "",
              "Random weights (speed does not depend on them); magnitude groups removed uniformly per layer; "
              f"CPU rows on {structured[0]['threads'] if structured else '-'} threads; onnxruntime's workers sleep "
              "between operators (`starfish.formats.onnx.session`). FLOPs: torch's counter on one image.", "",
              "| model | structure | removed | params | FLOPs | runtime | device | batch | dense ms | pruned ms "
              "| speed-up |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['structure']} | {r['amount']:g} | {r['params_ratio']:.3f} | {r['flops_ratio']:.3f} "
              f"| {r['runtime']} | {r['device']} | {r['batch']} | {r['dense_ms']} | {r['pruned_ms']} "
              f"| {r['speedup']}x |"
              for r in structured]
    atomic_write_bytes(out / "latency.md", ("\n".join(lines) + "\n").encode())
    plot_recovery_vs_speedup(rows, out / "recovery_vs_speedup.png")
    return rows


# Where the demo models' recovery comes from: committed bench results, (folder, structure).
RECOVERY_SOURCES = {
    "starfish_vit_fmnist": [("results/bench", None), ("results/bench_structured/vit", "neurons+heads")],
    "starfish_cnn_fmnist": [("results/bench_cnn", None), ("results/bench_structured/cnn", "channels")],
}
STARFISH_HEALERS = ("starfish", "recommended", "faithful", "fast")


def best_recovery(model: str, structure: str, amount: float, root: Path = Path(".")) -> float | None:
    """The best STARFISH preset's recovery (seed mean) at `structure` and `amount` in the committed
    bench results (magnitude masks, 2:4, or structured `contribution` units, the score to use for
    structure), None where none was measured."""
    for folder, structured in RECOVERY_SOURCES.get(model, []):
        path = root / folder / "bench.json"
        if not path.is_file() or (structured is None) != (structure in UNSTRUCTURED):
            continue
        wanted = "nm (2:4)" if structure == "2:4" else "magnitude" if structured is None else "contribution"
        found: dict[str, list[float]] = {}
        for r in read_json(path)["rows"]:
            if r["pruner"] == wanted and abs(r["sparsity"] - amount) < 1e-9 and r["healer"] in STARFISH_HEALERS \
                    and r.get("structure", "unstructured") in (structure, "unstructured"):
                found.setdefault(r["healer"], []).append(r["recovery"])
        if found:
            return max(statistics.fmean(v) for v in found.values())
    return None


def plot_recovery_vs_speedup(rows: list[dict[str, Any]], path: Path) -> bool:
    """Recovery (best STARFISH preset) against measured onnxruntime speed-up at batch 32, per demo
    model: unstructured, 2:4 and structured pruning, the choice a user makes."""
    from starfish.plots import save_png, subplots

    models = [m for m in RECOVERY_SOURCES if any(r.get("model") == m for r in rows)]
    if not models:
        return False
    fig, axes = subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        points = [(r["structure"], r["amount"], r["speedup"], best_recovery(model, r["structure"], r["amount"]))
                  for r in rows if r.get("model") == model and r.get("runtime") == "onnxruntime" and r["batch"] == 32]
        for structure in dict.fromkeys(p[0] for p in points):
            mine = sorted((p for p in points if p[0] == structure and p[3] is not None), key=lambda p: p[1])
            if mine:
                ax.plot([p[2] for p in mine], [p[3] for p in mine], marker="o", label=structure)
                for p in mine:
                    ax.annotate(f"{p[1]:g}", (p[2], p[3]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel="speed-up over dense (onnxruntime, CPU, batch 32)", ylabel="recovery (best STARFISH preset)",
               title=model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Recovery against measured speed-up (labels: fraction pruned)")
    fig.tight_layout()
    save_png(fig, path, dpi=120)
    return True
