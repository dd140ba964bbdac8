"""Reference implementations of the integer ops: the definition every kernel must match bit for bit.

Integer parts are integer arithmetic (int64, never wrapping: inference bounds every intermediate) with the
single rounding of `lowbit.ir.quant_math`. Products of conv/linear/matmul run as float64 BLAS when the
static accumulator bound is below 2^53: every product and partial sum is then an integer float64 holds
exactly, in any summation order, so the result equals the int64 sum (and is much faster than numpy's
integer matmul, which the larger bounds fall back to). docs/quantization.md states each formula.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lowbit.backends.reference.nn import _convolve, _pool_taps, _reduce_taps, max_pool2d
from lowbit.backends.reference.registry import reference
from lowbit.ir import quant_math
from lowbit.ir.ops.quantized import clamp_range, quantize_params
from lowbit.ir.types import TensorType

EXACT_FLOAT64 = 1 << 53


def _centred(array: np.ndarray, t: TensorType) -> np.ndarray:
    """array - zero_point in int64 (zero points broadcast per channel where the type says so)."""
    return array.astype(np.int64) - t.quant.zero_point_array(array.shape).astype(np.int64)


def _channel_view(values: Sequence[int], ndim: int, axis: int) -> np.ndarray:
    """Per-channel integers shaped to broadcast along `axis` of a rank-`ndim` result (or a scalar)."""
    array = np.asarray(values, dtype=np.int64)
    if array.size == 1:
        return array.reshape(())
    shape = [1] * ndim
    shape[axis] = array.size
    return array.reshape(shape)


def _finish(attrs: dict, terms: list[np.ndarray], columns: list[Sequence[int]], axis: int) -> np.ndarray:
    """The one requantization: per-channel multipliers of each term and shifts broadcast along `axis`."""
    ndim = terms[0].ndim
    multipliers = [_channel_view(column, ndim, axis) for column in columns]
    qmin, qmax = clamp_range(attrs)
    y = quant_math.requantize_sum(terms, multipliers, _channel_view(attrs["shift"], ndim, axis),
                                  attrs["zero_point"], qmin, qmax)
    return y.astype(attrs["dtype"].numpy)


def _carrier(types: list[TensorType | None], depth: int) -> type:
    """float64 when it holds every partial sum of the product exactly, else int64."""
    x, w = types[0], types[1]
    bound = quant_math.accumulator_bound(x.dtype, x.quant.zero_point, w.dtype, w.quant.zero_point, depth)
    return np.float64 if bound < EXACT_FLOAT64 else np.int64


def _product_result(attrs: dict, acc: np.ndarray, bias: np.ndarray | None, residual: np.ndarray | None,
                    residual_type: TensorType | None, axis: int) -> np.ndarray:
    acc = acc.astype(np.int64)
    if bias is not None:
        acc += _channel_view(bias, acc.ndim, axis)
    terms, columns = [acc], [attrs["multiplier"]]
    if residual is not None:
        terms.append(_centred(residual, residual_type))
        columns.append(attrs["residual_multiplier"])
    return _finish(attrs, terms, columns, axis)


@reference("quantize")
def quantize(attrs, x):
    """Half-to-even rounding of x / scale in float32, saturated; NaN becomes the zero point."""
    params = quantize_params(attrs)
    q = quant_math.quantize_values(x, params.scale_array(x.shape), params.zero_point_array(x.shape),
                                   params.qmin, params.qmax)
    return q.astype(attrs["dtype"].numpy)


@reference("dequantize", typed=True)
def dequantize(attrs, q, *, types):
    params = types[0].quant
    return quant_math.dequantize_values(q, params.scale_array(q.shape), params.zero_point_array(q.shape))


@reference("requantize", typed=True)
def requantize(attrs, q, *, types):
    axis = types[0].quant.axis
    return _finish(attrs, [_centred(q, types[0])], [attrs["multiplier"]], 0 if axis is None else axis % q.ndim)


@reference("qconv2d", typed=True)
def qconv2d(attrs, x, w, bias=None, residual=None, *, types):
    """Padding holds the input's zero point (real 0): the centred input is padded with 0."""
    carrier = _carrier(types, w.shape[1] * w.shape[2] * w.shape[3])
    pads = attrs["pads"]
    acc = _convolve(_centred(x, types[0]).astype(carrier), _centred(w, types[1]).astype(carrier), None,
                    attrs["strides"], pads[:2], pads[2:], attrs["dilations"], attrs["group"])
    return _product_result(attrs, acc, bias, residual, types[3] if residual is not None else None, axis=1)


