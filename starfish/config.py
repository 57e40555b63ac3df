"""Pipeline configuration: frozen dataclasses, validated once, loaded from params.yaml.

Every check raises `StarfishError` naming the field (`section.field`) and what would fix it.
The same sections feed the CLI, the DVC stages and the Prefect flows. Method names are checked
against the pruner and healer registries, so this module imports the pruning and healing
packages; they name these classes in annotations only, never importing this module at run time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from starfish.datasets import DATASET_KINDS, FASHION_MNIST_ROOT
from starfish.errors import StarfishError
from starfish.healing import HEALERS
from starfish.models import kwargs_problem, resolve_device
from starfish.precision import PRECISIONS
from starfish.pruning.masks import check_sparsity, parse_nm
from starfish.pruning.pruners import PRUNERS, check_scope
from starfish.pruning.structured import STRUCTURED_METHODS, parse_structure

log = logging.getLogger(__name__)

LOSSES = ("cosine", "nmse")
WARM_STARTS = ("none", "layerwise")
KEEP = ("best", "last")
BATCHNORM_MODES = ("train", "frozen", "recalibrate")  # healing/batchnorm.py
SOLVERS = ("exact", "cg")  # healing/baselines.py: masked_least_squares, cg_least_squares
CACHE_MODES = ("auto", "memory", "disk", "recompute")


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


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise StarfishError(message)


@dataclass(frozen=True)
class DataConfig:
    kind: str = "fashion-mnist"
    root: str = FASHION_MNIST_ROOT
    num_workers: int | None = None  # loader processes; None: auto (datasets.loader_workers)

    def __post_init__(self) -> None:
        _require(self.kind in DATASET_KINDS, f"data.kind={self.kind!r}: use one of {list(DATASET_KINDS)}")
        _require(self.num_workers is None or self.num_workers >= 0,
                 f"data.num_workers={self.num_workers} must be >= 0, or empty for auto")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "starfish_vit_fmnist"
    checkpoint: str | None = "data/demo/starfish_vit_fmnist.safetensors"
    pretrained: bool = False
    num_classes: int | None = None
    device: str = "auto"
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model, e.g. {img_size: 384}

    def __post_init__(self) -> None:
        resolve_device(self.device)
        problem = kwargs_problem(self.kwargs)
        _require(problem is None, f"model.kwargs {problem}: use model.checkpoint, model.pretrained and "
                                  "model.num_classes for the model's weights and classes")


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
    scope: str = "default"  # a preset (pruning/pruners.py SCOPE_PRESETS) or comma-separated module-name patterns
    # unstructured (single weights), or whole units: neurons, heads, channels, or several joined by +
    # (pruning/structured.py); `sparsity` is then the fraction of each layer's units removed.
    structure: str = "unstructured"
    slim: bool = True  # structured: write the smaller model (false: the dense shapes with the units masked)

    def __post_init__(self) -> None:
        PRUNERS.get(self.method)
        check_sparsity(self.sparsity)
        parse_nm(self.nm)
        check_scope(self.scope)
        parse_structure(self.structure)
        _require(self.structure == "unstructured" or self.method in STRUCTURED_METHODS,
                 f"prune.method={self.method!r} prunes single weights; prune.structure={self.structure!r} "
                 "takes magnitude, wanda or torch-pruning")
        _require(self.structure != "unstructured" or self.method != "torch-pruning",
                 "prune.method=torch-pruning removes whole units: set prune.structure (e.g. neurons+heads)")
        _require(self.structure == "unstructured" or self.scope == "default",
                 f"prune.scope={self.scope!r} chooses layers for unstructured pruning; prune.structure="
                 f"{self.structure!r} prunes every unit of its kind: leave prune.scope at default")

    @property
    def structured(self) -> bool:
        return self.structure != "unstructured"


# The authors' budget: 10 epochs of 5,000 calibration images (0.4% of ImageNet) at batch 32.
AUTHORS_STEPS = 10 * math.ceil(5000 / 32)  # 1,570 Adam steps

# Named heal presets: the HealConfig fields each one sets. Layering: built-in defaults < the
# preset < the fields the user sets (in params.yaml or with --set), so params.yaml names only
# what its user chose.
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


def layer_heal_fields(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`top` over `base`; a budget given in `top` alone (steps or epochs) replaces the other one,
    so `--set heal.epochs=5` over a steps budget counts epochs. Both in `top` stay an error."""
    merged = {**base, **top}
    for given, other in (("steps", "epochs"), ("epochs", "steps")):
        if top.get(given) is not None and other not in top:
            merged[other] = None
    return merged


