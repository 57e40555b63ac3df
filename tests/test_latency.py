"""The latency benchmark's CPU side for real (few repeats), and the 2:4 conversion's refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from starfish import latency


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
