"""Pipeline configuration (read by starfish/params.py): frozen pydantic dataclasses with types,
`Literal` choices and bounds on the fields, and what spans fields checked after them. Every problem
is one `StarfishError` naming the field (`section.field`) and the fix."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal, Mapping

from pydantic import ConfigDict, Field, TypeAdapter
from pydantic.dataclasses import dataclass

from starfish.catalog import (
    BATCHNORM_MODES,
    HEALERS,
    PRUNERS,
    QUANT_MODES,
    check_scope,
    check_sparsity,
    check_structure_fields,
    parse_nm,
    parse_structure,
)
from starfish.datasets import DATASET_KINDS, FASHION_MNIST_ROOT
from starfish.errors import one_line_errors, require
from starfish.precision import PRECISIONS, resolve_device
from starfish.recipes import (
    AUTHORS_STEPS,
    BUDGET_FIELDS,
    PRESETS,
    RECIPES,
    SHARED_FIELDS,
    layer_heal_fields,
    preset_fields,
)

# timm arguments a config or a checkpoint may not pass: the model section has its own fields for
# the first two, and the others make timm read files or the hub. `pretrained_cfg_overlay` may set
# only how images are prepared (a CNN's input size, say): its other keys name weight files.
RESERVED_KWARGS = ("pretrained", "num_classes", "checkpoint_path", "pretrained_cfg", "cache_dir")
OVERLAY_KEYS = ("input_size", "test_input_size", "mean", "std", "crop_pct", "interpolation")


def kwargs_problem(kwargs: Mapping[str, Any]) -> str | None:
    """Why these timm kwargs may not be passed (None when they may)."""
    taken = sorted(set(kwargs) & set(RESERVED_KWARGS))
    if taken:
        return f"sets {taken}, which starfish never passes to timm"
    overlay = kwargs.get("pretrained_cfg_overlay", {})
    if not isinstance(overlay, Mapping) or set(overlay) - set(OVERLAY_KEYS):
        return (f"sets pretrained_cfg_overlay={overlay!r}: starfish passes only its {', '.join(OVERLAY_KEYS)} "
                "to timm")
    return None


_LAX = ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True)  # "5" is 5, 24 is "24"


def config_section(name: str) -> Callable[[type], type]:
    """A frozen pydantic dataclass whose validation errors are one StarfishError naming `name.field`."""
    return lambda cls: one_line_errors(name, dataclass(frozen=True, config=_LAX)(cls))


@config_section("data")
class DataConfig:
    kind: Literal[DATASET_KINDS] = "fashion-mnist"
    root: str = FASHION_MNIST_ROOT
    num_workers: int | None = Field(None, ge=0, description="loader processes; empty: auto (datasets.loader_workers)")


@config_section("model")
class ModelConfig:
    name: str = "starfish_vit_fmnist"
    checkpoint: str | None = "data/demo/starfish_vit_fmnist.safetensors"
    pretrained: bool = False
    num_classes: int | None = None
    device: str = "auto"
    kwargs: dict[str, Any] = Field(default_factory=dict, description="for timm.create_model, e.g. {img_size: 384}")

    def __post_init__(self) -> None:
        resolve_device(self.device)
        problem = kwargs_problem(self.kwargs)
        require(problem is None, f"model.kwargs {problem}: use model.checkpoint, model.pretrained and "
                                 "model.num_classes for the model's weights and classes")


@config_section("calibration")
class CalibrationConfig:
    fraction: float = Field(0.004, gt=0, le=1, description="of the training images, sampled; the paper uses 0.004")
    seed: int = 0


@config_section("prune")
class PruneConfig:
    method: str = "magnitude"
    sparsity: float = 0.5
    nm: str = "2:4"
    global_ranking: bool = False
    scope: str = Field("default", description="a preset (pruning/pruners.py SCOPE_PRESETS) or module-name patterns")
    structure: str = Field("unstructured", description="unstructured, or units: neurons, heads, channels, joined "
                           "by + (pruning/groups.py); sparsity is then the fraction of each layer's units removed")
    slim: bool = Field(True, description="structured: write the smaller model (false: dense shapes, units masked)")
    allocation: Literal["uniform", "block-loss"] = Field(
        "uniform", description="structured: the same fraction in every layer, or more from the blocks whose removal "
        "moves the block outputs least (STARFISH's loss, unhealed)")
    depth: int = Field(0, ge=0, description="structured: whole blocks removed, those whose removal moves the block "
                       "outputs least; the rest of prune.sparsity comes evenly from the other blocks")

    def __post_init__(self) -> None:
        PRUNERS.get(self.method)
        check_sparsity(self.sparsity, "units of each layer" if self.structured else "weights")
        require(not (self.structured and self.sparsity == 0),
                f"prune.sparsity=0 with prune.structure={self.structure} removes no units, so the slim model would "
                "be the dense one; raise prune.sparsity, or set prune.structure=unstructured")
        parse_nm(self.nm)
        check_scope(self.scope)
        check_structure_fields(self.method, self.structure, self.scope)
        require(self.allocation == "uniform" or (self.structure != "unstructured" and not self.global_ranking),
                f"prune.allocation={self.allocation} shares out whole units per block: set prune.structure, and "
                "prune.global_ranking=false")
        require(not self.depth or (set(parse_structure(self.structure)) in ({"neurons"}, {"heads"},
                                                                             {"neurons", "heads"})
                                   and not self.global_ranking and self.allocation == "uniform"),
                f"prune.depth={self.depth} removes whole transformer blocks (their neurons and heads): set "
                "prune.structure=neurons+heads, prune.global_ranking=false and prune.allocation=uniform")
        require(PRUNERS.get(self.method).unit_scores is not None or (self.allocation == "uniform" and not self.depth),
                f"prune.method={self.method} chooses its own units, so prune.allocation={self.allocation} and "
                f"prune.depth={self.depth} cannot share them out; set prune.allocation=uniform and prune.depth=0, "
                "or a pruner that scores units (" + ", ".join(n for n in PRUNERS.names() if PRUNERS.get(n).unit_scores)
                + ")")

    @property
    def structured(self) -> bool:
        return self.structure != "unstructured"

    @property
    def reads_images(self) -> bool:
        """Whether pruning runs the model on the calibration split: the pruner's scores, or the
        block loss that allocation and depth are chosen by."""
        return PRUNERS.get(self.method).reads_images or self.allocation == "block-loss" or self.depth > 0


# The parts of the heal section each healer reads (catalog.HealerSpec.reads): views over its
# fields, so a healer's signature says what it depends on and a test can build one part alone.
@dataclasses.dataclass(frozen=True)
class Training:
    """A gradient heal's schedule: Adam over a step budget, the held-out slice that picks the
    state kept, BatchNorm, and where the dense states it aligns to live (healing/targets.py)."""

    steps: int | None
    epochs: int | None
    batch_size: int
    lr: float
    lr_min: float
    seed: int
    holdout: float
    holdout_every: int
    keep: str
    batchnorm: str
    cache: str
    cache_dtype: str

    def total_steps(self, num_images: int) -> int:
        """Adam steps this budget takes on `num_images` training images."""
        return self.steps if self.steps is not None else self.epochs * math.ceil(num_images / self.batch_size)


@dataclasses.dataclass(frozen=True)
class Alignment:
    """What STARFISH aligns and how: the dense states, their loss, the logit term, the warm start."""

    states: str
    loss: str
    logit_weight: float
    temperature: float
    warm_start: str


@dataclasses.dataclass(frozen=True)
class LeastSquares:
    """A layer-by-layer re-fit: its solver and damping, and how the layers' inputs are fed."""

    solver: str
    damp: float
    solve_memory_mb: int
    solve_dtype: str
    statistics_images: int | None
    batch_size: int
    cache: str