@reference("qlinear", typed=True)
def qlinear(attrs, x, w, bias=None, residual=None, *, types):
    carrier = _carrier(types, w.shape[1])
    acc = np.matmul(_centred(x, types[0]).astype(carrier), _centred(w, types[1]).astype(carrier).T)
    return _product_result(attrs, acc, bias, residual, types[3] if residual is not None else None, axis=-1)


@reference("qmatmul", typed=True)
def qmatmul(attrs, a, b, *, types):
    carrier = _carrier(types, a.shape[-1])
    acc = np.matmul(_centred(a, types[0]).astype(carrier), _centred(b, types[1]).astype(carrier))
    return _product_result(attrs, acc, None, None, None, axis=-1)


@reference("qadd", typed=True)
def qadd(attrs, a, b, *, types):
    terms = np.broadcast_arrays(_centred(a, types[0]), _centred(b, types[1]))
    return _finish(attrs, list(terms), [(m,) for m in attrs["multiplier"]], axis=0)


@reference("qmul", typed=True)
def qmul(attrs, a, b, *, types):
    return _finish(attrs, [_centred(a, types[0]) * _centred(b, types[1])], [attrs["multiplier"]], axis=0)


@reference("qconcat", typed=True)
def qconcat(attrs, *inputs, types):
    parts = [_finish({**attrs, "shift": (shift,)}, [_centred(x, t)], [(m,)], axis=0)
             for x, t, m, shift in zip(inputs, types, attrs["multiplier"], attrs["shift"])]
    return np.concatenate(parts, axis=attrs["axis"])


@reference("qmax_pool2d")
def qmax_pool2d(attrs, x):
    return max_pool2d(attrs, x)


def _rounded_mean(sums: np.ndarray, counts: np.ndarray | int) -> np.ndarray:
    """round_half_up(sums / counts) for int64 sums and positive counts, exactly."""
    return (2 * sums + counts) // (2 * counts)


@reference("qavg_pool2d", typed=True)
def qavg_pool2d(attrs, x, *, types):
    """The divisor is avg_pool2d's: taps inside the input, plus the explicit padding when count_include_pad."""
    sums = _reduce_taps(_pool_taps(_centred(x, types[0]), attrs, 0), np.add)
    inside = np.ones((1, 1) + x.shape[2:], np.int64)
    counts = _reduce_taps(_pool_taps(inside, attrs, 0, 1 if attrs["count_include_pad"] else None), np.add)
    zero_point = types[0].quant.zero_point_array(sums.shape)
    return (_rounded_mean(sums, counts) + zero_point).astype(x.dtype)


@reference("qglobal_avg_pool", typed=True)
def qglobal_avg_pool(attrs, x, *, types):
    axes = tuple(range(2, x.ndim))
    sums = _centred(x, types[0]).sum(axis=axes, keepdims=True)
    count = int(np.prod(x.shape[2:]))
    return (_rounded_mean(sums, count) + types[0].quant.zero_point_array(sums.shape)).astype(x.dtype)


def dynamic_quantize(x: np.ndarray) -> tuple[np.ndarray, np.float32, int]:
    """ONNX DynamicQuantizeLinear: u8, range widened to include 0, scale = (max - min) / 255 in float32,
    zero point = clamp(round_half_even(-min / scale), 0, 255); an all-zero tensor gets scale 1."""
    low = np.float32(min(float(x.min()), 0.0)) if x.size else np.float32(0)
    high = np.float32(max(float(x.max()), 0.0)) if x.size else np.float32(0)
    scale = np.float32((high - low) / np.float32(255)) if high > low else np.float32(1)
    zero_point = int(np.clip(np.rint(np.float32(-low) / scale), 0, 255))
    q = quant_math.quantize_values(x, scale, np.int64(zero_point), 0, 255)
    return q, scale, zero_point


def _dynamic_product(a_centred: np.ndarray, b_centred: np.ndarray) -> np.ndarray:
    # float64 holds every partial sum exactly: |term| < 2^16 and depth far below 2^37.
    return np.matmul(a_centred.astype(np.float64), b_centred.astype(np.float64)).astype(np.int64)


@reference("dynamic_linear", typed=True)
def dynamic_linear(attrs, x, w, bias=None, *, types):
    q, scale, zero_point = dynamic_quantize(x)
    acc = _dynamic_product(q - zero_point, _centred(w, types[1]).T)
    factors = (scale * np.asarray(types[1].quant.scale, np.float32)).astype(np.float32)
    y = acc.astype(np.float32) * factors
    return (y + bias).astype(np.float32) if bias is not None else y


@reference("dynamic_matmul")
def dynamic_matmul(attrs, a, b):
    qa, sa, za = dynamic_quantize(a)
    qb, sb, zb = dynamic_quantize(b)
    acc = _dynamic_product(qa - za, qb - zb)
    return acc.astype(np.float32) * np.float32(sa * sb)
