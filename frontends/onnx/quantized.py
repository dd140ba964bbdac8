"""Converters of ONNX's quantization operators into lowbit's QDQ form.

QuantizeLinear and DequantizeLinear become `quantize` and `dequantize`; their scales and zero points must
be constants and become the `QuantParams` of the integer values' types (per tensor, per axis, or per
block of opset 21, which is lowbit's per-group). The integer operators — QLinearConv, QLinearMatMul,
MatMulInteger, ConvInteger and com.microsoft's QGemm, QLinearAdd, QLinearMul, QLinearConcat and
QLinearGlobalAveragePool — expand into `dequantize` → float op → `quantize`, the form lowbit's realize
pass turns into integer ops. Their float results may differ from ONNX Runtime's integer kernels by one
step of the output scale (ONNX Runtime requantizes the exact integer sum).

A DequantizeLinear of a constant keeps the integer constant, typed with its parameters, and a
`dequantize` node: folding it would turn a quantized weight back into a float one. Run-time integers get
their parameters from the DequantizeLinear that reads them.

MatMulInteger and ConvInteger (int32 results) become the float product of operands dequantized with scale
1, quantized to int32 with scale 1 — exact only where float32 holds every partial sum, which is checked
(the weights' data bound it); otherwise the import fails with UnsupportedOpError. DynamicQuantizeLinear
computes its parameters at run time, so it expands into the float ops that compute exactly what ONNX
specifies (range including 0, scale, rounded zero point, quantized values); the integer product that
follows then centres with a run-time zero point (cast and subtract).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from lowbit.errors import ModelFormatError, ShapeError
from lowbit.frontends.onnx import nn, tensor
from lowbit.frontends.onnx.context import ConvertContext, OnnxNode
from lowbit.frontends.onnx.dtypes import element_type
from lowbit.frontends.onnx.registry import converter
from lowbit.ir import DType, QuantParams, TensorType, Value, constant_value
from lowbit.ir import quant_math

QUANTIZED_DTYPES = (DType.u8, DType.i8, DType.u16, DType.i16, DType.u4, DType.i4)
MICROSOFT = "com.microsoft."
# float32 holds every integer up to 2^24 exactly, so an integer matmul or convolution computed in float32
# is exact when no partial sum can exceed that (in any summation order).
FLOAT32_EXACT = 1 << 24


# -- parameters ---------------------------------------------------------------------------------------
def quantize_attrs(dtype: DType, params: QuantParams) -> dict:
    """The attributes of a `quantize` whose result has element type `dtype` and parameters `params`."""
    attrs = {"dtype": dtype, "scale": params.scale, "zero_point": params.zero_point, "axis": params.axis,
             "group_size": params.group_size}
    if params.bits != dtype.bits:
        attrs["bits"] = params.bits
    return attrs


def _read(ctx: ConvertContext, scale: Value | None, zero_point: Value | None, dtype: DType,
          what: str) -> tuple[np.ndarray, np.ndarray]:
    """Constant scales (float32) and zero points (int64, default 0) of `what`."""
    if scale is None:
        raise ModelFormatError(f"{ctx.where()}: {what} needs a scale")
    scales = ctx.const_data(scale, f"the scale of {what}").astype(np.float32)
    if zero_point is None:
        return scales, np.zeros(scales.shape, np.int64)
    if zero_point.type.dtype is not dtype:
        raise ModelFormatError(f"{ctx.where()}: the zero point of {what} is {zero_point.type.dtype}, the "
                               f"quantized values are {dtype}")
    return scales, ctx.const_data(zero_point, f"the zero point of {what}").astype(np.int64)


def _params(ctx: ConvertContext, shape: Sequence[int], scales: np.ndarray, zero_points: np.ndarray, dtype: DType,
            axis: int, what: str, block_size: int = 0) -> QuantParams:
    """Parameters of a tensor of `shape`: one scale per tensor, one per index along `axis`, or (with
    `block_size`) one per block of that many elements along `axis`."""
    if zero_points.size != scales.size:
        raise ModelFormatError(f"{ctx.where()}: {what} has scales of shape {list(scales.shape)} but zero "
                               f"points of shape {list(zero_points.shape)}")
    if scales.size == 1 and block_size <= 0:
        axis = None
    elif not -len(shape) <= axis < len(shape):
        raise ModelFormatError(f"{ctx.where()}: axis {axis} of {what} is out of range for rank {len(shape)}")
    else:
        axis %= len(shape)
    group = None
    if block_size > 0:
        group = block_size
        blocks = list(shape)
        blocks[axis] = -(-shape[axis] // block_size)
        if list(scales.shape) != blocks:
            raise ModelFormatError(f"{ctx.where()}: blocked scales of {what} must have shape {blocks}, "
                                   f"got {list(scales.shape)}")
        if shape[axis] % block_size:
            raise ctx.unsupported(f"block size {block_size} does not divide dimension {shape[axis]} of {what}; "
                                  f"lowbit's groups tile the axis exactly")
    elif axis is not None and (scales.ndim != 1 or scales.size != shape[axis]):
        raise ModelFormatError(f"{ctx.where()}: {what} of shape {list(shape)} needs one scale or one per index "
                               f"of axis {axis} ({shape[axis]}), got scales of shape {list(scales.shape)}")
    try:
        params = QuantParams(scales.reshape(-1), zero_points.reshape(-1), axis, group, dtype.bits, dtype.is_signed)
        TensorType(tuple(shape), dtype, params)
    except ShapeError as error:
        raise ShapeError(f"{ctx.where()}: {what}: {error}") from None
    return params


def _quantized_type(ctx: ConvertContext, zero_point: Value | None, output_dtype: int = 0) -> DType:
    """The integer type a quantizing node produces: its zero point's, else `output_dtype`, else u8."""
    if zero_point is not None:
        dtype = zero_point.type.dtype
    elif output_dtype:
        dtype = element_type(output_dtype, ctx.where())
    else:
        dtype = DType.u8
    if dtype not in QUANTIZED_DTYPES:
        raise ctx.unsupported(f"quantizing to {dtype}; lowbit quantizes to {', '.join(map(str, QUANTIZED_DTYPES))}")
    return dtype


