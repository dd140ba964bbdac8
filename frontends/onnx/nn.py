"""Converters of ONNX's neural-network operators (convolution, Gemm/MatMul, pooling, normalisation, softmax).

lowbit's spatial ops are 2-D; 1-D ONNX convolutions and pools are lifted by reshaping [N, C, L] to
[N, C, 1, L] and back. 3-D ones are unsupported.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from lowbit.errors import ModelFormatError
from lowbit.frontends.onnx.context import ConvertContext, OnnxNode
from lowbit.frontends.onnx.registry import converter
from lowbit.ir import Value, constant_value

_AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


def _spatial_rank(ctx: ConvertContext, node: OnnxNode, rank: int) -> int:
    """The number of spatial axes of a tensor of `rank`; lowbit handles one or two."""
    spatial = rank - 2
    if spatial not in (1, 2):
        raise ctx.unsupported(f"{spatial}-D {node.op_type} (lowbit supports 1-D and 2-D)" if spatial > 0
                              else f"an input of rank {rank}; {node.op_type} needs [N, C, spatial...]")
    return spatial


def _ints(ctx: ConvertContext, node: OnnxNode, name: str, count: int, default: int) -> list[int]:
    values = list(node.attr(name, [default] * count))
    if len(values) != count:
        raise ModelFormatError(f"{ctx.where()}: attribute '{name}' has {len(values)} values, expected {count}")
    return values


def _auto_pad(ctx: ConvertContext, node: OnnxNode) -> str:
    mode = node.attr("auto_pad", "NOTSET")
    if mode not in _AUTO_PADS:
        raise ctx.unsupported(f"auto_pad='{mode}' (expected one of {', '.join(_AUTO_PADS)})")
    return mode


def _split_same(total: int, mode: str) -> tuple[int, int]:
    """Begin and end padding: the odd unit goes to the end for SAME_UPPER, to the begin otherwise."""
    small, large = total // 2, total - total // 2
    return (small, large) if mode == "SAME_UPPER" else (large, small)


def _window_pads(ctx: ConvertContext, node: OnnxNode, sizes: Sequence[int], kernel: Sequence[int],
                 strides: Sequence[int], dilations: Sequence[int]) -> list[int]:
    """Explicit [begins..., ends...] padding of a convolution or pool, auto_pad resolved."""
    mode = _auto_pad(ctx, node)
    rank = len(sizes)
    if mode == "NOTSET":
        return _ints(ctx, node, "pads", 2 * rank, 0)
    if mode == "VALID":
        return [0] * (2 * rank)
    begins, ends = [], []
    for size, k, stride, dilation in zip(sizes, kernel, strides, dilations):
        total = max(0, (math.ceil(size / stride) - 1) * stride + dilation * (k - 1) + 1 - size)
        begin, end = _split_same(total, mode)
        begins.append(begin)
        ends.append(end)
    return begins + ends


def _kernel(ctx: ConvertContext, node: OnnxNode, weight: Value) -> list[int]:
    kernel = list(weight.type.shape[2:])
    declared = node.attr("kernel_shape")
    if declared is not None and list(declared) != kernel:
        raise ModelFormatError(f"{ctx.where()}: kernel_shape {list(declared)} does not match the weight's "
                               f"spatial shape {kernel}")
    return kernel


def _lifted(attrs: dict[str, Any]) -> dict[str, Any]:
    """1-D window attributes as 2-D ones over [1, L]."""
    lifted = dict(attrs)
    for name, unit in (("strides", 1), ("dilations", 1), ("kernel", 1), ("output_padding", 0)):
        if name in attrs:
            lifted[name] = [unit] + list(attrs[name])
    if "pads" in attrs:
        lifted["pads"] = [0, attrs["pads"][0], 0, attrs["pads"][1]]
    return lifted


def _emit_2d(ctx: ConvertContext, op: str, operands: Sequence[Value | None], attrs: dict[str, Any],
             spatial: int, lift: int) -> Value:
    """Emit a 2-D spatial op; for 1-D operands, the first `lift` operands gain an H=1 axis and the result
    loses it again."""
    if spatial == 2:
        return ctx.emit(op, operands, attrs)
    operands = list(operands)
    for index in range(lift):
        shape = operands[index].type.shape
        operands[index] = ctx.emit("reshape", [operands[index]], {"shape": shape[:2] + (1,) + shape[2:]},
                                   f".lift{index}")
    result = ctx.emit(op, operands, _lifted(attrs), ".2d")
    shape = result.type.shape
    return ctx.emit("reshape", [result], {"shape": shape[:2] + shape[3:]})


def _same_type(ctx: ConvertContext, value: Value | None, like: Value, suffix: str) -> Value | None:
    """`value` cast to `like`'s element type (opset 15 lets normalisation parameters differ)."""
    if value is None or value.type.dtype is like.type.dtype:
        return value
    return ctx.emit("cast", [value], {"to": like.type.dtype}, suffix)


