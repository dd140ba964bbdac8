"""Lowerings of pooling, normalisation, softmax, reductions and resize."""
from __future__ import annotations

import math

import numpy as np

from lowbit.backends.native.lowering import Buffer, LowerContext, lowering
# The resize tables come from the reference's own coordinate and tap rules, so both backends agree.
from lowbit.backends.reference.tensor import _cubic_taps, _linear_taps, _nearest, _source_coordinates
from lowbit.errors import UnsupportedOpError
from lowbit.ir import DType, Node, TensorType, constant_value
from lowbit.kernels.copy import copy_kernel
from lowbit.kernels.normalize import batch_norm_kernel, lrn_kernel, norm_kernel, softmax_kernel
from lowbit.kernels.pool import PoolAxis, pool_kernel
from lowbit.kernels.reduce import arg_reduce_kernel, reduce_kernel
from lowbit.kernels.resize import blend_axis_kernel, gather_kernel


def _operand(node: Node) -> TensorType:
    return node.inputs[0].type


def _reduce(ctx: LowerContext, node: Node, kind: str, axes: tuple[int, ...]) -> None:
    x = _operand(node)
    key = ("reduce", kind, x.dtype, x.shape, axes)
    kernel = ctx.kernel(key, lambda module, name: reduce_kernel(module, name, ctx.target, x.dtype, x.shape,
                                                                axes, kind))
    ctx.call(kernel, [ctx.operand(0), ctx.result(0)])


@lowering("reduce_sum", "reduce_mean", "reduce_max", "reduce_min", "reduce_prod")
def lower_reduce(ctx: LowerContext, node: Node) -> None:
    _reduce(ctx, node, node.op.removeprefix("reduce_"), tuple(node.attrs["axes"]))


@lowering("max_pool2d", "avg_pool2d")
def lower_pool(ctx: LowerContext, node: Node) -> None:
    x, y, attrs = _operand(node), node.outputs[0].type, node.attrs
    axes = tuple(PoolAxis(x.shape[2 + a], y.shape[2 + a], attrs["kernel"][a], attrs["strides"][a],
                          attrs["dilations"][a], attrs["pads"][a], attrs["pads"][a + 2]) for a in range(2))
    kind = "max" if node.op == "max_pool2d" else "avg"
    include_pad = kind == "avg" and attrs["count_include_pad"]
    planes = x.shape[0] * x.shape[1]
    kernel = ctx.kernel(("pool", kind, include_pad, x.dtype, planes, axes), lambda module, name: pool_kernel(
        module, name, ctx.target, x.dtype, planes, axes, kind, include_pad))
    ctx.call(kernel, [ctx.operand(0), ctx.result(0)])


@lowering("global_avg_pool", "global_max_pool")
def lower_global_pool(ctx: LowerContext, node: Node) -> None:
    _reduce(ctx, node, "mean" if node.op == "global_avg_pool" else "max", tuple(range(2, _operand(node).rank)))


@lowering("argmax", "argmin")
def lower_arg_reduce(ctx: LowerContext, node: Node) -> None:
    x, axis, last = _operand(node), node.attrs["axis"], node.attrs["select_last_index"]
    largest = node.op == "argmax"
    key = ("arg_reduce", largest, last, x.dtype, x.shape, axis)
    kernel = ctx.kernel(key, lambda module, name: arg_reduce_kernel(module, name, ctx.target, x.dtype, x.shape,
                                                                    axis, largest, last))
    ctx.call(kernel, [ctx.operand(0), ctx.result(0)])


@lowering("softmax", "log_softmax")
def lower_softmax(ctx: LowerContext, node: Node) -> None:
    x = _operand(node)
    axis = node.attrs["axis"] % x.rank
    outer, length, inner = math.prod(x.shape[:axis]), x.shape[axis], math.prod(x.shape[axis + 1:])
    log = node.op == "log_softmax"
    kernel = ctx.kernel(("softmax", log, x.dtype, outer, length, inner), lambda module, name: softmax_kernel(
        module, name, ctx.target, x.dtype, outer, length, inner, log))
    ctx.call(kernel, [ctx.operand(0), ctx.result(0)], parallel=True)


def _period(shape: tuple[int, ...], normalized: tuple[int, ...]) -> int | None:
    """How many values a parameter of `shape` holds when it repeats along the normalised row: the
    product of its dims once leading 1s go, if those equal the normalised shape's trailing dims."""
    dims = list(shape)
    while dims and dims[0] == 1:
        dims.pop(0)
    if tuple(dims) != normalized[len(normalized) - len(dims):]:
        return None
    return math.prod(dims)


def _layer_norm_params(ctx: LowerContext, node: Node, normalized: tuple[int, ...]) -> tuple[int, list[Buffer]]:
    """The parameters' common period along the row and their buffers. Constants are broadcast to the whole
    row at compile time (the kernel then never walks a short period); run-time parameters must repeat
    along the row with one common period."""
    params = node.inputs[1:]
    data = [constant_value(p) for p in params]
    if all(d is not None for d in data):
        full = [ctx.constant(np.ascontiguousarray(np.broadcast_to(d, normalized)), "layer_norm")
                for d in data]
        return math.prod(normalized), full
    periods = {_period(p.type.shape, normalized) for p in params}
    if None in periods or len(periods) > 1:
        raise UnsupportedOpError(
            f"{node.describe()}: run-time scale/bias of shapes {[list(p.type.shape) for p in params]} must "
            f"repeat along the normalised shape {list(normalized)} with one common period")
    return periods.pop(), [ctx.operand(i) for i in range(1, len(params) + 1)]


