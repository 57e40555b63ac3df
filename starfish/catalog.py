"""Every choice a config names, and what each can do: the pruners and healers (with where their
code lives), the structures, the pruning scopes, the BatchNorm and quantization modes.

`config` checks names and the rules between fields against these entries alone, so it imports no
implementation; the implementations read `config` and are imported on first use
(`registry.load`). A new pruner or healer is one entry here and one function there; its entry is
its contract, and the code that dispatches asks the entry, never the name.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from starfish.errors import StarfishError
from starfish.registry import Registry


@dataclasses.dataclass(frozen=True)
class PrunerSpec:
    """A pruner: what it removes and what it reads. `weights` masks single weights (unstructured,
    N:M): `(model, scope weights, images, cfg) -> masks`. For whole units (prune.structure),
    `unit_scores` scores every unit, `(model, groups, images) -> {group: scores}`, and the shared
    ranking (uniform, global, block-loss allocation, depth) removes the lowest; `unit_chooser`
    instead picks the units itself, `(model, groups, cfg, images) -> masks`, so no allocation
    applies to it. `floor` is what it keeps whatever the target: a weight per row or per layer."""

    name: str
    summary: str
    weights: str | None = None
    unit_scores: str | None = None
    unit_chooser: str | None = None
    reads_images: bool = False
    floor: Literal["row", "layer"] | None = None

    @property
    def removes_units(self) -> bool:
        return self.unit_scores is not None or self.unit_chooser is not None

    @property
    def removes_weights(self) -> bool:
        return self.weights is not None


@dataclasses.dataclass(frozen=True)
class HealerSpec:
    """A healer, `(model, dense, masks, images, **parts) -> report` (`healing.Healer`), and the
    parts of the heal section it `reads` (config.Training, Alignment, LeastSquares), which
    `healing.heal_` passes it by name. None reads labels: they heal on unlabeled images."""

    name: str
    summary: str
    target: str
    reads: tuple[str, ...] = ()


_PRUNERS = "starfish.pruning.pruners"
_HEALING = "starfish.healing"
PRUNERS: Registry[PrunerSpec] = Registry("pruner", [
    PrunerSpec("magnitude", "smallest |w| first, per layer (every layer at exactly the target) or globally over the "
               "scope; whole units by their weights' L2 norm",
               weights=f"{_PRUNERS}:magnitude", unit_scores=f"{_PRUNERS}:magnitude_scores", floor="layer"),
    PrunerSpec("wanda", "Wanda: |W| * ||x|| ranked within each output row, input norms from the calibration images",
               weights=f"{_PRUNERS}:wanda", unit_scores=f"{_PRUNERS}:wanda_scores", reads_images=True, floor="row"),
    PrunerSpec("nm", "semi-structured N:M by magnitude; prune.sparsity must equal 1 - N/M",
               weights=f"{_PRUNERS}:n_of_m"),
    PrunerSpec("contribution", "whole units by what each adds to the output of the layer that reads it, on the "
               "calibration images (prune.structure only)",
               unit_scores=f"{_PRUNERS}:contribution_scores", reads_images=True),
    PrunerSpec("torch-pruning", "Torch-Pruning's dependency graph and group-magnitude importance choosing the units "
               "(prune.structure only)", unit_chooser="starfish.pruning.structured:torch_pruning_masks",
               reads_images=True),
])
HEALERS: Registry[HealerSpec] = Registry("healer", [
    HealerSpec("none", "the pruned weights as they are: the floor every healer is measured against",
               f"{_HEALING}.baselines:no_healing"),
    HealerSpec("bias-correction", "b <- b_dense + W_dense E[x_dense] - W_pruned E[x_pruned], layer by layer",
               f"{_HEALING}.baselines:bias_correction", reads=("least_squares",)),
    HealerSpec("layerwise", "sequential per-layer least-squares reconstruction of the kept weights",
               f"{_HEALING}.baselines:layerwise", reads=("least_squares",)),
    HealerSpec("logit-kd", "distill only the final logits (the root module's output), same budget as STARFISH",
               f"{_HEALING}.baselines:logit_kd", reads=("training", "alignment")),
    HealerSpec("starfish", "STARFISH: Adam on the kept weights so the block outputs (internal states) align with the "
               "dense model's, on unlabeled calibration images; optionally warm-started and with a logit term",
               f"{_HEALING}.starfish:starfish", reads=("training", "alignment", "least_squares")),
])

STRUCTURES = ("neurons", "heads", "channels")
BATCHNORM_MODES = ("train", "frozen", "recalibrate")  # heal.batchnorm (healing/batchnorm.py says what each does)
QUANT_MODES = ("none", "int8-dynamic", "int8-static")  # quant.mode and heal.quant (starfish/quant)
QUANT_SUMMARIES = {
    "none": "float ONNX in onnxruntime",
    "int8-dynamic": "onnxruntime int8: Linear layers, int8 weights per channel, each call's own input range",
    "int8-static": "onnxruntime int8 (QDQ): Linear and Conv layers, input ranges from the calibration split",
}

# `prune.scope` presets, the authors' names: which Linear roles (pruning/pruners.py linear_role)
# and which convolutions each takes. Every preset stays inside the model's stages (never the
# stem, patch embedding or head).
SCOPE_PRESETS: dict[str, tuple[frozenset[str], str]] = {
    "default": (frozenset({"qkv", "qk", "v", "out", "mlp"}), "dense"),
    "qkv": (frozenset({"qkv", "qk", "v"}), "none"),
    "qkv_out": (frozenset({"qkv", "qk", "v", "out"}), "none"),
    "qkv_out_mlp": (frozenset({"qkv", "qk", "v", "out", "mlp"}), "none"),
    "mlp": (frozenset({"mlp"}), "none"),
    "qk": (frozenset({"qk"}), "none"),
    "qk_mlp": (frozenset({"qk", "mlp"}), "none"),
    "conv_only": (frozenset(), "dense"),
    "fc_only": (frozenset({"qkv", "qk", "v", "out", "mlp", "other"}), "none"),
    "conv_fc": (frozenset({"qkv", "qk", "v", "out", "mlp", "other"}), "dense"),
    "conv_dw": (frozenset(), "all"),
    "all": (frozenset({"qkv", "qk", "v", "out", "mlp", "other"}), "all"),
}


def is_scope_pattern(scope: str) -> bool:
    """A module-name pattern list (names have dots; globs have * ? or [), not a preset name."""
    return any(char in scope for char in ".*?[")


def check_scope(scope: str) -> None:
    if scope not in SCOPE_PRESETS and not is_scope_pattern(scope):
        raise StarfishError(f"prune.scope={scope!r} is neither a preset ({', '.join(SCOPE_PRESETS)}) nor a list of "
                            "module-name patterns (comma-separated, with dots or wildcards, e.g. blocks.*.mlp.fc1)")


def parse_structure(structure: str) -> tuple[str, ...]:
    """`prune.structure`: `unstructured`, or structures joined by `+` (e.g. `neurons+heads`)."""
    if structure == "unstructured":
        return ()
    parts = tuple(part.strip() for part in structure.split("+"))
    unknown = [part for part in parts if part not in STRUCTURES]
    if unknown or len(set(parts)) != len(parts):
        raise StarfishError(f"prune.structure={structure!r}: use unstructured, or one or more of {list(STRUCTURES)} "
                            "joined by + (e.g. neurons+heads)")
    return parts


def check_structure_fields(method: str, structure: str, scope: str) -> None:
    """`prune.structure` with the method and scope beside it: units are removed by a pruner that
    removes units, single weights by one that masks weights, and structure prunes every unit of
    its kind."""
    parse_structure(structure)
    spec = PRUNERS.get(method)
    if structure != "unstructured" and not spec.removes_units:
        takers = [name for name in PRUNERS.names() if PRUNERS.get(name).removes_units]
        raise StarfishError(f"prune.method={method!r} prunes single weights; prune.structure={structure!r} "
                            f"takes {', '.join(takers[:-1])} or {takers[-1]}")
    if structure == "unstructured" and not spec.removes_weights:
        raise StarfishError(f"prune.method={method} removes whole units: set prune.structure (e.g. neurons+heads)")
    if structure != "unstructured" and scope != "default":
        raise StarfishError(f"prune.scope={scope!r} chooses layers for unstructured pruning; prune.structure="
                            f"{structure!r} prunes every unit of its kind: leave prune.scope at default")


def check_sparsity(sparsity: float, what: str = "weights") -> None:
    """`sparsity` in [0, 1): the fraction of `what` removed (weights, or each layer's units)."""
    if not 0.0 <= sparsity < 1.0:
        raise StarfishError(f"prune.sparsity={sparsity} must be in [0, 1); e.g. 0.5 removes half the {what}")


def parse_nm(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): keep N of every M consecutive inputs."""
    try:
        n, m = (int(part) for part in pattern.split(":"))
    except ValueError:
        raise StarfishError(f"prune.nm={pattern!r} is not N:M (e.g. 2:4)") from None
    if not 0 < n < m:
        raise StarfishError(f"prune.nm={pattern!r} needs 0 < N < M (keep N of every M weights), e.g. 2:4")
    return n, m