# -- building the QDQ form ----------------------------------------------------------------------------
def _with_params(ctx: ConvertContext, value: Value, params: QuantParams, what: str) -> Value:
    """`value`'s integers typed with `params`. A constant gets a typed copy; a run-time value without
    parameters takes them (its producer's inference sets none); one that has others cannot."""
    current = value.type
    if current.quant == params:
        return value
    if not current.dtype.is_integer:
        raise ModelFormatError(f"{ctx.where()}: {what} must hold integers, got {current}")
    typed = TensorType(current.shape, current.dtype, params)
    data = constant_value(value)
    if data is not None:
        return ctx.graph.add_constant(data, value.name or f"{ctx.node.name}.{what}", type=typed)
    if current.quant is not None:
        raise ctx.unsupported(f"{what} is read with parameters {current.quant} elsewhere; lowbit gives a "
                              f"run-time tensor one set of parameters, not also {params}")
    value.type = typed
    return value


def _dequantized(ctx: ConvertContext, value: Value, params: QuantParams, what: str, suffix: str) -> Value:
    """dequantize(value with `params`), never folded (see the module docstring)."""
    operand = _with_params(ctx, value, params, what)
    return ctx.graph.add_node("dequantize", [operand], name=ctx.node.name + suffix).output


def _dequantized_operand(ctx: ConvertContext, node: OnnxNode, index: int, what: str, axis: int = 0,
                         value: Value | None = None) -> Value:
    """Operand `index` of a QLinear* node (or `value` in its place) dequantized with the scale and zero
    point that follow it."""
    value = value or node.input(index)
    scales, zero_points = _read(ctx, node.input(index + 1), node.input(index + 2), value.type.dtype, what)
    params = _params(ctx, value.type.shape, scales, zero_points, value.type.dtype, axis, what)
    return _dequantized(ctx, value, params, what, f".{what}")


