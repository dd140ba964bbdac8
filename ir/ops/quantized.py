"""Integer (quantized) ops: quantize / dequantize borders, requantize, and integer conv, linear, matmul,
add, mul, concat and pooling.

Operands are self-describing: each integer operand's type carries its `QuantParams`. The result's
parameters come from the attributes (`dtype`, `scale`, `zero_point`, `bits`) and inference returns a
type WITH them, so `graph.add_node` types results fully. Ops that requantize store the fixed-point
form of their real multipliers (`multiplier`, `shift`, from `lowbit.ir.quant_math`) so every target
computes with the same integers; inference checks those can never overflow int64. The arithmetic of
each op is written out in docs/quantization.md; backends/reference/quantized.py is its definition.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from lowbit.errors import ShapeError
from lowbit.ir import quant_math
from lowbit.ir.dtypes import DType
from lowbit.ir.ops import nn, tensor  # noqa: F401  (the float ops whose shape rules these reuse)
from lowbit.ir.ops.common import broadcast_shapes, require_float
from lowbit.ir.registry import Attr, InferContext, get_op, infer_types, register_op
from lowbit.ir.types import QuantParams, TensorType

PURE = ("pure",)
MAX_OPERAND_BITS = 16  # activations and weights; wider integers (i32 bias, accumulators) only where stated
REAL_TOLERANCE = 2.0 ** -20  # relative; float32 products of float32 scales differ by ulps with the order

_RESULT_ATTRS = {
    "dtype": Attr("dtype", doc="element type of the result"),
    "scale": Attr("float", doc="scale of the result (per-tensor)"),
    "zero_point": Attr("int", 0, "zero point of the result"),
    "bits": Attr("int", None, "significant bits of the result (default: the width of dtype)"),
}
_CLAMP_ATTRS = {
    "qmin": Attr("int", None, "lower clamp in the result's integer domain (default: the lowest value of bits); "
                              "a fused relu sets it to zero_point"),
    "qmax": Attr("int", None, "upper clamp (default: the highest value of bits); relu6 sets it to "
                              "zero_point + round(6 / scale)"),
}
_FIXED_POINT_ATTRS = {
    "multiplier": Attr("ints", doc="fixed-point multipliers in [0, 2^31), one or one per output channel"),
    "shift": Attr("ints", doc="right shifts in [0, 62], as many as multipliers"),
}
_REQUANT_ATTRS = {**_RESULT_ATTRS, **_CLAMP_ATTRS, **_FIXED_POINT_ATTRS}
_PRODUCT_ATTRS = {**_REQUANT_ATTRS, "residual_multiplier": Attr(
    "ints", (), "multipliers of the residual operand (sharing `shift`), as many as multiplier")}
_CONV_KEYS = ("strides", "pads", "dilations", "group")  # conv2d's window attributes (not its float epilogue)
_CONV_ATTRS = {k: get_op("conv2d").attrs[k] for k in _CONV_KEYS}
_MAX_POOL_ATTRS = get_op("max_pool2d").attrs
_AVG_POOL_ATTRS = get_op("avg_pool2d").attrs


# -- parameters of results (used by the reference implementations too) -----------------------------
def result_params(attrs: dict[str, Any]) -> QuantParams:
    """The per-tensor parameters of a requantizing op's result, from its attributes."""
    dtype = attrs["dtype"]
    return QuantParams((attrs["scale"],), (attrs["zero_point"],), bits=attrs["bits"] or dtype.bits,
                       signed=dtype.is_signed)


def quantize_params(attrs: dict[str, Any]) -> QuantParams:
    """The parameters of `quantize`'s result (zero points default to 0)."""
    dtype = attrs["dtype"]
    zero_point = attrs["zero_point"] or (0,) * len(attrs["scale"])
    return QuantParams(attrs["scale"], zero_point, attrs["axis"], attrs["group_size"],
                       attrs["bits"] or dtype.bits, dtype.is_signed)


