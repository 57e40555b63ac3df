"""Named heal recipes, one registry: each sets some HealConfig fields on top of a preset. The
presets (`heal.preset`) stand on the built-in defaults; every other recipe (a baseline healer, or
STARFISH with one field changed) names the preset it builds on, for the bench and sweeps to
compare. Any recipe is a `starfish bench --healers` name; `config.recipe_config` builds it.

Layering: built-in defaults < the preset < the fields the user sets (in params.yaml or with
--set), so params.yaml names only what its user chose.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from starfish.catalog import BATCHNORM_MODES
from starfish.registry import Registry

# The authors' budget: 10 epochs of 5,000 calibration images (0.4% of ImageNet) at batch 32.
AUTHORS_STEPS = 10 * math.ceil(5000 / 32)  # 1,570 Adam steps


@dataclasses.dataclass(frozen=True)
class Recipe:
    """`fields` set over `base`'s (a preset's name), or over the built-in defaults where `base` is
    None: then the recipe is a preset, which `heal.preset` may name."""

    name: str
    summary: str
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    base: str | None = "default"

    @property
    def is_preset(self) -> bool:
        return self.base is None

    def describe(self) -> str:
        """One line for `starfish list`: the summary, what it sets and over which preset."""
        sets = ", ".join(f"{k}={v}" for k, v in self.fields.items()) or "nothing"
        return f"{self.summary} (sets {sets}{'' if self.is_preset else f' over {self.base}'})"


_RECOMMENDED = {"method": "starfish", "warm_start": "layerwise", "solver": "cg", "logit_weight": 1.0, "keep": "last"}
_PRESETS = [
    Recipe("default", "STARFISH at the authors' 1,570 Adam steps, with a held-out slice that keeps the best state",
           base=None),
    # Their pruned model is left in train mode, so BatchNorm trains. On a split smaller than their
    # 5,000 images this is fewer steps (80 on 240 images).
    Recipe("faithful", "the authors' public recipe exactly: 10 epochs over the split, every image trained on, the "
           "last state, BatchNorm in train mode",
           {"method": "starfish", "steps": None, "epochs": 10, "holdout": 0.0, "keep": "last", "precision": "fp32",
            "batchnorm": "train"}, base=None),
    # Measured best on the demo from 75% sparsity up (results/bench): one Hessian per layer; the
    # last state is kept unless the held-out slice says it is worse than the pruned model.
    Recipe("recommended", "a layerwise least-squares warm start, then block states plus a logit term (75% sparsity "
           "up)", _RECOMMENDED, base=None),
    # a quarter of the authors' steps (results/steps), at the rate measured for it (results/fast_lr);
    # its warm start's statistics on at most 512 images, so they cost little beside 400 steps (results/scale)
    Recipe("fast", "recommended in 400 steps at lr 2e-3, its warm start on at most 512 images",
           {**_RECOMMENDED, "steps": 400, "lr": 2e-3, "statistics_images": 512}, base=None),
]
_COMPARED = [
    Recipe("none", "the pruned weights as they are", {"method": "none"}),
    Recipe("bias-correction", "the bias-correction baseline", {"method": "bias-correction"}),
    Recipe("layerwise", "the layerwise least-squares baseline", {"method": "layerwise"}),
    # its held-out KD loss bottoms out early, so the last state is kept
    Recipe("logit-kd", "logit distillation at STARFISH's budget", {"method": "logit-kd", "keep": "last"}),
    Recipe("starfish", "the default preset under its healer's name, as the results call it"),
    Recipe("starfish-holdout0", "STARFISH trained on the whole split", {"holdout": 0.0}),
    Recipe("starfish-holdout0.2", "STARFISH with a fifth of the split held out", {"holdout": 0.2}),
    # a target whose width structured pruning never narrows (results/bench_structured/cnn)
    Recipe("starfish-last-state", "STARFISH on the last block's output only", {"states": "last"}),
    # on structured removal (results/bench_structured/vit_variants)
    Recipe("starfish-logit", "STARFISH with a logit term", {"logit_weight": 1.0}),
    *[Recipe(f"starfish-lr{name}", "STARFISH at another learning rate", {"lr": float(name)})
      for name in ("1e-3", "3e-4", "2e-3")],
    Recipe("recommended-lr2e-3", "recommended at another learning rate", {"lr": 2e-3}, base="recommended"),
    Recipe("starfish-nmse", "STARFISH with the normalized squared error", {"loss": "nmse"}),
    *[Recipe(f"starfish-bn-{mode}", "STARFISH with one heal.batchnorm mode (results/batchnorm)", {"batchnorm": mode})
      for mode in BATCHNORM_MODES],
    *[Recipe(f"fast-lr{lr:g}", "fast at another learning rate (results/fast_lr)", {"lr": lr}, base="fast")
      for lr in (6e-4, 1e-3, 4e-3)],
]
RECIPES: Registry[Recipe] = Registry("heal recipe", [*_PRESETS, *_COMPARED])
PRESETS = tuple(recipe.name for recipe in _PRESETS)  # heal.preset's choices, default first
# Fields every recipe takes from the pipeline's heal section (the shared budget, batching and
# held-out slice), unless its preset sets them itself.
SHARED_FIELDS = ("steps", "epochs", "batch_size", "cache_dtype", "holdout", "holdout_every")
BUDGET_FIELDS = ("steps", "epochs")


def preset_fields(name: str) -> Mapping[str, Any]:
    """The fields preset `name` sets over the built-in defaults."""
    recipe = RECIPES.get(name)
    if not recipe.is_preset:
        raise ValueError(f"{name} is a recipe over {recipe.base}, not a preset")
    return recipe.fields


def layer_heal_fields(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`top` over `base`; a budget given in `top` alone (steps or epochs) replaces the other one,
    so `--set heal.epochs=5` over a steps budget counts epochs. Both in `top` stay an error."""
    merged = {**base, **top}
    for given, other in (("steps", "epochs"), ("epochs", "steps")):
        if top.get(given) is not None and other not in top:
            merged[other] = None
    return merged
