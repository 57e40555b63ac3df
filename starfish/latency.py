"""What sparsity buys at inference: `starfish latency --out results/latency`.

- On CUDA: 2:4-pruned Linear layers as PyTorch's semi-structured sparse tensors
  (`to_semi_structured_`, sparse tensor cores on Ampere and later), timed against the dense
  model at batch 1, 32 and 256 in fp16 and bf16.
- On a CPU: one Linear layer of ViT-B's fc1 shape (768 -> 3,072) with unstructured sparsity
  as a CSR tensor (`torch.sparse.mm`), timed against the dense matmul at 50, 75 and 90%.
Each row times both sides in the same process, alternating, and reports the median ratio.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from starfish.errors import StarfishError
from starfish.io import atomic_write_json

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


def median_ratio(dense: Callable[[], Any], sparse: Callable[[], Any], repeats: int, sync: Callable[[], None]
                 ) -> tuple[float, float, float]:
    """(dense median s, sparse median s, dense / sparse), timed alternately after a warm-up."""
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    for fn in (dense, sparse, dense, sparse):
        fn()
    sync()
    for _ in range(repeats):
        for label, fn in (("dense", dense), ("sparse", sparse)):
            start = time.perf_counter()
            fn()
            sync()
            times[label].append(time.perf_counter() - start)
    d, s = statistics.median(times["dense"]), statistics.median(times["sparse"])
    return d, s, d / s


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
        rows.append({"device": "cpu", "kind": "unstructured CSR", "sparsity": sparsity, "batch_tokens": CPU_TOKENS,
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
            rows.append({"device": torch.cuda.get_device_name(), "kind": "2:4 semi-structured",
                         "dtype": str(dtype).removeprefix("torch."), "batch": batch, "model": "deit_base_patch16_224",
                         "dense_ms": round(1e3 * dense_s, 3), "sparse_ms": round(1e3 * sparse_s, 3),
                         "speedup": round(ratio, 3), "layers_dense": len(skipped),
                         "layers_sparse": len(masks) - len(skipped)})
    return rows


def run(out: Path) -> list[dict[str, Any]]:
    rows = cpu_rows() + (cuda_rows() if torch.cuda.is_available() else [])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "latency.json", {"rows": rows})
    lines = ["# Latency: dense against sparse", "",
             "Generated by `starfish latency`; median of alternating timings.", ""]
    lines += ["## CPU: one 768 -> 3,072 Linear layer, unstructured sparsity as CSR", "",
              f"{CPU_TOKENS} tokens (8 images of 197) per call; {torch.get_num_threads()} threads.", "",
              "| sparsity | dense ms | CSR ms | dense / CSR |", "|---|---|---|---|"]
    lines += [f"| {r['sparsity']:g} | {r['dense_ms']} | {r['sparse_ms']} | {r['speedup']}x |"
              for r in rows if r["device"] == "cpu"]
    gpu = [r for r in rows if r["device"] != "cpu"]
    lines += ["", "## CUDA: DeiT-B with 2:4 Linear layers as semi-structured sparse tensors", ""]
    if gpu:
        lines += [f"On {gpu[0]['device']}.", "", "| dtype | batch | dense ms | 2:4 ms | dense / 2:4 |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['dtype']} | {r['batch']} | {r['dense_ms']} | {r['sparse_ms']} | {r['speedup']}x |"
                  for r in gpu]
    else:
        lines.append("Not measured: no CUDA device where this ran.")
    (out / "latency.md").write_text("\n".join(lines) + "\n")
    return rows
