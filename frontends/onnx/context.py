"""What a converter works with: the ONNX node being converted and a context that emits lowbit IR."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import onnx

from lowbit.errors import ModelFormatError, UnsupportedOpError
from lowbit.ir import Graph, Node, Value, constant_value, get_op

# Evaluates a node whose operands are all constant (the reference interpreter's `evaluate_node`).
FoldFn = Callable[[Node, list[np.ndarray]], list[np.ndarray]]


class OnnxNode:
    """One ONNX node with its operands resolved to IR values and its attributes decoded."""

    def __init__(self, proto: onnx.NodeProto, inputs: list[Value | None], opset: int) -> None:
        self.proto = proto
        self.op_type = proto.op_type
        self.name = proto.name or (proto.output[0] if proto.output else proto.op_type)
        self.inputs = inputs
        self.opset = opset
        self.num_outputs = len(proto.output)
        self.attrs: dict[str, Any] = {}
        for attribute in proto.attribute:
            value = onnx.helper.get_attribute_value(attribute)
            if isinstance(value, bytes):
                value = value.decode("utf-8")
            elif isinstance(value, list) and value and isinstance(value[0], bytes):
                value = [v.decode("utf-8") for v in value]
            self.attrs[attribute.name] = value

    def describe(self) -> str:
        return f"node '{self.name}' ({self.op_type}, opset {self.opset})"

    def input(self, index: int) -> Value | None:
        return self.inputs[index] if index < len(self.inputs) else None

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)


class ConvertContext:
    """Emits IR for converters; folds nodes whose operands are all constant when a folder is given."""

    def __init__(self, graph: Graph, opset: int, fold: FoldFn | None) -> None:
        self.graph = graph
        self.opset = opset
        self.fold = fold
        self.node: OnnxNode | None = None

    def emit(self, op: str, inputs: Sequence[Value | None], attrs: dict[str, Any] | None = None,
             name_suffix: str = "") -> Value:
        """Add one single-result node (or fold it to a constant) and return its result."""
        results = self.emit_multi(op, inputs, attrs, name_suffix)
        if len(results) != 1:
            raise ModelFormatError(f"{self.where()}: op '{op}' has {len(results)} results, not one")
        return results[0]

    def emit_multi(self, op: str, inputs: Sequence[Value | None], attrs: dict[str, Any] | None = None,
                   name_suffix: str = "") -> list[Value]:
        name = (self.node.name if self.node else op) + name_suffix
        node = self.graph.make_node(op, inputs, attrs, name=name)
        operands = [constant_value(v) if v is not None else None for v in node.inputs]
        foldable = self.fold is not None and "pure" in get_op(op).traits and all(
            array is not None for array, value in zip(operands, node.inputs) if value is not None)
        if foldable:
            results = self.fold(node, operands)
            for index in range(len(node.inputs)):
                node.set_input(index, None)
            return [self.graph.add_constant(array, name=f"{name}.{i}" if len(results) > 1 else name,
                                            type=node.outputs[i].type)  # keeps `quant` of a folded quantize
                    for i, array in enumerate(results)]
        node.graph = self.graph
        self.graph.nodes.append(node)
        return list(node.outputs)

    def constant(self, array: np.ndarray | int | float, dtype: Any = None, name: str | None = None) -> Value:
        """A new constant (named after the node being converted unless `name` is given)."""
        data = np.asarray(array, dtype=dtype)
        return self.graph.add_constant(data, name or (f"{self.node.name}.const" if self.node else None))

    def const_data(self, value: Value | None, what: str) -> np.ndarray:
        """The data of a constant operand; a non-constant one is unsupported and says which."""
        data = constant_value(value)
        if data is None:
            raise UnsupportedOpError(f"{self.where()}: {what} must be a constant (lowbit compiles static "
                                     f"shapes), but it is computed at run time")
        return data

    def unsupported(self, message: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"{self.where()}: {message}")

    def where(self) -> str:
        return self.node.describe() if self.node else "ONNX model"
