"""ONNX export of the neural-network ops (convolutions, products, pooling, normalisation, softmax) and of
fused attention, which becomes the MatMul / Mul / Add / Softmax / MatMul chain it was fused from."""
from __future__ import annotations

from typing import Callable

import numpy as np

from lowbit.backends.onnx.context import ExportContext
from lowbit.backends.onnx.elementwise import apply_epilogue
from lowbit.backends.onnx.registry import exporter
from lowbit.backends.onnx.tensor import reduce_nodes
from lowbit.ir import Node, Value, constant_value


def window_attrs(node: Node, kernel: tuple[int, ...]) -> dict:
    """ONNX attributes of a 2-D sliding window (conv or pool) from lowbit's."""
    return {"kernel_shape": list(kernel), "strides": list(node.attrs["strides"]), "pads": list(node.attrs["pads"]),
            "dilations": list(node.attrs["dilations"])}


def conv_nodes(ctx: ExportContext, node: Node, x: str, w: str, bias: str | None, out: str | None) -> str:
    """ONNX Conv with `node`'s window attributes (conv2d or qconv2d)."""
    return ctx.emit("Conv", [x, w, bias], out, group=node.attrs["group"],
                    **window_attrs(node, node.inputs[1].type.shape[2:]))


def linear_nodes(ctx: ExportContext, rank: int, x: str, weight: str, transposed: Callable[[], str],
                 bias: str | None, out: str | None) -> str:
    """x @ weightᵀ + bias: Gemm(transB=1) for a 2-D x, else MatMul with the [K, N] weight `transposed()`
    gives, then Add."""
    if rank == 2:
        return ctx.emit("Gemm", [x, weight, bias], out, transB=1)
    product = ctx.emit("MatMul", [x, transposed()], None if bias else out)
    return ctx.emit("Add", [product, bias], out) if bias else product


def _transposed_weight(ctx: ExportContext, w: Value) -> str:
    """A [N, K] weight as [K, N]: a transposed initializer when constant, else a Transpose."""
    data = constant_value(w)
    if data is not None:
        return ctx.initializer(np.ascontiguousarray(data.T), f"{w.name or 'weight'}.transposed", w.type.dtype)
    return ctx.emit("Transpose", [ctx.name(w)], perm=[1, 0])