def _no_extra_outputs(ctx: ConvertContext, node: OnnxNode, what: str) -> None:
    if any(node.proto.output[1:]):
        raise ctx.unsupported(f"the {what} output(s); lowbit converts inference graphs that use only the first")


@converter("Conv")
def conv(ctx: ConvertContext, node: OnnxNode) -> Value:
    x, weight, bias = node.input(0), node.input(1), node.input(2)
    spatial = _spatial_rank(ctx, node, weight.type.rank)
    kernel = _kernel(ctx, node, weight)
    strides = _ints(ctx, node, "strides", spatial, 1)
    dilations = _ints(ctx, node, "dilations", spatial, 1)
    pads = _window_pads(ctx, node, x.type.shape[2:], kernel, strides, dilations)
    attrs = {"strides": strides, "pads": pads, "dilations": dilations, "group": node.attr("group", 1)}
    return _emit_2d(ctx, "conv2d", [x, weight, bias], attrs, spatial, lift=2)


@converter("ConvTranspose")
def conv_transpose(ctx: ConvertContext, node: OnnxNode) -> Value:
    """With output_shape (or SAME_* auto_pad, whose output is input * stride), the padding that gives that
    output is split as ONNX says: the odd unit goes to the end for SAME_UPPER, to the begin otherwise."""
    x, weight, bias = node.input(0), node.input(1), node.input(2)
    spatial = _spatial_rank(ctx, node, weight.type.rank)
    kernel = _kernel(ctx, node, weight)
    strides = _ints(ctx, node, "strides", spatial, 1)
    dilations = _ints(ctx, node, "dilations", spatial, 1)
    output_padding = _ints(ctx, node, "output_padding", spatial, 0)
    mode = _auto_pad(ctx, node)
    sizes = x.type.shape[2:]
    wanted = node.attr("output_shape")
    if wanted is None and mode in ("SAME_UPPER", "SAME_LOWER"):
        wanted = [size * stride for size, stride in zip(sizes, strides)]
    if wanted is not None:
        wanted = list(wanted)[-spatial:]
        begins, ends = [], []
        for axis in range(spatial):
            full = (strides[axis] * (sizes[axis] - 1) + output_padding[axis]
                    + dilations[axis] * (kernel[axis] - 1) + 1)
            if wanted[axis] > full:
                raise ModelFormatError(f"{ctx.where()}: output_shape {wanted} exceeds the unpadded output along "
                                       f"spatial axis {axis} ({full})")
            begin, end = _split_same(full - wanted[axis], mode)
            begins.append(begin)
            ends.append(end)
        pads = begins + ends
    elif mode == "VALID":
        pads = [0] * (2 * spatial)
    else:
        pads = _ints(ctx, node, "pads", 2 * spatial, 0)
    attrs = {"strides": strides, "pads": pads, "dilations": dilations, "group": node.attr("group", 1),
             "output_padding": output_padding}
    return _emit_2d(ctx, "conv_transpose2d", [x, weight, bias], attrs, spatial, lift=2)


