"""The catalog: every entry's code loads from where the entry says, config checks the contracts
the entries state, and a lookup imports no implementation."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from starfish.catalog import HEALERS, PRUNERS
from starfish.config import Alignment, HealConfig, LeastSquares, PruneConfig, Training
from starfish.errors import StarfishError
from starfish.registry import load


@pytest.mark.parametrize("name", PRUNERS.names())
def test_every_pruner_entry_loads_the_code_it_names(name: str) -> None:
    spec = PRUNERS.get(name)
    targets = [t for t in (spec.weights, spec.unit_scores, spec.unit_chooser) if t]
    assert targets and spec.summary
    for target in targets:
        assert callable(load(target)) and load(target).__module__ == target.split(":")[0]
    assert not (spec.unit_scores and spec.unit_chooser)  # units are scored for the shared ranking, or chosen


@pytest.mark.parametrize("name", HEALERS.names())
def test_every_healer_entry_loads_the_code_it_names(name: str) -> None:
    spec = HEALERS.get(name)
    healer = load(spec.target)
    assert callable(healer) and healer.__module__ == spec.target.split(":")[0] and spec.summary


@pytest.mark.parametrize("name", HEALERS.names())
def test_every_healer_takes_exactly_the_parts_of_the_heal_section_its_entry_reads(name: str) -> None:
    """heal_ passes a healer the parts its entry names, by name, and nothing else: a healer that
    read another field would need it in its signature, where this test sees it."""
    spec = HEALERS.get(name)
    parameters = list(inspect.signature(load(spec.target)).parameters)
    assert parameters[:4] == ["model", "dense", "masks", "images"] and tuple(parameters[4:]) == spec.reads
    parts = {"training": Training, "alignment": Alignment, "least_squares": LeastSquares}
    for part in spec.reads:
        assert isinstance(getattr(HealConfig(method=name), part), parts[part])


def test_config_checks_the_contracts_the_entries_state() -> None:
    """A units-only pruner without structure, a weights-only one with it, and allocation or depth
    for a pruner that picks its own units: each refused with the fix."""
    with pytest.raises(StarfishError, match="removes whole units: set prune.structure"):
        PruneConfig("contribution", 0.5)
    with pytest.raises(StarfishError, match="prunes single weights; prune.structure='neurons' takes"):
        PruneConfig("nm", 0.5, structure="neurons")
    for fields in ({"allocation": "block-loss"}, {"depth": 1}):
        with pytest.raises(StarfishError, match="torch-pruning chooses its own units.*set prune.allocation=uniform"):
            PruneConfig("torch-pruning", 0.5, structure="neurons+heads", **fields)
    with pytest.raises(StarfishError, match="unknown pruner 'obs'; use one of"):
        PruneConfig("obs", 0.5)


def test_a_lookup_imports_no_implementation() -> None:
    """Config and the catalog answer names and capabilities without importing the pruners, the
    healers or timm; dispatch imports them on first use."""
    code = ("import sys; from starfish.config import PipelineConfig; from starfish.catalog import PRUNERS; "
            "PipelineConfig(); PRUNERS.get('wanda').reads_images; "
            "print(sorted(m for m in sys.modules if m.startswith(('starfish.pruning', 'starfish.healing', 'timm'))))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"