@lowering("layer_norm")
def lower_layer_norm(ctx: LowerContext, node: Node) -> None:
    x = _operand(node)
    axis = node.attrs["axis"] % x.rank
    rows, normalized = math.prod(x.shape[:axis]), x.shape[axis:]
    size, epsilon = math.prod(normalized), node.attrs["epsilon"]
    period, params = _layer_norm_params(ctx, node, normalized)
    has_bias = len(params) == 2
    key = ("layer_norm", x.dtype, rows, size, epsilon, period, has_bias)
    kernel = ctx.kernel(key, lambda module, name: norm_kernel(module, name, ctx.target, x.dtype, rows, 1, size,
                                                              epsilon, period, has_bias))
    ctx.call(kernel, [ctx.operand(0), *params, ctx.result(0)], parallel=True)


def _channels(node: Node) -> tuple[int, int, int]:
    """x [N, C, ...] as (N, C, elements per channel)."""
    shape = _operand(node).shape
    return shape[0], shape[1], math.prod(shape[2:])


@lowering("instance_norm")
def lower_instance_norm(ctx: LowerContext, node: Node) -> None:
    dtype, (batch, channels, size), epsilon = _operand(node).dtype, _channels(node), node.attrs["epsilon"]
    key = ("instance_norm", dtype, batch, channels, size, epsilon)
    kernel = ctx.kernel(key, lambda module, name: norm_kernel(module, name, ctx.target, dtype, batch, channels,
                                                              size, epsilon, 0, True))
    ctx.call(kernel, [ctx.operand(i) for i in range(3)] + [ctx.result(0)], parallel=True)


@lowering("batch_norm")
def lower_batch_norm(ctx: LowerContext, node: Node) -> None:
    dtype, (batch, channels, size), epsilon = _operand(node).dtype, _channels(node), node.attrs["epsilon"]
    key = ("batch_norm", dtype, batch, channels, size, epsilon)
    kernel = ctx.kernel(key, lambda module, name: batch_norm_kernel(module, name, ctx.target, dtype, batch,
                                                                    channels, size, epsilon))
    ctx.call(kernel, [ctx.operand(i) for i in range(5)] + [ctx.result(0)])


@lowering("lrn")
def lower_lrn(ctx: LowerContext, node: Node) -> None:
    dtype, (batch, channels, size) = _operand(node).dtype, _channels(node)
    attrs = tuple(node.attrs[name] for name in ("size", "alpha", "beta", "bias"))
    kernel = ctx.kernel(("lrn", dtype, batch, channels, size, attrs), lambda module, name: lrn_kernel(
        module, name, ctx.target, dtype, batch, channels, size, *attrs))
    ctx.call(kernel, [ctx.operand(0), ctx.result(0)])


@lowering("resize")
def lower_resize(ctx: LowerContext, node: Node) -> None:
    """Nearest: one gather over every axis. Linear / cubic: one blend per resized axis in axis order (as the
    reference), through scratch buffers of the compute type."""
    x, attrs = _operand(node), node.attrs
    resized = [axis for axis, (length, size, scale) in enumerate(zip(x.shape, attrs["sizes"], attrs["scales"]))
               if not (size == length and scale == 1.0)]
    if not resized:
        nbytes = ctx.operand(0).nbytes
        kernel = ctx.kernel(("copy", nbytes), lambda module, name: copy_kernel(module, name, nbytes))
        ctx.call(kernel, [ctx.operand(0), ctx.result(0)])
        return
    mode = attrs["mode"]

    def sources(axis: int):
        return _source_coordinates(attrs["coordinate_transformation_mode"], x.shape[axis], attrs["sizes"][axis],
                                   attrs["scales"][axis])

    if mode == "nearest":
        tables = tuple(tuple(int(i) for i in _nearest(attrs["nearest_mode"], sources(axis), x.shape[axis],
                                                      attrs["scales"][axis])) if axis in resized else None
                       for axis in range(x.rank))
        kernel = ctx.kernel(("gather", x.dtype, x.shape, tables), lambda module, name: gather_kernel(
            module, name, ctx.target, x.dtype, x.shape, tables))
        ctx.call(kernel, [ctx.operand(0), ctx.result(0)])
        return
    compute = DType.f64 if x.dtype is DType.f64 else DType.f32
    shape, source, dtype = list(x.shape), ctx.operand(0), x.dtype
    for axis in resized:
        if mode == "linear":
            taps, weights = _linear_taps(sources(axis), shape[axis])
        else:
            taps, weights = _cubic_taps(sources(axis), shape[axis], attrs["cubic_coeff_a"], attrs["exclude_outside"])
        outer, length, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])
        shape[axis] = attrs["sizes"][axis]
        last = axis == resized[-1]
        result_dtype = x.dtype if last else compute
        target = ctx.result(0) if last else ctx.scratch(math.prod(shape) * compute.numpy.itemsize, "resize")
        key = ("blend", dtype, result_dtype, outer, length, inner, taps.tobytes(), weights.tobytes())
        kernel = ctx.kernel(key, lambda module, name: blend_axis_kernel(
            module, name, ctx.target, dtype, result_dtype, outer, length, inner, taps, weights))
        ctx.call(kernel, [source, target])
        source, dtype = target, result_dtype
