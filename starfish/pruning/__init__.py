"""Pruning: pure mask functions (`masks`) and the registered pruners that apply them (`pruners`)."""

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
