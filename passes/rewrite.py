"""Pattern rewriting: local `RewritePattern`s applied by a worklist driver, and declarative
multi-node `Fusion`s (pattern / check / rewrite) whose rejected matches say why.

Patterns are trees over values:
    x, w, b = Var("x"), Const("w"), Const("b")
    Op("add", Op("matmul", x, w), b)
A `Var` matches any value and binds it (the same name must bind the same value); `Const` matches
constants only; `Op` matches a node's result by op name (and attributes given as `attrs`), trying both
operand orders of commutative ops.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from lowbit.ir import Graph, Node, Value, constant_value, get_op

log = logging.getLogger("lowbit.passes")


class PatternNode:
    def match(self, value: Value | None, found: "Match") -> bool:
        raise NotImplementedError


@dataclass
class Match:
    """What a pattern bound: values by name and the matched nodes (root first)."""

    values: dict[str, Value] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)

    def __getitem__(self, name: str) -> Value:
        return self.values[name]

    def const(self, name: str) -> np.ndarray:
        data = constant_value(self.values[name])
        if data is None:
            raise KeyError(f"'{name}' is not bound to a constant")
        return data

    def node(self, op: str) -> Node:
        """The first matched node of `op`."""
        return next(n for n in self.nodes if n.op == op)

    def copy(self) -> "Match":
        return Match(dict(self.values), list(self.nodes))


@dataclass
class Var(PatternNode):
    name: str
    where: Callable[[Value], bool] | None = None

    def match(self, value: Value | None, found: Match) -> bool:
        if value is None or (self.where is not None and not self.where(value)):
            return False
        bound = found.values.get(self.name)
        if bound is not None:
            return bound is value or _same_constant(bound, value)
        found.values[self.name] = value
        return True


@dataclass
class Const(Var):
    """A constant value; with `value`, only a constant equal to it everywhere (a scalar or broadcast)."""

    value: float | None = None

    def match(self, value: Value | None, found: Match) -> bool:
        data = constant_value(value)
        if data is None:
            return False
        if self.value is not None and (data.size == 0 or not np.allclose(data, self.value, rtol=1e-6, atol=0)):
            return False
        return super().match(value, found)


class Op(PatternNode):
    def __init__(self, op: str, *operands: PatternNode, attrs: dict[str, Any] | None = None,
                 name: str | None = None) -> None:
        self.op = op
        self.operands = operands
        self.attrs = attrs or {}
        self.name = name

    def match(self, value: Value | None, found: Match) -> bool:
        node = value.producer if value is not None else None
        if node is None or node.op != self.op or len(node.inputs) < len(self.operands):
            return False
        if any(node.attrs.get(k) != v for k, v in self.attrs.items()):
            return False
        orders = [node.inputs]
        if len(self.operands) == 2 and "commutative" in get_op(node.op).traits:
            orders.append([node.inputs[1], node.inputs[0]])
        for operands in orders:
            trial = found.copy()
            if all(p.match(v, trial) for p, v in zip(self.operands, operands)):
                trial.nodes.append(node)
                if self.name:
                    trial.values[self.name] = value
                found.values, found.nodes = trial.values, trial.nodes
                return True
        return False


def _same_constant(a: Value, b: Value) -> bool:
    x, y = constant_value(a), constant_value(b)
    return x is not None and y is not None and x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y)


def match_at(pattern: PatternNode, root: Node) -> Match | None:
    """Match `pattern` against the (single) result of `root`; matched nodes are listed root first."""
    if len(root.outputs) != 1:
        return None
    found = Match()
    if not pattern.match(root.outputs[0], found):
        return None
    found.nodes.reverse()
    return found


class RewritePattern:
    """A local rewrite tried on nodes whose op is in `ops` (all nodes when empty)."""

    ops: Sequence[str] = ()

    def match_and_rewrite(self, graph: Graph, node: Node) -> bool:
        raise NotImplementedError


class Fusion(RewritePattern):
    """A declarative multi-node rewrite: `pattern`, then `check` (a reason string rejects), then `rewrite`.

    By default a match is rejected when an interior node's result is used outside the match, since
    fusing it would compute it twice.
    """

    pattern: PatternNode
    name: str = "fusion"

    def __init__(self) -> None:
        root = self.patterns()[0]
        self.ops = tuple({p.op for p in self.patterns() if isinstance(p, Op)}) if isinstance(root, Op) else ()

    def patterns(self) -> list[PatternNode]:
        """Alternative forms of the pattern, tried in order."""
        return [self.pattern]

    def check(self, graph: Graph, match: Match) -> str | None:
        return None

    def rewrite(self, graph: Graph, match: Match) -> Value:
        """Build the replacement before the root node and return it; the driver rewires and cleans up."""
        raise NotImplementedError

    def match_and_rewrite(self, graph: Graph, node: Node) -> bool:
        for pattern in self.patterns():
            found = match_at(pattern, node)
            if found is None:
                continue
            reason = self._escaping(graph, found) or self.check(graph, found)
            if reason:
                log.debug("%s: rejected match at %s: %s", self.name, node.describe(), reason)
                continue
            replacement = self.rewrite(graph, found)
            graph.replace_all_uses_with(node.output, replacement)
            for matched in reversed(found.nodes):
                if matched.graph is graph and not any(graph.has_uses(v) for v in matched.outputs):
                    graph.erase(matched)
            log.debug("%s: rewrote %s", self.name, node.describe())
            return True
        return False

    @staticmethod
    def _escaping(graph: Graph, found: Match) -> str | None:
        inside = {id(n) for n in found.nodes}
        for matched in found.nodes[1:]:
            for value in matched.outputs:
                if graph.is_output(value) or any(id(user) not in inside for user in value.users):
                    return f"the result of {matched.describe()} is also used outside the pattern"
        return None


def apply_patterns(graph: Graph, patterns: Sequence[RewritePattern], max_rewrites: int = 100_000) -> bool:
    """Apply patterns until none matches, revisiting only nodes near each rewrite (a worklist)."""
    by_op: dict[str, list[RewritePattern]] = {}
    generic: list[RewritePattern] = []
    for pattern in patterns:
        if pattern.ops:
            for op in pattern.ops:
                by_op.setdefault(op, []).append(pattern)
        else:
            generic.append(pattern)
    # Consumers are visited before producers, so a pattern rooted late in a chain (the largest
    # fusion) claims the chain before a smaller pattern rooted inside it does.
    worklist = list(graph.nodes)
    # The set holds the nodes themselves: an erased node's id() can be reused by a new one.
    known = set(graph.nodes)
    changed = False
    rewrites = 0
    while worklist:
        node = worklist.pop()
        if node.erased or node.graph is not graph:
            continue
        neighbours = [v.producer for v in node.inputs if v is not None and v.producer is not None]
        neighbours += [user for v in node.outputs for user in v.users]
        for pattern in by_op.get(node.op, []) + generic:
            if pattern.match_and_rewrite(graph, node):
                changed = True
                rewrites += 1
                if rewrites > max_rewrites:
                    raise RuntimeError(f"pattern rewriting did not converge after {max_rewrites} rewrites")
                fresh = [n for n in graph.nodes if n not in known]
                known.update(fresh)
                revisit = fresh + [user for n in fresh for v in n.outputs for user in v.users]
                revisit += [v.producer for n in fresh for v in n.inputs if v is not None and v.producer]
                worklist.extend(revisit + neighbours + ([node] if not node.erased else []))
                break
    return changed