@converter("MaxPool", "AveragePool")
def pool(ctx: ConvertContext, node: OnnxNode) -> Value:
    if node.op_type == "MaxPool":
        _no_extra_outputs(ctx, node, "Indices")
    x = node.inputs[0]
    spatial = _spatial_rank(ctx, node, x.type.rank)
    kernel = node.attr("kernel_shape")
    if kernel is None or len(kernel) != spatial:
        raise ModelFormatError(f"{ctx.where()}: kernel_shape must give {spatial} sizes, got {kernel}")
    strides = _ints(ctx, node, "strides", spatial, 1)
    dilations = _ints(ctx, node, "dilations", spatial, 1)
    attrs = {"kernel": list(kernel), "strides": strides, "dilations": dilations,
             "pads": _window_pads(ctx, node, x.type.shape[2:], kernel, strides, dilations),
             "ceil_mode": bool(node.attr("ceil_mode", 0))}
    op = "max_pool2d"
    if node.op_type == "AveragePool":
        op = "avg_pool2d"
        attrs["count_include_pad"] = bool(node.attr("count_include_pad", 0))
    return _emit_2d(ctx, op, [x], attrs, spatial, lift=1)


@converter("GlobalAveragePool", "GlobalMaxPool")
def global_pool(ctx: ConvertContext, node: OnnxNode) -> Value:
    op = "global_avg_pool" if node.op_type == "GlobalAveragePool" else "global_max_pool"
    return ctx.emit(op, node.inputs[:1])


@converter("MatMul")
def matmul(ctx: ConvertContext, node: OnnxNode) -> Value:
    return ctx.emit("matmul", node.inputs[:2])


def _scaled(ctx: ConvertContext, value: Value, factor: float, suffix: str) -> Value:
    if factor == 1.0:
        return value
    return ctx.emit("mul", [value, ctx.constant(np.asarray(factor, value.type.dtype.numpy),
                                               name=f"{ctx.node.name}{suffix}.factor")], name_suffix=suffix)


def _transposed(ctx: ConvertContext, value: Value, suffix: str) -> Value:
    return ctx.emit("transpose", [value], {"perm": [1, 0]}, suffix)


@converter("Gemm")
def gemm(ctx: ConvertContext, node: OnnxNode) -> Value:
    """alpha * A' @ B' + beta * C. A constant B becomes linear's [N, K] weight with alpha folded in, and a
    constant C that broadcasts to [N] its bias; otherwise matmul, mul and add. (Gemm-7's `broadcast`
    attribute is implied by Gemm's own broadcasting and ignored.)"""
    a, b, c = node.input(0), node.input(1), node.input(2)
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
    for name, operand in (("A", a), ("B", b)):
        if operand.type.rank != 2:
            raise ModelFormatError(f"{ctx.where()}: {name} must be 2-D, got shape {list(operand.type.shape)}")
    if node.attr("transA", 0):
        a = _transposed(ctx, a, ".transA")
    weight_data = constant_value(b)
    run_time_weight = weight_data is None and node.attr("transB", 0) and alpha == 1.0
    if run_time_weight and c is not None and beta == 1.0 and c.type.shape == (b.type.shape[0],):
        # A run-time [N, K] weight (a dequantized integer weight in a QDQ model) keeps the linear form,
        # so realizing the quantization can turn it into qlinear.
        return ctx.emit("linear", [a, b, c])
    if run_time_weight:
        return _add_bias(ctx, ctx.emit("linear", [a, b], name_suffix=".linear"), c, beta)
    if weight_data is None:
        product = ctx.emit("matmul", [a, _transposed(ctx, b, ".transB") if node.attr("transB", 0) else b],
                           name_suffix=".matmul")
        return _add_bias(ctx, _scaled(ctx, product, alpha, ".alpha"), c, beta)
    if node.attr("transB", 0) and alpha == 1.0:
        weight = b  # already [N, K]: no copy of what may be the model's largest tensor
    else:
        data = weight_data if node.attr("transB", 0) else weight_data.T
        data = data * data.dtype.type(alpha) if alpha != 1.0 else data
        weight = ctx.constant(np.ascontiguousarray(data), name=f"{node.name}.weight")
    out_features = weight.type.shape[0]
    if c is None or beta == 0.0:
        return ctx.emit("linear", [a, weight])
    c_data = constant_value(c)
    # A constant C is a bias when it holds one value per output column: [], [1], [N], [1, 1] or [1, N].
    if c_data is not None and c_data.ndim <= 2 and all(d == 1 for d in c_data.shape[:-1]) and \
            c_data.shape[-1:] in ((), (1,), (out_features,)):
        bias = np.broadcast_to(c_data.reshape(-1), (out_features,)) * c_data.dtype.type(beta)
        return ctx.emit("linear", [a, weight, ctx.constant(bias, name=f"{node.name}.bias")])
    return _add_bias(ctx, ctx.emit("linear", [a, weight], name_suffix=".linear"), c, beta)


