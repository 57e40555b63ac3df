"""Implementations chosen by name (the pruners, the healers): a decorator adds one, a lookup
finds it, and an unknown name fails with the names that would work."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from starfish.errors import StarfishError

T = TypeVar("T")


class Registry(Generic[T]):
    """`{name: implementation}` of one kind: `@PRUNERS.register("wanda")` adds, `PRUNERS.get("wanda")` finds."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(entry: T) -> T:
            self._entries[name] = entry
            return entry

        return decorate

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise StarfishError(f"unknown {self.kind} {name!r}; use one of {self.names()}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def summary(self, name: str) -> str:
        """The first paragraph of the entry's docstring, on one line."""
        doc = (self.get(name).__doc__ or "").strip().split("\n\n")[0]
        return " ".join(doc.split())