def _part(cls: type, values: Any) -> Any:
    return cls(**{field.name: getattr(values, field.name) for field in dataclasses.fields(cls)})


@config_section("heal")
class HealConfig:
    """Defaults: the authors' STARFISH recipe (block-output alignment, Adam at 6e-4, cosine to 1e-6,
    batch 32) at their step budget, with a held-out slice of the split that picks the best state.
    `steps` and `epochs` are alternatives (neither: the authors' 1,570 steps). `keep=last` keeps
    the final state unless the slice says it is worse than the start; `holdout=0` trains on all."""

    preset: Literal[PRESETS] = "default"  # starfish/recipes.py
    method: str = "starfish"
    steps: int | None = Field(None, ge=1, description="total Adam steps, cosine schedule over them")
    epochs: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(6e-4, gt=0)
    lr_min: float = Field(1e-6, ge=0)
    loss: Literal["cosine", "nmse"] = "cosine"
    states: str = "blocks"
    warm_start: Literal["none", "layerwise"] = "none"
    logit_weight: float = Field(0.0, ge=0, description="times the logit distillation loss, added to the states'")
    holdout: float = Field(0.1, ge=0, lt=0.5, description="the fraction of the split held out")
    holdout_every: int = Field(50, ge=1, description="steps between held-out measurements")
    keep: Literal["best", "last"] = "best"
    cache_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    cache: Literal["auto", "memory", "disk", "recompute"] = "auto"  # where the dense states live (healing/targets.py)
    batchnorm: Literal[BATCHNORM_MODES] = "train"  # healing/batchnorm.py
    damp: float = Field(0.01, ge=0)
    solver: Literal["exact", "cg"] = "exact"  # least squares: one system per output row, or one Hessian per layer
    solve_memory_mb: int = Field(1024, ge=1, description="layerwise: memory for the batched per-row solves")
    # float32: statistics and solves in float32, a solve redone in float64 where its residual says so
    solve_dtype: Literal["float32", "float64"] = "float32"
    statistics_images: int | None = Field(None, ge=1, description="layerwise: at most this many calibration "
                                          "images (evenly spaced) feed the least-squares statistics; empty: all")
    precision: Literal[PRECISIONS] = "auto"
    grad_checkpointing: bool = False  # recompute block activations in backward: less memory, same result
    compile: bool = False  # torch.compile each block's forward: faster steps on a GPU after a compile
    quant: Literal[QUANT_MODES] = Field("none", description="heal through this int8 scheme (fake-quant, "
                                        "straight-through gradients); the quant.mode the model is served in")
    temperature: float = Field(1.0, gt=0)
    seed: int = 0

    def __post_init__(self) -> None:
        HEALERS.get(self.method)
        if self.steps is None and self.epochs is None:
            object.__setattr__(self, "steps", AUTHORS_STEPS)
        require((self.steps is None) != (self.epochs is None),
                f"heal.steps={self.steps} and heal.epochs={self.epochs}: set exactly one budget "
                "(e.g. --set heal.epochs= to count steps, or --set heal.steps= to count epochs)")
        require(self.lr_min <= self.lr, f"heal.lr={self.lr}, heal.lr_min={self.lr_min}: need lr_min <= lr")

    @classmethod
    def from_preset(cls, preset: str = "default", **fields: Any) -> "HealConfig":
        """The preset's fields, then `fields` on top: `HealConfig.from_preset("faithful", seed=1)`."""
        require(preset in PRESETS, f"heal.preset={preset!r}: use one of {list(PRESETS)}")
        return cls(**{**layer_heal_fields(preset_fields(preset), fields), "preset": preset})

    def total_steps(self, num_images: int) -> int:
        """Adam steps this budget takes on `num_images` training images."""
        return self.training.total_steps(num_images)

    @property
    def training(self) -> Training:
        return _part(Training, self)

    @property
    def alignment(self) -> Alignment:
        return _part(Alignment, self)

    @property
    def least_squares(self) -> LeastSquares:
        return _part(LeastSquares, self)