def _add_bias(ctx: ConvertContext, product: Value, c: Value | None, beta: float) -> Value:
    if c is None or beta == 0.0:
        return product
    return ctx.emit("add", [product, _scaled(ctx, c, beta, ".beta")])


@converter("BatchNormalization")
def batch_norm(ctx: ConvertContext, node: OnnxNode) -> Value:
    """Inference form only. Legacy attributes of opsets 7-9 (`spatial`, `consumed_inputs`, `is_test`,
    `momentum`) are accepted; spatial=0 is per-activation statistics and only means the same for 2-D x."""
    x = node.inputs[0]
    if node.attr("training_mode", 0):
        raise ctx.unsupported("training_mode=1 (lowbit converts inference graphs)")
    _no_extra_outputs(ctx, node, "running or saved mean/variance (training)")
    if not node.attr("spatial", 1) and x.type.rank > 2:
        raise ctx.unsupported("spatial=0 (per-activation statistics) on an input with spatial axes")
    params = [_same_type(ctx, value, x, f".{name}")
              for name, value in zip(("scale", "bias", "mean", "var"), node.inputs[1:5])]
    return ctx.emit("batch_norm", [x, *params], {"epsilon": node.attr("epsilon", 1e-5)})


@converter("InstanceNormalization")
def instance_norm(ctx: ConvertContext, node: OnnxNode) -> Value:
    x = node.inputs[0]
    params = [_same_type(ctx, value, x, f".{name}") for name, value in zip(("scale", "bias"), node.inputs[1:3])]
    return ctx.emit("instance_norm", [x, *params], {"epsilon": node.attr("epsilon", 1e-5)})


@converter("LayerNormalization")
def layer_norm(ctx: ConvertContext, node: OnnxNode) -> Value:
    """stash_type (the precision of the statistics) is not followed: the reference computes them in the
    input's type, float16 widened to float32."""
    _no_extra_outputs(ctx, node, "Mean/InvStdDev")
    x = node.inputs[0]
    params = [_same_type(ctx, value, x, f".{name}") for name, value in zip(("scale", "bias"), node.inputs[1:3])]
    return ctx.emit("layer_norm", [x, *params],
                    {"axis": node.attr("axis", -1), "epsilon": node.attr("epsilon", 1e-5)})


@converter("LRN")
def lrn(ctx: ConvertContext, node: OnnxNode) -> Value:
    if node.attr("size") is None:
        raise ModelFormatError(f"{ctx.where()}: LRN needs the 'size' attribute")
    attrs = {name: node.attr(name) for name in ("size", "alpha", "beta", "bias") if node.attr(name) is not None}
    return ctx.emit("lrn", node.inputs[:1], attrs)


@converter("Softmax", "LogSoftmax")
def softmax(ctx: ConvertContext, node: OnnxNode) -> Value:
    """Opset 13 normalises along one axis. Older opsets flatten x to 2-D at `axis` (default 1) and
    normalise each row of the flattened [prod(shape[:axis]), prod(shape[axis:])]; that equals the
    per-axis form when at most one of the trailing axes is longer than 1, and needs reshapes otherwise."""
    op = "softmax" if node.op_type == "Softmax" else "log_softmax"
    x = node.inputs[0]
    shape = x.type.shape
    if node.opset >= 13:
        return ctx.emit(op, [x], {"axis": node.attr("axis", -1)})
    axis = node.attr("axis", 1)
    if not -len(shape) <= axis < max(len(shape), 1):
        raise ModelFormatError(f"{ctx.where()}: axis {axis} is out of range for an input of shape {list(shape)}")
    axis %= max(len(shape), 1)
    trailing = [index for index in range(axis, len(shape)) if shape[index] != 1]
    if len(trailing) <= 1:
        return ctx.emit(op, [x], {"axis": trailing[0] if trailing else axis})
    rows = ctx.emit("reshape", [x], {"shape": [math.prod(shape[:axis]), math.prod(shape[axis:])]}, ".rows")
    return ctx.emit("reshape", [ctx.emit(op, [rows], {"axis": -1}, ".2d")], {"shape": list(shape)})
