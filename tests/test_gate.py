"""The gate's rules over a run's metrics and a version's tags, without a registry (the registry
tests run them through MLflow: tests/test_pipeline_compress.py, tests/test_registry_lock.py)."""

from __future__ import annotations

import pytest

from starfish.config import GateConfig
from starfish.errors import StarfishError
from starfish.gate import METRICS, REGISTER_KEY_TAG, check_registrable, promotion_failures

GOOD = {key: 0.97 for key in METRICS} | {"sparsity_drift": 0.0, "flops_ratio": 0.5}
TAGS = {REGISTER_KEY_TAG: "key", "size_ratio": "0.4"}


def test_a_good_version_passes_and_each_rule_names_its_failure() -> None:
    gate = GateConfig(min_recovery=0.95, max_flops_ratio=0.6, max_size_ratio=0.5)
    assert promotion_failures(GOOD, TAGS, gate) == []
    assert promotion_failures(GOOD, TAGS, gate, champion=("3", 0.96)) == []
    cases = [
        ({**GOOD, "recovery": 0.9}, TAGS, None, "recovery 0.9000 < gate.min_recovery 0.95"),
        (GOOD, TAGS, ("3", 0.98), "recovery 0.9700 < champion v3's 0.9800"),
        ({**GOOD, "flops_ratio": 0.7}, TAGS, None, "forward FLOPs 0.7000 of dense > gate.max_flops_ratio 0.6"),
        ({k: v for k, v in GOOD.items() if k != "flops_ratio"}, TAGS, None, "forward FLOPs unknown"),
        (GOOD, {**TAGS, "size_ratio": "0.6"}, None, "size on disk 0.6000 of dense > gate.max_size_ratio 0.5"),
        (GOOD, {"size_ratio": "0.4"}, None, f"it carries no {REGISTER_KEY_TAG} tag"),
        ({**GOOD, "sparsity_drift": 0.01}, TAGS, None, "sparsity drift 0.01 exceeds gate.max_sparsity_drift"),
        ({k: v for k, v in GOOD.items() if k != "healed_top1"}, TAGS, None, "evaluation has no numeric 'healed_top1'"),
    ]
    for metrics, tags, champion, reason in cases:
        reasons = promotion_failures(metrics, tags, gate, champion)
        assert len(reasons) == 1 and reasons[0].startswith(reason), (reason, reasons)


def test_a_model_that_failed_a_check_is_never_registrable() -> None:
    check_registrable(GOOD, GateConfig())
    with pytest.raises(StarfishError, match="not registering this model: sparsity drift 0.5 exceeds"):
        check_registrable({**GOOD, "sparsity_drift": 0.5}, GateConfig())