def _requantized(ctx: ConvertContext, node: OnnxNode, result: Value, index: int) -> Value:
    """`result` quantized with the scale and zero point at operands `index` and `index + 1`."""
    dtype = _quantized_type(ctx, node.input(index + 1))
    scales, zero_points = _read(ctx, node.input(index), node.input(index + 1), dtype, "the result")
    params = _params(ctx, result.type.shape, scales, zero_points, dtype, 0, "the result")
    return ctx.emit("quantize", [result], quantize_attrs(dtype, params))


def _params_of(dequantized: Value) -> QuantParams:
    """The parameters of the integers a `dequantize` result reads."""
    return dequantized.producer.inputs[0].type.quant


def _product_scales(x: Value, w: Value) -> np.ndarray:
    """x_scale · w_scale (one per channel of w), in float32 as ONNX Runtime's quantizer stores biases."""
    return np.float32(_params_of(x).scale[0]) * np.asarray(_params_of(w).scale, np.float32)


def _bias(ctx: ConvertContext, bias: Value | None, x: Value, w: Value, channels: int) -> Value | None:
    """An int32 bias of `channels` values dequantized with scale x_scale · w_scale and zero point 0."""
    if bias is None:
        return None
    data = ctx.const_data(bias, "the int32 bias").reshape(-1)
    if bias.type.dtype is not DType.i32 or data.size not in (1, channels):
        raise ModelFormatError(f"{ctx.where()}: the bias must be int32 with {channels} values, got {bias.type}")
    scales = _product_scales(x, w)
    params = QuantParams(scales, (0,) * scales.size, 0 if scales.size > 1 else None, bits=32)
    vector = ctx.graph.add_constant(np.broadcast_to(data, (channels,)), bias.name,
                                    type=TensorType((channels,), DType.i32, params))
    return _dequantized(ctx, vector, params, "bias", ".bias")


# -- QuantizeLinear / DequantizeLinear ----------------------------------------------------------------
def _node_params(ctx: ConvertContext, node: OnnxNode, shape: Sequence[int], dtype: DType) -> QuantParams:
    """Parameters of QuantizeLinear / DequantizeLinear from operands 1 and 2 and the axis attributes."""
    scales, zero_points = _read(ctx, node.input(1), node.input(2), dtype, "the input")
    block_size = node.attr("block_size", 0) if node.opset >= 21 else 0
    return _params(ctx, shape, scales, zero_points, dtype, node.attr("axis", 1), "the input", block_size)


@converter("QuantizeLinear")
def quantize_linear(ctx: ConvertContext, node: OnnxNode) -> Value:
    x = node.inputs[0]
    dtype = _quantized_type(ctx, node.input(2), node.attr("output_dtype", 0) if node.opset >= 21 else 0)
    return ctx.emit("quantize", [x], quantize_attrs(dtype, _node_params(ctx, node, x.type.shape, dtype)))


@converter("DequantizeLinear")
def dequantize_linear(ctx: ConvertContext, node: OnnxNode) -> Value:
    """The result has the scale's float type (float16 scales since opset 19), or `output_dtype`'s: a cast
    follows the float32 dequantize."""
    q = node.inputs[0]
    if q.type.dtype not in QUANTIZED_DTYPES + (DType.i32,):
        raise ctx.unsupported(f"dequantizing {q.type.dtype}")
    result = _dequantized(ctx, q, _node_params(ctx, node, q.type.shape, q.type.dtype), "the input", "")
    output_dtype = node.attr("output_dtype", 0)
    float_type = element_type(output_dtype, ctx.where()) if output_dtype else node.input(1).type.dtype
    if float_type is not DType.f32:
        result = ctx.emit("cast", [result], {"to": float_type}, ".cast")
    return result


# -- QLinear* -----------------------------------------------------------------------------------------
@converter("QLinearConv")
def qlinear_conv(ctx: ConvertContext, node: OnnxNode) -> Value:
    """x (operands 0-2), w (3-5, per output channel), y's scale and zero point (6-7), int32 bias (8)."""
    x = _dequantized_operand(ctx, node, 0, "x")
    w = _dequantized_operand(ctx, node, 3, "w")
    bias = _bias(ctx, node.input(8), x, w, w.type.shape[0])
    return _requantized(ctx, node, nn.conv(ctx, OnnxNode(node.proto, [x, w, bias], node.opset)), 6)