def recipe_config(base: HealConfig, name: str, seed: int | None = None, steps: int | None = None) -> HealConfig:
    """The heal config of recipe `name`: its preset and fields, plus `base`'s shared budget,
    batching and held-out slice, so every gradient healer gets the same steps. A preset that
    sets its own budget (faithful, fast) keeps all of it, unless `steps` sets every recipe's."""
    recipe = RECIPES.get(name)
    preset, fields = (name, {}) if recipe.is_preset else (recipe.base, dict(recipe.fields))
    own = set(preset_fields(preset))
    if own & set(BUDGET_FIELDS):
        own |= set(BUDGET_FIELDS)
    shared = {field: getattr(base, field) for field in SHARED_FIELDS if field not in own}
    budget = {"steps": steps, "epochs": None} if steps is not None else {}
    return type(base).from_preset(preset, **{**shared, **fields, **budget}, seed=base.seed if seed is None else seed)


@config_section("quant")
class QuantConfig:
    """How the served model is quantized (starfish/quant): `none` serves it in float;
    `int8-dynamic` and `int8-static` write an onnxruntime int8 model (static: activation ranges
    measured on the calibration split)."""

    mode: Literal[QUANT_MODES] = "none"


@config_section("evaluate")
class EvalConfig:
    batch_size: int = Field(500, ge=1)
    max_samples: int | None = Field(None, ge=1, description="evaluate on the first N images of the split; empty: all")
    precision: Literal[PRECISIONS] = "auto"
    split: str = "test"  # the labelled split evaluated: `test` for Fashion-MNIST, `val` for an ImageNet tree

    def __post_init__(self) -> None:
        require(bool(self.split) and self.split != "train",
                f"evaluate.split={self.split!r}: name a held-out split (test, or val for an ImageNet tree)")


