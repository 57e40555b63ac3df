"""Typed flow parameters built from the config sections, so Prefect's UI offers a form.

`Settings` has one optional model per config section (prune, heal, ...) and in each one optional
field per config field, with the field's type and, where the config checks a set of names, its
choices. A field left empty keeps what params.yaml says; a field set is applied as the override
`section.field=value`, before the run's own `overrides`, so the config checks it exactly as it
checks `--set` (one line, naming the field and the fix).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from starfish.config import (
    BATCHNORM_MODES,
    CACHE_MODES,
    HEAL_PRESETS,
    KEEP,
    LOSSES,
    SOLVERS,
    WARM_STARTS,
    CalibrationConfig,
    DataConfig,
    EvalConfig,
    GateConfig,
    HealConfig,
    ModelConfig,
    PruneConfig,
)
from starfish.datasets import DATASET_KINDS
from starfish.healing import HEALERS
from starfish.precision import PRECISIONS
from starfish.pruning import PRUNERS

SECTIONS = {"prune": PruneConfig, "heal": HealConfig, "model": ModelConfig, "calibration": CalibrationConfig,
            "evaluate": EvalConfig, "gate": GateConfig, "data": DataConfig}  # the form's order: the usual choices first
CHOICES = {  # the fields whose values the config checks against a set of names
    ("data", "kind"): DATASET_KINDS, ("prune", "method"): tuple(PRUNERS.names()),
    ("heal", "preset"): tuple(HEAL_PRESETS), ("heal", "method"): tuple(HEALERS.names()),
    ("heal", "loss"): LOSSES, ("heal", "warm_start"): WARM_STARTS, ("heal", "keep"): KEEP,
    ("heal", "batchnorm"): BATCHNORM_MODES, ("heal", "solver"): SOLVERS, ("heal", "cache"): CACHE_MODES,
    ("heal", "precision"): PRECISIONS, ("evaluate", "precision"): PRECISIONS,
}


def _section_model(section: str, cls: type) -> type[BaseModel]:
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        choices = CHOICES.get((section, field.name))
        kind = Literal[choices] if choices else hints[field.name]
        fields[field.name] = (kind | None, None)
    return create_model(f"{section.title()}Settings", __config__=ConfigDict(extra="forbid"), **fields)


_MODELS = {name: _section_model(name, cls) for name, cls in SECTIONS.items()}
Settings = create_model("Settings", __config__=ConfigDict(extra="forbid"),
                        **{name: (model, Field(default_factory=model)) for name, model in _MODELS.items()})
Settings.__doc__ = "Config fields to set for this run; an empty field keeps params.yaml's value."


def as_overrides(settings: BaseModel) -> list[str]:
    """The `section.field=value` overrides of the fields `settings` sets (values as JSON, which
    the overrides read as YAML)."""
    return [f"{section}.{name}={json.dumps(value)}"
            for section, fields in settings.model_dump(exclude_none=True).items() for name, value in fields.items()]
