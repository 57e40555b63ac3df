"""The pruners' code, dispatched by their entries in `catalog.PRUNERS`. Single weights:

    pruner(model, weights, images, cfg) -> masks

`weights` are the scope's `{parameter name: weight}` (`scope_weights`), `images` the calibration
images (None for pruners that read none), `cfg` a `PruneConfig` (`method`, `sparsity`, `nm`,
`global_ranking`). Whole units: a scorer, `(model, groups, images) -> {group: scores}`, whose
lowest units the shared ranking removes, or a chooser that picks them itself. A pruner never
changes the model; `sparsify_` applies the masks.

Scope is chosen by a `(module name, module) -> bool` predicate; the default keeps to the Linear
layers inside the blocks (attn.qkv, attn.proj, mlp.fc1, mlp.fc2) and the convolutions inside
CNN stages, never the patch embedding, the stem or the head.
"""

from __future__ import annotations

import fnmatch
import logging
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import torch
from torch import nn

from starfish.capture import ActivationCapture, stage_names
from starfish.catalog import PRUNERS, SCOPE_PRESETS, PrunerSpec, check_scope, is_scope_pattern, parse_nm
from starfish.errors import StarfishError
from starfish.losses import cosine_loss  # the loss STARFISH heals with: each block's sensitivity
from starfish.pruning import masks as M
from starfish.pruning.groups import Group, StructurePlan
from starfish.pruning.masks import Masks
from starfish.pruning.slim import cost_ratios, kept_by_group, model_cost, slim_, slim_masks
from starfish.pruning.structured import contributions, masks_removing, structured_masks, unit_scores
from starfish.registry import load

if TYPE_CHECKING:
    from starfish.config import PruneConfig

log = logging.getLogger(__name__)

ScopePredicate = Callable[[str, nn.Module], bool]
NM_GROUP_SIZES = (4, 8, 10, 16, 20)


# What a Linear layer does in a transformer block, from its name's parts: timm's ViT, DeiT,
# Swin, ConvNeXt (attn.qkv, attn.proj, mlp.fc1, mlp.fc2) and LeViT (attn.qkv.linear,
# attn.proj.ln.linear, mlp.ln1.linear).
_ATTENTION_IN = {"qkv", "q", "k", "v", "kv"}


def linear_role(name: str) -> str | None:
    """`qk` (query or key), `v`, `qkv` (fused), `out` (attention output) or `mlp`; None for others."""
    parts = name.split(".")
    found = [part for part in parts if part in _ATTENTION_IN]
    if found:
        return {"q": "qk", "k": "qk", "v": "v"}.get(found[-1], "qkv")
    if parts[-1] == "proj" or ("proj" in parts and any(part.startswith("attn") for part in parts)):
        return "out"
    if "mlp" in parts or parts[-1] in ("fc1", "fc2"):
        return "mlp"
    return None


def _is_depthwise(module: nn.Conv2d) -> bool:
    return module.groups == module.in_channels and module.in_channels > 1


