"""Per-op rule tables: reference implementations, converters, lowerings, exporters, … each keyed by
op name and filled by a decorator next to the rule (DESIGN: "registered beside each other")."""
from __future__ import annotations

from typing import Callable, TypeVar

Rule = TypeVar("Rule", bound=Callable)


class OpTable(dict[str, Rule]):
    """A dict of op name → rule in which every op has at most one rule."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def register(self, *ops: str) -> Callable[[Rule], Rule]:
        """Decorator: `fn` becomes the rule of each op in `ops` (registering an op twice is an error)."""

        def decorate(fn: Rule) -> Rule:
            for op in ops:
                if op in self:
                    raise ValueError(f"'{op}' already has a {self.what}")
                self[op] = fn
            return fn

        return decorate