def clamp_range(attrs: dict[str, Any]) -> tuple[int, int]:
    """[qmin, qmax] a requantizing op clamps to: the attributes, defaulting to the range of the result's bits."""
    params = result_params(attrs)
    low = attrs.get("qmin")
    high = attrs.get("qmax")
    return (params.qmin if low is None else low), (params.qmax if high is None else high)


# -- checks shared by the declarations --------------------------------------------------------------
def _params_problem(params: QuantParams, dtype: DType) -> str | None:
    if not dtype.is_integer:
        return f"quantized values must be integers, got {dtype}"
    if params.signed != dtype.is_signed:
        return f"parameters say {'signed' if params.signed else 'unsigned'} but the type is {dtype}"
    if not 2 <= params.bits <= dtype.bits:
        return f"{params.bits} bits do not fit {dtype} (2 to {dtype.bits})"
    if any(not (math.isfinite(s) and s > 0) for s in params.scale):
        return f"scales must be finite and positive, got {list(params.scale)}"
    outside = sorted({z for z in params.zero_point if not params.qmin <= z <= params.qmax})
    if outside:
        return f"zero point(s) {outside} are outside [{params.qmin}, {params.qmax}] of {params.bits}-bit {dtype}"
    return None


def _operand(ctx: InferContext, index: int, what: str, channel_axis: int | None = None,
             max_bits: int = MAX_OPERAND_BITS) -> QuantParams:
    """The parameters of integer operand `index`: per-tensor, or per-channel along `channel_axis`."""
    t = ctx.type(index)
    if not t.dtype.is_integer or t.dtype.bits > max_bits:
        ctx.fail(f"{what} must be an integer type of at most {max_bits} bits, got {t.dtype}")
    params = t.quant
    if params is None:
        ctx.fail(f"{what} of type {t} carries no quantization parameters")
    problem = _params_problem(params, t.dtype)
    if problem:
        ctx.fail(f"{what}: {problem}")
    if params.group_size is not None:
        ctx.fail(f"{what} is quantized per group, which integer ops do not take; dequantize it and use the "
                 f"float op (weight-only quantization)")
    if params.axis is not None and (channel_axis is None or params.axis % t.rank != channel_axis % t.rank):
        allowed = "per-tensor" if channel_axis is None else f"per-tensor or per-channel along axis {channel_axis}"
        ctx.fail(f"{what} is quantized per channel along axis {params.axis}; this op takes {allowed} parameters")
    return params


def _result(ctx: InferContext, shape: tuple[int, ...], params: QuantParams | None = None) -> TensorType:
    """The result type with `params` (default: from the attributes), checking they are sound."""
    dtype = ctx.attrs["dtype"]
    if not dtype.is_integer or dtype.bits > 32:
        ctx.fail(f"result dtype must be an integer type of at most 32 bits, got {dtype}")
    try:
        params = params or result_params(ctx.attrs)
        result = TensorType(shape, dtype, params)
    except ShapeError as error:
        ctx.fail(f"result parameters: {error}")
    problem = _params_problem(params, dtype)
    if problem:
        ctx.fail(f"result: {problem}")
    return result


def _shape_of(ctx: InferContext, op: str, types: list[TensorType], attrs: dict[str, Any]) -> tuple[int, ...]:
    """The result shape the float / plain op `op` infers: the integer ops share its shape rule."""
    where = ctx.where or ctx.op
    return infer_types(op, types, get_op(op).normalize_attrs(attrs, where), where=where)[0].shape


def _check_clamp(ctx: InferContext, params: QuantParams) -> None:
    low, high = clamp_range(ctx.attrs)
    if not params.qmin <= low <= high <= params.qmax:
        ctx.fail(f"clamp [{low}, {high}] must lie within [{params.qmin}, {params.qmax}] of the result")


