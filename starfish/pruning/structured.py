"""Structured pruning: remove whole MLP neurons, attention heads or inner conv channels.

A *group* is one prunable dimension of the model, written down as data: the tensors that hold
its units and where. Removing unit `u` of a group removes, in every member tensor, the entries
`[s * units * width + u * width + j]` along the member's axis, for each of its `sections`
(q, k and v of a fused qkv; the two halves of a gated MLP's fc1) and `j < width` (a head's
head_dim rows). Weights that make a unit (rows) or read it (input columns) are *masked*; the
rest (biases, norms, a Swin head's relative-position bias) are only *sliced* by `slim_`.

Lifecycle: `StructurePlan.find(model, structure)` (the groups, found once) ->
`structured_masks(...)` (keep-masks over the masked weights, True = kept, the same format as
unstructured masks, so the healers and the checks take them unchanged) -> `slim_(model, masks,
plan.groups)` (smaller modules; returns the
`architecture` record a checkpoint stores) -> `rebuild_(model, architecture)` (the same
smaller modules on a freshly built dense model, from that record alone).

Which modules have which structure is one finder per module type (`FINDERS`), because the
coupling lives in each type's forward: a fused qkv's (3, heads, head_dim) layout, a gated MLP's
chunk, an inverted residual's squeeze-excite. A module type with no finder is left whole.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from timm.layers import Attention, GluMlp, Mlp, SwiGLU
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models.resnet import BasicBlock, Bottleneck
from timm.models.swin_transformer import WindowAttention
from torch import nn

from starfish.catalog import STRUCTURES, check_sparsity, parse_structure
from starfish.errors import StarfishError
from starfish.pruning.masks import Masks, capped_count

if TYPE_CHECKING:
    from starfish.config import PruneConfig

ARCHITECTURE_ATTRIBUTES = ("num_heads", "attn_dim")  # module attributes a slim checkpoint may set
ARCHITECTURE_ATTR = "starfish_architecture"  # where a slim model keeps its record (`architecture_of`)


@dataclass(frozen=True)
class Member:
    """One tensor of a group: its state key, the axis that indexes units, and the layout along it."""

    key: str
    axis: int
    sections: int = 1
    width: int = 1
    masked: bool = False  # a weight whose mask carries the group (rows it makes, columns that read it)

    def index(self, keep: torch.Tensor, units: int) -> torch.Tensor:
        """Entries along `axis` that the kept units own, in order."""
        offsets = torch.arange(self.width)
        per_section = (keep.view(-1, 1) * self.width + offsets).reshape(-1)
        return torch.cat([per_section + s * units * self.width for s in range(self.sections)])


@dataclass(frozen=True)
class Group:
    """A prunable dimension: `units` of kind `structure` owned by module `name`.

    `attributes` are the module attributes that count units (`{module: {attribute: per unit}}`:
    an attention's num_heads is 1 per head, its attn_dim head_dim per head). `state` names the
    block whose output width the group sets, when it does (a CNN without residuals)."""

    name: str
    structure: str
    units: int
    members: tuple[Member, ...]
    attributes: dict[str, dict[str, int]] = field(default_factory=dict)
    state: str | None = None

    @property
    def masked(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.masked)

    @property
    def producer(self) -> Member:
        """The first masked member with units on axis 0: whose mask says which units are kept."""
        return next(m for m in self.masked if m.axis == 0)


Finder = Callable[[str, nn.Module, dict[str, nn.Module]], Iterator[Group]]
FINDERS: dict[type, tuple[str, Finder]] = {}


def finder(structure: str, *types: type) -> Callable[[Finder], Finder]:
    def register(fn: Finder) -> Finder:
        for kind in types:
            FINDERS[kind] = (structure, fn)
        return fn

    return register


def _weight(name: str, axis: int, sections: int = 1, width: int = 1) -> Member:
    return Member(f"{name}.weight", axis, sections, width, masked=True)


def _sliced(module: nn.Module, name: str, axis: int = 0, sections: int = 1, width: int = 1,
            keys: tuple[str, ...] = ("bias",)) -> list[Member]:
    """Members for the per-unit tensors of `module` (its bias; a norm's affine and statistics)."""
    owned = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
    return [Member(f"{name}.{key}", axis, sections, width) for key in keys if owned.get(key) is not None]


_NORM_KEYS = ("weight", "bias", "running_mean", "running_var")


def _per_channel_norm(module: nn.Module, name: str, where: str) -> list[Member]:
    """A norm between a group's producer and consumer: BatchNorm is per channel (sliced with the
    units); one that mixes channels (LayerNorm, GRN) would make the masked and the slim model differ."""
    if isinstance(module, nn.Identity):
        return []
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _sliced(module, name, keys=_NORM_KEYS)
    raise StarfishError(f"{where} normalizes across its units ({type(module).__name__} at {name}), so removing units "
                        "changes what the kept ones compute; structured pruning does not take this module")


@finder("neurons", Mlp, GluMlp, SwiGLU)
def _mlp(name: str, mlp: nn.Module, modules: dict[str, nn.Module]) -> Iterator[Group]:
    """MLP hidden units: fc1's rows (both halves of a gated fc1, or SwiGLU's fc1_g and fc1_x),
    fc2's columns, and a per-channel norm between them."""
    gated = isinstance(mlp, GluMlp)
    producers = ("fc1_g", "fc1_x") if isinstance(mlp, SwiGLU) else ("fc1",)
    members: list[Member] = []
    for producer in producers:
        layer = getattr(mlp, producer)
        members += [_weight(f"{name}.{producer}", 0, 2 if gated else 1),
                    *_sliced(layer, f"{name}.{producer}", 0, 2 if gated else 1)]
    members += _per_channel_norm(mlp.norm, f"{name}.norm", f"the MLP {name}")
    members.append(_weight(f"{name}.fc2", 1))
    units = mlp.fc2.weight.shape[1]
    yield Group(name, "neurons", units, tuple(members))


@finder("heads", Attention)
def _attention(name: str, attn: Attention, modules: dict[str, nn.Module]) -> Iterator[Group]:
    """Heads of timm's fused-qkv attention (ViT, DeiT, ...): each head's head_dim rows of q, k and
    v (and of the output gate), and its head_dim columns of the output projection."""
    if not isinstance(attn.norm, nn.Identity):
        raise StarfishError(f"the attention {name} normalizes across its heads (scale_norm), so removing heads changes "
                            "what the kept ones compute; structured pruning does not take this module")
    hd = attn.head_dim
    members = [_weight(f"{name}.qkv", 0, 3, hd), *_sliced(attn.qkv, f"{name}.qkv", 0, 3, hd)]
    if attn.gate is not None:
        members += [_weight(f"{name}.gate", 0, 1, hd), *_sliced(attn.gate, f"{name}.gate", 0, 1, hd)]
    members.append(_weight(f"{name}.proj", 1, 1, hd))
    yield Group(name, "heads", attn.num_heads, tuple(members), {name: {"num_heads": 1, "attn_dim": hd}})


@finder("heads", WindowAttention)
def _window_attention(name: str, attn: WindowAttention, modules: dict[str, nn.Module]) -> Iterator[Group]:
    """Heads of Swin's window attention: as `_attention`, plus each head's column of the
    relative-position bias table."""
    hd = attn.qkv.out_features // (3 * attn.num_heads)
    members = (_weight(f"{name}.qkv", 0, 3, hd), *_sliced(attn.qkv, f"{name}.qkv", 0, 3, hd),
               Member(f"{name}.relative_position_bias_table", 1), _weight(f"{name}.proj", 1, 1, hd))
    yield Group(name, "heads", attn.num_heads, members, {name: {"num_heads": 1}})


def _plain_conv(conv: nn.Module, name: str) -> None:
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        raise StarfishError(f"channels: {name} is a grouped convolution; structured pruning takes plain and "
                            "depthwise convolutions only")


def _no_aa(block: nn.Module, name: str) -> None:
    if not isinstance(getattr(block, "aa", None), (nn.Identity, type(None))):
        raise StarfishError(f"channels: {name} anti-aliases its inner channels; structured pruning does not take it")


def _conv_chain(name: str, block: nn.Module, chain: list[tuple[str, str]]) -> Iterator[Group]:
    """Groups over a chain of plain convs `conv -> norm -> conv`: each conv's output channels
    (its rows, the norm after it, the next conv's columns), for every link but the last."""
    for (conv, norm), (reader, _) in zip(chain, chain[1:]):
        _plain_conv(getattr(block, reader), f"{name}.{reader}")
        members = [_weight(f"{name}.{conv}", 0), *_sliced(getattr(block, conv), f"{name}.{conv}"),
                   *_per_channel_norm(getattr(block, norm), f"{name}.{norm}", f"the block {name}"),
                   _weight(f"{name}.{reader}", 1)]
        yield Group(f"{name}.{conv}", "channels", getattr(block, conv).out_channels, tuple(members))


@finder("channels", Bottleneck)
def _bottleneck(name: str, block: Bottleneck, modules: dict[str, nn.Module]) -> Iterator[Group]:
    """ResNet's bottleneck: conv1's and conv2's output channels (conv3 writes the residual stream)."""
    _no_aa(block, name)
    _plain_conv(block.conv1, f"{name}.conv1")
    yield from _conv_chain(name, block, [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")])


@finder("channels", BasicBlock)
def _basic_block(name: str, block: BasicBlock, modules: dict[str, nn.Module]) -> Iterator[Group]:
    """ResNet's basic block: conv1's output channels."""
    _no_aa(block, name)
    _plain_conv(block.conv1, f"{name}.conv1")
    yield from _conv_chain(name, block, [("conv1", "bn1"), ("conv2", "bn2")])


def _depthwise(conv: nn.Module, name: str) -> list[Member]:
    if not (isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels == conv.out_channels):
        raise StarfishError(f"channels: {name} is not a depthwise convolution; structured pruning does not take it")
    return [_weight(name, 0), *_sliced(conv, name)]


def _squeeze_excite(se: nn.Module, name: str) -> list[Member]:
    """A squeeze-excite over the group's channels reads each (conv_reduce's columns) and gates each
    (conv_expand's rows)."""
    if isinstance(se, nn.Identity):
        return []
    if not (hasattr(se, "conv_reduce") and hasattr(se, "conv_expand")):
        raise StarfishError(f"channels: {name} is a {type(se).__name__}, which structured pruning does not take")
    return [_weight(f"{name}.conv_reduce", 1), _weight(f"{name}.conv_expand", 0),
            *_sliced(se.conv_expand, f"{name}.conv_expand")]


@finder("channels", InvertedResidual)
def _inverted_residual(name: str, block: InvertedResidual, modules: dict[str, nn.Module]) -> Iterator[Group]:
    """EfficientNet's / MobileNetV2-V3's inverted residual: the expansion channels (conv_pw's rows,
    bn1, the depthwise conv, bn2, the squeeze-excite, conv_pwl's columns)."""
    _no_aa(block, name)
    _plain_conv(block.conv_pw, f"{name}.conv_pw")
    _plain_conv(block.conv_pwl, f"{name}.conv_pwl")
    members = [_weight(f"{name}.conv_pw", 0), *_sliced(block.conv_pw, f"{name}.conv_pw"),
               *_per_channel_norm(block.bn1, f"{name}.bn1", f"the block {name}"),
               *_depthwise(block.conv_dw, f"{name}.conv_dw"),
               *_per_channel_norm(block.bn2, f"{name}.bn2", f"the block {name}"),
               *_squeeze_excite(block.se, f"{name}.se"), _weight(f"{name}.conv_pwl", 1)]
    yield Group(f"{name}.conv_pw", "channels", block.conv_pw.out_channels, tuple(members))


@finder("channels", DepthwiseSeparableConv)
def _separable(name: str, block: DepthwiseSeparableConv, modules: dict[str, nn.Module]) -> Iterator[Group]:
    """MobileNetV1's depthwise-separable block without a skip: its output channels (conv_pw's rows,
    bn2), read by the next such block (its depthwise conv, bn1, squeeze-excite, conv_pw's columns).
    The block's output is narrower, so `state` names it. A block with a skip, or the last one, is
    left whole: its output is the residual stream or the head's input."""
    following = _next_block(name, modules)
    if block.has_skip or not isinstance(following, DepthwiseSeparableConv) or following.has_skip:
        return
    nxt = _name_of(following, modules)
    _no_aa(block, name)
    _no_aa(following, nxt)
    _plain_conv(block.conv_pw, f"{name}.conv_pw")
    _plain_conv(following.conv_pw, f"{nxt}.conv_pw")
    members = [_weight(f"{name}.conv_pw", 0), *_sliced(block.conv_pw, f"{name}.conv_pw"),
               *_per_channel_norm(block.bn2, f"{name}.bn2", f"the block {name}"),
               *_depthwise(following.conv_dw, f"{nxt}.conv_dw"),
               *_per_channel_norm(following.bn1, f"{nxt}.bn1", f"the block {nxt}"),
               *_squeeze_excite(following.se, f"{nxt}.se"), _weight(f"{nxt}.conv_pw", 1)]
    yield Group(f"{name}.conv_pw", "channels", block.conv_pw.out_channels, tuple(members), state=name)


def _next_block(name: str, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The module after `name` in an EfficientNet's `blocks` (stages of blocks), or None."""
    flat = [key for key, module in modules.items() if key.startswith("blocks.") and key.count(".") == 2]
    return modules[flat[flat.index(name) + 1]] if name in flat and flat.index(name) + 1 < len(flat) else None


def _name_of(module: nn.Module, modules: dict[str, nn.Module]) -> str:
    return next(key for key, value in modules.items() if value is module)


def find_groups(model: nn.Module, structures: tuple[str, ...] = STRUCTURES) -> list[Group]:
    """Every group of the named structures in `model`, in forward order. ConvNeXt's MLP (its
    only inner channels) counts as both neurons and channels."""
    modules = dict(model.named_modules())
    groups = []
    for name, module in modules.items():
        structure, find = FINDERS.get(type(module), (None, None))
        if find is None:
            continue
        if structure not in structures and structure == "neurons" and "channels" in structures \
                and type(modules.get(name.rpartition(".")[0])).__name__ == "ConvNeXtBlock":
            groups += [dataclasses.replace(g, structure="channels") for g in find(name, module, modules)]
        elif structure in structures:
            groups += list(find(name, module, modules))
    return groups


def skipped_blocks(model: nn.Module, groups: list[Group], structure: str) -> dict[str, str]:
    """`{block: why}` for the model's blocks that no group lies in: they keep every unit, so
    the model's FLOPs fall by less than the target (EfficientNetV2's fused blocks, say)."""
    from starfish.capture import block_names

    kinds = " or ".join(parse_structure(structure))

    def kind(block: str) -> str:
        name = type(model.get_submodule(block)).__name__
        return f"{'an' if name[0] in 'AEIOU' else 'a'} {name}"

    return {block: f"starfish removes no {kinds} from {kind(block)}"
            for block in block_names(model)
            if not any(g.name == block or g.name.startswith(block + ".") for g in groups)}


@dataclass(frozen=True)
class StructurePlan:
    """What `structure` can remove from a model, found once (`StructurePlan.find`): its groups,
    and the blocks no group lies in, with why. The pruner scores these groups, slimming cuts them
    and the report counts their units; nothing looks for them again."""

    structure: str
    groups: tuple[Group, ...]
    skipped: dict[str, str]

    @classmethod
    def find(cls, model: nn.Module, structure: str) -> "StructurePlan":
        groups = groups_for(model, structure)
        return cls(structure, tuple(groups), skipped_blocks(model, groups, structure))

    def report(self, kept: dict[str, list[int]]) -> dict[str, Any]:
        """What was removed, from `{group: kept units}` of the narrowed groups (`kept_by_group`):
        the fraction of all the plan's units, the groups and how many were narrowed, the blocks
        skipped."""
        units = sum(g.units for g in self.groups)
        removed = sum(g.units - len(kept.get(g.name, range(g.units))) for g in self.groups)
        return {"structure": self.structure, "removed": removed / max(units, 1), "groups": len(self.groups),
                "narrowed": sum(g.name in kept for g in self.groups), "skipped": self.skipped}


def groups_for(model: nn.Module, structure: str) -> list[Group]:
    """`find_groups` for `prune.structure`, or an error naming the structures the model has."""
    wanted = parse_structure(structure)
    groups = find_groups(model, wanted)
    missing = [s for s in wanted if not any(g.structure == s for g in groups)]
    if missing:
        has = sorted({g.structure for g in find_groups(model)})
        raise StarfishError(f"prune.structure={structure!r}: {type(model).__name__} has no {missing[0]} that can be "
                            f"removed (it has: {', '.join(has) or 'no prunable structure'}); pick one it has")
    return groups


def unit_scores(group: Group, weights: dict[str, torch.Tensor], norms: dict[str, torch.Tensor] | None
                ) -> torch.Tensor:
    """One importance per unit over all its masked weights: the group's L2 norm (no `norms`), or
    wanda's sum of |W| * ||x|| with each weight column scaled by its input's norm."""
    score = torch.zeros(group.units)
    for member in group.masked:
        w = weights[member.key].detach().float().cpu()
        w = w.movedim(member.axis, 0).reshape(w.shape[member.axis], -1)  # (entries along axis, rest)
        if norms is None:
            per_entry = w.pow(2).sum(1)
        else:  # columns of a row scale by the layer's input norms; a column is one input
            layer = member.key.removesuffix(".weight")
            x = norms[layer].float().cpu()
            if member.axis == 1:  # the entries are input columns: each scales by its own input's norm
                per_entry = w.abs().sum(1) * x
            elif x.numel() == w.shape[0] and w.shape[1] < x.numel():  # depthwise: row i reads channel i
                per_entry = w.abs().sum(1) * x
            else:  # a conv's channel norm covers its kh*kw columns
                per_entry = (w.abs() * x.repeat_interleave(w.shape[1] // x.numel()).view(1, -1)).sum(1)
        score += per_entry.view(member.sections, group.units, member.width).sum((0, 2))
    return score.sqrt() if norms is None else score


def contributions(group: Group, weights: dict[str, torch.Tensor], norms: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per unit, what it adds to the output of the layers that read it (the group's input columns:
    fc2's, proj's, a conv chain's last conv's), ||W[:, unit]||^2 * ||x_unit||^2 over the
    calibration images: the part of the block's output it takes away (cross terms left out)."""
    score = torch.zeros(group.units)
    for member in group.masked:
        if member.axis != 1:
            continue
        w = weights[member.key].detach().float().cpu()
        w = w.movedim(1, 0).reshape(w.shape[1], -1)  # (input columns, the rest)
        x = norms[member.key.removesuffix(".weight")].float().cpu()
        score += (w.pow(2).sum(1) * x.pow(2)).view(member.sections, group.units, member.width).sum((0, 2))
    return score


def _check_amount(groups: list[Group], amount: float) -> None:
    check_sparsity(amount, "units of each layer")
    for group in groups:
        if round(amount * group.units) >= group.units:
            raise StarfishError(f"prune.sparsity={amount:g} would remove all {group.units} {group.structure} of "
                                f"{group.name}; lower it (at most {(group.units - 1) / group.units:g} here)")


def structured_masks(model: nn.Module, groups: list[Group], cfg: "PruneConfig", scores: dict[str, torch.Tensor],
                     amounts: dict[str, float] | None = None) -> Masks:
    """Keep-masks removing `cfg.sparsity` of each group's units, lowest `scores` first: the same
    count in every group, or (`cfg.global_ranking`) one ranking per structure over all its groups
    with scores normalized per group, keeping each group's best unit. Ties go by position.
    `amounts` ({group: fraction}) sets a group's own fraction instead (a group it leaves out
    loses `cfg.sparsity`; a fraction of 1 removes every unit)."""
    _check_amount(groups, cfg.sparsity)
    weights = dict(model.named_parameters())
    removed: dict[str, torch.Tensor] = {}
    if cfg.global_ranking:
        for structure in {g.structure for g in groups}:
            members = [g for g in groups if g.structure == structure]
            flat = torch.cat([scores[g.name] / scores[g.name].mean().clamp_min(1e-12) for g in members])
            count = round(cfg.sparsity * flat.numel())
            pruned = torch.zeros(flat.numel(), dtype=torch.bool)
            pruned[torch.argsort(flat, stable=True)[:count]] = True
            start = 0
            for g in members:
                cut = pruned[start : start + g.units].clone()
                if cut.all():
                    cut[scores[g.name].argmax()] = False
                removed[g.name] = cut.nonzero().squeeze(1)
                start += g.units
    else:
        for g in groups:
            amount = (amounts or {}).get(g.name, cfg.sparsity)
            count = g.units if amount >= 1 else capped_count(amount, g.units)  # 1: the whole group (prune.depth)
            removed[g.name] = torch.argsort(scores[g.name], stable=True)[:count]
    return masks_removing(weights, groups, removed)


def masks_removing(weights: dict[str, torch.Tensor], groups: list[Group], removed: dict[str, torch.Tensor]) -> Masks:
    """Keep-masks over the groups' masked weights with each group's `removed` units pruned (a
    weight in two groups, as a bottleneck's conv2, gets both)."""
    masks: Masks = {}
    for g in groups:
        for member in g.masked:
            weight = weights[member.key]
            mask = masks.get(member.key, torch.ones(weight.shape, dtype=torch.bool, device=weight.device))
            mask.index_fill_(member.axis, member.index(removed[g.name].sort().values, g.units).to(weight.device),
                             False)
            masks[member.key] = mask
    return masks


def torch_pruning_masks(model: nn.Module, groups: list[Group], cfg: "PruneConfig", images: torch.Tensor
                        ) -> Masks:
    """The same groups as `structured_masks`, with Torch-Pruning choosing the units: its
    dependency graph and group-magnitude importance (`MetaPruner`, the recipe of its timm ViT
    example), kept to these groups' layers (every other layer ignored, so the residual width stays)
    and read back as masks, not applied. The alternative a user would reach for, measured on the
    same footing."""
    import warnings

    import torch_pruning as tp

    modules = {module: name for name, module in model.named_modules()}
    roots, heads = {}, {}
    for g in groups:
        if g.structure == "heads":
            qkv = model.get_submodule(f"{g.name}.qkv")
            heads[qkv] = g.units
            roots[qkv] = g
        else:
            roots[model.get_submodule(g.producer.key.removesuffix(".weight"))] = g
    by_key = {m.key: (g, m) for g in groups for m in g.masked}
    ignored = [m for m in modules if isinstance(m, (nn.Linear, nn.Conv2d)) and m not in roots]
    removed: dict[str, set[int]] = {g.name: set() for g in groups}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            model, images[:2].to(next(model.parameters()).device),
            importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=cfg.sparsity,
            global_pruning=cfg.global_ranking, ignored_layers=ignored, num_heads=heads, prune_num_heads=bool(heads),
            prune_head_dims=False, head_pruning_ratio=cfg.sparsity if heads else 0.0)
        try:
            chosen = list(pruner.step(interactive=True))  # each group's choice; nothing is pruned
        except Exception as exc:  # the library's own failures on a graph it misreads (EVA02's SwiGLU)
            raise StarfishError(f"torch-pruning failed on {type(model).__name__}'s {groups[0].structure} "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no message'}); "
                                "use prune.method=magnitude or wanda") from None
        for tp_group in chosen:
            for dep, idxs in tp_group:
                name = modules.get(dep.target.module)
                handler = getattr(dep.handler, "__name__", "")
                axis = 0 if "out_channels" in handler else 1 if "in_channels" in handler else None
                found = by_key.get(f"{name}.weight")
                if found is None or axis is None or found[1].axis != axis:
                    continue
                g, member = found
                removed[g.name] |= {(int(i) % (g.units * member.width)) // member.width for i in idxs}
    untouched = [g.name for g in groups if not removed[g.name] and capped_count(cfg.sparsity, g.units)]
    if untouched:  # measured: groups through a depthwise conv (MobileNet, EfficientNet), Swin's heads
        raise StarfishError(f"torch-pruning removes nothing from {untouched[0]} and {len(untouched) - 1} more groups: "
                            f"Torch-Pruning does not take this family's {groups[0].structure} as one group; use "
                            "prune.method=magnitude or wanda")
    emptied = [g for g in groups if len(removed[g.name]) >= g.units]
    if emptied:
        raise StarfishError(f"torch-pruning would remove all {emptied[0].units} {emptied[0].structure} of "
                            f"{emptied[0].name}; lower prune.sparsity")
    return masks_removing(dict(model.named_parameters()), groups,
                           {name: torch.tensor(sorted(units), dtype=torch.long) for name, units in removed.items()})


def kept_units(group: Group, masks: Masks) -> torch.Tensor:
    """The units the masks keep: all but those with every entry pruned in every masked member
    (so single weights pruned apart never read as a removed unit)."""
    alive = torch.zeros(group.units, dtype=torch.bool)
    for member in group.masked:
        mask = masks[member.key].movedim(member.axis, 0)
        entries = mask.reshape(mask.shape[0], -1).any(1).cpu()
        alive |= entries.view(member.sections, group.units, member.width).any(2).any(0)
    return alive.nonzero().squeeze(1)


def architecture_of(model: nn.Module) -> dict[str, Any] | None:
    """The architecture record of a slim model (set by `slim_` and `rebuild_`), None for a dense one."""
    return getattr(model, ARCHITECTURE_ATTR, None)


def recorded_structure(model: nn.Module, dense: nn.Module, prefer: str | None = None) -> str | None:
    """The `prune.structure` a slim model was pruned with, read from its architecture record:
    `prefer` if its groups hold every group the model narrowed, else the fewest structures whose
    groups do (ConvNeXt's MLP is both neurons and channels). None for a model that is not slim."""
    import itertools

    architecture = architecture_of(model)
    if architecture is None:
        return None
    narrowed = set(architecture["kept"])
    held = {s: {g.name for g in find_groups(dense, (s,))} for s in STRUCTURES}
    preferred = [parse_structure(prefer)] if prefer and prefer != "unstructured" else []
    fewest = [combo for size in range(1, len(STRUCTURES) + 1) for combo in itertools.combinations(STRUCTURES, size)]
    for i, combo in enumerate(preferred + fewest):
        if narrowed <= set().union(*(held[s] for s in combo)):
            return prefer if i < len(preferred) else "+".join(combo)
    return None


def kept_by_group(model: nn.Module, masks: Masks, groups: tuple[Group, ...] | None = None) -> dict[str, list[int]]:
    """`{group: kept units}` of the groups a slim model or structured masks narrowed (among
    `groups`, default all the model's)."""
    architecture = architecture_of(model)
    if architecture is not None:
        return architecture["kept"]
    kept = {}
    for g in find_groups(model) if groups is None else groups:
        if all(m.key in masks for m in g.masked):
            units = kept_units(g, masks)
            if len(units) < g.units:
                kept[g.name] = units.tolist()
    return kept


def state_channels(model: nn.Module, dense: nn.Module, masks: Masks) -> dict[str, torch.Tensor]:
    """`{block: the dense channels its output keeps}` for the blocks whose output width the
    structure narrows (a CNN without residuals): the channels of the dense state to align with."""
    kept = kept_by_group(model, masks)
    return {g.state: torch.tensor(kept[g.name], dtype=torch.long) for g in find_groups(dense)
            if g.state is not None and g.name in kept}


def dense_rows(model: nn.Module, dense: nn.Module) -> dict[str, torch.Tensor]:
    """`{weight: the dense rows its rows are}` for the weights a slim model has fewer rows of."""
    architecture = architecture_of(model)
    if architecture is None:
        return {}
    rows = {}
    for g in find_groups(dense):
        if g.name in architecture["kept"]:
            for member in g.masked:
                if member.axis == 0:
                    kept = torch.tensor(architecture["kept"][g.name], dtype=torch.long)  # may be empty (depth)
                    rows[member.key] = member.index(kept, g.units)
    return rows


def slim_(model: nn.Module, masks: Masks, groups: tuple[Group, ...] | None = None) -> dict[str, Any]:
    """Turn structured masks into smaller modules, in place, cutting `groups` (default: every
    group the masks narrow); returns the `architecture` record (`rebuild_` builds the same
    modules from it): the new shape of every tensor it changed, the module attributes that count
    units, and each narrowed group's kept units (which dense rows and channels the slim ones are)."""
    if architecture_of(model) is not None:
        raise StarfishError("the model is slim already; slim the masked model once")
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    index: dict[str, list[tuple[int, torch.Tensor]]] = {}
    attributes: dict[str, dict[str, int]] = {}
    kept: dict[str, list[int]] = {}
    for g in find_groups(model) if groups is None else groups:
        if not all(m.key in masks for m in g.masked):
            continue
        keep = kept_units(g, masks)
        if len(keep) == g.units:
            continue
        for member in g.members:
            index.setdefault(member.key, []).append((member.axis, member.index(keep, g.units)))
        for module, counts in g.attributes.items():
            attributes[module] = {attr: per_unit * len(keep) for attr, per_unit in counts.items()}
        kept[g.name] = keep.tolist()
    tensors = {}
    for key, cuts in index.items():
        value = state[key].detach()
        for axis, idx in cuts:
            value = value.index_select(axis, idx.to(value.device))
        tensors[key] = value
    architecture = {"shapes": {key: list(value.shape) for key, value in tensors.items()},
                    "attributes": attributes, "kept": kept}
    _resize_(model, tensors, attributes)
    _bypass_emptied_(model, kept)
    setattr(model, ARCHITECTURE_ATTR, architecture)
    return architecture


def slim_masks(model: nn.Module) -> Masks:
    """All-True masks over the weights a slim model's structure narrowed: the layers a heal trains
    (every weight of them; there is nothing left to keep at zero)."""
    architecture = architecture_of(model)
    if architecture is None:
        return {}
    modules = dict(model.named_modules())
    return {key: torch.ones(shape, dtype=torch.bool) for key, shape in architecture["shapes"].items()
            if key.endswith(".weight") and isinstance(modules.get(key.removesuffix(".weight")), (nn.Linear, nn.Conv2d))}


def check_architecture(model: nn.Module, architecture: Any, source: str) -> dict[str, Any]:
    """Validate a checkpoint's architecture record against the dense model it will shrink, before
    anything is allocated: known tensors, the same rank, every size in 0..the dense size, known
    attributes with values in 0..the dense value, kept units that are increasing unit numbers (none
    where `prune.depth` removed a block)."""
    def bad(why: str) -> StarfishError:
        return StarfishError(f"checkpoint {source}: its architecture record {why}; the file is damaged or not "
                             "written by starfish: write it again")

    if not isinstance(architecture, dict) or set(architecture) != {"shapes", "attributes", "kept"}:
        raise bad("is not a mapping of shapes, attributes and kept units")
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    modules = dict(model.named_modules())
    shapes, attributes, kept = architecture["shapes"], architecture["attributes"], architecture["kept"]
    if not all(isinstance(x, dict) for x in (shapes, attributes, kept)):
        raise bad("has a section that is not a mapping")
    for key, shape in shapes.items():
        if key not in state:
            raise bad(f"names {key!r}, which {type(model).__name__} does not have")
        dense = state[key].shape
        if not (isinstance(shape, list) and len(shape) == len(dense)
                and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= d for s, d in zip(shape, dense))):
            raise bad(f"gives {key} the shape {shape!r}, which does not fit its dense shape {list(dense)}")
    for module, values in attributes.items():
        if module not in modules or not isinstance(values, dict):
            raise bad(f"sets attributes of {module!r}, which {type(model).__name__} does not have")
        for attr, value in values.items():
            dense_value = getattr(modules[module], attr, None)
            if attr not in ARCHITECTURE_ATTRIBUTES or not isinstance(dense_value, int) or not (
                    isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= dense_value):
                raise bad(f"sets {module}.{attr}={value!r}, which is not a unit count up to {dense_value}")
    groups = find_groups(model)
    units = {g.name: g.units for g in groups}
    for group, values in kept.items():
        if group not in units or not (isinstance(values, list) and all(
                isinstance(u, int) and not isinstance(u, bool) for u in values)
                and values == sorted(set(values)) and all(0 <= u < units[group] for u in values[:1] + values[-1:])):
            raise bad(f"keeps units {str(values)[:40]} of {group!r}, which are not increasing unit numbers of a "
                      "prunable group")
    for g in groups:  # every narrowed size is what the group's kept units make it
        for member in g.members:
            if member.key not in shapes:
                continue
            dense_size = state[member.key].shape[member.axis]
            want = dense_size if g.name not in kept else \
                len(member.index(torch.tensor(kept[g.name], dtype=torch.long), g.units))
            if shapes[member.key][member.axis] != want:
                raise bad(f"gives {member.key} {shapes[member.key][member.axis]} along axis {member.axis}, where "
                          + (f"the kept units of {g.name} make {want}" if g.name in kept else
                             f"it keeps no units of {g.name} (dense: {dense_size})"))
    return architecture


def rebuild_(model: nn.Module, architecture: dict[str, Any], source: str = "the checkpoint") -> nn.Module:
    """Shrink a freshly built dense `model` to a slim checkpoint's architecture, in place (the
    tensors are left uninitialized: load the checkpoint's state next)."""
    check_architecture(model, architecture, source)
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    tensors = {key: torch.empty(shape, dtype=state[key].dtype, device=state[key].device)
               for key, shape in architecture["shapes"].items()}
    _resize_(model, tensors, architecture["attributes"])
    _bypass_emptied_(model, architecture["kept"])
    setattr(model, ARCHITECTURE_ATTR, architecture)
    return model


def _bias_only(layer: nn.Linear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return layer.bias.expand(*x.shape[:-1], layer.out_features) if layer.bias is not None else \
        x.new_zeros(*x.shape[:-1], layer.out_features)


def _bypass_emptied_(model: nn.Module, kept: dict[str, list[int]]) -> None:
    """A group left with no units (a block `prune.depth` removed) adds only its output layer's
    bias to the residual stream; its module forwards straight to that bias, so no graph holds
    the zero-width tensors ONNX cannot reshape. Same outputs, same state-dict keys."""
    import functools

    for name, units in kept.items():
        if units:
            continue
        module = model.get_submodule(name)
        outputs = [m for m in module.modules() if isinstance(m, nn.Linear) and m.in_features == 0]
        if len(outputs) != 1:
            raise StarfishError(f"{name} has no units left, and starfish cannot tell which layer adds its output; "
                                "lower prune.depth or prune.sparsity")
        module.forward = functools.partial(_bias_only, outputs[0])


@torch.no_grad()
def _resize_(model: nn.Module, tensors: dict[str, torch.Tensor], attributes: dict[str, dict[str, int]]) -> None:
    """Put the resized `tensors` in place and make each module's size attributes agree with them."""
    touched = set()
    for key, value in tensors.items():
        owner_name, _, leaf = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        if leaf in owner._parameters:
            old = owner._parameters[leaf]
            owner._parameters[leaf] = nn.Parameter(value.clone(), requires_grad=old.requires_grad)
        else:
            owner._buffers[leaf] = value.clone()
        touched.add(owner_name)
    for name in touched:
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.Conv2d):
            depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
            module.out_channels = module.weight.shape[0]
            module.groups = module.out_channels if depthwise else module.groups
            module.in_channels = module.weight.shape[1] * module.groups
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.num_features = module.weight.shape[0] if module.weight is not None else module.running_mean.numel()
    for name, values in attributes.items():
        for attr, value in values.items():
            setattr(model.get_submodule(name), attr, value)


def model_cost(model: nn.Module, image_size: tuple[int, ...] | None = None) -> dict[str, int]:
    """Parameters and forward FLOPs (torch's FLOP counter) of `model` on one image of `image_size`
    (C, H, W; default: the model's input size in timm's data config)."""
    from timm.data import resolve_data_config
    from torch.utils.flop_counter import FlopCounterMode

    image_size = image_size or resolve_data_config({}, model=model)["input_size"]
    counter = FlopCounterMode(display=False)
    param = next(model.parameters())
    # The counter's module hooks trip on views of trainable tensors made under no_grad (CaiT's
    # expanded class token): count with every parameter frozen, then restore.
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        with counter, torch.no_grad():
            model.eval()(torch.zeros(1, *image_size, dtype=param.dtype, device=param.device))
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return {"params": sum(p.numel() for p in model.parameters()), "flops": counter.get_total_flops()}


def cost_ratios(cost: dict[str, int], dense_cost: dict[str, int]) -> dict[str, float]:
    """`model_cost` over dense's, as the reports and version tags carry it."""
    return {"params_ratio": cost["params"] / dense_cost["params"],
            "flops_ratio": cost["flops"] / max(dense_cost["flops"], 1)}


def size_ratios(slim: nn.Module, dense: nn.Module, image_size: tuple[int, ...] | None = None) -> dict[str, float]:
    """`model_cost` of `slim` over `dense`'s, on the same image size (default: `dense`'s)."""
    from timm.data import resolve_data_config

    image_size = image_size or resolve_data_config({}, model=dense)["input_size"]
    return cost_ratios(model_cost(slim, image_size), model_cost(dense, image_size))
