"""Name -> class registries for strategies and connectors (timm-style: names users can type).

Strategies register with `@register_strategy`; third-party packages add theirs through the entry-point group
`vlmeff.strategies` (``name = "package.module:Class"``), loaded on first lookup.
"""

from __future__ import annotations

import difflib
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A registry lookup for a name that is not registered (the message lists close matches)."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str, entry_point_group: str | None = None):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._items: dict[str, type[T]] = {}
        self._entry_points_loaded = entry_point_group is None

    def register(self, cls: type[T]) -> type[T]:
        name = cls.name  # type: ignore[attr-defined]
        if name in self._items and self._items[name] is not cls:
            raise ValueError(f"{self.kind} {name!r} is already registered by {self._items[name].__module__}")
        self._items[name] = cls
        return cls

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.entry_point_group):
            cls = ep.load()
            if getattr(cls, "name", None) != ep.name:
                raise ValueError(f"entry point {ep.name!r} -> {ep.value}: class name attribute is {cls.name!r}")
            self.register(cls)

    def get(self, name: str) -> type[T]:
        self._builtins()
        self._load_entry_points()
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(sorted(self._items))} (see `vlmeff list`)."
            )
        return self._items[name]

    def items(self) -> dict[str, type[T]]:
        self._builtins()
        self._load_entry_points()
        return dict(sorted(self._items.items()))

    def _builtins(self) -> None:
        # importing the packages runs their @register decorators
        import vlmeff.connectors  # noqa: F401
        import vlmeff.pruners  # noqa: F401


STRATEGIES: Registry = Registry("strategy", entry_point_group="vlmeff.strategies")
CONNECTORS: Registry = Registry("connector")


def register_strategy(cls):
    return STRATEGIES.register(cls)


def register_connector(cls):
    return CONNECTORS.register(cls)