@converter("QLinearMatMul")
def qlinear_matmul(ctx: ConvertContext, node: OnnxNode) -> Value:
    """a per tensor or per row (0-2), b per tensor or per column (3-5), y's scale and zero point (6-7)."""
    a = _dequantized_operand(ctx, node, 0, "a", axis=-2)
    b = _dequantized_operand(ctx, node, 3, "b", axis=-1)
    return _requantized(ctx, node, ctx.emit("matmul", [a, b], name_suffix=".matmul"), 6)


@converter(MICROSOFT + "QGemm")
def qgemm(ctx: ConvertContext, node: OnnxNode) -> Value:
    """A (operands 0-2), B (3-5, per column of B'), int32 C (6) with scale a_scale · b_scale, and y's scale
    and zero point (7-8; without them the result is float). With a constant B and a C of one value per
    column this is linear(DQ(A'), DQ(w), DQ(C)) with w = B' as [N, K]; otherwise Gemm's own conversion."""
    if node.attr("alpha", 1.0) != 1.0:
        raise ctx.unsupported(f"alpha={node.attr('alpha')}; lowbit imports QGemm with alpha 1")
    b, c = node.input(3), node.input(6)
    trans_b = bool(node.attr("transB", 0))
    columns = b.type.shape[0 if trans_b else 1]
    data = constant_value(b)
    a = _dequantized_operand(ctx, node, 0, "a")
    bias_vector = c is None or (constant_value(c) is not None and c.type.size in (1, columns) and c.type.rank <= 2)
    if data is not None and bias_vector:
        weight = b if trans_b else ctx.graph.add_constant(data.T, f"{b.name}.transposed")
        w = _dequantized_operand(ctx, node, 3, "b", axis=0, value=weight)
        x = ctx.emit("transpose", [a], {"perm": [1, 0]}, ".transA") if node.attr("transA", 0) else a
        y = ctx.emit("linear", [x, w] + ([_bias(ctx, c, a, w, columns)] if c is not None else []),
                     name_suffix=".linear")
    else:
        w = _dequantized_operand(ctx, node, 3, "b", axis=0 if trans_b else 1)
        y = nn.gemm(ctx, OnnxNode(node.proto, [a, w, _gemm_c(ctx, c, a, w)], node.opset))
    return _requantized(ctx, node, y, 7) if node.input(7) is not None else y


def _gemm_c(ctx: ConvertContext, c: Value | None, a: Value, b: Value) -> Value | None:
    """QGemm's C as a float matrix: int32 with scale a_scale · b_scale (per column) and zero point 0."""
    if c is None:
        return None
    scales = _product_scales(a, b)
    if scales.size > 1 and c.type.shape[-1:] != (scales.size,):
        raise ctx.unsupported(f"C of shape {list(c.type.shape)} with a B quantized per column")
    params = QuantParams(scales, (0,) * scales.size, c.type.rank - 1 if scales.size > 1 else None, bits=32)
    return _dequantized(ctx, c, params, "C", ".C")


def _binary(op: str):
    def convert(ctx: ConvertContext, node: OnnxNode) -> Value:
        a = _dequantized_operand(ctx, node, 0, "a")
        b = _dequantized_operand(ctx, node, 3, "b")
        return _requantized(ctx, node, ctx.emit(op, [a, b], name_suffix=f".{op}"), 6)

    convert.__doc__ = f"A (operands 0-2), B (3-5) and C's scale and zero point (6-7): Q({op}(DQ(A), DQ(B)))."
    return convert


converter(MICROSOFT + "QLinearAdd")(_binary("add"))
converter(MICROSOFT + "QLinearMul")(_binary("mul"))