def _constant_fits(ctx: InferContext, index: int, params: QuantParams, what: str) -> None:
    """Constant data must lie within its declared bits (kernels rely on it, e.g. 7-bit weights)."""
    data = ctx.const(index)
    if data is not None and data.size and (data.min() < params.qmin or data.max() > params.qmax):
        ctx.fail(f"{what} holds values in [{data.min()}, {data.max()}], outside [{params.qmin}, {params.qmax}] "
                 f"of its {params.bits}-bit parameters")


# -- fixed-point multipliers ------------------------------------------------------------------------
# A requantizing op computes, per channel c, Σ_i term_i · m[i][c] >> shift[c]. Its terms rule gives the
# real multipliers reals[i][c] (from the operands' and result's scales, in float64) and the static
# bounds[i][c] of |term_i|; inference checks the stored integers against both, and `fixed_point_attrs`
# computes them, so passes and the verifier can never disagree.
Terms = tuple[list[list[float]], list[list[int]]]
_TERMS: dict[str, Callable[[InferContext], Terms]] = {}
_TERM_LAYOUT_OPS = ("qadd", "qmul")  # one channel; `multiplier` lists its terms


def _columns(op: str, attrs: dict[str, Any]) -> list[tuple[int, ...]]:
    """The stored multipliers as columns[term][channel]."""
    if op in _TERM_LAYOUT_OPS:
        return [(m,) for m in attrs["multiplier"]]
    columns = [attrs["multiplier"]]
    if attrs.get("residual_multiplier"):
        columns.append(attrs["residual_multiplier"])
    return columns


def fixed_point_attrs(op: str, types: Sequence[TensorType | None], attrs: dict[str, Any],
                      constants: Sequence[Any] | None = None) -> dict[str, tuple[int, ...]]:
    """`multiplier`, `shift` (and `residual_multiplier`) for a requantizing op with operands of `types`
    (and constant data, which tightens the bias bound) and the other attributes in `attrs`."""
    full = get_op(op).normalize_attrs({**attrs, "multiplier": (), "shift": ()})  # placeholders: not read
    ctx = InferContext(op, list(types), full, list(constants or [None] * len(types)))
    reals, bounds = _TERMS[op](ctx)
    columns: list[list[int]] = [[] for _ in reals]
    shifts = []
    for c in range(len(reals[0])):
        multipliers, shift = quant_math.quantize_multipliers([r[c] for r in reals], [b[c] for b in bounds])
        for column, m in zip(columns, multipliers):
            column.append(m)
        shifts.append(shift)
    if op in _TERM_LAYOUT_OPS:
        return {"multiplier": tuple(column[0] for column in columns), "shift": tuple(shifts)}
    result = {"multiplier": tuple(columns[0]), "shift": tuple(shifts)}
    if len(columns) > 1:
        result["residual_multiplier"] = tuple(columns[1])
    return result


def _check_fixed_point(ctx: InferContext, terms: Terms) -> None:
    reals, bounds = terms
    columns, shifts = _columns(ctx.op, ctx.attrs), ctx.attrs["shift"]
    channels = len(reals[0])
    if len(columns) != len(reals) or any(len(c) != channels for c in columns) or len(shifts) != channels:
        stored = {k: list(ctx.attrs[k]) for k in ("multiplier", "residual_multiplier", "shift") if k in ctx.attrs}
        ctx.fail(f"expects {len(reals)} term(s) × {channels} channel(s) of multipliers and {channels} shift(s), "
                 f"got {stored}")
    for c, shift in enumerate(shifts):
        multipliers = [column[c] for column in columns]
        problem = quant_math.multiplier_problem(multipliers, shift, [b[c] for b in bounds])
        if problem:
            ctx.fail(f"channel {c}: {problem}")
        for m, real in zip(multipliers, (r[c] for r in reals)):
            scaled = real * 2.0 ** shift
            # Rounding allows 1/2; the rest covers scales multiplied in another order or precision.
            if abs(m - scaled) > 0.5 + REAL_TOLERANCE * scaled:
                ctx.fail(f"channel {c}: multiplier {m} >> {shift} = {m / 2.0 ** shift:.9g} does not match the "
                         f"real multiplier {real:.9g} of the operands' and result's scales")


