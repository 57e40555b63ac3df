"""STARFISH: heal a pruned network by aligning its internal states with the dense original's.

As the authors' public code has it: the output of every block is compared per token with
1 - cosine similarity over the hidden dimension, averaged over tokens and blocks; only the
weights in the pruning scope train (biases, norms, embeddings and head stay frozen); Adam at
6e-4 with a cosine schedule to 1e-6, batch 32; dense states cached once in fp16. CNN block
outputs are compared per sample over the flattened C*H*W; a block output that structured
pruning narrowed (a CNN without residuals) is compared on the channels it keeps. The budget
is counted in Adam steps (`heal.steps`, the authors' 1,570 by default), so a smaller split
gets the same optimization.

Options (config.Alignment): `loss` (cosine | nmse), `states` (blocks | stages | last | module names),
`logit_weight` (add logit distillation to the block alignment), `warm_start=layerwise`
(least-squares reconstruction of the Linear layers first), `holdout` and `keep` (a held-out
slice that picks the state returned).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from starfish.capture import state_names
from starfish.healing.baselines import layerwise, non_linear_layers
from starfish.healing.common import Objective, align_, on_channels, snapshot, split_calibration
from starfish.losses import STATE_LOSSES, kd_loss
from starfish.pruning.masks import Masks
from starfish.pruning.slim import state_channels

if TYPE_CHECKING:
    from starfish.config import Alignment, LeastSquares, Training

log = logging.getLogger(__name__)


def starfish(model: nn.Module, dense: nn.Module, masks: Masks, images: torch.Tensor, training: "Training",
             alignment: "Alignment", least_squares: "LeastSquares") -> dict[str, object]:
    """STARFISH: Adam on the kept weights so the block outputs (internal states) align with the
    dense model's, on unlabeled calibration images; optionally warm-started and with a logit term.

    The rest of this module's docstring has the details."""
    report: dict[str, object] = {}
    train, holdout = split_calibration(images, training.holdout)
    pruned = snapshot(model, masks) if alignment.warm_start != "none" else None
    if alignment.warm_start == "layerwise":
        convs = non_linear_layers(model, masks)
        if convs:  # the least-squares re-fit is written for Linear layers
            log.warning("the layerwise warm start re-fits Linear layers only; %s and %d more start from the "
                        "pruned weights", convs[0], len(convs) - 1)
            report["warm_start"] = "skipped: the scope has non-Linear layers"
        else:
            start = time.perf_counter()
            fit = layerwise(model, dense, masks, train, least_squares)
            report.update(warm_start="layerwise", warm_start_seconds=time.perf_counter() - start,
                          statistics_images=fit["statistics_images"], float64_fallbacks=fit["float64_fallbacks"])
            log.info("layerwise warm start (%s solver) in %.1fs", least_squares.solver, report["warm_start_seconds"])
    names = state_names(model, alignment.states)
    narrowed = state_channels(model, dense, masks)
    loss = STATE_LOSSES[alignment.loss]
    terms = {name: (on_channels(loss, narrowed[name]) if name in narrowed else loss, 1.0 / len(names))
             for name in names}
    terms[""] = (kd_loss(alignment.temperature), alignment.logit_weight)  # "" is the model itself: its logits
    report.update(align_(model, dense, masks, train, holdout, Objective(terms), training, fallback=pruned))
    report["states"] = names
    return report
