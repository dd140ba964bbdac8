"""Neural-network ops: convolutions, matrix products, pooling, normalisation and softmax.

Spatial ops are two-dimensional and NCHW; the ONNX frontend lifts 1-D ones by inserting H=1.
`pads` are [top, left, bottom, right] (ONNX order: every begin, then every end).
"""
from __future__ import annotations

from typing import Sequence

from lowbit.ir.dtypes import DType
from lowbit.ir.ops.common import broadcast_shapes, normalize_axis, require_float, same_dtype, unary_float
from lowbit.ir.ops.epilogue import EPILOGUE_ATTRS, check_epilogue
from lowbit.ir.registry import Attr, InferContext, register_op
from lowbit.ir.types import TensorType

PURE = ("pure",)

_STRIDES = Attr("ints", (1, 1), "step of the window along H and W")
_PADS = Attr("ints", (0, 0, 0, 0), "zero padding [top, left, bottom, right]")
_DILATIONS = Attr("ints", (1, 1), "spacing of the window's taps along H and W")
_CONV_ATTRS = {"strides": _STRIDES, "pads": _PADS, "dilations": _DILATIONS,
               "group": Attr("int", 1, "channel groups; group == channels is a depthwise convolution")}
_POOL_ATTRS = {"kernel": Attr("ints", doc="window size [kH, kW]"), "strides": _STRIDES, "pads": _PADS,
               "dilations": _DILATIONS,
               "ceil_mode": Attr("bool", False, "round the output size up (the last window must still start "
                                                "inside the input or its leading padding)")}