def resolve_scope(model: nn.Module, scope: str = "default") -> ScopePredicate:
    """The predicate for `prune.scope`: a preset, or comma-separated fnmatch patterns over module
    names (any Linear or Conv2d they name, wherever it is). A pattern that names nothing fails."""
    check_scope(scope)
    if scope in SCOPE_PRESETS:
        return _preset_scope(model, scope)
    patterns = [pattern.strip() for pattern in scope.split(",") if pattern.strip()]
    modules = [(name, module) for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in modules):
            example = modules[0][0] if modules else "none"
            raise StarfishError(f"prune.scope pattern {pattern!r} names no Linear or Conv2d layer of "
                                f"{type(model).__name__} (e.g. {example}); fix the pattern")
    return lambda name, module: isinstance(module, (nn.Linear, nn.Conv2d)) and any(
        fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _preset_scope(model: nn.Module, preset: str) -> ScopePredicate:
    roles, convs = SCOPE_PRESETS[preset]
    inside = _inside_stages(model)

    def in_scope(name: str, module: nn.Module) -> bool:
        if not inside(name):
            return False
        if isinstance(module, nn.Linear):
            return (linear_role(name) or "other") in roles
        if isinstance(module, nn.Conv2d):
            return convs == "all" or (convs == "dense" and not _is_depthwise(module))
        return False

    return in_scope


def _inside_stages(model: nn.Module) -> Callable[[str], bool]:
    try:
        prefixes = tuple(f"{name}." for name in stage_names(model))
    except StarfishError as exc:
        raise StarfishError(f"{exc}, so the pruning scope presets (layers inside its stages) select nothing; "
                            "name the layers with prune.scope patterns") from None
    return lambda name: name.startswith(prefixes)


def default_scope(model: nn.Module) -> ScopePredicate:
    """The predicate for `model`'s default scope: prunable layers inside its stages.

    Stages, not blocks: a stage may hold layers outside its blocks (ConvNeXt's downsample conv).
    Linear layers by their role in a transformer block (attention in and out, MLP); convolutions
    unless depthwise (`groups == in_channels`, the authors' rule), so grouped convolutions
    (RegNet's) are pruned too.
    """
    return _preset_scope(model, "default")


def scope_weights(model: nn.Module, predicate: ScopePredicate | None = None) -> dict[str, nn.Parameter]:
    """`{parameter name: weight}` of every module the predicate selects, in forward order."""
    predicate = predicate or default_scope(model)
    weights = {f"{name}.weight": module.weight for name, module in model.named_modules()
               if name and predicate(name, module) and isinstance(getattr(module, "weight", None), nn.Parameter)}
    if not weights:
        raise StarfishError(f"the pruning scope selects no layers of {type(model).__name__}")
    return weights


@torch.no_grad()
def sparsify_(model: nn.Module, masks: Masks) -> nn.Module:
    """Set every weight whose mask is False to +0.0, in place (a product with the mask would leave
    -0.0 where a pruned weight was negative, and a file of the result would not be what a reader
    rebuilding zeros writes)."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].masked_fill_(~mask.to(params[name].device, torch.bool), 0.0)
    return model


def magnitude(model: nn.Module, weights: dict[str, nn.Parameter], images: torch.Tensor | None,
              cfg: "PruneConfig") -> Masks:
    """Smallest |w| first, per layer (every layer at exactly `sparsity`) or globally over the scope."""
    if cfg.global_ranking:
        return M.global_magnitude_masks(dict(weights), cfg.sparsity)
    return {name: M.magnitude_mask(weight, cfg.sparsity) for name, weight in weights.items()}


class InputNormAccumulator:
    """Running sum of squared inputs per input feature of each layer (Wanda's ||x_j||_2).

    Linear inputs are (..., features), whatever their rank: ConvNeXt feeds its MLP Linears
    channels-last (N, H, W, C) maps. Conv inputs (N, C, H, W), the layers named in
    `channels_first`, count per channel.
    """

    def __init__(self, channels_first: set[str] = frozenset()) -> None:
        self.sq_sums: dict[str, torch.Tensor] = {}
        self.channels_first = channels_first

    def __call__(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().float()
        flat = x.movedim(1, -1).reshape(-1, x.shape[1]) if name in self.channels_first else x.reshape(-1, x.shape[-1])
        self.sq_sums[name] = self.sq_sums.get(name, 0) + flat.pow(2).sum(dim=0)

    def norms(self, name: str) -> torch.Tensor:
        return self.sq_sums[name].sqrt()


@torch.no_grad()
def input_norms(model: nn.Module, layer_names: list[str], images: torch.Tensor,
                batch_size: int = 64) -> dict[str, torch.Tensor]:
    """||x_j||_2 over all calibration tokens of the inputs to each named layer."""
    modules = dict(model.named_modules())
    accumulator = InputNormAccumulator({name for name in layer_names if isinstance(modules[name], nn.Conv2d)})
    with ActivationCapture(model, layer_names, inputs=True, on_value=accumulator):
        for start in range(0, images.shape[0], batch_size):
            model(images[start : start + batch_size].to(next(model.parameters()).device))
    return {name: accumulator.norms(name) for name in layer_names}


def wanda(model: nn.Module, weights: dict[str, nn.Parameter], images: torch.Tensor | None,
          cfg: "PruneConfig") -> Masks:
    """Wanda: |W| * ||x|| ranked within each output row, norms from the calibration images.

    For a conv weight (out, in, kh, kw) each input channel's norm covers its kh*kw columns.
    """
    layers = [name.removesuffix(".weight") for name in weights]
    norms = input_norms(model, layers, images)
    modules = dict(model.named_modules())
    masks = {}
    for (name, weight), layer in zip(weights.items(), layers):
        masks[name] = M.row_mask(M.wanda_scores(weight, _column_norms(modules[layer], weight, norms[layer])),
                                 cfg.sparsity, weight.shape)
    return masks


def _column_norms(module: nn.Module, weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Input norms per weight column: a conv's channel norm covers its kh*kw columns, and each
    output row of a grouped conv sees only its own group's channels."""
    if weight.ndim != 4:
        return norms
    groups = getattr(module, "groups", 1)
    columns = norms.reshape(groups, -1).repeat_interleave(weight[0, 0].numel(), dim=1)  # (groups, columns)
    return columns[0] if groups == 1 else columns.repeat_interleave(weight.shape[0] // groups, dim=0)


def n_of_m(model: nn.Module, weights: dict[str, nn.Parameter], images: torch.Tensor | None,
           cfg: "PruneConfig") -> Masks:
    """Semi-structured N:M by magnitude; `sparsity` must equal 1 - N/M."""
    n, m = parse_nm(cfg.nm)
    if abs(cfg.sparsity - (1 - n / m)) > 1e-9:
        raise StarfishError(f"prune.nm={cfg.nm} gives sparsity {1 - n / m:g}, not prune.sparsity={cfg.sparsity:g}; "
                            f"set prune.sparsity={1 - n / m:g} or pick another N:M")
    if is_scope_pattern(cfg.scope):  # a layer the user named must be taken; under a preset it stays dense
        untiled = [f"{name} ({weight.shape[1]} inputs)" for name, weight in weights.items() if weight.shape[1] % m]
        if untiled:
            raise StarfishError(f"prune.nm={cfg.nm} cannot take {untiled[0]}{' and more' if len(untiled) > 1 else ''} "
                                f"named by prune.scope: its input channels do not tile by {m}; leave it out of the "
                                "scope")
    tiled = {name: weight for name, weight in weights.items() if weight.shape[1] % m == 0}
    if not tiled:
        raise StarfishError(f"prune.nm={cfg.nm}: no layer of the pruning scope has a multiple of {m} input "
                            "channels; pick another M")
    return {name: M.nm_mask(weight.detach().abs(), n, m) for name, weight in tiled.items()}


def nm_pattern_for(sparsity: float) -> str:
    """The N:M pattern with the smallest group size in NM_GROUP_SIZES that gives `sparsity` exactly."""
    for m in NM_GROUP_SIZES:
        n = (1 - sparsity) * m
        if abs(n - round(n)) < 1e-9 and 0 < round(n) < m:
            return f"{round(n)}:{m}"
    raise StarfishError(f"no N:M pattern with M in {NM_GROUP_SIZES} gives sparsity {sparsity:g}")


class Pruned(NamedTuple):
    """A pruner's masks, the layers it held back from the target (`{layer: why}`), and for whole
    units the plan they were chosen from."""

    masks: Masks
    held_back: dict[str, str]
    plan: StructurePlan | None = None


def prune(model: nn.Module, cfg: "PruneConfig", images: torch.Tensor | None = None,
          predicate: ScopePredicate | None = None) -> Pruned:
    """Masks for `model`'s scope (`predicate`, else `cfg.scope`) from the pruner `cfg.method`
    (the model is not changed), and the layers held back from `cfg.sparsity`."""
    spec = PRUNERS.get(cfg.method)
    if spec.reads_images and images is None:
        raise StarfishError(f"{cfg.method} needs calibration images; pass a calibration manifest")
    if cfg.structured:
        plan = StructurePlan.find(model, cfg.structure)
        return Pruned(_structured(model, spec, cfg, images, plan), {}, plan)
    weights = scope_weights(model, predicate or resolve_scope(model, cfg.scope))
    masks = load(spec.weights)(model, weights, images, cfg)
    held = _held_back(weights, masks, cfg, spec)
    if held:
        log.warning("%d layers are held back from prune.sparsity=%g: %s", len(held), cfg.sparsity,
                    "; ".join(f"{name}: {why}" for name, why in list(held.items())[:5])
                    + (" ..." if len(held) > 5 else ""))
    log.info("%s pruned %d layers to %.3f", cfg.method, len(masks), cfg.sparsity)
    return Pruned(masks, held)


def _structured(model: nn.Module, spec: PrunerSpec, cfg: "PruneConfig", images: torch.Tensor | None,
                plan: StructurePlan) -> Masks:
    """Masks removing whole units of the plan's groups: the pruner's scores ranked, in each group
    or shared out by block loss or depth, or the units its chooser picks."""
    groups = list(plan.groups)
    if spec.unit_chooser is not None:
        masks = load(spec.unit_chooser)(model, groups, cfg, images)
    else:
        scores = load(spec.unit_scores)(model, groups, images)
        amounts = None
        if cfg.allocation == "block-loss" or cfg.depth:
            if images is None:
                what = "prune.allocation=block-loss" if cfg.allocation == "block-loss" else f"prune.depth={cfg.depth}"
                raise StarfishError(f"{what} measures each block on calibration images; pass a calibration manifest")
            allocate = block_loss_amounts if cfg.allocation == "block-loss" else depth_amounts
            amounts = allocate(model, groups, cfg, scores, images)
        masks = structured_masks(model, groups, cfg, scores, amounts)
    log.info("%s removed %g of the %s of %d groups", cfg.method, cfg.sparsity, cfg.structure, len(groups))
    return masks


def remove_units_(model: nn.Module, masks: Masks, plan: StructurePlan, slim: bool = True,
                  image_size: tuple[int, ...] | None = None) -> tuple[Masks, dict[str, Any]]:
    """Zero the pruned units of `model` and, when `slim`, cut them out, in place: the masks the
    model has now (all True over a slim model's narrowed weights), and what went (the plan's
    report, with the parameters and FLOPs against the dense shapes on one image of `image_size`).
    The pipeline's prune step and the benchmarks all take this one path."""
    sparsify_(model, masks)
    report = plan.report(kept_by_group(model, masks, plan.groups))
    dense_cost = model_cost(model, image_size)
    if slim:
        slim_(model, masks, plan.groups)
        masks = slim_masks(model)
    report.update(cost_ratios(model_cost(model, image_size), dense_cost))
    return masks, report


def magnitude_scores(model: nn.Module, groups: list[Group], images: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Each unit's L2 norm over all its masked weights."""
    weights = dict(model.named_parameters())
    return {g.name: unit_scores(g, weights, None) for g in groups}


def wanda_scores(model: nn.Module, groups: list[Group], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Wanda's |W| * ||x|| summed over each unit's masked weights, every column scaled by its
    input's norm on the calibration images."""
    weights = dict(model.named_parameters())
    norms = _group_input_norms(model, groups, images)
    return {g.name: unit_scores(g, weights, norms) for g in groups}


def contribution_scores(model: nn.Module, groups: list[Group], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each unit adds to the output of the layer that reads it, on the calibration images
    (`structured.contributions`)."""
    weights = dict(model.named_parameters())
    norms = _group_input_norms(model, groups, images)
    return {g.name: contributions(g, weights, norms) for g in groups}


def _group_input_norms(model: nn.Module, groups: list[Group], images: torch.Tensor) -> dict[str, torch.Tensor]:
    return input_norms(model, sorted({member.key.removesuffix(".weight") for g in groups for member in g.masked}),
                       images)


SENSITIVITY_IMAGES = 64  # calibration images each block's sensitivity is measured on


class _BlockLoss:
    """STARFISH's loss, unhealed: the mean 1 - cosine of every block output of a pruned copy
    against the dense model's, on the first calibration images."""

    def __init__(self, model: nn.Module, groups: list, images: torch.Tensor) -> None:
        from starfish.capture import block_names

        self.model, self.blocks = model, block_names(model)
        self.batch = images[:SENSITIVITY_IMAGES].to(next(model.parameters()).device)
        self.dense = self._states(model)
        self.owner = {g.name: max((b for b in self.blocks if g.name == b or g.name.startswith(b + ".")), key=len,
                                  default=None) for g in groups}

    def _states(self, net: nn.Module) -> dict[str, torch.Tensor]:
        with ActivationCapture(net, self.blocks) as capture:
            net(self.batch)
            return dict(capture.values)

    def owned(self) -> list[str]:
        """The blocks that hold groups, in forward order."""
        return list(dict.fromkeys(b for b in self.owner.values() if b is not None))

    @torch.no_grad()
    def of(self, masks: Masks) -> float:
        import copy

        found = self._states(sparsify_(copy.deepcopy(self.model), masks))
        return max(float(sum(cosine_loss(found[b], self.dense[b]) for b in self.blocks)) / len(self.blocks), 1e-12)


def block_loss_amounts(model: nn.Module, groups: list, cfg: "PruneConfig", scores: dict[str, torch.Tensor],
                       images: torch.Tensor) -> dict[str, float]:
    """Per-group fractions to remove, from STARFISH's own loss: each block's groups are pruned
    alone at `cfg.sparsity` (by the same scores), and the block loss (`_BlockLoss`) is that
    block's sensitivity. Each structure's groups then lose units in inverse proportion to their
    block's sensitivity, their mean fraction `cfg.sparsity`, none beyond all but one unit
    (water-filling)."""
    loss = _BlockLoss(model, groups, images)
    owner = loss.owner
    sensitivity = {block: loss.of(structured_masks(model, [g for g in groups if owner[g.name] == block], cfg, scores))
                   for block in loss.owned()}
    amounts: dict[str, float] = {}
    for structure in {g.structure for g in groups}:
        members = [g for g in groups if g.structure == structure and owner[g.name] is not None]
        weights = {g.name: 1.0 / sensitivity[owner[g.name]] for g in members}
        caps = {g.name: (g.units - 1) / g.units for g in members}
        fixed: dict[str, float] = {}
        while True:  # give every group its share of what is left; a group over its cap is held at it
            free = [g.name for g in members if g.name not in fixed]
            left = cfg.sparsity * len(members) - sum(fixed.values())
            total = sum(weights[name] for name in free)
            share = {name: left * weights[name] / total for name in free}
            over = [name for name in free if share[name] > caps[name]]
            if not over:
                amounts.update(fixed, **share)
                break
            fixed.update({name: caps[name] for name in over})
    log.info("block-loss allocation: sensitivity %s; fractions %s",
             {b: round(v, 5) for b, v in sensitivity.items()}, {g: round(a, 3) for g, a in amounts.items()})
    return amounts


def depth_amounts(model: nn.Module, groups: list, cfg: "PruneConfig", scores: dict[str, torch.Tensor],
                  images: torch.Tensor) -> dict[str, float]:
    """Per-group fractions that remove `cfg.depth` whole blocks (every unit of their groups, so
    each leaves its residual path and biases) and take the rest of each structure's
    `cfg.sparsity` evenly from the other blocks (to the unit: each structure loses
    `round(cfg.sparsity * its units)`). The blocks removed are those whose removal
    alone moves the block outputs least (`_BlockLoss`, unhealed): the same label-free
    sensitivity as `block_loss_amounts`, at the block's full removal."""
    loss = _BlockLoss(model, groups, images)
    owner, blocks = loss.owner, loss.owned()
    if cfg.depth >= len(blocks):
        raise StarfishError(f"prune.depth={cfg.depth} would remove all {len(blocks)} blocks of the model; lower it "
                            f"(at most {len(blocks) - 1})")
    weights = dict(model.named_parameters())

    def all_of(block: str) -> Masks:
        alone = [g for g in groups if owner[g.name] == block]
        return masks_removing(weights, alone, {g.name: torch.arange(g.units) for g in alone})

    sensitivity = {block: loss.of(all_of(block)) for block in blocks}
    dropped = set(sorted(blocks, key=lambda b: (sensitivity[b], blocks.index(b)))[:cfg.depth])
    amounts: dict[str, float] = {}
    for structure in {g.structure for g in groups}:
        members = [g for g in groups if g.structure == structure and owner[g.name] is not None]
        gone = [g for g in members if owner[g.name] in dropped]
        rest = [g for g in members if owner[g.name] not in dropped]
        left = round(cfg.sparsity * sum(g.units for g in members)) - sum(g.units for g in gone)
        if left < 0:
            raise StarfishError(f"prune.depth={cfg.depth} removes more {structure} than prune.sparsity="
                                f"{cfg.sparsity:g} asks for; raise prune.sparsity or lower prune.depth")
        if left == 0:
            raise StarfishError(f"prune.depth={cfg.depth} takes all of prune.sparsity={cfg.sparsity:g} from the "
                                f"removed blocks and leaves the other blocks' {structure} whole, so a heal has no "
                                "narrowed layer to train; lower prune.depth or raise prune.sparsity")
        counts = _largest_remainder(left, {g.name: g.units for g in rest})
        too_much = [g for g in rest if counts[g.name] >= g.units]
        if too_much:
            raise StarfishError(f"prune.sparsity={cfg.sparsity:g} with prune.depth={cfg.depth} would empty "
                                f"{too_much[0].name} too; lower prune.sparsity or raise prune.depth")
        amounts.update({g.name: 1.0 for g in gone}, **{g.name: counts[g.name] / g.units for g in rest})
    log.info("depth: removed %s (block loss %s); the other blocks lose %s", sorted(dropped),
             {b: round(v, 5) for b, v in sensitivity.items()},
             {g: round(a, 3) for g, a in amounts.items() if a < 1.0})
    return amounts


def _largest_remainder(total: int, sizes: dict[str, int]) -> dict[str, int]:
    """`total` split over groups in proportion to their `sizes`, whole numbers that add up to it
    exactly (the largest remainders, then the first groups, take the units rounding left)."""
    whole = sum(sizes.values())
    exact = {name: total * size / whole for name, size in sizes.items()}
    counts = {name: int(value) for name, value in exact.items()}
    order = sorted(sizes, key=lambda name: (counts[name] - exact[name], list(sizes).index(name)))
    for name in order[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


def _held_back(weights: dict[str, torch.Tensor], masks: Masks, cfg: "PruneConfig", spec: PrunerSpec
               ) -> dict[str, str]:
    """`{layer: why}` for the layers pruned less than asked: left dense by N:M, or keeping one
    weight per row or per layer (the pruner's `floor`) that the target would have removed."""
    held = {}
    floor, sparsity = spec.floor, cfg.sparsity
    for name, weight in weights.items():
        if name not in masks:
            held[name] = f"left dense: its {weight.shape[1]} input channels do not tile by {parse_nm(cfg.nm)[1]}"
        elif floor == "row" and M.capped_count(sparsity, weight[0].numel()) < round(sparsity * weight[0].numel()):
            held[name] = "keeps one weight per row"
        elif floor == "layer" and not cfg.global_ranking and \
                M.capped_count(sparsity, weight.numel()) < round(sparsity * weight.numel()):
            held[name] = "keeps one weight in the layer"
    if floor == "layer" and cfg.global_ranking:
        kept = {name: weights[name].detach().abs()[masks[name]] for name in masks}
        for name, values in kept.items():
            others = [v.min() for other, v in kept.items() if other != name and v.numel()]
            if values.numel() == 1 and weights[name].numel() > 1 and others and values[0] < min(others):
                held[name] = "keeps one weight in the layer"
    return held
