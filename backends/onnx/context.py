"""What an ONNX exporter works with: the names of lowbit values in the ONNX graph, and the nodes and
initializers being written."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lowbit.errors import UnsupportedOpError
from lowbit.ir import DType, Graph, Node, Value, constant_value

ELEMENT_TYPES = {
    DType.f64: TensorProto.DOUBLE, DType.f32: TensorProto.FLOAT, DType.f16: TensorProto.FLOAT16,
    DType.i64: TensorProto.INT64, DType.i32: TensorProto.INT32, DType.i16: TensorProto.INT16,
    DType.i8: TensorProto.INT8, DType.u64: TensorProto.UINT64, DType.u32: TensorProto.UINT32,
    DType.u16: TensorProto.UINT16, DType.u8: TensorProto.UINT8, DType.i4: TensorProto.INT4,
    DType.u4: TensorProto.UINT4, DType.bool: TensorProto.BOOL,
}
SUB_BYTE = (DType.i4, DType.u4)  # ONNX packs them two to a byte; they need opset 21


def tensor_proto(array: np.ndarray, name: str, dtype: DType) -> onnx.TensorProto:
    """An initializer holding `array` as ONNX element type `dtype` (sub-byte types packed)."""
    if dtype in SUB_BYTE:
        return helper.make_tensor(name, ELEMENT_TYPES[dtype], array.shape, array.reshape(-1).tolist())
    return numpy_helper.from_array(np.asarray(array, dtype=dtype.numpy, order="C"), name)


class ExportContext:
    """Writes ONNX nodes and initializers for lowbit nodes, and knows every exported value's ONNX name."""

    def __init__(self, graph: Graph, opset: int) -> None:
        self.graph = graph
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.node: Node | None = None
        self._names: dict[int, str] = {}
        self._used: set[str] = set()
        for value in graph.inputs:
            self._names[id(value)] = self.fresh(value.name)
        for name, value in zip(graph.output_names, graph.outputs):
            # A node's result takes the output's name; inputs, constants and repeats get an Identity later.
            if value.producer is not None and id(value) not in self._names and name not in self._used:
                self._names[id(value)] = self.fresh(name)

    # -- names ----------------------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        """A name no other value, initializer or node of the model has."""
        base = hint or "v"
        name, count = base, 0
        while name in self._used:
            count += 1
            name = f"{base}_{count}"
        self._used.add(name)
        return name

    def name(self, value: Value) -> str:
        """The ONNX name of `value`; a constant becomes an initializer on first use."""
        known = self._names.get(id(value))
        if known is not None:
            return known
        data = constant_value(value)
        if data is None:
            reason = ("its data was elided from the text form the graph came from (load a full text)"
                      if value.is_constant else "its producer was not exported")
            raise UnsupportedOpError(f"{self.where()}: value {value!r} has no ONNX name: {reason}")
        name = self.initializer(data, value.name or "const", value.type.dtype)
        self._names[id(value)] = name
        return name

    def outputs(self, node: Node) -> list[str]:
        """The ONNX names of `node`'s results (graph outputs keep their names)."""
        hint = node.name or node.op
        names = []
        for index, value in enumerate(node.outputs):
            if id(value) not in self._names:
                self._names[id(value)] = self.fresh(hint if len(node.outputs) == 1 else f"{hint}.{index}")
            names.append(self._names[id(value)])
        return names

    def where(self) -> str:
        return self.node.describe() if self.node is not None else "ONNX export"

    # -- writing --------------------------------------------------------------------------------------
    def initializer(self, array: np.ndarray, hint: str, dtype: DType | None = None) -> str:
        array = np.asarray(array)
        dtype = dtype or DType.from_numpy(array.dtype)
        if dtype in SUB_BYTE:
            self.require_opset(21, f"{dtype} tensors")
        name = self.fresh(hint)
        self.initializers.append(tensor_proto(array, name, dtype))
        return name

    def ints(self, values: Sequence[int], hint: str) -> str:
        """A 1-D int64 initializer (shapes, axes, pads, ...)."""
        return self.initializer(np.asarray(list(values), np.int64), self._hint(hint))

    def scalar(self, value: float | int, dtype: DType, hint: str) -> str:
        """A 0-d initializer of element type `dtype`."""
        return self.initializer(np.asarray(value).astype(dtype.numpy), self._hint(hint), dtype)

    def emit(self, op_type: str, inputs: Sequence[str | None], outputs: Sequence[str] | str | None = None,
             **attrs: Any) -> str:
        """Append one ONNX node; returns its (first) output name, fresh unless given. Attributes that are
        None are left out; absent optional inputs are None (written as '')."""
        if outputs is None:
            outputs = [self.fresh(self._hint(op_type))]
        elif isinstance(outputs, str):
            outputs = [outputs]
        attrs = {key: value for key, value in attrs.items() if value is not None}
        inputs = list(inputs)
        while inputs and inputs[-1] is None:
            inputs.pop()
        self.nodes.append(helper.make_node(op_type, [name or "" for name in inputs], list(outputs),
                                           name=self.fresh(self._hint(op_type)), **attrs))
        return outputs[0]

    def require_opset(self, opset: int, what: str) -> None:
        if self.opset < opset:
            raise UnsupportedOpError(f"{self.where()}: ONNX has {what} from opset {opset}; exporting at opset "
                                     f"{self.opset}")

    def _hint(self, suffix: str) -> str:
        base = (self.node.name or self.node.op) if self.node is not None else "lowbit"
        return f"{base}.{suffix}"
