"""STARFISH: heal a pruned network by aligning its internal states with the dense original's.

Faithful default (the authors' public code): the output of every block is compared per token
with 1 - cosine similarity over the hidden dimension, averaged over tokens and blocks; only the
weights in the pruning scope train (biases, norms, embeddings and head stay frozen); Adam at
6e-4 with a cosine schedule to 1e-6, 10 epochs, batch 32; dense states cached once in fp16.
CNN stage outputs are compared per sample over the flattened C*H*W.

Options (HealConfig): `loss` (cosine | nmse), `states` (blocks | last | module names),
`warm_start=layerwise` (least-squares reconstruction first, then alignment).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from starfish.capture import state_names
from starfish.healing import register_healer
from starfish.healing.baselines import layerwise
from starfish.healing.common import STATE_LOSSES, align_

if TYPE_CHECKING:
    from starfish.config import HealConfig


@register_healer("starfish")
def starfish(model: nn.Module, dense: nn.Module, masks: dict[str, torch.Tensor], images: torch.Tensor,
             cfg: "HealConfig") -> dict[str, object]:
    report: dict[str, object] = {}
    if cfg.warm_start == "layerwise":
        start = time.perf_counter()
        layerwise(model, dense, masks, images, cfg)
        report["warm_start_seconds"] = time.perf_counter() - start
    names = state_names(model, cfg.states)
    report.update(align_(model, dense, masks, images, names, STATE_LOSSES[cfg.loss], cfg))
    report["states"] = names
    return report
