"""Float16 and float64 products (linear, matmul, convolutions, attention) on the float32 kernels.

The product kernels (`lowbit.kernels.gemm_f32`, `lowbit.kernels.conv`) are float32 only. A float16 or
float64 product is lowered as: its float operands cast to float32, the float32 lowering of a float32
twin of the node, its result cast back. Why that is accurate enough:
- float16: it is what the reference interpreter (and ONNX Runtime's MLAS) does: float32 arithmetic,
  one rounding to float16 at the end, so results agree to float16's rounding.
- float64: results carry float32 precision (relative error ≈ 1e-7·√K for a K-long dot product) and
  operands beyond float32's range become ±inf; well inside ONNX's conformance tolerance (rtol 1e-3),
  but not float64 accuracy: a model that needs that needs dedicated float64 kernels.
"""
from __future__ import annotations

import functools

import numpy as np

from lowbit.backends.native.lowering import Lowering, LowerContext, lower_node
from lowbit.errors import UnsupportedOpError
from lowbit.ir import DType, Node, TensorType, Value, constant_value

_WIDTHS = (DType.f16, DType.f64)


def in_float32(lower: Lowering) -> Lowering:
    """`lower` (a float32 lowering) extended to float16 and float64 nodes through float32 (module doc)."""

    @functools.wraps(lower)
    def lower_any_width(ctx: LowerContext, node: Node) -> None:
        dtype = node.inputs[0].type.dtype
        if dtype is DType.f32:
            lower(ctx, node)
            return
        if dtype not in _WIDTHS:
            raise UnsupportedOpError(f"{node.describe()}: the native backend computes {node.op} in float32, "
                                     f"float16 or float64, not {dtype}")
        twin = _float32_twin(node)
        for value, wide in zip(node.inputs, twin.inputs):
            if value is not None and constant_value(wide) is None:
                _cast(ctx, node, value, wide)
        lower_node(ctx, twin)  # the twin's values get arena buffers like any intermediate value
        for value, wide in zip(node.outputs, twin.outputs):
            _cast(ctx, node, wide, value)

    return lower_any_width


def _float32_twin(node: Node) -> Node:
    """`node` with float32 operands (products' operands share one type; constants are converted now) and
    results. It stays out of the graph: its values are not the graph's and record no uses."""
    twin = Node(node.op, node.attrs, node.name)
    twin.inputs = [None if value is None else _float32_value(value) for value in node.inputs]
    twin.outputs = [_float32_value(value) for value in node.outputs]
    return twin


def _float32_value(value: Value) -> Value:
    data = constant_value(value)
    return Value(TensorType(value.type.shape, DType.f32), value.name,
                 data=None if data is None else np.asarray(data, np.float32))


def _cast(ctx: LowerContext, node: Node, source: Value, result: Value) -> None:
    """A call converting `source` into `result`'s type, lowered as a cast node named after `node`."""
    cast = Node("cast", {"to": result.type.dtype}, node.name)
    cast.inputs, cast.outputs = [source], [result]
    lower_node(ctx, cast)