@dataclass(frozen=True)
class HealConfig:
    """Defaults: the authors' public STARFISH recipe (block-output alignment, Adam at 6e-4 with a
    cosine schedule to 1e-6, batch 32; `starfish.healing.starfish`) at their step budget, not their
    epoch count, with a held-out slice of the calibration split that picks the best state.

    `steps` (total Adam steps, cosine schedule over them) and `epochs` are alternatives: at
    most one is given, and with neither the budget is the authors' 1,570 steps. `holdout` is
    the fraction of the split kept out of training and used to measure alignment every
    `holdout_every` steps; `keep=best` returns the state with the lowest held-out loss,
    `keep=last` the final one unless the held-out loss says it is worse than the start. Either
    way the result is never worse on the slice than the pruned model. `holdout=0` trains on all
    of it and returns the last state. `logit_weight` adds that many times the logit
    distillation loss to the block alignment. `batchnorm` is how BatchNorm layers heal
    (`starfish.healing.batchnorm`); `solver` how the least-squares re-fit (the `layerwise`
    healer and warm start) solves its masked systems.
    """

    preset: str = "default"
    method: str = "starfish"
    steps: int | None = None  # None with epochs None: the authors' AUTHORS_STEPS
    epochs: int | None = None
    batch_size: int = 32
    lr: float = 6e-4
    lr_min: float = 1e-6
    loss: str = "cosine"
    states: str = "blocks"
    warm_start: str = "none"
    logit_weight: float = 0.0
    holdout: float = 0.1
    holdout_every: int = 50
    keep: str = "best"
    cache_dtype: str = "float16"
    cache: str = "auto"  # where the dense states live: memory | disk | recompute | auto (healing/targets.py)
    batchnorm: str = "train"
    damp: float = 0.01
    solver: str = "exact"  # exact: one system per output row; cg: one Hessian per layer
    solve_memory_mb: int = 1024  # layerwise: memory for the batched per-row solves (baselines.solve_rows)
    precision: str = "auto"  # auto | fp32 | tf32 | bf16 (starfish/precision.py)
    grad_checkpointing: bool = False  # recompute block activations in backward: less memory, same result
    compile: bool = False  # torch.compile each block's forward: faster steps on a GPU after a compile
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.preset in HEAL_PRESETS, f"heal.preset={self.preset!r}: use one of {list(HEAL_PRESETS)}")
        HEALERS.get(self.method)
        if self.steps is None and self.epochs is None:
            object.__setattr__(self, "steps", AUTHORS_STEPS)
        _require((self.steps is None) != (self.epochs is None),
                 f"heal.steps={self.steps} and heal.epochs={self.epochs}: set exactly one budget "
                 "(e.g. --set heal.epochs= to count steps, or --set heal.steps= to count epochs)")
        _require(self.steps is None or self.steps >= 1, f"heal.steps={self.steps} must be >= 1")
        _require(self.epochs is None or self.epochs >= 1, f"heal.epochs={self.epochs} must be >= 1")
        _require(self.batch_size >= 1, f"heal.batch_size={self.batch_size} must be >= 1")
        _require(self.lr > 0 and 0 <= self.lr_min <= self.lr,
                 f"heal.lr={self.lr}, heal.lr_min={self.lr_min}: need 0 <= lr_min <= lr and lr > 0")
        _require(self.loss in LOSSES, f"heal.loss={self.loss!r}: use one of {list(LOSSES)}")
        _require(self.warm_start in WARM_STARTS, f"heal.warm_start={self.warm_start!r}: use one of {list(WARM_STARTS)}")
        _require(self.logit_weight >= 0, f"heal.logit_weight={self.logit_weight} must be >= 0")
        _require(0.0 <= self.holdout < 0.5,
                 f"heal.holdout={self.holdout} must be in [0, 0.5): the fraction of the split held out")
        _require(self.holdout_every >= 1, f"heal.holdout_every={self.holdout_every} must be >= 1")
        _require(self.keep in KEEP, f"heal.keep={self.keep!r}: use one of {list(KEEP)}")
        _require(self.cache_dtype in ("float16", "bfloat16", "float32"),
                 f"heal.cache_dtype={self.cache_dtype!r}: use float16, bfloat16 or float32")
        _require(self.cache in CACHE_MODES, f"heal.cache={self.cache!r}: use one of {list(CACHE_MODES)}")
        _require(self.batchnorm in BATCHNORM_MODES,
                 f"heal.batchnorm={self.batchnorm!r}: use one of {list(BATCHNORM_MODES)}")
        _require(self.damp >= 0, f"heal.damp={self.damp} must be >= 0")
        _require(self.solver in SOLVERS, f"heal.solver={self.solver!r}: use one of {list(SOLVERS)}")
        _require(self.solve_memory_mb >= 1, f"heal.solve_memory_mb={self.solve_memory_mb} must be >= 1")
        _require(self.precision in PRECISIONS, f"heal.precision={self.precision!r}: use one of {list(PRECISIONS)}")
        _require(self.temperature > 0, f"heal.temperature={self.temperature} must be > 0")

    @classmethod
    def from_preset(cls, preset: str = "default", **fields: Any) -> "HealConfig":
        """The preset's fields, then `fields` on top: `HealConfig.from_preset("faithful", seed=1)`."""
        _require(preset in HEAL_PRESETS, f"heal.preset={preset!r}: use one of {list(HEAL_PRESETS)}")
        return cls(**{**layer_heal_fields(HEAL_PRESETS[preset], fields), "preset": preset})

    def total_steps(self, num_images: int) -> int:
        """Adam steps this budget takes on `num_images` training images."""
        return self.steps if self.steps is not None else self.epochs * math.ceil(num_images / self.batch_size)


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
    # STARFISH with a logit term, or a larger step, on structured removal (results/bench_structured/vit_variants)
    "starfish-logit": {"logit_weight": 1.0},
    "starfish-lr1e-3": {"lr": 1e-3},
    # heal.batchnorm, each mode named (results/batchnorm)
    **{f"starfish-bn-{mode}": {"batchnorm": mode} for mode in BATCHNORM_MODES},
    # the fast preset's learning rate against the alternatives (results/fast_lr)
    **{f"fast-lr{lr:g}": {"preset": "fast", "lr": lr} for lr in (6e-4, 1e-3, 4e-3)},
}
# Fields every variant takes from the pipeline's heal section (the shared budget, batching and
# held-out slice), unless its preset sets them itself.
SHARED_FIELDS = ("steps", "epochs", "batch_size", "cache_dtype", "holdout", "holdout_every")
BUDGET_FIELDS = ("steps", "epochs")


