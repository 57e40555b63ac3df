"""The latency benchmark's CPU side for real (few repeats), and the 2:4 conversion's refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from starfish.benchmarks import latency


def test_cpu_rows_time_dense_and_csr_side_by_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(latency, "CPU_SPARSITIES", (0.9,))
    monkeypatch.setattr(latency, "CPU_TOKENS", 64)
    rows = latency.cpu_rows(repeats=3)
    assert len(rows) == 1 and rows[0]["dense_ms"] > 0 and rows[0]["sparse_ms"] > 0
    assert rows[0]["speedup"] == pytest.approx(rows[0]["dense_ms"] / rows[0]["sparse_ms"], rel=0.05)


def test_two_four_masks_and_what_stays_dense_off_cuda() -> None:
    keep = torch.tensor([[True, False, True, False, False, True, True, False]])
    assert latency.is_two_four(keep) and not latency.is_two_four(torch.ones(1, 8, dtype=torch.bool))
    model = nn.Sequential(nn.Linear(8, 1), nn.Conv2d(1, 1, 1))
    masks = {"0.weight": keep, "1.weight": torch.ones(1, 1, 1, 1, dtype=torch.bool)}
    skipped = latency.to_semi_structured_(model, masks)
    assert skipped == {"0.weight": "needs a CUDA fp16 or bf16 weight", "1.weight": "not a Linear layer"}
    assert model[0].weight.layout == torch.strided


def test_structured_rows_time_dense_and_slim_in_every_runtime() -> None:
    """The demo ViT at half its neurons and heads, and the masked model as semi-structured pruning
    (2:4) leaves it: rows in the committed format, both runtimes, the speed-up their medians' ratio."""
    rows = latency.structured_rows((("starfish_vit_fmnist", "neurons+heads", (1, 28, 28)),
                                    ("starfish_vit_fmnist", "2:4", (1, 28, 28))),
                                   amounts=(0.5,), batches=(2,), threads=1)
    assert {(r["structure"], r["runtime"]) for r in rows} >= {("neurons+heads", "torch eager"),
                                                              ("neurons+heads", "onnxruntime")}
    for row in rows:
        assert {"model", "structure", "amount", "runtime", "batch", "speedup"} <= set(row)
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["pruned_ms"], rel=0.05)
    slim = [r for r in rows if r["structure"] == "neurons+heads"]
    assert all(0.4 < r["flops_ratio"] < 0.6 for r in slim)
    assert all(r["flops_ratio"] == 1.0 for r in rows if r["structure"] == "2:4")  # masked: dense cost
