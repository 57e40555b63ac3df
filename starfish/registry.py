"""Choices by name (the pruners, the healers): each entry is a spec that says what the choice can
do and, as `module:function`, where its code lives. Looking a name up imports nothing; `load`
imports the code on first use. An unknown name fails with the names that would work."""

from __future__ import annotations

import importlib
from typing import Any, Generic, Iterable, Protocol, TypeVar

from starfish.errors import StarfishError


class Spec(Protocol):
    name: str
    summary: str


S = TypeVar("S", bound=Spec)


class Registry(Generic[S]):
    """`{name: spec}` of one kind: `PRUNERS.get("wanda")` is wanda's spec."""

    def __init__(self, kind: str, specs: Iterable[S]) -> None:
        self.kind = kind
        self._entries: dict[str, S] = {}
        for spec in specs:
            if spec.name in self._entries:
                raise ValueError(f"{kind} {spec.name!r} is registered twice")
            self._entries[spec.name] = spec

    def get(self, name: str) -> S:
        if name not in self._entries:
            raise StarfishError(f"unknown {self.kind} {name!r}; use one of {self.names()}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def summary(self, name: str) -> str:
        return self.get(name).summary


def load(target: str) -> Any:
    """The object a `module:attribute` target names, its module imported on first use."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)