def variant_config(base: HealConfig, name: str, seed: int | None = None, steps: int | None = None) -> HealConfig:
    """The heal config of variant `name`: its preset and fields, plus `base`'s shared budget,
    batching and held-out slice, so every gradient healer gets the same steps. A preset that
    sets its own budget (faithful, fast) keeps all of it, unless `steps` sets every variant's."""
    if name not in VARIANTS:
        raise StarfishError(f"unknown healer variant {name!r}; use one of {list(VARIANTS)}")
    fields = dict(VARIANTS[name])
    preset = fields.pop("preset", "default")
    own = set(HEAL_PRESETS[preset])
    if own & set(BUDGET_FIELDS):
        own |= set(BUDGET_FIELDS)
    shared = {field: getattr(base, field) for field in SHARED_FIELDS if field not in own}
    budget = {"steps": steps, "epochs": None} if steps is not None else {}
    return HealConfig.from_preset(preset, **{**shared, **fields, **budget}, seed=base.seed if seed is None else seed)


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 500
    max_samples: int | None = None  # evaluate on the first N images of the split (None: all)
    precision: str = "auto"  # as heal.precision
    split: str = "test"  # the labelled split evaluated: `test` for Fashion-MNIST, `val` for an ImageNet tree

    def __post_init__(self) -> None:
        _require(self.precision in PRECISIONS, f"evaluate.precision={self.precision!r}: use one of {list(PRECISIONS)}")
        _require(self.batch_size >= 1, f"evaluate.batch_size={self.batch_size} must be >= 1")
        _require(self.max_samples is None or self.max_samples >= 1,
                 f"evaluate.max_samples={self.max_samples} must be >= 1 or empty")
        _require(bool(self.split) and self.split != "train",
                 f"evaluate.split={self.split!r}: name a held-out split (test, or val for an ImageNet tree)")