def _bias(ctx: ExportContext, node: Node) -> str | None:
    return ctx.name(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None


def _epilogue_target(ctx: ExportContext, node: Node) -> str | None:
    """The name the product itself should write: the node's result when there is no epilogue."""
    plain = node.attrs["activation"] == "none" and (len(node.inputs) < 4 or node.inputs[3] is None)
    return ctx.outputs(node)[0] if plain else None


@exporter("conv2d")
def conv2d(ctx: ExportContext, node: Node) -> None:
    out = ctx.outputs(node)[0]
    y = conv_nodes(ctx, node, ctx.name(node.inputs[0]), ctx.name(node.inputs[1]), _bias(ctx, node),
                   _epilogue_target(ctx, node))
    if y != out:
        apply_epilogue(ctx, node, y, out)


@exporter("linear")
def linear(ctx: ExportContext, node: Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    out = ctx.outputs(node)[0]
    y = linear_nodes(ctx, x.type.rank, ctx.name(x), ctx.name(w), lambda: _transposed_weight(ctx, w),
                     _bias(ctx, node), _epilogue_target(ctx, node))
    if y != out:
        apply_epilogue(ctx, node, y, out)


@exporter("conv_transpose2d")
def conv_transpose2d(ctx: ExportContext, node: Node) -> None:
    ctx.emit("ConvTranspose", [ctx.name(v) for v in node.inputs], ctx.outputs(node), group=node.attrs["group"],
             output_padding=list(node.attrs["output_padding"]), **window_attrs(node, node.inputs[1].type.shape[2:]))


@exporter("matmul")
def matmul(ctx: ExportContext, node: Node) -> None:
    ctx.emit("MatMul", [ctx.name(v) for v in node.inputs], ctx.outputs(node))


def pool_nodes(ctx: ExportContext, node: Node, x: str, out: str | None) -> str:
    """MaxPool / AveragePool with the attributes of `node` (a float or an integer pool)."""
    attrs = window_attrs(node, node.attrs["kernel"])
    attrs["ceil_mode"] = int(node.attrs["ceil_mode"])
    if "count_include_pad" not in node.attrs:
        return ctx.emit("MaxPool", [x], out, **attrs)
    if tuple(node.attrs["dilations"]) != (1, 1):
        ctx.require_opset(19, "AveragePool with dilations")
    else:
        del attrs["dilations"]
    return ctx.emit("AveragePool", [x], out, count_include_pad=int(node.attrs["count_include_pad"]), **attrs)


@exporter("max_pool2d", "avg_pool2d")
def pool(ctx: ExportContext, node: Node) -> None:
    pool_nodes(ctx, node, ctx.name(node.inputs[0]), ctx.outputs(node)[0])


@exporter("global_avg_pool", "global_max_pool")
def global_pool(ctx: ExportContext, node: Node) -> None:
    op_type = "GlobalAveragePool" if node.op == "global_avg_pool" else "GlobalMaxPool"
    ctx.emit(op_type, [ctx.name(node.inputs[0])], ctx.outputs(node))


@exporter("batch_norm", "instance_norm")
def norm(ctx: ExportContext, node: Node) -> None:
    op_type = "BatchNormalization" if node.op == "batch_norm" else "InstanceNormalization"
    ctx.emit(op_type, [ctx.name(v) for v in node.inputs], ctx.outputs(node), epsilon=float(node.attrs["epsilon"]))


@exporter("layer_norm")
def layer_norm(ctx: ExportContext, node: Node) -> None:
    """LayerNormalization from opset 17 (scale and bias given the full normalised shape, which ONNX Runtime
    requires); before, the reference's two-pass form: (x - mean) / sqrt(mean((x - mean)²) + epsilon)."""
    x = node.inputs[0]
    axis = node.attrs["axis"] % x.type.rank
    normalized = x.type.shape[axis:]
    params = [_full(ctx, value, normalized) for value in node.inputs[1:] if value is not None]
    out = ctx.outputs(node)[0]
    epsilon = float(node.attrs["epsilon"])
    if ctx.opset >= 17:
        ctx.emit("LayerNormalization", [ctx.name(x)] + params, out, axis=axis, epsilon=epsilon)
        return
    axes = list(range(axis, x.type.rank))
    centred = ctx.emit("Sub", [ctx.name(x), reduce_nodes(ctx, "ReduceMean", ctx.name(x), axes, True)])
    variance = reduce_nodes(ctx, "ReduceMean", ctx.emit("Mul", [centred, centred]), axes, True)
    deviation = ctx.emit("Sqrt", [ctx.emit("Add", [variance, ctx.scalar(epsilon, x.type.dtype, "epsilon")])])
    scaled = ctx.emit("Mul", [ctx.emit("Div", [centred, deviation]), params[0]], None if len(params) > 1 else out)
    if len(params) > 1:
        ctx.emit("Add", [scaled, params[1]], out)


def _full(ctx: ExportContext, value: Value, shape: tuple[int, ...]) -> str:
    """`value` broadcast to `shape`: a broadcast initializer when constant, else an Expand."""
    if value.type.shape == shape:
        return ctx.name(value)
    data = constant_value(value)
    if data is not None:
        return ctx.initializer(np.broadcast_to(data, shape), value.name or "param", value.type.dtype)
    return ctx.emit("Expand", [ctx.name(value), ctx.ints(shape, "shape")])


@exporter("lrn")
def lrn(ctx: ExportContext, node: Node) -> None:
    ctx.emit("LRN", [ctx.name(node.inputs[0])], ctx.outputs(node), size=node.attrs["size"],
             alpha=float(node.attrs["alpha"]), beta=float(node.attrs["beta"]), bias=float(node.attrs["bias"]))


@exporter("softmax", "log_softmax")
def softmax(ctx: ExportContext, node: Node) -> None:
    ctx.emit("Softmax" if node.op == "softmax" else "LogSoftmax", [ctx.name(node.inputs[0])], ctx.outputs(node),
             axis=node.attrs["axis"])


@exporter("attention")
def attention(ctx: ExportContext, node: Node) -> None:
    """softmax(q @ k_t · scale + mask) @ v, with Where(IsNaN(p), 0, p) for zero_nan_probs."""
    q, k_t, v = node.inputs[:3]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    dtype = q.type.dtype
    scores = ctx.emit("MatMul", [ctx.name(q), ctx.name(k_t)])
    if node.attrs["scale"] != 1.0:
        scores = ctx.emit("Mul", [scores, ctx.scalar(node.attrs["scale"], dtype, "scale")])
    if mask is not None:
        scores = ctx.emit("Add", [scores, ctx.name(mask)])
    probs = ctx.emit("Softmax", [scores], axis=-1)
    if node.attrs["zero_nan_probs"]:
        probs = ctx.emit("Where", [ctx.emit("IsNaN", [probs]), ctx.scalar(0, dtype, "zero"), probs])
    ctx.emit("MatMul", [probs, ctx.name(v)], ctx.outputs(node))
