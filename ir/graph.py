"""Values, nodes and graphs: SSA with use lists and a few safe mutation primitives."""
from __future__ import annotations

import copy
from typing import Any, Iterator, Sequence

import numpy as np

from lowbit.errors import ShapeError, VerificationError
from lowbit.ir.dtypes import DType
from lowbit.ir.registry import get_op, infer_types
from lowbit.ir.types import TensorType


class ElidedData:
    """Stands in for constant data that a summarised text form left out; it cannot be computed with."""

    __slots__ = ("summary",)

    def __init__(self, summary: str) -> None:
        self.summary = summary


class Value:
    """A tensor in SSA form: one producer (a node, or none for graph inputs and constants), many uses."""

    __slots__ = ("type", "producer", "uses", "name", "data", "__weakref__")

    def __init__(self, type: TensorType, name: str | None = None,
                 producer: "Node | None" = None, data: np.ndarray | ElidedData | None = None) -> None:
        self.type = type
        self.name = name
        self.producer = producer
        self.data = data
        self.uses: list[tuple[Node, int]] = []

    @property
    def is_constant(self) -> bool:
        return self.data is not None

    @property
    def users(self) -> list["Node"]:
        """Distinct nodes that use this value, in use order."""
        seen: dict[int, Node] = {}
        for node, _ in self.uses:
            seen.setdefault(id(node), node)
        return list(seen.values())

    def __repr__(self) -> str:
        kind = "const" if self.is_constant else ("result of " + self.producer.op if self.producer else "input")
        return f"<Value {self.name or '?'} {self.type} ({kind})>"


class Node:
    """One op application. Operands may be None for absent optional operands."""

    __slots__ = ("op", "inputs", "outputs", "attrs", "name", "graph", "erased")

    def __init__(self, op: str, attrs: dict[str, Any], name: str | None = None) -> None:
        self.op = op
        self.attrs = attrs
        self.name = name
        self.inputs: list[Value | None] = []
        self.outputs: list[Value] = []
        self.graph: Graph | None = None
        self.erased = False

    @property
    def output(self) -> Value:
        """The only output of a single-output node."""
        if len(self.outputs) != 1:
            raise VerificationError(f"{self.describe()} has {len(self.outputs)} outputs, not one")
        return self.outputs[0]

    def describe(self) -> str:
        return f"node '{self.name}' ({self.op})" if self.name else f"node {self.op}"

    def set_input(self, index: int, value: Value | None) -> None:
        old = self.inputs[index]
        if old is value:
            return
        if old is not None:
            old.uses.remove((self, index))
        self.inputs[index] = value
        if value is not None:
            value.uses.append((self, index))

    def __repr__(self) -> str:
        return f"<Node {self.describe()}>"


