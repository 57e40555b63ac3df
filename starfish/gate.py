"""The registry's gate, as rules over a run's metrics and a version's tags: what a model must
show to be registered at all (`check_registrable`, before anything is logged) and to become
`champion` (`promotion_failures`). MLflow reads and writes them in `tracking`; the rules are here.
"""

from __future__ import annotations

from typing import Any, Mapping

from starfish.config import GateConfig
from starfish.errors import StarfishError

METRICS = ("dense_top1", "pruned_top1", "healed_top1", "recovery", "sparsity", "sparsity_drift")
SERVED_METRICS = ("served_top1", "served_recovery", "served_agreement")  # the served file, in onnxruntime
REGISTER_KEY_TAG = "starfish.register_key"  # on the run and its version: one registration per key
SERVED_SHA256_TAG = "sha256"  # on a version: its served file's hash, checked by `starfish serve` before serving
MODEL_NAME_TAG = "starfish.model_name"  # on the run: the model it compressed


def gate_failures(metrics: dict[str, Any], gate: GateConfig) -> list[str]:
    """Why a model may not be registered at all (empty when it may)."""
    failures = []
    drift = metrics.get("sparsity_drift")
    if drift is None or drift > gate.max_sparsity_drift:
        failures.append(f"sparsity drift {drift} exceeds gate.max_sparsity_drift={gate.max_sparsity_drift}")
    for key in METRICS:
        if not isinstance(metrics.get(key), (int, float)):
            failures.append(f"evaluation has no numeric {key!r}")
    return failures


def check_registrable(metrics: dict[str, Any], gate: GateConfig) -> None:
    """Raise if a model failed a check: such a model is never registered."""
    failures = gate_failures(metrics, gate)
    if failures:
        raise StarfishError("not registering this model: " + "; ".join(failures))


def promotion_failures(metrics: Mapping[str, Any], tags: Mapping[str, str], gate: GateConfig,
                       champion: tuple[str, float | None] | None = None) -> list[str]:
    """Why a registered version may not become champion (empty when it may): the registration
    checks, the recovery floor, the champion's recovery (`champion`: its version and recovery,
    when another version holds the alias), and the FLOP and size bounds."""
    reasons = gate_failures(dict(metrics), gate)
    if tags.get(REGISTER_KEY_TAG) is None:
        reasons.append(f"it carries no {REGISTER_KEY_TAG} tag: it was not registered by a complete compress run")
    recovery = metrics.get("recovery", float("-inf"))
    if recovery < gate.min_recovery:
        reasons.append(f"recovery {recovery:.4f} < gate.min_recovery {gate.min_recovery}")
    if champion is not None and champion[1] is not None and recovery < champion[1]:
        reasons.append(f"recovery {recovery:.4f} < champion v{champion[0]}'s {champion[1]:.4f}")
    if gate.max_flops_ratio is not None:
        flops = metrics.get("flops_ratio")
        if flops is None or flops > gate.max_flops_ratio:
            reasons.append(f"forward FLOPs {'unknown' if flops is None else f'{flops:.4f}'} of dense > "
                           f"gate.max_flops_ratio {gate.max_flops_ratio}")
    if gate.max_size_ratio is not None:
        ratio = tags.get("size_ratio")
        if ratio is None or float(ratio) > gate.max_size_ratio:
            reasons.append(f"size on disk {'unknown' if ratio is None else f'{float(ratio):.4f}'} of dense > "
                           f"gate.max_size_ratio {gate.max_size_ratio}")
    return reasons