def _terms(op: str) -> Callable[[Callable[[InferContext], Terms]], Callable[[InferContext], Terms]]:
    def decorate(fn: Callable[[InferContext], Terms]) -> Callable[[InferContext], Terms]:
        _TERMS[op] = fn
        return fn
    return decorate


def _scale_out(ctx: InferContext) -> float:
    return result_params(ctx.attrs).scale[0]


def _product_terms(ctx: InferContext, depth: int, channels: int, w_axis: int, w_what: str = "weight",
                   bias_index: int | None = 2, residual_index: int | None = 3) -> Terms:
    """Terms of qconv2d, qlinear and qmatmul: the accumulator per weight channel, and the residual."""
    x = _operand(ctx, 0, "input")
    w = _operand(ctx, 1, w_what, w_axis)
    _constant_fits(ctx, 1, w, w_what)
    bias_bound = 0
    if bias_index is not None and ctx.has(bias_index):
        bias = ctx.type(bias_index)
        if bias.dtype is not DType.i32 or bias.shape != (channels,):
            ctx.fail(f"bias must be i32[{channels}], got {bias}")
        if bias.quant is not None:
            _check_bias_params(ctx, bias.quant, x, w, channels)
        bias_bound = quant_math.data_bound(ctx.const(bias_index), DType.i32)
    out = _scale_out(ctx)
    acc = quant_math.accumulator_bound(ctx.type(0).dtype, x.zero_point, ctx.type(1).dtype, w.zero_point, depth,
                                       bias_bound)
    reals = [[x.scale[0] * s / out for s in w.scale]]
    bounds = [[acc] * len(w.scale)]
    if residual_index is not None and ctx.has(residual_index):
        residual = _operand(ctx, residual_index, "residual")
        reals.append([residual.scale[0] / out] * len(w.scale))
        bounds.append([quant_math.term_bound(ctx.type(residual_index).dtype, residual.zero_point)] * len(w.scale))
    return reals, bounds


def _check_bias_params(ctx: InferContext, bias: QuantParams, x: QuantParams, w: QuantParams, channels: int) -> None:
    """A quantized bias has zero point 0 and scale x.scale · w.scale (per tensor or per output channel)."""
    if any(bias.zero_point):
        ctx.fail(f"bias zero points must be 0, got {sorted(set(bias.zero_point))}")
    expected = [x.scale[0] * s for s in w.scale]
    if len(expected) == 1 and len(bias.scale) == channels:
        expected *= channels
    if len(bias.scale) != len(expected) or any(
            abs(b - e) > REAL_TOLERANCE * e for b, e in zip(bias.scale, expected)):
        ctx.fail(f"bias scales {list(bias.scale)} must equal input scale × weight scales {expected}")


def _requantizing(ctx: InferContext, shape: tuple[int, ...]) -> TensorType:
    """The result type of a requantizing op, after checking its clamp and fixed-point attributes."""
    result = _result(ctx, shape)
    _check_clamp(ctx, result.quant)
    _check_fixed_point(ctx, _TERMS[ctx.op](ctx))
    return result


