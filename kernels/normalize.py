"""Softmax, log-softmax, layer / instance / batch normalisation and LRN, as LLVM IR.

Everything computes in f32 (f16 widens, f64 stays f64) along vectors of the contiguous axis:
- softmax over the last axis reduces each contiguous row (max, then Σ exp(x - max) while storing the
  exponentials, then one multiply by the reciprocal); over another axis, vectors run along the
  contiguous inner axis and the reduced axis is walked with a stride;
- layer and instance norm use two-pass statistics per row (the mean, then the mean of squared
  deviations), as the reference does, so float32 needs no wider accumulator;
- exp and log of f32 are vectorised Cephes polynomials (about 1 ulp; exp flushes results below
  2^-126 to that bound rather than to denormals); f64 uses LLVM's intrinsics (libm).
"""
from __future__ import annotations

import math
from typing import Sequence

from llvmlite import ir

from lowbit.ir.dtypes import DType
from lowbit.kernels import llvm as ll
from lowbit.kernels.llvm import F32, I32, TargetSpec
from lowbit.kernels.reduce import Arith, combiner, const, convert, kernel_function, nested_loops, reduce_row

_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
             5.0000001201e-1)
_LOG_POLY = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
             -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)
_LN2_HIGH, _LN2_LOW = 0.693359375, -2.12194440e-4  # ln 2 split so that n·high is exact


def _splat(value: float, like: ir.Value) -> ir.Constant:
    return ir.Constant(like.type, [float(value)] * like.type.count)


