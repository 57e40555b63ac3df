"""Typed flow parameters built from the config sections, so Prefect's UI offers a form.

`Settings` has one optional model per config section (prune, heal, ...) and in each one optional
field per config field, with the field's type and, where the config checks a set of names, its
choices. A field left empty keeps what params.yaml says; a field set is applied as the override
`section.field=value`, before the run's own `overrides`, so the config checks it exactly as it
checks `--set` (one line, naming the field and the fix).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from starfish.catalog import HEALERS, PRUNERS
from starfish.config import SECTIONS

# the form's order: the usual choices first
ORDER = ("prune", "heal", "quant", "model", "calibration", "evaluate", "gate", "data")
REGISTRY_CHOICES = {("prune", "method"): tuple(PRUNERS.names()), ("heal", "method"): tuple(HEALERS.names())}
# (the other fields with choices declare them as `Literal` in the config itself)


def _section_model(section: str, cls: type) -> type[BaseModel]:
    fields: dict[str, Any] = {}
    for name, info in cls.__pydantic_fields__.items():
        choices = REGISTRY_CHOICES.get((section, name))
        kind = Literal[choices] if choices else info.annotation
        fields[name] = (kind | None, Field(None, description=info.description))
    return create_model(f"{section.title()}Settings", __config__=ConfigDict(extra="forbid"), **fields)


_MODELS = {name: _section_model(name, SECTIONS[name]) for name in ORDER}
Settings = create_model("Settings", __config__=ConfigDict(extra="forbid"),
                        **{name: (model, Field(default_factory=model)) for name, model in _MODELS.items()})
Settings.__doc__ = "Config fields to set for this run; an empty field keeps params.yaml's value."


def as_overrides(settings: BaseModel) -> list[str]:
    """The `section.field=value` overrides of the fields `settings` sets (values as JSON, which
    the overrides read as YAML)."""
    return [f"{section}.{name}={json.dumps(value)}"
            for section, fields in settings.model_dump(exclude_none=True).items() for name, value in fields.items()]