# -- the borders -------------------------------------------------------------------------------------
@register_op("quantize", ("x",), {
    "dtype": Attr("dtype", doc="integer element type of the result"),
    "scale": Attr("floats", doc="one scale, or one per channel / group"),
    "zero_point": Attr("ints", (), "as many as scales (default: all 0)"),
    "axis": Attr("int", None, "channel axis for per-channel or per-group parameters"),
    "group_size": Attr("int", None, "block size along axis for per-group parameters"),
    "bits": Attr("int", None, "significant bits (default: the width of dtype), e.g. 7 for i8 weights"),
}, traits=PURE)
def _quantize(ctx: InferContext) -> TensorType:
    """Float x → clamp(round_half_even(x / scale) + zero_point, qmin, qmax) (ONNX QuantizeLinear), in float32."""
    require_float(ctx)
    if ctx.attrs["zero_point"] and len(ctx.attrs["zero_point"]) != len(ctx.attrs["scale"]):
        ctx.fail(f"needs as many zero points as scales, got {len(ctx.attrs['zero_point'])} and "
                 f"{len(ctx.attrs['scale'])}")
    try:
        params = quantize_params(ctx.attrs)
    except ShapeError as error:
        ctx.fail(str(error))
    return _result(ctx, ctx.type(0).shape, params)


@register_op("dequantize", ("q",), traits=PURE)
def _dequantize(ctx: InferContext) -> TensorType:
    """float32((q - zero_point) · scale) with q's own parameters (any granularity): ONNX DequantizeLinear."""
    t = ctx.type(0)
    if t.quant is None:
        ctx.fail(f"operand of type {t} carries no quantization parameters")
    problem = _params_problem(t.quant, t.dtype)
    if problem:
        ctx.fail(f"operand: {problem}")
    return TensorType(t.shape, DType.f32)


@register_op("requantize", ("q",), _REQUANT_ATTRS, traits=PURE)
def _requantize(ctx: InferContext) -> TensorType:
    """clamp(zero_point + (((q - zq) · multiplier + 2^(shift-1)) >> shift)): new scale, zero point or type.

    q may be per-channel (any axis, one multiplier and shift per channel) and up to 32 bits (an i32 sum).
    """
    return _requantizing(ctx, ctx.type(0).shape)


@_terms("requantize")
def _requantize_terms(ctx: InferContext) -> Terms:
    t = ctx.type(0)
    q = _operand(ctx, 0, "operand", t.quant.axis if t.quant is not None else None, max_bits=32)
    out = _scale_out(ctx)
    return [[s / out for s in q.scale]], [[quant_math.term_bound(t.dtype, q.zero_point)] * len(q.scale)]


# -- products -----------------------------------------------------------------------------------------
@register_op("qconv2d", ("x", "w", "bias?", "residual?"), {**_CONV_ATTRS, **_PRODUCT_ATTRS},
             traits=PURE)
def _qconv2d(ctx: InferContext) -> TensorType:
    """Integer conv2d (shapes as conv2d): acc = Σ (x - zx)(w - zw) + bias, requantized per output channel
    together with an optional residual (r - zr), then clamped. w may be per-channel along axis 0."""
    x, w = ctx.type(0), ctx.type(1)
    shape = _shape_of(ctx, "conv2d", [TensorType(x.shape, DType.f32), TensorType(w.shape, DType.f32)],
                      {k: ctx.attrs[k] for k in _CONV_KEYS})
    return _product(ctx, shape)


@_terms("qconv2d")
def _qconv2d_terms(ctx: InferContext) -> Terms:
    w = ctx.type(1).shape
    return _product_terms(ctx, depth=w[1] * w[2] * w[3], channels=w[0], w_axis=0)


@register_op("qlinear", ("x", "w", "bias?", "residual?"), _PRODUCT_ATTRS, traits=PURE)
def _qlinear(ctx: InferContext) -> TensorType:
    """Integer x @ w^T (x [..., K], w [N, K]) + bias [N], requantized per output feature together with an
    optional residual, then clamped. w may be per-channel along axis 0."""
    x, w = ctx.type(0), ctx.type(1)
    if w.rank != 2 or not x.rank or x.shape[-1] != w.shape[1]:
        ctx.fail(f"input of shape {list(x.shape)} does not fit a weight [N, K] of shape {list(w.shape)}")
    return _product(ctx, x.shape[:-1] + (w.shape[0],))


