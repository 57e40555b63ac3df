"""The slim model: structured masks turned into smaller modules (`slim_`), the `architecture`
record a slim checkpoint stores, the same modules rebuilt from that record alone (`rebuild_`,
checked before anything is allocated), and what a model costs in parameters and FLOPs.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from starfish.catalog import STRUCTURES, parse_structure
from starfish.errors import StarfishError
from starfish.pruning.groups import Group, find_groups, kept_units
from starfish.pruning.masks import Masks

ARCHITECTURE_ATTRIBUTES = ("num_heads", "attn_dim")  # module attributes a slim checkpoint may set
ARCHITECTURE_ATTR = "starfish_architecture"  # where a slim model keeps its record (`architecture_of`)


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