class Graph:
    """An ordered list of nodes in topological order, with inputs, constants, outputs and metadata."""

    def __init__(self, name: str = "main") -> None:
        self.name = name
        self.inputs: list[Value] = []
        self.constants: list[Value] = []
        self.nodes: list[Node] = []
        self.outputs: list[Value] = []
        self.output_names: list[str] = []
        self.metadata: dict[str, Any] = {}

    # -- building ---------------------------------------------------------------------------------
    def add_input(self, name: str, type: TensorType) -> Value:
        if any(v.name == name for v in self.inputs):
            raise VerificationError(f"graph already has an input named '{name}'")
        value = Value(type, name)
        self.inputs.append(value)
        return value

    def add_constant(self, data: np.ndarray, name: str | None = None,
                     type: TensorType | None = None) -> Value:
        """A new constant holding `data` (copied to an owned contiguous array)."""
        array = np.array(data, order="C")
        if type is None:
            type = TensorType.of(array)
        elif tuple(array.shape) != type.shape or array.dtype != type.dtype.numpy:
            raise ShapeError(f"constant '{name}': data {array.dtype}{list(array.shape)} does not match {type}")
        array.flags.writeable = False
        value = Value(type, name, data=array)
        self.constants.append(value)
        return value

    def add_elided_constant(self, type: TensorType, summary: str, name: str | None = None) -> Value:
        value = Value(type, name, data=ElidedData(summary))
        self.constants.append(value)
        return value

    def make_node(self, op: str, inputs: Sequence[Value | None], attrs: dict[str, Any] | None = None,
                  *, name: str | None = None, output_types: Sequence[TensorType] | None = None) -> Node:
        """A node that is not yet placed in the graph; its outputs' types are inferred unless given."""
        opdef = get_op(op)
        where = f"node '{name}' ({op})" if name else f"op '{op}'"
        node = Node(op, opdef.normalize_attrs(dict(attrs or {}), where), name)
        inputs = list(inputs)
        while inputs and inputs[-1] is None:
            inputs.pop()
        if output_types is None:
            constants = [v.data if v is not None and isinstance(v.data, np.ndarray) else None for v in inputs]
            output_types = infer_types(op, [v.type if v is not None else None for v in inputs],
                                       node.attrs, constants, where)
        for index, value in enumerate(inputs):
            node.inputs.append(None)
            node.set_input(index, value)
        node.outputs = [Value(t, producer=node) for t in output_types]
        return node

    def add_node(self, op: str, inputs: Sequence[Value | None], attrs: dict[str, Any] | None = None,
                 *, name: str | None = None, before: Node | None = None, after: Node | None = None,
                 output_types: Sequence[TensorType] | None = None) -> Node:
        """Create a node and place it at the end of the graph, or before/after an anchor node."""
        node = self.make_node(op, inputs, attrs, name=name, output_types=output_types)
        if before is not None:
            self.insert_before(before, node)
        elif after is not None:
            self.insert_after(after, node)
        else:
            node.graph = self
            self.nodes.append(node)
        return node

    def add(self, op: str, *inputs: Value | None, name: str | None = None, **attrs: Any) -> Value:
        """Append a single-output node and return its output (a convenience for building graphs)."""
        return self.add_node(op, inputs, attrs, name=name).output

    def set_outputs(self, outputs: Sequence[tuple[str, Value]]) -> None:
        self.output_names = [name for name, _ in outputs]
        self.outputs = [value for _, value in outputs]

    # -- safe mutation ----------------------------------------------------------------------------
    def insert_before(self, anchor: Node, node: Node) -> None:
        self._place(node, self._index(anchor))

    def insert_after(self, anchor: Node, node: Node) -> None:
        self._place(node, self._index(anchor) + 1)

    def _place(self, node: Node, index: int) -> None:
        if node.graph is not None:
            raise VerificationError(f"{node.describe()} is already placed in a graph")
        node.graph = self
        self.nodes.insert(index, node)

    def _index(self, node: Node) -> int:
        if node.graph is not self or node.erased:
            raise VerificationError(f"{node.describe()} is not in this graph")
        for index, candidate in enumerate(self.nodes):
            if candidate is node:
                return index
        raise VerificationError(f"{node.describe()} is not in this graph")

    def replace_all_uses_with(self, old: Value, new: Value) -> None:
        """Point every use of `old` (node operands and graph outputs) at `new`."""
        if old is new:
            return
        for node, index in list(old.uses):
            node.set_input(index, new)
        self.outputs = [new if v is old else v for v in self.outputs]

    def is_output(self, value: Value) -> bool:
        return any(v is value for v in self.outputs)

    def has_uses(self, value: Value) -> bool:
        return bool(value.uses) or self.is_output(value)

    def erase(self, node: Node) -> None:
        """Remove a node whose outputs are unused; refuses while any use remains."""
        for value in node.outputs:
            if self.has_uses(value):
                users = ", ".join(user.describe() for user in value.users) or "a graph output"
                raise VerificationError(f"cannot erase {node.describe()}: its output is used by {users}")
        index = self._index(node)
        for i in range(len(node.inputs)):
            node.set_input(i, None)
        del self.nodes[index]
        node.erased = True
        node.graph = None

    def eliminate_dead_code(self) -> int:
        """Erase nodes none of whose results is used, then unused constants; returns how many went."""
        removed = 0
        for node in reversed(list(self.nodes)):
            if not any(self.has_uses(value) for value in node.outputs):
                self.erase(node)
                removed += 1
        return removed + self.remove_unused_constants()

    def remove_unused_constants(self) -> int:
        before = len(self.constants)
        self.constants = [c for c in self.constants if self.has_uses(c)]
        return before - len(self.constants)

    # -- queries ----------------------------------------------------------------------------------
    def iter_nodes(self) -> Iterator[Node]:
        """Nodes in order; safe while nodes are inserted or erased (erased ones are skipped)."""
        for node in list(self.nodes):
            if not node.erased and node.graph is self:
                yield node

    def input(self, name: str) -> Value:
        for value in self.inputs:
            if value.name == name:
                return value
        raise KeyError(name)

    def output(self, name: str) -> Value:
        return self.outputs[self.output_names.index(name)]

    def op_histogram(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))

    def parameter_count(self) -> int:
        return sum(c.type.size for c in self.constants)

    def parameter_bytes(self) -> int:
        return sum(c.type.nbytes for c in self.constants)

    def copy(self) -> "Graph":
        """A deep copy of the structure; constant arrays are shared (they are read-only)."""
        clone = Graph(self.name)
        clone.metadata = copy.deepcopy(self.metadata)
        mapping: dict[int, Value] = {}
        for value in self.inputs:
            mapping[id(value)] = clone.add_input(value.name, value.type)
        for value in self.constants:
            twin = Value(value.type, value.name, data=value.data)
            clone.constants.append(twin)
            mapping[id(value)] = twin
        for node in self.nodes:
            twin_node = clone.add_node(
                node.op, [mapping[id(v)] if v is not None else None for v in node.inputs], node.attrs,
                name=node.name, output_types=[v.type for v in node.outputs])
            for old, new in zip(node.outputs, twin_node.outputs):
                new.name = old.name
                mapping[id(old)] = new
        clone.set_outputs([(name, mapping[id(v)]) for name, v in zip(self.output_names, self.outputs)])
        return clone

    def __str__(self) -> str:
        from lowbit.ir.printer import print_graph

        return print_graph(self)

    def to_text(self, *, full: bool = False) -> str:
        """The text form; `full=True` writes every constant's data so the text round-trips weights."""
        from lowbit.ir.printer import print_graph

        return print_graph(self, full=full)

    def __repr__(self) -> str:
        return f"<Graph {self.name}: {len(self.inputs)} inputs, {len(self.nodes)} nodes, {len(self.outputs)} outputs>"


def constant_value(value: Value | None) -> np.ndarray | None:
    """The data of a constant value, or None for anything else (including elided constants)."""
    if value is not None and isinstance(value.data, np.ndarray):
        return value.data
    return None


def is_float_type(value: Value) -> bool:
    return value.type.dtype in (DType.f32, DType.f16, DType.f64)
