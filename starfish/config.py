"""Pipeline configuration: frozen dataclasses, validated once, loaded from params.yaml.

Every check raises `StarfishError` naming the field (`section.field`) and what would fix it.
The same sections feed the CLI, the DVC stages and the Prefect flows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from starfish.datasets import DATASET_KINDS, FASHION_MNIST_ROOT
from starfish.errors import StarfishError

LOSSES = ("cosine", "nmse")
WARM_STARTS = ("none", "layerwise")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise StarfishError(message)


@dataclass(frozen=True)
class DataConfig:
    kind: str = "fashion-mnist"
    root: str = FASHION_MNIST_ROOT

    def __post_init__(self) -> None:
        _require(self.kind in DATASET_KINDS, f"data.kind={self.kind!r}: use one of {list(DATASET_KINDS)}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "starfish_vit_fmnist"
    checkpoint: str | None = "data/demo/starfish_vit_fmnist.safetensors"
    pretrained: bool = False
    num_classes: int | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        from starfish.models import resolve_device

        resolve_device(self.device)


@dataclass(frozen=True)
class CalibrationConfig:
    fraction: float = 0.004
    seed: int = 0

    def __post_init__(self) -> None:
        _require(0.0 < self.fraction <= 1.0,
                 f"calibration.fraction={self.fraction} must be in (0, 1]; the paper uses 0.004")


@dataclass(frozen=True)
class PruneConfig:
    method: str = "magnitude"
    sparsity: float = 0.5
    nm: str = "2:4"
    global_ranking: bool = False

    def __post_init__(self) -> None:
        from starfish.pruning.masks import check_sparsity, parse_nm
        from starfish.pruning.pruners import get_pruner

        get_pruner(self.method)
        check_sparsity(self.sparsity)
        parse_nm(self.nm)


@dataclass(frozen=True)
class HealConfig:
    """Defaults follow the authors' public STARFISH code (see DESIGN.md)."""

    method: str = "starfish"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 6e-4
    lr_min: float = 1e-6
    loss: str = "cosine"
    states: str = "blocks"
    warm_start: str = "none"
    cache_dtype: str = "float16"
    damp: float = 0.01
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        from starfish.healing import get_healer

        get_healer(self.method)
        _require(self.epochs >= 0, f"heal.epochs={self.epochs} must be >= 0")
        _require(self.batch_size >= 1, f"heal.batch_size={self.batch_size} must be >= 1")
        _require(self.lr > 0 and 0 <= self.lr_min <= self.lr,
                 f"heal.lr={self.lr}, heal.lr_min={self.lr_min}: need 0 <= lr_min <= lr and lr > 0")
        _require(self.loss in LOSSES, f"heal.loss={self.loss!r}: use one of {list(LOSSES)}")
        _require(self.warm_start in WARM_STARTS, f"heal.warm_start={self.warm_start!r}: use one of {list(WARM_STARTS)}")
        _require(self.cache_dtype in ("float16", "bfloat16", "float32"),
                 f"heal.cache_dtype={self.cache_dtype!r}: use float16, bfloat16 or float32")
        _require(self.damp >= 0, f"heal.damp={self.damp} must be >= 0")
        _require(self.temperature > 0, f"heal.temperature={self.temperature} must be > 0")


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 500
    max_samples: int | None = None  # evaluate on the first N test images (None: all)

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, f"evaluate.batch_size={self.batch_size} must be >= 1")
        _require(self.max_samples is None or self.max_samples >= 1,
                 f"evaluate.max_samples={self.max_samples} must be >= 1 or empty")


@dataclass(frozen=True)
class GateConfig:
    """Registry promotion gate: what a challenger must show before it may become champion."""

    min_recovery: float = 0.95
    max_sparsity_drift: float = 0.001

    def __post_init__(self) -> None:
        _require(0.0 <= self.min_recovery, f"gate.min_recovery={self.min_recovery} must be >= 0")
        _require(self.max_sparsity_drift >= 0, f"gate.max_sparsity_drift={self.max_sparsity_drift} must be >= 0")


@dataclass(frozen=True)
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    heal: HealConfig = field(default_factory=HealConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: Mapping[str, Any]) -> "PipelineConfig":
        """A copy with some fields changed: `cfg.replace(heal={"epochs": 3})`."""
        return from_dict({**self.to_dict(), **{k: {**self.to_dict()[k], **v} for k, v in sections.items()}})


def _build(cls: type, section: str, values: Mapping[str, Any]) -> Any:
    if not isinstance(values, Mapping):
        raise StarfishError(f"{section} must be a mapping of fields, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise StarfishError(f"{section}: unknown field(s) {unknown}; known: {sorted(fields)}")
    typed = {}
    for name, value in values.items():
        typed[name] = _coerce(f"{section}.{name}", fields[name].type, value)
    return cls(**typed)


def _coerce(where: str, annotation: str, value: Any) -> Any:
    """Check a YAML/CLI value against the field's annotation (kept as a string by `from __future__`)."""
    optional = "None" in annotation
    if value is None:
        _require(optional, f"{where} must not be empty")
        return None
    base = annotation.replace(" | None", "")
    if base == "bool":
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        _require(isinstance(value, bool), f"{where}={value!r} must be true or false")
        return value
    if base in ("int", "float"):
        kind = int if base == "int" else float
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise StarfishError(f"{where}={value!r} must be a number ({base})") from None
        _require(not isinstance(value, bool) and (base == "float" or float(value) == number),
                 f"{where}={value!r} must be {base}")
        return number
    return str(value)


_SECTION_CLASSES = {"data": DataConfig, "model": ModelConfig, "calibration": CalibrationConfig,
                    "prune": PruneConfig, "heal": HealConfig, "evaluate": EvalConfig, "gate": GateConfig}


def from_dict(values: Mapping[str, Any]) -> PipelineConfig:
    """Validate a nested mapping (params.yaml's content) into a PipelineConfig."""
    values = values or {}
    unknown = sorted(set(values) - set(_SECTION_CLASSES))
    if unknown:
        raise StarfishError(f"unknown section(s) {unknown}; known: {sorted(_SECTION_CLASSES)}")
    return PipelineConfig(**{name: _build(cls, name, values.get(name) or {})
                             for name, cls in _SECTION_CLASSES.items()})


def _override_value(section: str, name: str, raw: str) -> Any:
    """An override's value parsed as YAML, except that text fields keep the text as typed
    (YAML would read `prune.nm=2:4` as the base-60 integer 124)."""
    if not raw:
        return None
    parsed = yaml.safe_load(raw)
    cls = _SECTION_CLASSES.get(section)
    annotation = {f.name: f.type for f in dataclasses.fields(cls)}.get(name, "") if cls else ""
    if annotation.replace(" | None", "") == "str" and parsed is not None and not isinstance(parsed, str):
        return raw
    return parsed


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read params.yaml (defaults if `path` is None), then apply `section.field=value` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise StarfishError(f"params file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise StarfishError(f"params file {path} is not valid YAML: {exc}") from exc
        if not isinstance(values, dict):
            raise StarfishError(f"params file {path} must hold a mapping of sections")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise StarfishError(f"override {item!r} must look like section.field=value, e.g. heal.epochs=5")
        values.setdefault(section, {})
        if not isinstance(values[section], dict):
            raise StarfishError(f"{section} in {path} must be a mapping")
        values[section][name] = _override_value(section, name, raw)
    return from_dict(values)