@config_section("gate")
class GateConfig:
    """Registry promotion gate: what a challenger must show before it may become champion."""

    min_recovery: float = Field(0.95, ge=0)
    max_sparsity_drift: float = Field(0.001, ge=0)
    max_size_ratio: float | None = Field(None, gt=0, description="registered file size over dense's; empty: none")
    max_flops_ratio: float | None = Field(None, gt=0, description="forward FLOPs over dense's; empty: none")


@config_section("serve")
class ServeConfig:
    """The bounds `starfish serve` puts on each request (starfish/serving.py); its flags win."""

    max_batch: int = Field(256, ge=1, description="most images one request may send (more: HTTP 400)")
    max_request_mb: float = Field(1024.0, gt=0, description="most memory one request's run may take, estimated "
                                  "from the ONNX graph's tensors (more: HTTP 400)")
    deadline_s: float = Field(30.0, gt=0, description="seconds of inference per request; an ONNX run is stopped "
                              "there (HTTP 504)")
    preflight_timeout_s: float = Field(120.0, gt=0, description="seconds the model may take to load and answer "
                                       "its input example before the server starts")
    threads: int = Field(0, ge=0, le=1024, description="onnxruntime threads per run; 0: its default, one per core")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)
    prune: PruneConfig = dataclasses.field(default_factory=PruneConfig)
    heal: HealConfig = dataclasses.field(default_factory=HealConfig)
    quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)
    evaluate: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    gate: GateConfig = dataclasses.field(default_factory=GateConfig)
    serve: ServeConfig = dataclasses.field(default_factory=ServeConfig)

    def __post_init__(self) -> None:
        require(self.heal.quant in ("none", self.quant.mode),
                f"heal.quant={self.heal.quant} but quant.mode={self.quant.mode}: a heal through the quantizer "
                "trains against the scheme the model is served in; set "
                + (f"quant.mode={self.heal.quant}" if self.quant.mode == "none" else f"heal.quant={self.quant.mode}")
                + " too, or heal.quant=none")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: Mapping[str, Any]) -> "PipelineConfig":
        """A copy with some fields changed: `cfg.replace(heal={"lr": 1e-3})`; naming a heal preset
        starts the heal section from that preset, not from the current values."""
        current = self.to_dict()
        changed = {k: (dict(v) if k == "heal" and "preset" in v
                       else layer_heal_fields(current[k], v) if k == "heal" else {**current[k], **v})
                   for k, v in sections.items()}
        return from_dict({**current, **changed})


SECTIONS = {field.name: field.default_factory for field in dataclasses.fields(PipelineConfig)}


def json_schema() -> dict[str, Any]:
    """The params.yaml schema, for editors and `starfish config --schema`."""
    return TypeAdapter(PipelineConfig).json_schema()


def _build(name: str, cls: type, values: Any) -> Any:
    require(isinstance(values, Mapping), f"{name} must be a mapping of fields, got {type(values).__name__}")
    return HealConfig.from_preset(**values) if cls is HealConfig else cls(**values)


def from_dict(values: Mapping[str, Any]) -> PipelineConfig:
    """Validate a nested mapping (params.yaml's content) into a PipelineConfig."""
    values = values or {}
    unknown = sorted(set(values) - set(SECTIONS))
    require(not unknown, f"unknown section(s) {unknown}; known: {sorted(SECTIONS)}")
    return PipelineConfig(**{name: _build(name, cls, values.get(name) or {}) for name, cls in SECTIONS.items()})
