"""params.yaml and `--set` overrides: read as YAML 1.2 (as DVC writes the file), layered (the
file, then the overrides; a heal preset under the fields set on top of it) and validated into a
`PipelineConfig` (starfish/config.py)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from starfish.config import SECTIONS, HealConfig, PipelineConfig, from_dict
from starfish.errors import StarfishError, require
from starfish.recipes import layer_heal_fields, preset_fields

log = logging.getLogger(__name__)


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's core schema for plain scalars, as DVC (ruamel.yaml)
    writes params.yaml: `nm: 2:4` stays a string (YAML 1.1 reads the base-60 integer 124),
    `yes`/`on` stay strings, `010` is ten, and dates stay text."""


_CORE_SCHEMA = {
    "tag:yaml.org,2002:bool": (r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    "tag:yaml.org,2002:int": (r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    "tag:yaml.org,2002:float": (r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                                r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+0123456789."),
}
Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag not in (*_CORE_SCHEMA, "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _tag, (_pattern, _first) in _CORE_SCHEMA.items():
    Yaml12Loader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))
Yaml12Loader.add_constructor(
    "tag:yaml.org,2002:int",
    lambda loader, node: int(text, 0) if (text := loader.construct_scalar(node)).startswith(("0o", "0x"))
    else int(text))


def read_yaml(text: str) -> Any:
    """YAML text as YAML 1.2 (core schema) reads it: params files and `--set` values."""
    return yaml.load(text, Loader=Yaml12Loader)


def _override_yaml(key: str, raw: str) -> Any:
    try:
        return read_yaml(raw)
    except yaml.YAMLError as exc:
        raise StarfishError(f"--set {key}={raw}: the value is not valid YAML ({str(exc).splitlines()[0]}); "
                            f"quote it, e.g. --set {key}='\"{raw}\"'") from None


def _override_value(section: str, name: str, raw: str) -> Any:
    """An override's value parsed as YAML 1.2, except that text fields keep the text as typed
    (`model.name=1e3` is the name, not a number, and a scope of patterns stays as typed)."""
    if not raw:
        return None
    fields = getattr(SECTIONS.get(section), "__pydantic_fields__", {})
    if name in fields and fields[name].annotation in (str, str | None):
        try:
            parsed = read_yaml(raw)
        except yaml.YAMLError:
            return raw
        return raw if parsed is not None and not isinstance(parsed, str) else parsed
    return _override_yaml(f"{section}.{name}", raw)


def _read_params(path: Path) -> dict[str, Any]:
    require(path.is_file(), f"params file {path} does not exist")
    try:
        values = read_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise StarfishError(f"params file {path} is not valid YAML: {exc}") from exc
    require(isinstance(values, dict), f"params file {path} must hold a mapping of sections")
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read params.yaml (defaults if `path` is None), then apply `section.field=value` overrides;
    `section.field.key=value` sets one entry of a mapping field (model.kwargs.img_size=384)."""
    values = _read_params(Path(path)) if path is not None else {}
    overridden: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        require(bool(sep and dot), f"override {item!r} must look like section.field=value, e.g. heal.epochs=5")
        entries = values.setdefault(section, {})
        require(isinstance(entries, dict), f"{section} in {path} must be a mapping")
        name, dot, key = name.partition(".")
        value = _override_value(section, name, raw) if not dot else _override_yaml(f"{section}.{name}.{key}", raw)
        if dot:
            require(isinstance(entries.get(name) or {}, dict),
                    f"{section}.{name} in {path} must be a mapping to set {section}.{name}.{key}")
            value = {**(entries.get(name) or {}), key: value}
        entries[name] = value
        if section == "heal":
            overridden[name] = value
    explicit = dict(values["heal"]) if isinstance(values.get("heal"), Mapping) else {}
    if overridden:
        values["heal"] = layer_heal_fields(values["heal"], overridden)
    cfg = from_dict(values)
    log_heal_layers(cfg.heal, explicit)
    return cfg


def log_heal_layers(heal: HealConfig, explicit: Mapping[str, Any]) -> None:
    """One line: the preset, the fields it set, and the fields set on top of it (`explicit`, the
    heal section as the user wrote it), naming each preset field they replaced. Said out loud
    (INFO) only when one was replaced; every heal logs its effective config anyway."""
    own = preset_fields(heal.preset)
    given = {key: value for key, value in explicit.items() if key != "preset"}
    replaced = [f"{key} (preset: {own[key]!r})" for key in given if key in own and own[key] != getattr(heal, key)]
    log.log(logging.INFO if replaced else logging.DEBUG, "heal preset %r sets %s; set on top: %s%s", heal.preset,
            own or "nothing", given or "nothing", f"; replacing the preset's {', '.join(replaced)}" if replaced else "")