def _fma(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    """a·b + c, fused where the target has FMA."""
    return ll.intrinsic(builder, "llvm.fmuladd", a, b, c)


def _polynomial(builder: ir.IRBuilder, x: ir.Value, coefficients: Sequence[float]) -> ir.Value:
    result = _splat(coefficients[0], x)
    for coefficient in coefficients[1:]:
        result = _fma(builder, result, x, _splat(coefficient, x))
    return result


def _clamp(builder: ir.IRBuilder, x: ir.Value, low: float, high: float | None) -> ir.Value:
    """x limited to [low, high] (no upper limit for None); NaN passes through."""
    x = builder.select(builder.fcmp_ordered("<", x, _splat(low, x)), _splat(low, x), x)
    if high is None:
        return x
    return builder.select(builder.fcmp_ordered(">", x, _splat(high, x)), _splat(high, x), x)


def vector_exp(builder: ir.IRBuilder, x: ir.Value, at_most_zero: bool = False) -> ir.Value:
    """exp of a float vector: 2^n · e^r with n = round(x / ln 2), |r| <= ln 2 / 2, e^r = 1 + r(1 + r·P(r)).

    n is rounded by adding a magic number whose low mantissa bits then hold n + 127, the biased exponent
    of 2^n; `at_most_zero` (softmax's x - max) skips the upper clamp.
    """
    if x.type.element != F32:
        return ll.intrinsic(builder, "llvm.exp", x)
    x = _clamp(builder, x, -87.33654, None if at_most_zero else 88.72283)  # 2^n stays a normal float
    magic = _splat(12582912.0 + 127.0, x)  # 1.5·2^23: adding it rounds to an integer in the low bits
    biased = _fma(builder, x, _splat(math.log2(math.e), x), magic)
    n = builder.fsub(biased, magic)
    r = _fma(builder, n, _splat(-_LN2_HIGH, x), x)
    r = _fma(builder, n, _splat(-_LN2_LOW, x), r)
    one = _splat(1.0, x)
    y = _fma(builder, _fma(builder, _polynomial(builder, r, _EXP_POLY), r, one), r, one)
    ints = ll.vector(I32, x.type.count)
    exponent = builder.shl(builder.bitcast(biased, ints), ir.Constant(ints, [23] * x.type.count))
    return builder.fmul(y, builder.bitcast(exponent, x.type))


def vector_log(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """Natural log of a float vector: x = m · 2^e with m in [√½, √2), a polynomial in m - 1; log 0 is -inf,
    log of a negative number NaN, log inf inf (denormal operands are not handled)."""
    if x.type.element != F32:
        return ll.intrinsic(builder, "llvm.log", x)
    count = x.type.count
    ints = ll.vector(I32, count)

    def int_splat(value: int) -> ir.Constant:
        return ir.Constant(ints, [value] * count)

    bits = builder.bitcast(x, ints)
    exponent = builder.sub(builder.and_(builder.lshr(bits, int_splat(23)), int_splat(0xFF)), int_splat(126))
    mantissa = builder.bitcast(builder.or_(builder.and_(bits, int_splat(0x807FFFFF)), int_splat(0x3F000000)),
                               x.type)  # in [0.5, 1)
    small = builder.fcmp_ordered("<", mantissa, _splat(math.sqrt(0.5), x))
    e = builder.sitofp(builder.sub(exponent, builder.zext(small, ints)), x.type)
    m = builder.fsub(builder.fadd(mantissa, builder.select(small, mantissa, _splat(0.0, x))), _splat(1.0, x))
    z = builder.fmul(m, m)
    y = builder.fmul(builder.fmul(_polynomial(builder, m, _LOG_POLY), m), z)
    y = _fma(builder, e, _splat(_LN2_LOW, x), y)
    y = _fma(builder, z, _splat(-0.5, x), y)
    result = _fma(builder, e, _splat(_LN2_HIGH, x), builder.fadd(m, y))
    result = builder.select(builder.fcmp_ordered("==", x, _splat(0.0, x)), _splat(-math.inf, x), result)
    result = builder.select(builder.fcmp_ordered("==", x, _splat(math.inf, x)), x, result)
    return builder.select(builder.fcmp_ordered(">=", x, _splat(0.0, x)), result, _splat(math.nan, x))


def _first_lane(builder: ir.IRBuilder, value: ir.Value, width: int) -> ir.Value:
    """The first lane of `value` in every lane of a `width`-lane vector."""
    return ll.splat(builder, builder.extract_element(value, ir.Constant(I32, 0)), width)


class _Io:
    """Loads in compute precision and stores back in storage precision for one kernel."""

    def __init__(self, target: TargetSpec, dtype: DType) -> None:
        self.storage, self.compute = Arith.storage(dtype), Arith.compute(dtype)
        self.lanes = ll.vector_lanes(target, self.compute.element)
        self.add = combiner("sum", self.compute)
        # Softmax's maximum may drop a NaN: the NaN still reaches every result through the sum of exp.
        self.max = combiner("max", self.compute, propagate_nan=False)

    def load(self, builder: ir.IRBuilder, base: ir.Value, index: ir.Value, width: int) -> ir.Value:
        return convert(builder, ll.load_vector(builder, base, index, width), self.storage, self.compute)

    def store(self, builder: ir.IRBuilder, value: ir.Value, base: ir.Value, index: ir.Value) -> None:
        ll.store_vector(builder, convert(builder, value, self.compute, self.storage), base, index)

    def splat(self, value: float, width: int) -> ir.Constant:
        return self.compute.splat(value, width)


# -- softmax -----------------------------------------------------------------------------------------
def softmax_kernel(module: ir.Module, name: str, target: TargetSpec, dtype: DType, outer: int, length: int,
                   inner: int, log: bool) -> ir.Function:
    """`name(x, out)`: softmax (or log-softmax with `log`) of x viewed as [outer, length, inner] along
    the middle axis: the maximum, Σ exp(x - maximum), then the results, each a pass over the axis."""
    io = _Io(target, dtype)
    function, builder, (x, out) = kernel_function(module, name, [io.storage.element] * 2)
    # Keeping exp(x - max) in the output for the final scaling is exact only when it stores losslessly.
    keep = not log and io.storage == io.compute

    def passes(b: ir.IRBuilder, reduce, spread, walk) -> None:
        """The three passes given how to reduce over the axis (`reduce(load, combine, identity)`), to widen a
        reduced statistic to a vector (`spread(builder, statistic, width)`) and to visit each vector
        (`walk(body(builder, index, width))`)."""
        peak = reduce(lambda b2, index, w: io.load(b2, x, index, w), io.max, -math.inf)

        def exponential(b2: ir.IRBuilder, index: ir.Value, w: int) -> ir.Value:
            value = vector_exp(b2, b2.fsub(io.load(b2, x, index, w), spread(b2, peak, w)), True)
            if keep:
                ll.store_vector(b2, value, out, index)
            return value

        total = reduce(exponential, io.add, 0.0)
        # What the results need of Σ exp: its log, or its reciprocal.
        total = vector_log(b, total) if log else b.fdiv(_splat(1.0, total), total)

        def result(b2: ir.IRBuilder, index: ir.Value, w: int) -> None:
            if keep:
                value = ll.load_vector(b2, out, index, w)
            else:
                shifted = b2.fsub(io.load(b2, x, index, w), spread(b2, peak, w))
                value = shifted if log else vector_exp(b2, shifted, True)
            combine = b2.fsub if log else b2.fmul
            io.store(b2, combine(value, spread(b2, total, w)), out, index)

        walk(result)

    if inner == 1:  # rows are contiguous: vectors along the row, statistics reduced across lanes
        def row(b: ir.IRBuilder, o: ir.Value, carried: list) -> list:
            base = b.mul(o, const(length))

            def reduce(load, combine, identity_value: float) -> ir.Value:
                return reduce_row(b, length, io.lanes, lambda b2, i, w: load(b2, b2.add(base, i), w), combine,
                                  lambda w: io.splat(identity_value, w))

            # Not overlapping: the scaling pass reads what it writes when the exponentials are kept.
            passes(b, reduce, _first_lane, lambda body: ll.strip_mine(b, base, length, io.lanes, "s", body))
            return carried

        ll.static_loop(builder, outer, "o", row)
    else:  # vectors along the contiguous inner axis, each lane its own softmax
        def column(b: ir.IRBuilder, o: ir.Value, i: ir.Value, w: int) -> None:
            base = b.add(b.mul(o, const(length * inner)), i)

            def each(body, carried: list) -> list:
                return ll.static_loop(b, length, "a", lambda b2, a, c: body(
                    b2, b2.add(base, b2.mul(a, const(inner))), c), carried)

            def reduce(load, combine, identity_value: float) -> ir.Value:
                return each(lambda b2, index, c: [combine(b2, c[0], load(b2, index, w))],
                            [io.splat(identity_value, w)])[0]

            passes(b, reduce, lambda b2, value, width: value,
                   lambda body: each(lambda b2, index, c: body(b2, index, w) or c, []))

        ll.static_loop(builder, outer, "o", lambda b, o, c: ll.strip_mine(
            b, const(0), inner, io.lanes, "i", lambda b2, i, w: column(b2, o, i, w), overlap=True) or c)
    builder.ret_void()
    return function


# -- layer / instance normalisation ------------------------------------------------------------------
def _row_statistics(builder: ir.IRBuilder, io: _Io, x: ir.Value, base: ir.Value, size: int,
                    epsilon: float) -> tuple[ir.Value, ir.Value]:
    """(mean, 1 / sqrt(variance + epsilon)) of x[base : base + size] as one-lane vectors; two passes."""
    def zero(width: int) -> ir.Constant:
        return io.splat(0.0, width)

    total = reduce_row(builder, size, io.lanes, lambda b, i, w: io.load(b, x, b.add(base, i), w), io.add, zero)
    mean = builder.fdiv(total, io.splat(size, 1))

    def square(b: ir.IRBuilder, i: ir.Value, w: int) -> ir.Value:
        centred = b.fsub(io.load(b, x, b.add(base, i), w), _first_lane(b, mean, w))
        return b.fmul(centred, centred)

    variance = builder.fdiv(reduce_row(builder, size, io.lanes, square, io.add, zero), io.splat(size, 1))
    deviation = ll.intrinsic(builder, "llvm.sqrt", builder.fadd(variance, io.splat(epsilon, 1)))
    return mean, builder.fdiv(io.splat(1.0, 1), deviation)


def norm_kernel(module: ir.Module, name: str, target: TargetSpec, dtype: DType, rows: int, channels: int,
                size: int, epsilon: float, period: int, has_bias: bool) -> ir.Function:
    """`name(x, scale, [bias,] out)`: each of the rows·channels contiguous rows of `size` elements
    normalised to zero mean and unit variance, then · scale + bias.

    `period` 0: scale and bias hold one value per channel (instance norm, rows = N); otherwise they hold
    `period` values repeated along the row (layer norm, channels = 1; `period` divides `size`).
    """
    io = _Io(target, dtype)
    buffers = 4 if has_bias else 3
    function, builder, pointers = kernel_function(module, name, [io.storage.element] * buffers)
    x, scale, out = pointers[0], pointers[1], pointers[-1]
    bias = pointers[2] if has_bias else None

    def row(b: ir.IRBuilder, indices: list, carried: list) -> list:
        n, c = indices
        base = b.mul(b.add(b.mul(n, const(channels)), c), const(size))
        mean, factor = _row_statistics(b, io, x, base, size, epsilon)
        if period == 0:
            factor = b.fmul(factor, io.load(b, scale, c, 1))
            shift = io.load(b, bias, c, 1) if bias is not None else io.splat(0.0, 1)

        def normalise(b2: ir.IRBuilder, index: ir.Value, p: ir.Value | None, w: int) -> None:
            centred = b2.fsub(io.load(b2, x, index, w), _first_lane(b2, mean, w))
            if period == 0:
                value = _fma(b2, centred, _first_lane(b2, factor, w), _first_lane(b2, shift, w))
            else:
                normal = b2.fmul(centred, _first_lane(b2, factor, w))
                offset = io.load(b2, bias, p, w) if bias is not None else io.splat(0.0, w)
                value = _fma(b2, normal, io.load(b2, scale, p, w), offset)
            io.store(b2, value, out, index)

        if period == 0:
            ll.strip_mine(b, base, size, io.lanes, "s", lambda b2, index, w: normalise(b2, index, None, w),
                          overlap=True)
        else:
            def block(b2: ir.IRBuilder, k: ir.Value, c2: list) -> list:
                start = b2.add(base, b2.mul(k, const(period)))
                ll.strip_mine(b2, const(0), period, io.lanes, "p",
                              lambda b3, p, w: normalise(b3, b3.add(start, p), p, w), overlap=True)
                return c2

            ll.static_loop(b, size // period, "k", block)
        return carried

    nested_loops(builder, [rows, channels], "r", row)
    builder.ret_void()
    return function


# -- batch normalisation -----------------------------------------------------------------------------
def batch_norm_kernel(module: ir.Module, name: str, target: TargetSpec, dtype: DType, batch: int, channels: int,
                      size: int, epsilon: float) -> ir.Function:
    """`name(x, scale, bias, mean, var, out)` on x [batch, channels, size]:
    (x - mean) · scale / sqrt(var + epsilon) + bias per channel."""
    io = _Io(target, dtype)
    function, builder, (x, scale, bias, mean, var, out) = kernel_function(module, name, [io.storage.element] * 6)

    def affine(b: ir.IRBuilder, channel: ir.Value, width: int) -> tuple[ir.Value, ir.Value, ir.Value]:
        """(mean, factor, bias) of `width` channels from `channel` on."""
        deviation = ll.intrinsic(b, "llvm.sqrt", b.fadd(io.load(b, var, channel, width), io.splat(epsilon, width)))
        factor = b.fdiv(io.load(b, scale, channel, width), deviation)
        return io.load(b, mean, channel, width), factor, io.load(b, bias, channel, width)

    def apply(b: ir.IRBuilder, index: ir.Value, params: tuple, width: int) -> None:
        centre, factor, shift = params
        io.store(b, _fma(b, b.fsub(io.load(b, x, index, width), centre), factor, shift), out, index)

    if size == 1:  # [N, C]: vectors across channels
        def sample(b: ir.IRBuilder, n: ir.Value, carried: list) -> list:
            base = b.mul(n, const(channels))
            ll.strip_mine(b, const(0), channels, io.lanes, "c",
                          lambda b2, c, w: apply(b2, b2.add(base, c), affine(b2, c, w), w), overlap=True)
            return carried

        ll.static_loop(builder, batch, "n", sample)
    else:
        def plane(b: ir.IRBuilder, indices: list, carried: list) -> list:
            n, c = indices
            params = affine(b, c, 1)
            base = b.mul(b.add(b.mul(n, const(channels)), c), const(size))
            ll.strip_mine(b, base, size, io.lanes, "s", lambda b2, index, w: apply(
                b2, index, tuple(_first_lane(b2, p, w) for p in params), w), overlap=True)
            return carried

        nested_loops(builder, [batch, channels], "p", plane)
    builder.ret_void()
    return function


# -- local response normalisation --------------------------------------------------------------------
def lrn_kernel(module: ir.Module, name: str, target: TargetSpec, dtype: DType, batch: int, channels: int,
               size: int, window: int, alpha: float, beta: float, bias: float) -> ir.Function:
    """`name(x, out)` on x [batch, channels, size]: x / (bias + alpha / window · Σ x²)^beta, the sum over
    channels [c - (window-1)//2, c + window//2] clipped to the tensor."""
    io = _Io(target, dtype)
    function, builder, (x, out) = kernel_function(module, name, [io.storage.element] * 2)
    before, after = (window - 1) // 2, window // 2

    def plane(b: ir.IRBuilder, indices: list, carried: list) -> list:
        n, c = indices
        low = b.sub(c, const(before))
        low = b.select(b.icmp_signed("<", low, const(0)), const(0), low)
        high = b.add(c, const(after + 1))
        high = b.select(b.icmp_signed(">", high, const(channels)), const(channels), high)
        sample = b.mul(n, const(channels * size))
        centre = b.add(sample, b.mul(c, const(size)))

        def chunk(b2: ir.IRBuilder, s: ir.Value, w: int) -> None:
            def add_square(b3: ir.IRBuilder, k: ir.Value, sums: list) -> list:
                index = b3.add(b3.add(sample, b3.mul(b3.add(low, k), const(size))), s)
                value = io.load(b3, x, index, w)
                return [_fma(b3, value, value, sums[0])]

            total, = ll.counted_loop(b2, b2.sub(high, low), "k", [io.splat(0.0, w)], add_square)
            base = _fma(b2, total, io.splat(alpha / window, w), io.splat(bias, w))
            power = vector_exp(b2, b2.fmul(vector_log(b2, base), io.splat(-beta, w)))
            index = b2.add(centre, s)
            io.store(b2, b2.fmul(io.load(b2, x, index, w), power), out, index)

        ll.strip_mine(b, const(0), size, io.lanes, "s", chunk, overlap=True)
        return carried

    nested_loops(builder, [batch, channels], "p", plane)
    builder.ret_void()
    return function
