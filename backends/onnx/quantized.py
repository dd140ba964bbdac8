"""ONNX export of the quantization borders and of the integer ops, in the QDQ form.

`quantize` / `dequantize` are QuantizeLinear / DequantizeLinear. An integer op becomes DequantizeLinear of
each integer operand (constants stay integer initializers; the int32 bias is dequantized with scale
x_scale · w_scale), the float op, and QuantizeLinear with the result's parameters: the standard QDQ model
that ONNX Runtime runs, fusing it into its own integer kernels. Such a model computes the float
simulation of lowbit's integer op, which can differ from lowbit's fixed-point requantization by one step
of the result's scale.

The clamp of a requantizing op (`qmin`/`qmax`: a fused ReLU or ReLU6, or fewer `bits` than the storage
type) becomes Relu or Clip on the float result before the QuantizeLinear: QuantizeLinear is monotonic and
maps the real bounds (q - zero_point) · scale exactly back to q, so the clamp commutes with it. Where that
argument fails (per-channel parameters, or bounds too far from the zero point for float32), an integer
Clip follows the QuantizeLinear instead.

16-bit and 4-bit types and per-group (blocked) parameters need opset 21. Below that, 16-bit and int32
borders are written in float ops (Cast, Sub, Mul and Div, Round, Add, Clip, Cast) that compute the same;
so are the results of per-channel integer pools, whose Q/DQ ONNX Runtime would fuse into pools it then
refuses. The dynamic ops become ONNX Runtime's own dynamic form: DynamicQuantizeLinear, MatMulInteger,
Cast and Mul by the scale product.
"""
from __future__ import annotations

import numpy as np

from lowbit.backends.onnx.context import ELEMENT_TYPES, SUB_BYTE, ExportContext
from lowbit.backends.onnx.nn import conv_nodes, linear_nodes, pool_nodes
from lowbit.backends.onnx.registry import exporter
from lowbit.errors import UnsupportedOpError
from lowbit.ir import DType, Node, QuantParams, TensorType, Value, constant_value
from lowbit.ir.ops.quantized import clamp_range

EIGHT_BIT = (DType.u8, DType.i8)
FLOAT32_EXACT_BOUNDS = 1 << 22  # |q - zero_point| below this: (q - zp) · scale / scale rounds back to q


def _linear_form(ctx: ExportContext, dtype: DType, params: QuantParams, dequantizing: bool) -> bool:
    """Whether QuantizeLinear / DequantizeLinear at the context's opset takes `dtype` with `params`."""
    if params.group_size is not None or dtype in SUB_BYTE:
        ctx.require_opset(21, f"{dtype} or blocked (per-group) QuantizeLinear / DequantizeLinear")
        return True
    return dtype in EIGHT_BIT or (dequantizing and dtype is DType.i32) or (
        ctx.opset >= 21 and dtype in (DType.u16, DType.i16))


def _parameter_inputs(ctx: ExportContext, dtype: DType, params: QuantParams, shape: tuple[int, ...],
                      what: str) -> tuple[str, str, dict]:
    """Scale and zero-point initializers and the axis / block_size attributes of Q / DQ."""
    scales = np.asarray(params.scale, np.float32)
    zero_points = np.asarray(params.zero_point, np.int64).astype(dtype.numpy)
    attrs: dict = {}
    if params.axis is None:
        scales, zero_points = scales.reshape(()), zero_points.reshape(())
    else:
        attrs["axis"] = params.axis
        if params.group_size is not None:
            blocked = list(shape)
            blocked[params.axis] //= params.group_size
            scales, zero_points = scales.reshape(blocked), zero_points.reshape(blocked)
            attrs["block_size"] = params.group_size
    return ctx.initializer(scales, f"{what}.scale"), ctx.initializer(zero_points, f"{what}.zero_point", dtype), attrs


def dequantize_nodes(ctx: ExportContext, q: str, t: TensorType, out: str | None = None) -> str:
    """float32((q - zero_point) · scale) with the parameters of `t`: DequantizeLinear, or below opset 21 for
    16-bit values Cast, Sub and Mul, which are exact (the difference is an integer float32 holds)."""
    params = t.quant
    if _linear_form(ctx, t.dtype, params, dequantizing=True):
        scale, zero_point, attrs = _parameter_inputs(ctx, t.dtype, params, t.shape, "dq")
        return ctx.emit("DequantizeLinear", [q, scale, zero_point], out, **attrs)
    centred = ctx.emit("Sub", [ctx.emit("Cast", [q], to=ELEMENT_TYPES[DType.f32]),
                               ctx.initializer(params.zero_point_array(t.shape).astype(np.float32), "dq.zero_point")])
    return ctx.emit("Mul", [centred, ctx.initializer(params.scale_array(t.shape), "dq.scale")], out)