@_terms("qlinear")
def _qlinear_terms(ctx: InferContext) -> Terms:
    w = ctx.type(1).shape
    return _product_terms(ctx, depth=w[1], channels=w[0], w_axis=0)


def _product(ctx: InferContext, shape: tuple[int, ...]) -> TensorType:
    if ctx.has(3) and ctx.type(3).shape != shape:
        ctx.fail(f"residual {ctx.type(3)} must have the result's shape {list(shape)}")
    return _requantizing(ctx, shape)


@register_op("qmatmul", ("a", "b"), _REQUANT_ATTRS, traits=PURE)
def _qmatmul(ctx: InferContext) -> TensorType:
    """Integer matmul of two run-time tensors (shapes as matmul, both rank >= 2): Σ (a - za)(b - zb),
    requantized and clamped. b may be per-channel along its last axis (one multiplier per column)."""
    a, b = ctx.type(0), ctx.type(1)
    if a.rank < 2 or b.rank < 2:
        ctx.fail(f"operands must have rank >= 2, got shapes {list(a.shape)} and {list(b.shape)}")
    shape = _shape_of(ctx, "matmul", [TensorType(a.shape, DType.i32), TensorType(b.shape, DType.i32)], {})
    return _requantizing(ctx, shape)


@_terms("qmatmul")
def _qmatmul_terms(ctx: InferContext) -> Terms:
    a, b = ctx.type(0), ctx.type(1)
    return _product_terms(ctx, depth=a.shape[-1], channels=b.shape[-1], w_axis=b.rank - 1, w_what="operand b",
                          bias_index=None, residual_index=None)


# -- elementwise -------------------------------------------------------------------------------------
def _binary(ctx: InferContext) -> TensorType:
    return _requantizing(ctx, broadcast_shapes(ctx, ctx.type(0).shape, ctx.type(1).shape))


def _binary_operands(ctx: InferContext) -> tuple[list[float], list[int]]:
    """Scales and term bounds of a and b."""
    params = [_operand(ctx, i, "ab"[i]) for i in (0, 1)]
    return ([p.scale[0] for p in params],
            [quant_math.term_bound(ctx.type(i).dtype, p.zero_point) for i, p in enumerate(params)])


register_op("qadd", ("a", "b"), _REQUANT_ATTRS, traits=PURE + ("elementwise", "commutative"),
            doc="a + b with broadcasting: clamp(zy + (((a - za)·ma + (b - zb)·mb + 2^(s-1)) >> s)), "
                "one rounding; multiplier = [ma, mb], shift = [s].")(_binary)
register_op("qmul", ("a", "b"), _REQUANT_ATTRS, traits=PURE + ("elementwise", "commutative"),
            doc="a · b with broadcasting: clamp(zy + (((a - za)(b - zb)·m + 2^(s-1)) >> s)), one rounding; "
                "multiplier = [m], shift = [s].")(_binary)


@_terms("qadd")
def _qadd_terms(ctx: InferContext) -> Terms:
    scales, bounds = _binary_operands(ctx)
    out = _scale_out(ctx)
    return [[s / out] for s in scales], [[b] for b in bounds]


@_terms("qmul")
def _qmul_terms(ctx: InferContext) -> Terms:
    (sa, sb), (ba, bb) = _binary_operands(ctx)
    return [[sa * sb / _scale_out(ctx)]], [[ba * bb]]


@register_op("qconcat", ("inputs*",),
             {"axis": Attr("int"), **_RESULT_ATTRS, **_FIXED_POINT_ATTRS}, traits=PURE)
def _qconcat(ctx: InferContext) -> TensorType:
    """Inputs joined along `axis`, each requantized to the result's parameters by its own multiplier and
    shift (multiplier 2^30, shift 30 is the exact identity for inputs that already share them)."""
    shape = _shape_of(ctx, "concat", [TensorType(ctx.type(i).shape, DType.i32) for i in range(len(ctx.types))],
                      {"axis": ctx.attrs["axis"]})
    return _requantizing(ctx, shape)


