"""Native lowerings of the integer ops, bit-exact with `backends/reference/quantized.py`.

Element-wise ops (quantize, dequantize, requantize, qadd, qmul, qconcat) are one broadcasting map kernel
each (`kernels.requantize.map_kernel`), their parameters folded into the code or read from compile-time
tables. Pooling: `kernels.pool` for max (exact on integers), `kernels.qpool` for the rounded averages.
The products (qlinear, qconv2d, qmatmul, dynamic_linear, dynamic_matmul) live in `quantized_products`.
"""
from __future__ import annotations

import numpy as np

from lowbit.backends.native.lowering import LowerContext, lowering
from lowbit.backends.native.lowerings.lookup import lower_in_chain
from lowbit.ir import DType, Node
from lowbit.ir.ops.quantized import clamp_range, quantize_params
from lowbit.kernels.movement import broadcast_strides, contiguous_strides
from lowbit.kernels.pool import PoolAxis, pool_kernel
from lowbit.kernels.qpool import average_pool_kernel, global_average_kernel
from lowbit.kernels.requantize import (Operand, Requant, dequantize_body, halves, map_kernel, quantize_body,
                                       quantize_by_inverse_body, requantize_body, table_operand)


def requant_of(node: Node) -> Requant:
    """The result side of a requantizing node, from its attributes."""
    attrs = node.attrs
    qmin, qmax = clamp_range(attrs)
    return Requant(tuple(attrs["multiplier"]), tuple(attrs["shift"]), attrs["zero_point"], qmin, qmax, attrs["dtype"],
                   tuple(attrs.get("residual_multiplier") or ()))


def _constant(dtype: DType, value: int | float, rank: int) -> Operand:
    return Operand(dtype, (0,) * rank, values=(value,))


