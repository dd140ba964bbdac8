"""What pruning applies to, and what it records.

A prunable layer is a conv2d, linear or matmul whose weight is a float constant. Pruning sees the weight
as a matrix [outputs, K] whose rows are output channels and whose columns run along the reduction
axis K:
- linear: w [N, K] as it is;
- conv2d: w [M, C/group, kH, kW] as [M, C/group·kH·kW] (row-major, the im2col column order of NCHW);
- matmul(x, W) with a constant 2-D W [K, N]: Wᵀ; matmul(W, x) with a constant 2-D W [M, K]: W.

Each layer is named by its node's name (the ONNX node name), else its weight's name. `exclude` entries
match node names, weight names or op types. What pruning did is merged into
`graph.metadata["pruning"][layer name]` (JSON: method, pattern, sparsity, params, errors, or `skipped`
with the reason), which later passes (`sparsify`) and reports read.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from lowbit.ir import Graph, Node, Value, constant_value
from lowbit.passes.registry import PassError

log = logging.getLogger("lowbit.passes")

PRUNABLE_OPS = ("conv2d", "linear", "matmul")
# Ops whose constant weight `sparsify` may give a sparse layout: op → weight operand index.
WEIGHT_OPERAND = {"conv2d": 1, "linear": 1, "qconv2d": 1, "qlinear": 1, "dynamic_linear": 1}


class PruneError(PassError):
    """A bad pruning option (sparsity out of range, unknown layer in overrides, bad spec) or pattern."""


@dataclass
class WeightLayer:
    """One layer's constant weight (operand `index` of `node`) and how it maps to [outputs, K]."""

    node: Node
    index: int
    transposed: bool = False

    @property
    def weight(self) -> Value:
        return self.node.inputs[self.index]

    @property
    def data(self) -> np.ndarray:
        return constant_value(self.weight)

    @property
    def name(self) -> str:
        return layer_name(self.node, self.weight)

    @property
    def groups(self) -> int:
        return self.node.attrs.get("group", 1)

    def matrix(self) -> np.ndarray:
        data = self.data
        return data.T if self.transposed else data.reshape(data.shape[0], -1)

    def from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        shape = self.weight.type.shape
        array = matrix.T if self.transposed else matrix.reshape(shape)
        return np.ascontiguousarray(array, dtype=self.weight.type.dtype.numpy)

    def set_matrix(self, graph: Graph, matrix: np.ndarray) -> None:
        """Give this layer (only: a weight shared with another node stays) a new weight."""
        replacement = graph.add_constant(self.from_matrix(matrix), self.weight.name)
        self.node.set_input(self.index, replacement)

    def matches(self, names: Iterable[str]) -> bool:
        return any(name in (self.node.op, self.node.name, self.weight.name) for name in names)


def layer_name(node: Node, weight: Value | None = None) -> str:
    if node.name:
        return node.name
    if weight is not None and weight.name:
        return weight.name
    position = node.graph.nodes.index(node) if node.graph is not None else -1
    return f"{node.op}@{position}"


def weight_layer(node: Node, ops: Iterable[str] = PRUNABLE_OPS, *, float_only: bool = True) -> WeightLayer | None:
    """The layer `node` is, if it is one of `ops` with a (float) constant weight; None otherwise."""
    if node.op not in ops:
        return None
    if node.op == "matmul":
        for index, transposed in ((1, True), (0, False)):
            data = constant_value(node.inputs[index])
            other = node.inputs[1 - index]
            if data is not None and data.ndim == 2 and constant_value(other) is None:
                layer = WeightLayer(node, index, transposed)
                break
        else:
            return None
    else:
        index = WEIGHT_OPERAND.get(node.op, 1)
        if constant_value(node.inputs[index]) is None:
            return None
        layer = WeightLayer(node, index)
    return layer if layer.weight.type.dtype.is_float or not float_only else None