def dequantized(ctx: ExportContext, value: Value) -> str:
    """A DequantizeLinear of an integer operand, one per use (ONNX Runtime fuses a DQ with one consumer)."""
    return dequantize_nodes(ctx, ctx.name(value), value.type)


def quantize_nodes(ctx: ExportContext, x: str, dtype: DType, params: QuantParams, shape: tuple[int, ...],
                   qmin: int, qmax: int, out: str) -> None:
    """clamp(quantize(x), qmin, qmax) for a float32 x, ending in `out` (see the module docstring)."""
    clamped = qmin > dtype.min or qmax < dtype.max
    if not _linear_form(ctx, dtype, params, dequantizing=False):
        _float_quantize(ctx, x, dtype, params, shape, qmin, qmax, out)
        return
    reach = max(abs(qmin - params.zero_point[0]), abs(qmax - params.zero_point[0]))
    after = clamped and (params.axis is not None or reach >= FLOAT32_EXACT_BOUNDS)
    if clamped and not after:
        x = _float_clamp(ctx, x, params, dtype, qmin, qmax)
    scale, zero_point, attrs = _parameter_inputs(ctx, dtype, params, shape, "q")
    q = ctx.emit("QuantizeLinear", [x, scale, zero_point], None if after else out, **attrs)
    if after:
        if dtype in SUB_BYTE:
            raise UnsupportedOpError(f"{ctx.where()}: ONNX has no Clip of {dtype} for the clamp [{qmin}, {qmax}]")
        ctx.emit("Clip", [q, ctx.scalar(qmin, dtype, "qmin"), ctx.scalar(qmax, dtype, "qmax")], out)


def _float_clamp(ctx: ExportContext, x: str, params: QuantParams, dtype: DType, qmin: int, qmax: int) -> str:
    """Relu (qmin = zero point) or Clip at the real values of qmin and qmax (per-tensor parameters)."""
    zero_point, scale = params.zero_point[0], np.float32(params.scale[0])
    if qmin == zero_point and qmax >= dtype.max:
        return ctx.emit("Relu", [x])

    def bound(q: int, open_end: bool) -> str | None:
        return None if open_end else ctx.scalar(np.float32(q - zero_point) * scale, DType.f32, "clamp")

    return ctx.emit("Clip", [x, bound(qmin, qmin <= dtype.min), bound(qmax, qmax >= dtype.max)])


def _float_quantize(ctx: ExportContext, x: str, dtype: DType, params: QuantParams, shape: tuple[int, ...],
                    qmin: int, qmax: int, out: str) -> None:
    """clamp(round_half_even(x / scale) + zero_point) in float32, then Cast: for the types QuantizeLinear
    lacks (int32, and 16-bit below opset 21) and per-channel pools. Exact while |x / scale| + |zero_point|
    < 2^24 (NaN aside, which the reference maps to qmin)."""
    ratio = ctx.emit("Div", [x, ctx.initializer(params.scale_array(shape), "q.scale")])
    shifted = ctx.emit("Add", [ctx.emit("Round", [ratio]),
                               ctx.initializer(params.zero_point_array(shape).astype(np.float32), "q.zero_point")])
    low, high = (_float32_within(bound, toward) for bound, toward in ((qmin, qmax), (qmax, qmin)))
    clamped = ctx.emit("Clip", [shifted, ctx.scalar(low, DType.f32, "qmin"), ctx.scalar(high, DType.f32, "qmax")])
    ctx.emit("Cast", [clamped], out, to=ELEMENT_TYPES[dtype])


def _float32_within(bound: int, toward: int) -> np.float32:
    """The float32 nearest `bound` on the side of `toward` (2^31 - 1 has no float32; 2^31 - 128 is next)."""
    value = np.float32(bound)
    if (float(value) - bound) * (toward - bound) < 0:
        value = np.nextafter(value, np.float32(toward))
    return value


