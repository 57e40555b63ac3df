"""Named heal recipes: the presets `heal.preset` selects and the healer variants the bench and
sweeps compare, each as the HealConfig fields it sets.

Layering: built-in defaults < the preset < the fields the user sets (in params.yaml or with
--set), so params.yaml names only what its user chose.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from starfish.catalog import BATCHNORM_MODES

# The authors' budget: 10 epochs of 5,000 calibration images (0.4% of ImageNet) at batch 32.
AUTHORS_STEPS = 10 * math.ceil(5000 / 32)  # 1,570 Adam steps

HEAL_PRESETS: dict[str, dict[str, Any]] = {
    # The built-in defaults: STARFISH at the authors' step budget, with a held-out slice.
    "default": {},
    # The authors' public recipe exactly: 10 epochs, every image trained on, the last state kept,
    # BatchNorm in train mode (their pruned model is left in train mode). On a split smaller than
    # their 5,000 images this is fewer steps (80 on 240 images).
    "faithful": {"method": "starfish", "steps": None, "epochs": 10, "holdout": 0.0, "keep": "last",
                 "precision": "fp32", "batchnorm": "train"},
    # Measured best on the demo from 75% sparsity up (results/bench): a layerwise least-squares
    # warm start (one Hessian per layer), then block states plus a logit term, at the same step
    # budget; the last state is kept unless the held-out slice says it is worse than the pruned model.
    "recommended": {"method": "starfish", "warm_start": "layerwise", "solver": "cg", "logit_weight": 1.0,
                    "keep": "last"},
}
# recommended in a quarter of the authors' steps (results/steps), at the learning rate measured
# for that budget (results/fast_lr).
HEAL_PRESETS["fast"] = {**HEAL_PRESETS["recommended"], "steps": 400, "lr": 2e-3}
PRESET_SUMMARIES = {  # one line each, for `starfish list`
    "default": "STARFISH at the authors' 1,570 Adam steps, with a held-out slice that keeps the best state",
    "faithful": "the authors' public recipe exactly: 10 epochs over the split, the last state",
    "recommended": "a layerwise least-squares warm start, then block states plus a logit term (75% sparsity up)",
    "fast": "recommended in 400 steps at lr 2e-3",
}

# Healer variants by name, for the bench and sweeps: a heal preset and the fields set on top of it.
VARIANTS: dict[str, dict[str, Any]] = {
    "none": {"method": "none"},
    "bias-correction": {"method": "bias-correction"},
    "layerwise": {"method": "layerwise"},
    "logit-kd": {"method": "logit-kd", "keep": "last"},  # its held-out KD loss bottoms out early
    "faithful": {"preset": "faithful"},
    "starfish": {"preset": "default"},
    "recommended": {"preset": "recommended"},
    "fast": {"preset": "fast"},
    "starfish-holdout0": {"holdout": 0.0},
    "starfish-holdout0.2": {"holdout": 0.2},
    # the last block only: a target whose width structured pruning never narrows (results/bench_structured/cnn)
    "starfish-last-state": {"states": "last"},
    # STARFISH with a logit term, a larger or smaller step, or the normalized squared error, on
    # structured removal (results/bench_structured/vit_variants)
    "starfish-logit": {"logit_weight": 1.0},
    "starfish-lr1e-3": {"lr": 1e-3},
    "starfish-lr3e-4": {"lr": 3e-4},
    "starfish-lr2e-3": {"lr": 2e-3},
    "recommended-lr2e-3": {"preset": "recommended", "lr": 2e-3},
    "starfish-nmse": {"loss": "nmse"},
    # heal.batchnorm, each mode named (results/batchnorm)
    **{f"starfish-bn-{mode}": {"batchnorm": mode} for mode in BATCHNORM_MODES},
    # the fast preset's learning rate against the alternatives (results/fast_lr)
    **{f"fast-lr{lr:g}": {"preset": "fast", "lr": lr} for lr in (6e-4, 1e-3, 4e-3)},
}
# Fields every variant takes from the pipeline's heal section (the shared budget, batching and
# held-out slice), unless its preset sets them itself.
SHARED_FIELDS = ("steps", "epochs", "batch_size", "cache_dtype", "holdout", "holdout_every")
BUDGET_FIELDS = ("steps", "epochs")


def layer_heal_fields(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`top` over `base`; a budget given in `top` alone (steps or epochs) replaces the other one,
    so `--set heal.epochs=5` over a steps budget counts epochs. Both in `top` stay an error."""
    merged = {**base, **top}
    for given, other in (("steps", "epochs"), ("epochs", "steps")):
        if top.get(given) is not None and other not in top:
            merged[other] = None
    return merged