@_terms("qconcat")
def _qconcat_terms(ctx: InferContext) -> Terms:
    params = [_operand(ctx, i, f"input {i}") for i in range(len(ctx.types))]
    out = _scale_out(ctx)
    return ([[p.scale[0] / out for p in params]],
            [[quant_math.term_bound(ctx.type(i).dtype, p.zero_point) for i, p in enumerate(params)]])


# -- pooling (parameters pass through unchanged) -------------------------------------------------------
def _same_params(ctx: InferContext, float_op: str) -> TensorType:
    x = ctx.type(0)
    _operand(ctx, 0, "input", channel_axis=1)
    shape = _shape_of(ctx, float_op, [TensorType(x.shape, DType.f32)], ctx.attrs)
    return TensorType(shape, x.dtype, x.quant)


@register_op("qmax_pool2d", ("x",), _MAX_POOL_ATTRS, traits=PURE)
def _qmax_pool2d(ctx: InferContext) -> TensorType:
    """max_pool2d on the integers (exact: scales are positive); the result keeps x's parameters."""
    return _same_params(ctx, "max_pool2d")


@register_op("qavg_pool2d", ("x",), _AVG_POOL_ATTRS, traits=PURE)
def _qavg_pool2d(ctx: InferContext) -> TensorType:
    """avg_pool2d on the integers, keeping x's parameters: zx + floor((2·Σ(x - zx) + n) / (2n)) for the
    n counted taps (padding holds zx, i.e. real 0): the mean rounded half toward +infinity."""
    return _same_params(ctx, "avg_pool2d")


@register_op("qglobal_avg_pool", ("x",), traits=PURE)
def _qglobal_avg_pool(ctx: InferContext) -> TensorType:
    """global_avg_pool on the integers with qavg_pool2d's rounding; the result keeps x's parameters."""
    return _same_params(ctx, "global_avg_pool")


# -- dynamic quantization: activation parameters computed at run time ------------------------------
@register_op("dynamic_linear", ("x", "w", "bias?"), traits=PURE)
def _dynamic_linear(ctx: InferContext) -> TensorType:
    """Float x [..., K] quantized at run time to u8 (ONNX DynamicQuantizeLinear over the whole tensor),
    times integer weights w [N, K] (per-tensor or per-channel axis 0), accumulated exactly in int32, then
    float32(acc) · float32(scale_x · scale_w[n]) + bias[n] (float32, in that order)."""
    require_float(ctx)
    x, w = ctx.type(0), ctx.type(1)
    _operand(ctx, 1, "weight w", channel_axis=0, max_bits=8)
    if w.rank != 2 or not x.rank or x.shape[-1] != w.shape[1]:
        ctx.fail(f"input of shape {list(x.shape)} does not fit a weight [N, K] of shape {list(w.shape)}")
    if ctx.has(2) and (ctx.type(2).shape != (w.shape[0],) or not ctx.type(2).dtype.is_float):
        ctx.fail(f"bias must be float [{w.shape[0]}], got {ctx.type(2)}")
    return TensorType(x.shape[:-1] + (w.shape[0],), x.dtype)


@register_op("dynamic_matmul", ("a", "b"), traits=PURE)
def _dynamic_matmul(ctx: InferContext) -> TensorType:
    """Both float operands quantized at run time to u8 (DynamicQuantizeLinear, per tensor), multiplied
    exactly in int32, result float32(acc) · float32(scale_a · scale_b); shapes as matmul (rank >= 2)."""
    require_float(ctx)
    a, b = ctx.type(0), ctx.type(1)
    if a.rank < 2 or b.rank < 2 or a.dtype != b.dtype:
        ctx.fail(f"operands must be float tensors of one type with rank >= 2, got {a} and {b}")
    shape = _shape_of(ctx, "matmul", [a, b], {})
    return TensorType(shape, a.dtype)