def _result(ctx: ExportContext, node: Node, y: str) -> None:
    """The residual add (products), the clamp and the QuantizeLinear of a requantizing op."""
    if node.op in ("qconv2d", "qlinear") and len(node.inputs) > 3 and node.inputs[3] is not None:
        y = ctx.emit("Add", [y, dequantized(ctx, node.inputs[3])])
    result = node.outputs[0].type
    qmin, qmax = clamp_range(node.attrs)
    quantize_nodes(ctx, y, result.dtype, result.quant, result.shape, qmin, qmax, ctx.outputs(node)[0])


def _same_params(ctx: ExportContext, node: Node, y: str) -> None:
    """The QuantizeLinear of an integer pool, whose result keeps the operand's parameters. Per-channel ones
    are quantized by float ops: ONNX Runtime fuses DQ → pool → Q into pools that take per-tensor parameters
    only, and fails to load the model otherwise."""
    result = node.outputs[0].type
    params = result.quant
    if params.axis is not None:
        _float_quantize(ctx, y, result.dtype, params, result.shape, params.qmin, params.qmax, ctx.outputs(node)[0])
        return
    quantize_nodes(ctx, y, result.dtype, params, result.shape, params.qmin, params.qmax, ctx.outputs(node)[0])


def _bias(ctx: ExportContext, node: Node) -> str | None:
    """The int32 bias dequantized with its parameters, by default scale x_scale · w_scale and zero point 0."""
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    bias = node.inputs[2]
    t = bias.type
    if t.quant is None:
        x, w = node.inputs[0].type.quant, node.inputs[1].type.quant
        scales = np.float32(x.scale[0]) * np.asarray(w.scale, np.float32)
        t = TensorType(t.shape, t.dtype, QuantParams(scales, (0,) * scales.size,
                                                     0 if scales.size > 1 else None, bits=32))
    return dequantize_nodes(ctx, ctx.name(bias), t)


# -- the borders --------------------------------------------------------------------------------------
@exporter("quantize")
def quantize(ctx: ExportContext, node: Node) -> None:
    """A float16 / float64 x is cast to float32 first, as lowbit's quantize divides in float32."""
    x = node.inputs[0]
    name = ctx.name(x)
    if x.type.dtype is not DType.f32:
        name = ctx.emit("Cast", [name], to=ELEMENT_TYPES[DType.f32])
    result = node.outputs[0].type
    quantize_nodes(ctx, name, result.dtype, result.quant, result.shape, result.quant.qmin, result.quant.qmax,
                   ctx.outputs(node)[0])


@exporter("dequantize")
def dequantize(ctx: ExportContext, node: Node) -> None:
    dequantize_nodes(ctx, ctx.name(node.inputs[0]), node.inputs[0].type, ctx.outputs(node)[0])


# -- integer ops --------------------------------------------------------------------------------------
@exporter("requantize")
def requantize(ctx: ExportContext, node: Node) -> None:
    _result(ctx, node, dequantized(ctx, node.inputs[0]))


@exporter("qconv2d")
def qconv2d(ctx: ExportContext, node: Node) -> None:
    x, w = node.inputs[:2]
    _result(ctx, node, conv_nodes(ctx, node, dequantized(ctx, x), dequantized(ctx, w), _bias(ctx, node), None))


@exporter("qlinear")
def qlinear(ctx: ExportContext, node: Node) -> None:
    x, w = node.inputs[:2]
    y = linear_nodes(ctx, x.type.rank, dequantized(ctx, x), dequantized(ctx, w), lambda: _transposed(ctx, w),
                     _bias(ctx, node), None)
    _result(ctx, node, y)


def _transposed(ctx: ExportContext, w: Value) -> str:
    """A [N, K] integer weight as a dequantized [K, N] one: a transposed initializer (its per-channel axis
    moves to 1) when constant, else a Transpose of the dequantized weight."""
    data = constant_value(w)
    if data is None:
        return ctx.emit("Transpose", [dequantized(ctx, w)], perm=[1, 0])
    params = w.type.quant
    moved = QuantParams(params.scale, params.zero_point, None if params.axis is None else 1, None, params.bits,
                        params.signed)
    name = ctx.initializer(np.ascontiguousarray(data.T), f"{w.name or 'weight'}.transposed", w.type.dtype)
    return dequantize_nodes(ctx, name, TensorType(data.T.shape, w.type.dtype, moved))


@exporter("qmatmul")
def qmatmul(ctx: ExportContext, node: Node) -> None:
    _result(ctx, node, ctx.emit("MatMul", [dequantized(ctx, v) for v in node.inputs]))