@dataclass(frozen=True)
class GateConfig:
    """Registry promotion gate: what a challenger must show before it may become champion."""

    min_recovery: float = 0.95
    max_sparsity_drift: float = 0.001
    max_size_ratio: float | None = None  # the registered file's size over dense's (version tag size_ratio)
    max_flops_ratio: float | None = None  # the healed model's forward FLOPs over dense's (structured pruning)

    def __post_init__(self) -> None:
        _require(0.0 <= self.min_recovery, f"gate.min_recovery={self.min_recovery} must be >= 0")
        _require(self.max_size_ratio is None or self.max_size_ratio > 0,
                 f"gate.max_size_ratio={self.max_size_ratio} must be > 0, or empty for no limit")
        _require(self.max_flops_ratio is None or self.max_flops_ratio > 0,
                 f"gate.max_flops_ratio={self.max_flops_ratio} must be > 0, or empty for no limit")
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
        """A copy with some fields changed: `cfg.replace(heal={"lr": 1e-3})`.

        Naming a heal preset starts the heal section from that preset, not from the current values.
        """
        current = self.to_dict()
        changed = {k: (dict(v) if k == "heal" and "preset" in v
                       else layer_heal_fields(current[k], v) if k == "heal" else {**current[k], **v})
                   for k, v in sections.items()}
        return from_dict({**current, **changed})


