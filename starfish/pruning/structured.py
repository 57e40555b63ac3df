"""Structured masks: which units of a plan's groups go. Each unit is scored (by magnitude, by
wanda's input-scaled magnitude, or by what it adds to the output of the layer that reads it) and
the lowest go, the same count in every group or as an allocation shares them out; or
Torch-Pruning chooses them. The masks are keep-masks in the unstructured format, over the
weights that make or read each unit (`groups.Group.masked`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from starfish.catalog import check_sparsity
from starfish.errors import StarfishError
from starfish.pruning.groups import Group
from starfish.pruning.masks import Masks, capped_count

if TYPE_CHECKING:
    from starfish.config import PruneConfig


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