@exporter("qadd", "qmul")
def qbinary(ctx: ExportContext, node: Node) -> None:
    _result(ctx, node, ctx.emit("Add" if node.op == "qadd" else "Mul", [dequantized(ctx, v) for v in node.inputs]))


@exporter("qconcat")
def qconcat(ctx: ExportContext, node: Node) -> None:
    _result(ctx, node, ctx.emit("Concat", [dequantized(ctx, v) for v in node.inputs], axis=node.attrs["axis"]))


@exporter("qmax_pool2d", "qavg_pool2d")
def qpool(ctx: ExportContext, node: Node) -> None:
    _same_params(ctx, node, pool_nodes(ctx, node, dequantized(ctx, node.inputs[0]), None))


@exporter("qglobal_avg_pool")
def qglobal_avg_pool(ctx: ExportContext, node: Node) -> None:
    _same_params(ctx, node, ctx.emit("GlobalAveragePool", [dequantized(ctx, node.inputs[0])]))


# -- dynamic quantization -------------------------------------------------------------------------------
def _dynamically_quantized(ctx: ExportContext, value: Value) -> tuple[str, str, str]:
    """DynamicQuantizeLinear of a float operand (cast to float32 first): u8 values, scale, zero point."""
    x = ctx.name(value)
    if value.type.dtype is not DType.f32:
        x = ctx.emit("Cast", [x], to=ELEMENT_TYPES[DType.f32])
    names = [ctx.fresh(f"{ctx.node.name or ctx.node.op}.{part}") for part in ("q", "scale", "zero_point")]
    ctx.emit("DynamicQuantizeLinear", [x], names)
    return names[0], names[1], names[2]


def _float_product(ctx: ExportContext, node: Node, acc: str, factors: str, bias: str | None) -> None:
    """float32(acc) · factors (+ bias), in the reference's order, cast back to the result's type."""
    result = node.outputs[0].type.dtype
    out = ctx.outputs(node)[0]
    last = out if result is DType.f32 and bias is None else None
    y = ctx.emit("Mul", [ctx.emit("Cast", [acc], to=ELEMENT_TYPES[DType.f32]), factors], last)
    if bias is not None:
        y = ctx.emit("Add", [y, bias], out if result is DType.f32 else None)
    if result is not DType.f32:
        ctx.emit("Cast", [y], out, to=ELEMENT_TYPES[result])


@exporter("dynamic_linear")
def dynamic_linear(ctx: ExportContext, node: Node) -> None:
    """DynamicQuantizeLinear, MatMulInteger with the weight as [K, N] (its zero points per column), Cast, Mul
    by scale_x · scale_w (per column), Add bias: ONNX Runtime's own dynamic form, which it fuses."""
    x, w = node.inputs[:2]
    params = w.type.quant
    storage = DType.i8 if params.signed else DType.u8  # MatMulInteger takes 8-bit storage (int4 fits)
    data = constant_value(w)
    if data is None:
        if w.type.dtype is not storage:
            raise UnsupportedOpError(f"{ctx.where()}: a run-time {w.type.dtype} weight (MatMulInteger takes 8 bits)")
        weight = ctx.emit("Transpose", [ctx.name(w)], perm=[1, 0])
    else:
        weight = ctx.initializer(np.ascontiguousarray(data.T), f"{w.name or 'weight'}.transposed", storage)
    per_column = params.axis is not None
    zero_points = np.asarray(params.zero_point).astype(storage.numpy)
    scales = np.asarray(params.scale, np.float32)
    q, scale, zero_point = _dynamically_quantized(ctx, x)
    acc = ctx.emit("MatMulInteger", [q, weight, zero_point, ctx.initializer(
        zero_points if per_column else zero_points.reshape(()), "w.zero_point", storage)])
    factors = ctx.emit("Mul", [scale, ctx.initializer(scales if per_column else scales.reshape(()), "w.scale")])
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    _float_product(ctx, node, acc, factors, ctx.name(bias) if bias is not None else None)


@exporter("dynamic_matmul")
def dynamic_matmul(ctx: ExportContext, node: Node) -> None:
    """Both operands through DynamicQuantizeLinear, MatMulInteger, Cast, Mul by scale_a · scale_b."""
    qa, sa, za = _dynamically_quantized(ctx, node.inputs[0])
    qb, sb, zb = _dynamically_quantized(ctx, node.inputs[1])
    _float_product(ctx, node, ctx.emit("MatMulInteger", [qa, qb, za, zb]), ctx.emit("Mul", [sa, sb]), None)