def window_count(size: int, kernel: int, stride: int, dilation: int, pad_begin: int, pad_end: int,
                 ceil_mode: bool = False) -> int:
    """How many window positions fit along one axis (0 when the window is larger than the padded input).

    With `ceil_mode` a partial last window counts unless it would start in the trailing padding
    (the rule of ONNX Runtime and PyTorch).
    """
    extent = size + pad_begin + pad_end - (dilation * (kernel - 1) + 1)
    if extent < 0:
        return 0
    count = (-(-extent // stride) if ceil_mode else extent // stride) + 1
    if ceil_mode and (count - 1) * stride >= size + pad_begin:
        count -= 1
    return count


def _require_rank(ctx: InferContext, index: int, rank: int, what: str) -> tuple[int, ...]:
    shape = ctx.type(index).shape
    if len(shape) != rank:
        ctx.fail(f"{what} must have rank {rank}, got shape {list(shape)}")
    return shape


def _check_ints(ctx: InferContext, name: str, length: int, minimum: int) -> tuple[int, ...]:
    values = ctx.attrs[name]
    if len(values) != length or min(values) < minimum:
        ctx.fail(f"attribute '{name}' must be {length} ints >= {minimum}, got {list(values)}")
    return values


def _window_output(ctx: InferContext, spatial: Sequence[int], kernel: Sequence[int],
                   ceil_mode: bool = False) -> tuple[int, int]:
    """Output H and W of a sliding window op; fails when the window does not fit the padded input."""
    strides = _check_ints(ctx, "strides", 2, 1)
    dilations = _check_ints(ctx, "dilations", 2, 1)
    pads = _check_ints(ctx, "pads", 4, 0)
    sizes = []
    for axis in range(2):
        count = window_count(spatial[axis], kernel[axis], strides[axis], dilations[axis], pads[axis],
                             pads[axis + 2], ceil_mode)
        if count < 1:
            span = dilations[axis] * (kernel[axis] - 1) + 1
            padded = spatial[axis] + pads[axis] + pads[axis + 2]
            ctx.fail(f"the window spans {span} along {'HW'[axis]} but the padded input has only {padded}")
        sizes.append(count)
    return sizes[0], sizes[1]


def _conv_operands(ctx: InferContext, out_channels: int) -> DType:
    """Checks shared by both convolutions: float operands of one type, a bias of [out_channels]."""
    dtype = require_float(ctx)
    same_dtype(ctx)
    if ctx.has(2) and ctx.type(2).shape != (out_channels,):
        ctx.fail(f"bias must have shape [{out_channels}], got {list(ctx.type(2).shape)}")
    if ctx.attrs["group"] < 1:
        ctx.fail(f"group must be at least 1, got {ctx.attrs['group']}")
    return dtype


@register_op("conv2d", ("x", "w", "b?", "residual?"), dict(_CONV_ATTRS, **EPILOGUE_ATTRS), traits=PURE)
def _conv2d(ctx: InferContext) -> TensorType:
    """2-D cross-correlation: x [N, C, H, W], w [M, C/group, kH, kW], optional bias b [M] → [N, M, OH, OW],
    then the fused epilogue (residual add, activation; see lowbit.ir.ops.epilogue)."""
    n, c, h, w = _require_rank(ctx, 0, 4, "input x")
    m, c_per_group, kh, kw = _require_rank(ctx, 1, 4, "weight w")
    dtype = _conv_operands(ctx, m)
    group = ctx.attrs["group"]
    if c != c_per_group * group or m % group:
        ctx.fail(f"with group={group}, input channels {c} and output channels {m} need a weight of shape "
                 f"[M, {c // group if c % group == 0 else 'C/group'}, kH, kW] with M divisible by {group}; "
                 f"got {list(ctx.type(1).shape)}")
    result = TensorType((n, m) + _window_output(ctx, (h, w), (kh, kw)), dtype)
    check_epilogue(ctx, 3, result)
    return result


@register_op("conv_transpose2d", ("x", "w", "b?"),
             dict(_CONV_ATTRS, output_padding=Attr("ints", (0, 0), "extra rows/columns at the bottom/right")),
             traits=PURE)
def _conv_transpose2d(ctx: InferContext) -> TensorType:
    """Transposed 2-D convolution (gradient of conv2d): x [N, C, H, W], w [C, M/group, kH, kW] → [N, M, OH, OW].

    OH = strides[0] * (H - 1) + output_padding[0] + dilations[0] * (kH - 1) + 1 - pads[0] - pads[2].
    """
    n, c, h, w = _require_rank(ctx, 0, 4, "input x")
    c_w, m_per_group, kh, kw = _require_rank(ctx, 1, 4, "weight w")
    group = ctx.attrs["group"]
    dtype = _conv_operands(ctx, m_per_group * group)
    if c_w != c or c % group:
        ctx.fail(f"with group={group}, input channels {c} need a weight of shape [{c}, M/group, kH, kW] with "
                 f"{c} divisible by {group}; got {list(ctx.type(1).shape)}")
    strides = _check_ints(ctx, "strides", 2, 1)
    dilations = _check_ints(ctx, "dilations", 2, 1)
    pads = _check_ints(ctx, "pads", 4, 0)
    output_padding = _check_ints(ctx, "output_padding", 2, 0)
    sizes = []
    for axis, (size, kernel) in enumerate(((h, kh), (w, kw))):
        out = (strides[axis] * (size - 1) + output_padding[axis] + dilations[axis] * (kernel - 1) + 1
               - pads[axis] - pads[axis + 2])
        if out < 1:
            ctx.fail(f"pads {list(pads)} leave no output along {'HW'[axis]}")
        sizes.append(out)
    return TensorType((n, m_per_group * group, *sizes), dtype)


@register_op("matmul", ("a", "b"), traits=PURE)
def _matmul(ctx: InferContext) -> TensorType:
    """numpy matmul: batch dimensions broadcast; a 1-D a is a row and a 1-D b a column, dropped afterwards."""
    dtype = same_dtype(ctx)
    if dtype is DType.bool:
        ctx.fail("operands must be numeric, got bool")
    a, b = ctx.type(0).shape, ctx.type(1).shape
    if not a or not b:
        ctx.fail(f"operands must have rank >= 1, got shapes {list(a)} and {list(b)}")
    rows = (1,) + a if len(a) == 1 else a
    cols = b + (1,) if len(b) == 1 else b
    if rows[-1] != cols[-2]:
        ctx.fail(f"inner dimensions do not match: {list(a)} @ {list(b)}")
    shape = broadcast_shapes(ctx, rows[:-2], cols[:-2])
    if len(a) > 1:
        shape += (rows[-2],)
    if len(b) > 1:
        shape += (cols[-1],)
    return TensorType(shape, dtype)


@register_op("linear", ("x", "w", "b?", "residual?"), EPILOGUE_ATTRS, traits=PURE)
def _linear(ctx: InferContext) -> TensorType:
    """x @ w^T + b: x [..., K], weight w [N, K] (out, in), optional bias b [N] → [..., N], then the fused
    epilogue (residual add, activation; see lowbit.ir.ops.epilogue)."""
    dtype = require_float(ctx)
    same_dtype(ctx)
    x = ctx.type(0).shape
    out_features, in_features = _require_rank(ctx, 1, 2, "weight w")
    if not x or x[-1] != in_features:
        ctx.fail(f"input of shape {list(x)} does not fit weight [{out_features}, {in_features}]")
    if ctx.has(2) and ctx.type(2).shape != (out_features,):
        ctx.fail(f"bias must have shape [{out_features}], got {list(ctx.type(2).shape)}")
    result = TensorType(x[:-1] + (out_features,), dtype)
    check_epilogue(ctx, 3, result)
    return result


def _pool(ctx: InferContext) -> TensorType:
    n, c, h, w = _require_rank(ctx, 0, 4, "input x")
    kernel = _check_ints(ctx, "kernel", 2, 1)
    return TensorType((n, c) + _window_output(ctx, (h, w), kernel, ctx.attrs["ceil_mode"]), ctx.type(0).dtype)


@register_op("max_pool2d", ("x",), _POOL_ATTRS, traits=PURE)
def _max_pool2d(ctx: InferContext) -> TensorType:
    """Maximum over each window of x [N, C, H, W]; padding never wins (it holds the type's lowest value)."""
    if ctx.type(0).dtype is DType.bool:
        ctx.fail("input must be numeric, got bool")
    return _pool(ctx)


@register_op("avg_pool2d", ("x",),
             dict(_POOL_ATTRS, count_include_pad=Attr("bool", False, "divide by the window size including "
                                                                     "padding, not just the input taps")),
             traits=PURE)
def _avg_pool2d(ctx: InferContext) -> TensorType:
    """Mean over each window of x [N, C, H, W]. Taps past the padding (ceil_mode) never count."""
    require_float(ctx)
    return _pool(ctx)


def _global_pool(ctx: InferContext) -> TensorType:
    shape = ctx.type(0).shape
    if len(shape) < 3:
        ctx.fail(f"input must be [N, C, spatial...] with rank >= 3, got shape {list(shape)}")
    return TensorType(shape[:2] + (1,) * (len(shape) - 2), ctx.type(0).dtype)


@register_op("global_avg_pool", ("x",), traits=PURE)
def _global_avg_pool(ctx: InferContext) -> TensorType:
    """Mean over every spatial axis of a float x [N, C, ...] → [N, C, 1, ...]."""
    require_float(ctx)
    return _global_pool(ctx)


register_op("global_max_pool", ("x",), traits=PURE,
            doc="Maximum over every spatial axis of x [N, C, ...] → [N, C, 1, ...].")(_global_pool)


def _per_channel(ctx: InferContext, indices: Sequence[int], names: Sequence[str]) -> TensorType:
    """x [N, C, ...] with float parameters of shape [C] at `indices`."""
    dtype = require_float(ctx)
    same_dtype(ctx)
    shape = ctx.type(0).shape
    if len(shape) < 2:
        ctx.fail(f"input must be [N, C, ...] with rank >= 2, got shape {list(shape)}")
    for index, name in zip(indices, names):
        if ctx.has(index) and ctx.type(index).shape != (shape[1],):
            ctx.fail(f"{name} must have shape [{shape[1]}] (one per channel), got {list(ctx.type(index).shape)}")
    return TensorType(shape, dtype)


@register_op("batch_norm", ("x", "scale", "bias", "mean", "var"), {"epsilon": Attr("float", 1e-5)}, traits=PURE)
def _batch_norm(ctx: InferContext) -> TensorType:
    """Inference batch normalisation: (x - mean) / sqrt(var + epsilon) * scale + bias along axis 1."""
    return _per_channel(ctx, (1, 2, 3, 4), ("scale", "bias", "mean", "var"))


@register_op("instance_norm", ("x", "scale", "bias"), {"epsilon": Attr("float", 1e-5)}, traits=PURE)
def _instance_norm(ctx: InferContext) -> TensorType:
    """Normalise each (sample, channel) over its spatial axes, then scale and shift per channel."""
    if ctx.has(0) and ctx.type(0).rank < 3:
        ctx.fail(f"input must be [N, C, spatial...] with rank >= 3, got shape {list(ctx.type(0).shape)}")
    return _per_channel(ctx, (1, 2), ("scale", "bias"))


@register_op("layer_norm", ("x", "scale", "bias?"), {"axis": Attr("int", -1), "epsilon": Attr("float", 1e-5)},
             traits=PURE)
def _layer_norm(ctx: InferContext) -> TensorType:
    """Normalise over axes [axis, rank), then * scale + bias (both broadcast onto x.shape[axis:])."""
    dtype = require_float(ctx)
    same_dtype(ctx)
    shape = ctx.type(0).shape
    axis = normalize_axis(ctx, ctx.attrs["axis"], len(shape))
    normalized = shape[axis:]
    for index, name in ((1, "scale"), (2, "bias")):
        if not ctx.has(index):
            continue
        param = ctx.type(index).shape
        aligned = normalized[len(normalized) - len(param):] if len(param) <= len(normalized) else None
        if aligned is None or any(p not in (1, n) for p, n in zip(param, aligned)):
            ctx.fail(f"{name} of shape {list(param)} does not broadcast onto the normalised shape "
                     f"{list(normalized)}")
    return TensorType(shape, dtype)


@register_op("lrn", ("x",), {"size": Attr("int"), "alpha": Attr("float", 1e-4), "beta": Attr("float", 0.75),
                             "bias": Attr("float", 1.0)}, traits=PURE)
def _lrn(ctx: InferContext) -> TensorType:
    """Local response normalisation across channels: x / (bias + alpha / size * sum of squares) ** beta,
    the sum over channels [c - (size-1)//2, c + size//2] clipped to the tensor (ONNX LRN)."""
    if ctx.attrs["size"] < 1:
        ctx.fail(f"size must be at least 1, got {ctx.attrs['size']}")
    if ctx.type(0).rank < 3:
        ctx.fail(f"input must be [N, C, spatial...] with rank >= 3, got shape {list(ctx.type(0).shape)}")
    return unary_float(ctx)


def _softmax(ctx: InferContext) -> TensorType:
    normalize_axis(ctx, ctx.attrs["axis"], ctx.type(0).rank)
    return unary_float(ctx)


register_op("softmax", ("x",), {"axis": Attr("int", -1)}, traits=PURE,
            doc="exp(x) / sum(exp(x)) along one axis (computed with the maximum subtracted).")(_softmax)
register_op("log_softmax", ("x",), {"axis": Attr("int", -1)}, traits=PURE,
            doc="x - log(sum(exp(x))) along one axis (computed with the maximum subtracted).")(_softmax)
