"""Pruning: pure mask functions (`masks`), the pruners (`pruners`, dispatched by `catalog.PRUNERS`),
and for whole units the groups a structure can remove (`groups`), the masks that remove them
(`structured`) and the smaller model they leave (`slim`)."""

from starfish.pruning.pruners import (
    Pruned,
    default_scope,
    nm_pattern_for,
    prune,
    remove_units_,
    scope_weights,
    sparsify_,
)

__all__ = ["Pruned", "default_scope", "nm_pattern_for", "prune", "remove_units_", "scope_weights", "sparsify_"]
