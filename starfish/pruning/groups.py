"""The units structured pruning can remove: whole MLP neurons, attention heads, inner conv channels.

A *group* is one prunable dimension of the model, written down as data: the tensors that hold
its units and where. Removing unit `u` of a group removes, in every member tensor, the entries
`[s * units * width + u * width + j]` along the member's axis, for each of its `sections`
(q, k and v of a fused qkv; the two halves of a gated MLP's fc1) and `j < width` (a head's
head_dim rows). Weights that make a unit (rows) or read it (input columns) are *masked*; the
rest (biases, norms, a Swin head's relative-position bias) are only *sliced* by `slim_`.

Lifecycle: `StructurePlan.find(model, structure)` (the groups, found once, here) ->
`structured.structured_masks(...)` (keep-masks over the masked weights, True = kept, the same
format as unstructured masks, so the healers and the checks take them unchanged) ->
`slim.slim_(model, masks, plan.groups)` (smaller modules; returns the `architecture` record a
checkpoint stores) -> `slim.rebuild_(model, architecture)` (the same smaller modules on a freshly
built dense model, from that record alone).

Which modules have which structure is one finder per module type (`FINDERS`), because the
coupling lives in each type's forward: a fused qkv's (3, heads, head_dim) layout, a gated MLP's
chunk, an inverted residual's squeeze-excite. A module type with no finder is left whole.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from timm.layers import Attention, GluMlp, Mlp, SwiGLU
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models.resnet import BasicBlock, Bottleneck
from timm.models.swin_transformer import WindowAttention
from torch import nn

from starfish.catalog import STRUCTURES, parse_structure
from starfish.errors import StarfishError
from starfish.pruning.masks import Masks


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


def kept_units(group: Group, masks: Masks) -> torch.Tensor:
    """The units the masks keep: all but those with every entry pruned in every masked member
    (so single weights pruned apart never read as a removed unit)."""
    alive = torch.zeros(group.units, dtype=torch.bool)
    for member in group.masked:
        mask = masks[member.key].movedim(member.axis, 0)
        entries = mask.reshape(mask.shape[0], -1).any(1).cpu()
        alive |= entries.view(member.sections, group.units, member.width).any(2).any(0)
    return alive.nonzero().squeeze(1)