@converter(MICROSOFT + "QLinearConcat")
def qlinear_concat(ctx: ConvertContext, node: OnnxNode) -> Value:
    """Y's scale and zero point (operands 0-1), then a (tensor, scale, zero point) triple per input."""
    parts = [_dequantized_operand(ctx, node, index, f"input{(index - 2) // 3}")
             for index in range(2, len(node.inputs), 3)]
    return _requantized(ctx, node, tensor.concat(ctx, OnnxNode(node.proto, parts, node.opset)), 0)


@converter(MICROSOFT + "QLinearGlobalAveragePool")
def qlinear_global_average_pool(ctx: ConvertContext, node: OnnxNode) -> Value:
    """X (operands 0-2), Y's scale and zero point (3-4); NCHW only."""
    if node.attr("channels_last", 0):
        raise ctx.unsupported("channels_last=1 (lowbit's pools are NCHW)")
    x = _dequantized_operand(ctx, node, 0, "x")
    return _requantized(ctx, node, ctx.emit("global_avg_pool", [x], name_suffix=".pool"), 3)


# -- integer products with int32 results ---------------------------------------------------------------
def _centred(ctx: ConvertContext, value: Value, zero_point: Value | None, axis: int, what: str) -> Value:
    """value - zero_point as exact float32: a dequantize with scale 1 when the zero point is constant (the
    QDQ form), else cast and subtract (the run-time zero point of DynamicQuantizeLinear)."""
    dtype = value.type.dtype
    if zero_point is None or constant_value(zero_point) is not None:
        zero_points = np.zeros(1, np.int64) if zero_point is None else constant_value(zero_point).astype(np.int64)
        if zero_point is not None and zero_point.type.dtype is not dtype:
            raise ModelFormatError(f"{ctx.where()}: the zero point of {what} is {zero_point.type.dtype}, the "
                                   f"values are {dtype}")
        params = _params(ctx, value.type.shape, np.ones(zero_points.shape, np.float32), zero_points, dtype, axis,
                         what)
        return _dequantized(ctx, value, params, what, f".{what}")
    as_float = ctx.emit("cast", [value], {"to": DType.f32}, f".{what}.float")
    zero = ctx.emit("cast", [zero_point], {"to": DType.f32}, f".{what}.zero_point")
    if zero_point.type.size > 1:  # one per index of `axis`
        shape = [1] * value.type.rank
        shape[axis] = zero_point.type.size
        zero = ctx.emit("reshape", [zero], {"shape": shape}, f".{what}.zero_points")
    return ctx.emit("sub", [as_float, zero], name_suffix=f".{what}.centred")


def _type_bound(value: Value, zero_point: Value | None) -> int:
    """The largest |value - zero_point| for any value of the type (and any zero point when it is run-time)."""
    dtype = value.type.dtype
    if zero_point is None:
        zeros = [0]
    elif constant_value(zero_point) is not None:
        zeros = [int(z) for z in constant_value(zero_point).reshape(-1)]
    else:
        zeros = [int(dtype.min), int(dtype.max)]
    return quant_math.term_bound(dtype, zeros)


def _check_exact(ctx: ConvertContext, x: Value, x_zero: Value | None, w: Value, w_zero: Value | None,
                 depth: int, w_axis: int, sum_axes: tuple[int, ...]) -> None:
    """Fail unless Σ |x̃ · w̃| for one output stays below 2^24, so that float32 computes the int32 sum
    exactly. A constant w (the usual weight) is bounded by its data: Σ |w - zw| along `sum_axes`."""
    data = constant_value(w)
    zeros = constant_value(w_zero) if w_zero is not None else None
    if data is not None and (w_zero is None or zeros is not None):
        zeros = np.zeros(1, np.int64) if zeros is None else zeros.astype(np.int64).reshape(-1)
        shape = [1] * data.ndim
        shape[w_axis] = zeros.size
        terms = np.abs(data.astype(np.int64) - zeros.reshape(shape if zeros.size > 1 else ()))
        w_bound = int(terms.sum(axis=sum_axes).max(initial=0))
    else:
        w_bound = depth * _type_bound(w, w_zero)
    bound = _type_bound(x, x_zero) * w_bound
    if bound >= FLOAT32_EXACT:
        raise ctx.unsupported(f"its int32 sums can reach {bound}, which float32 does not hold exactly (2^24); "
                              f"lowbit computes {ctx.node.op_type} as a float op on dequantized operands")