def _channels(values, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    """Per-channel values (or one) as an array broadcastable to `shape` along `axis`."""
    array = np.asarray(values, np.int64)
    if array.size == 1:
        return array.reshape(())
    view = [1] * len(shape)
    view[axis % len(shape)] = array.size
    return array.reshape(view)


def _fixed_point(requant: Requant, shape: tuple[int, ...], axis: int | None, multipliers) -> list[Operand]:
    """Operands m_i (int32, one per entry of `multipliers`), shift and rounding term (int64), per channel
    along `axis`."""
    return ([table_operand(_channels(m, shape, axis), DType.i32, shape) for m in multipliers] +
            [table_operand(_channels(values, shape, axis), DType.i64, shape)
             for values in (requant.shifts, halves(requant.shifts))])


def _map(ctx: LowerContext, node: Node, tag: str, shape: tuple[int, ...], operands: list[Operand],
         result: tuple, body_key: tuple, body, buffers) -> None:
    key = ("qmap", tag, shape, tuple(operands), result, body_key)
    kernel = ctx.kernel(key, lambda module, name: map_kernel(module, name, ctx.target, len(buffers), shape, operands,
                                                             result, body))
    ctx.call(kernel, buffers)


def _input(node: Node, index: int, shape: tuple[int, ...], arg: int | None = None) -> Operand:
    """Operand `index` of the node read at the coordinates of `shape` (broadcast)."""
    t = node.inputs[index].type
    return Operand(t.dtype, broadcast_strides(shape, t.shape), arg=index if arg is None else arg)


@lowering("quantize")
def lower_quantize(ctx: LowerContext, node: Node) -> None:
    if lower_in_chain(ctx, node):  # the end of a table lookup (lowerings.lookup)
        return
    shape = node.inputs[0].type.shape
    params = quantize_params(node.attrs)
    dtype = node.attrs["dtype"]
    result = (dtype, 1, contiguous_strides(shape), 0)
    if len(params.scale) == 1 and node.inputs[0].type.dtype == DType.f32 and dtype.bits <= 16:
        scale, zero_point = params.scale[0], params.zero_point[0]
        _map(ctx, node, "quantize.inverse", shape, [_input(node, 0, shape)], result,
             (params.qmin, params.qmax, scale, zero_point),
             quantize_by_inverse_body(dtype, params.qmin, params.qmax, scale, zero_point),
             [ctx.operand(0), ctx.result(0)])
        return
    operands = [_input(node, 0, shape), table_operand(params.scale_array(shape), DType.f32, shape),
                table_operand(params.zero_point_array(shape).astype(np.int64), DType.i64, shape)]
    _map(ctx, node, "quantize", shape, operands, result, (params.qmin, params.qmax),
         quantize_body(dtype, params.qmin, params.qmax), [ctx.operand(0), ctx.result(0)])


@lowering("dequantize")
def lower_dequantize(ctx: LowerContext, node: Node) -> None:
    if lower_in_chain(ctx, node):  # the start of a table lookup (lowerings.lookup)
        return
    t = node.inputs[0].type
    shape, params = t.shape, t.quant
    operands = [_input(node, 0, shape),
                table_operand(params.zero_point_array(shape).astype(np.int64), DType.i64, shape),
                table_operand(params.scale_array(shape), DType.f32, shape)]
    _map(ctx, node, "dequantize", shape, operands, (DType.f32, 1, contiguous_strides(shape), 0), (),
         dequantize_body(t.dtype.is_signed), [ctx.operand(0), ctx.result(0)])


@lowering("requantize")
def lower_requantize(ctx: LowerContext, node: Node) -> None:
    t = node.inputs[0].type
    shape, params, requant = t.shape, t.quant, requant_of(node)
    operands = [_input(node, 0, shape),
                table_operand(params.zero_point_array(shape).astype(np.int64), DType.i64, shape),
                *_fixed_point(requant, shape, params.axis, [requant.multipliers])]
    _map(ctx, node, "requantize", shape, operands, (requant.dtype, 1, contiguous_strides(shape), 0), requant,
         requantize_body([t.dtype.is_signed], requant), [ctx.operand(0), ctx.result(0)])


@lowering("qadd", "qmul")
def lower_qadd_qmul(ctx: LowerContext, node: Node) -> None:
    """qadd: R((a − za)·ma + (b − zb)·mb); qmul: R((a − za)(b − zb)·m); a and b broadcast."""
    shape, requant = node.outputs[0].type.shape, requant_of(node)
    a, b = (node.inputs[i].type for i in (0, 1))
    operands = [_input(node, 0, shape), _constant(DType.i64, a.quant.zero_point[0], len(shape)),
                _input(node, 1, shape), _constant(DType.i64, b.quant.zero_point[0], len(shape))]
    multipliers = [(m,) for m in requant.multipliers]
    operands += _fixed_point(requant, shape, None, multipliers)
    product = node.op == "qmul"
    _map(ctx, node, node.op, shape, operands, (requant.dtype, 2, contiguous_strides(shape), 0), requant,
         requantize_body([a.dtype.is_signed, b.dtype.is_signed], requant, product),
         [ctx.operand(0), ctx.operand(1), ctx.result(0)])


@lowering("qconcat")
def lower_qconcat(ctx: LowerContext, node: Node) -> None:
    """Each input requantized with its own multiplier and shift straight into its block of the result."""
    axis = node.attrs["axis"] % node.outputs[0].type.rank
    target = contiguous_strides(node.outputs[0].type.shape)
    requant = requant_of(node)
    position = 0
    for index, value in enumerate(node.inputs):
        t = value.type
        shape = t.shape
        mine = Requant((requant.multipliers[index],), (requant.shifts[index],), requant.zero_point, requant.qmin,
                       requant.qmax, requant.dtype)
        operands = [_input(node, index, shape, arg=0), _constant(DType.i64, t.quant.zero_point[0], len(shape)),
                    *_fixed_point(mine, shape, None, [mine.multipliers])]
        result = (requant.dtype, 1, target, position * target[axis])
        _map(ctx, node, "qconcat", shape, operands, result, mine, requantize_body([t.dtype.is_signed], mine),
             [ctx.operand(index), ctx.result(0)])
        position += shape[axis]


# -- pooling ---------------------------------------------------------------------------------------------
def _pool_axes(node: Node) -> tuple[PoolAxis, PoolAxis]:
    x, y, attrs = node.inputs[0].type, node.outputs[0].type, node.attrs
    return tuple(PoolAxis(x.shape[2 + a], y.shape[2 + a], attrs["kernel"][a], attrs["strides"][a],
                          attrs["dilations"][a], attrs["pads"][a], attrs["pads"][a + 2]) for a in range(2))


@lowering("qmax_pool2d")
def lower_qmax_pool2d(ctx: LowerContext, node: Node) -> None:
    x = node.inputs[0].type
    planes, axes = x.shape[0] * x.shape[1], _pool_axes(node)
    kernel = ctx.kernel(("pool", "max", False, x.dtype, planes, axes), lambda module, name: pool_kernel(
        module, name, ctx.target, x.dtype, planes, axes, "max"))
    ctx.call(kernel, [ctx.operand(0), ctx.result(0)])


@lowering("qavg_pool2d")
def lower_qavg_pool2d(ctx: LowerContext, node: Node) -> None:
    x = node.inputs[0].type
    planes, axes, include = x.shape[0] * x.shape[1], _pool_axes(node), node.attrs["count_include_pad"]
    zero_points = x.quant.zero_point
    kernel = ctx.kernel(("qavg_pool", x.dtype, planes, x.shape[1], axes, include, zero_points),
                        lambda module, name: average_pool_kernel(module, name, x.dtype, planes, x.shape[1], axes,
                                                                 include, zero_points))
    ctx.call(kernel, [ctx.operand(0), ctx.result(0)])


@lowering("qglobal_avg_pool")
def lower_qglobal_avg_pool(ctx: LowerContext, node: Node) -> None:
    x = node.inputs[0].type
    planes, size, zero_points = x.shape[0] * x.shape[1], int(np.prod(x.shape[2:])), x.quant.zero_point
    kernel = ctx.kernel(("qglobal_avg_pool", x.dtype, planes, x.shape[1], size, zero_points),
                        lambda module, name: global_average_kernel(module, name, ctx.target, x.dtype, planes,
                                                                   x.shape[1], size, zero_points))
    ctx.call(kernel, [ctx.operand(0), ctx.result(0)])