def _build(cls: type, section: str, values: Mapping[str, Any]) -> Any:
    if not isinstance(values, Mapping):
        raise StarfishError(f"{section} must be a mapping of fields, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise StarfishError(f"{section}: unknown field(s) {unknown}; known: {sorted(fields)}")
    typed = {name: _coerce(f"{section}.{name}", fields[name].type, value) for name, value in values.items()}
    if cls is HealConfig:
        return HealConfig.from_preset(typed.pop("preset", "default"), **typed)
    return cls(**typed)


def _coerce(where: str, annotation: str, value: Any) -> Any:
    """Check a YAML/CLI value against the field's annotation (kept as a string by `from __future__`)."""
    optional = "None" in annotation
    if value is None:
        _require(optional, f"{where} must not be empty")
        return None
    base = annotation.replace(" | None", "")
    if base.startswith("dict"):
        _require(isinstance(value, Mapping) and all(isinstance(key, str) for key in value),
                 f"{where}={value!r} must be a mapping of names to values, e.g. {{img_size: 384}}")
        return dict(value)
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
        except OverflowError:  # int(inf)
            raise StarfishError(f"{where}={value!r} must be a finite number") from None
        _require(not isinstance(value, bool) and (base == "float" or float(value) == number),
                 f"{where}={value!r} must be {base}")
        _require(math.isfinite(number), f"{where}={value!r} must be a finite number")
        return number
    return str(value)


# How a step runs, not what it computes: left out of the fingerprints and cache keys of results,
# so setting one (or adding one to the config) never invalidates a result.
EXECUTION_FIELDS = {"data": {"num_workers"}, "heal": {"cache", "solve_memory_mb", "grad_checkpointing", "compile"}}
# Values that reproduce what results were before their field existed: left out too, so older
# fingerprints stay valid. An empty `model.kwargs` is the model as it was; BatchNorm was frozen and
# the least-squares solve exact before `heal.batchnorm` and `heal.solver`; `precision` `fp32`,
# and `auto` on a CPU, compute what every result before the field did (the device, as with
# `model.device=auto`, is not part of a fingerprint); `evaluate.split=test` is the split every earlier result used.
NEUTRAL_VALUES = {("model", "kwargs"): ({},), ("heal", "precision"): ("auto", "fp32"),
                  ("heal", "batchnorm"): ("frozen",), ("heal", "solver"): ("exact",),
                  ("evaluate", "precision"): ("auto", "fp32"), ("evaluate", "split"): ("test",),
                  ("prune", "scope"): ("default",)}


def result_fields(section: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """A config section's fields that decide its results: no execution fields, no neutral values."""
    return {key: value for key, value in values.items() if key not in EXECUTION_FIELDS.get(section, ())
            and value not in NEUTRAL_VALUES.get((section, key), ())}


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


def _override_yaml(key: str, raw: str) -> Any:
    try:
        return read_yaml(raw)
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0]
        raise StarfishError(f"--set {key}={raw}: the value is not valid YAML ({problem}); quote it, "
                            f"e.g. --set {key}='\"{raw}\"'") from None


def _override_value(section: str, name: str, raw: str) -> Any:
    """An override's value parsed as YAML 1.2, except that text fields keep the text as typed
    (`model.name=1e3` is the name, not a number)."""
    if not raw:
        return None
    cls = _SECTION_CLASSES.get(section)
    annotation = {f.name: f.type for f in dataclasses.fields(cls)}.get(name, "") if cls else ""
    if annotation.replace(" | None", "") == "str":
        try:
            parsed = read_yaml(raw)
        except yaml.YAMLError:  # text as typed, such as a scope of patterns
            return raw
        return raw if parsed is not None and not isinstance(parsed, str) else parsed
    return _override_yaml(f"{section}.{name}", raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read params.yaml (defaults if `path` is None), then apply `section.field=value` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise StarfishError(f"params file {path} does not exist")
        try:
            values = read_yaml(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise StarfishError(f"params file {path} is not valid YAML: {exc}") from exc
        if not isinstance(values, dict):
            raise StarfishError(f"params file {path} must hold a mapping of sections")
    overridden: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise StarfishError(f"override {item!r} must look like section.field=value, e.g. heal.epochs=5")
        values.setdefault(section, {})
        if not isinstance(values[section], dict):
            raise StarfishError(f"{section} in {path} must be a mapping")
        name, dot, key = name.partition(".")  # model.kwargs.img_size=384 sets one entry of a mapping field
        value = _override_value(section, name, raw) if not dot else _override_yaml(f"{section}.{name}.{key}", raw)
        if dot:
            entries = values[section].get(name) or {}
            if not isinstance(entries, dict):
                raise StarfishError(f"{section}.{name} in {path} must be a mapping to set {section}.{name}.{key}")
            value = {**entries, key: value}
        values[section][name] = value
        if section == "heal":
            overridden[name] = values[section][name]
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
    own = HEAL_PRESETS[heal.preset]
    given = {key: value for key, value in explicit.items() if key != "preset"}
    replaced = [f"{key} (preset: {own[key]!r})" for key in given if key in own and own[key] != getattr(heal, key)]
    log.log(logging.INFO if replaced else logging.DEBUG, "heal preset %r sets %s; set on top: %s%s", heal.preset,
            own or "nothing", given or "nothing", f"; replacing the preset's {', '.join(replaced)}" if replaced else "")