def split_names(text: str | Iterable[str]) -> tuple[str, ...]:
    """Names from `"a;b"` (pipeline text; `;` because node names hold `/` and `,` ends an option)."""
    items = text.split(";") if isinstance(text, str) else list(text)
    return tuple(item.strip() for item in items if item and item.strip())


def parse_overrides(text: str | Mapping[str, float] | None) -> dict[str, float]:
    """Per-layer values from `"name:0.5;name2:0.7"` or a mapping; each must be a fraction in [0, 1)."""
    if not text:
        return {}
    if isinstance(text, Mapping):
        pairs = list(text.items())
    else:
        pairs = []
        for item in split_names(text):
            name, sep, value = item.rpartition(":")
            if not sep or not name.strip():
                raise PruneError(f"overrides entry {item!r} needs the form NAME:VALUE (e.g. 'fc1:0.7')")
            pairs.append((name.strip(), value.strip()))
    overrides = {}
    for name, value in pairs:
        overrides[name] = check_fraction(value, f"override for layer '{name}'")
    return overrides


def check_fraction(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PruneError(f"{what}: expected a number in [0, 1), got {value!r}") from None
    if not 0.0 <= number < 1.0:
        hint = " (a fraction: 0.9 means 90%)" if 1.0 <= number <= 100.0 else ""
        raise PruneError(f"{what}: expected a number in [0, 1), got {value!r}{hint}")
    return number


@dataclass
class Selection:
    """The layers a pruning pass works on, those it skips (with why), and per-layer overrides."""

    layers: list[WeightLayer]
    skipped: dict[str, tuple[str, str]]
    overrides: dict[str, float]

    def value(self, layer: WeightLayer, default: float) -> float:
        for key in (layer.node.name, layer.weight.name):
            if key in self.overrides:
                return self.overrides[key]
        return default


def select_layers(graph: Graph, exclude: str | Iterable[str] = "", overrides: str | Mapping | None = None,
                  ops: Iterable[str] = PRUNABLE_OPS) -> Selection:
    """Every prunable layer of `graph` in order, less the excluded ones (which are listed as skipped)."""
    names = split_names(exclude)
    table = parse_overrides(overrides)
    layers, skipped, known = [], {}, set()
    for node in graph.nodes:
        layer = weight_layer(node, ops)
        if layer is None:
            continue
        known.update(n for n in (node.name, layer.weight.name) if n)
        if layer.matches(names):
            skipped[layer.name] = (node.op, "excluded")
        else:
            layers.append(layer)
    unknown = sorted(set(table) - known)
    if unknown:
        raise PruneError(f"overrides name unknown layer(s) {unknown}; the prunable layers are "
                         f"{sorted(known) or 'none'}")
    unmatched = [n for n in names if n not in known and not any(n == node.op for node in graph.nodes)]
    if unmatched:
        log.warning("pruning: exclude entries %s match no layer or op of graph '%s'", unmatched, graph.name)
    return Selection(layers, skipped, table)


def record(graph: Graph, name: str, entry: Mapping[str, Any]) -> None:
    """Merge `entry` into the layer's pruning record (a fresh pruning result drops an older `skipped`)."""
    layers = graph.metadata.setdefault("pruning", {})
    current = dict(layers.get(name, {}))
    if "method" in entry and "skipped" not in entry:
        current.pop("skipped", None)
    current.update({key: _json_number(value) for key, value in entry.items()})
    layers[name] = current


def record_skipped(graph: Graph, skipped: Mapping[str, tuple[str, str]], method: str) -> None:
    """Record the layers `method` left as they were: name → (op, reason)."""
    for name, (op, reason) in skipped.items():
        log.info("%s: layer '%s' left as it is: %s", method, name, reason)
        record(graph, name, {"op": op, "skipped": f"{method}: {reason}"})


def _json_number(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return float(f"{float(value):.6g}")
    if isinstance(value, np.integer):
        return int(value)
    return value


def sparsity_of(array: np.ndarray) -> float:
    return float(np.count_nonzero(array == 0)) / max(array.size, 1)