def _int32(ctx: ConvertContext, exact: Value) -> Value:
    """A float32 tensor of exact integers as the int32 result: quantize with scale 1."""
    return ctx.emit("quantize", [exact], {"dtype": DType.i32, "scale": (1.0,)})


@converter("MatMulInteger")
def matmul_integer(ctx: ConvertContext, node: OnnxNode) -> Value:
    """Σ (A - a_zero_point)(B - b_zero_point) in int32; a's zero point per tensor or row, b's per tensor or
    column. Exact only where float32 holds every partial sum (see `_check_exact`)."""
    a, b = node.inputs[0], node.inputs[1]
    _check_exact(ctx, a, node.input(2), b, node.input(3), a.type.shape[-1], b.type.rank - 1,
                 (max(b.type.rank - 2, 0),))
    a = _centred(ctx, a, node.input(2), -2, "a")
    b = _centred(ctx, b, node.input(3), -1, "b")
    return _int32(ctx, ctx.emit("matmul", [a, b], name_suffix=".matmul"))


@converter("ConvInteger")
def conv_integer(ctx: ConvertContext, node: OnnxNode) -> Value:
    """Conv of (x - x_zero_point) and (w - w_zero_point, per output channel) in int32; the padding holds
    x's zero point (ONNX Runtime's choice), i.e. 0 after centring."""
    x, w = node.inputs[0], node.inputs[1]
    _check_exact(ctx, x, node.input(2), w, node.input(3), math.prod(w.type.shape[1:]), 0,
                 tuple(range(1, w.type.rank)))
    x = _centred(ctx, x, node.input(2), 0, "x")
    w = _centred(ctx, w, node.input(3), 0, "w")
    return _int32(ctx, nn.conv(ctx, OnnxNode(node.proto, [x, w], node.opset)))


@converter("DynamicQuantizeLinear")
def dynamic_quantize_linear(ctx: ConvertContext, node: OnnxNode) -> list[Value]:
    """uint8 y, scale and zero point computed from x as ONNX specifies (ONNX Runtime's arithmetic, all in
    float32): the range [min(x, 0), max(x, 0)], scale = range / 255 (1 for an all-zero x), zero point =
    round_half_even(clamp(-min / scale, 0, 255)), y = clamp(round_half_even(x / scale) + zero point, 0, 255)."""
    x = node.inputs[0]
    if x.type.dtype is not DType.f32:
        raise ModelFormatError(f"{ctx.where()}: the input must be float32, got {x.type.dtype}")

    def number(value: float, what: str) -> Value:
        return ctx.constant(np.float32(value), name=f"{node.name}.{what}")

    def emit(op: str, operands: list[Value], suffix: str, **attrs) -> Value:
        return ctx.emit(op, operands, attrs, name_suffix=suffix)

    everything = {"axes": tuple(range(x.type.rank)), "keepdims": False}
    zero, top = number(0.0, "zero"), number(255.0, "qmax")
    low = emit("minimum", [emit("reduce_min", [x], ".min", **everything), zero], ".low")
    high = emit("maximum", [emit("reduce_max", [x], ".max", **everything), zero], ".high")
    span = emit("sub", [high, low], ".range")
    scale = emit("where", [emit("equal", [span, zero], ".flat"), number(1.0, "one"),
                           emit("div", [span, top], ".ratio")], ".scale")
    bounds = {"min": 0.0, "max": 255.0}
    zero_point = emit("round", [emit("clip", [emit("div", [emit("neg", [low], ".negated"), scale], ".offset")],
                                     ".offset_clamped", **bounds)], ".zero_point_float")
    levels = emit("add", [emit("round", [emit("div", [x, scale], ".scaled")], ".rounded"), zero_point], ".shifted")
    y = emit("cast", [emit("clip", [levels], ".clamped", **bounds)], ".y", to=DType.u8)
    return [y, scale, emit("cast", [zero_point], ".zero_point", to=DType.u8)]
