"""Softmax, log-softmax, layer / instance / batch normalisation and LRN, as LLVM IR.

Everything computes in f32 (f16 widens, f64 stays f64) along vectors of the contiguous axis, with the
reference interpreter's operations in its order, so that float32 results are bit-identical to it on x86
(where numpy runs its own SIMD exp):
- softmax over the last axis: max, exp(x - max) stored, their sum in numpy's pairwise order
  (`reduce.pairwise_sum`), then a division of each by the sum; over another axis, vectors run along the
  contiguous inner axis and the reduced axis is walked (and summed) in order;
- layer and instance norm: two-pass statistics per row (the pairwise-summed mean, then the mean of
  squared deviations), then (x - mean) / sqrt(variance + epsilon), · scale, + bias, each rounded;
- exp of f32 is numpy's float32 algorithm (`elementwise.exp_f32`); log of f32 a vectorised Cephes
  polynomial (about 1 ulp); f64 uses LLVM's intrinsics (libm).
"""
from __future__ import annotations

import math
from typing import Sequence

from llvmlite import ir

from lowbit.ir.dtypes import DType
from lowbit.kernels import llvm as ll
from lowbit.kernels.elementwise import exp_f32
from lowbit.kernels.llvm import F32, I32, TargetSpec
from lowbit.kernels.parallel import new_parallel_kernel, share
from lowbit.kernels.reduce import (Arith, combiner, const, convert, kernel_function, nested_loops, pairwise_sum,
                                   reduce_row)

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


def vector_exp(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """exp of a float vector: numpy's float32 algorithm for f32 (`elementwise.exp_f32`, bit-identical to the
    reference on x86), LLVM's intrinsic (libm) for f64."""
    if x.type.element != F32:
        return ll.intrinsic(builder, "llvm.exp", x)
    return exp_f32(builder, x)


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
def _parallel_kernel(module: ir.Module, name: str, elements: Sequence[ir.Type]
                     ) -> tuple[ir.Function, ir.IRBuilder, list[ir.Value], ir.Value, ir.Value]:
    """A parallel kernel (`kernels.parallel`) with one buffer per entry of `elements`: the function, a
    builder, the buffers as typed pointers, and (thread, threads)."""
    function, builder, thread, threads = new_parallel_kernel(module, name, len(elements))
    pointers = [builder.bitcast(arg, element.as_pointer()) for arg, element in zip(function.args, elements)]
    return function, builder, pointers, thread, threads


def _thread_rows(builder: ir.IRBuilder, thread: ir.Value, threads: ir.Value, count: int, name: str, body) -> None:
    """body(builder, row) for this thread's share of `count` independent rows."""
    begin, end = share(builder, thread, threads, count)
    ll.counted_loop(builder, builder.sub(end, begin), name, body=lambda b, i, c: body(b, b.add(begin, i)) or c)


def softmax_kernel(module: ir.Module, name: str, target: TargetSpec, dtype: DType, outer: int, length: int,
                   inner: int, log: bool) -> ir.Function:
    """`name(x, out, thread, threads)`: softmax (or log-softmax with `log`) of x viewed as [outer, length,
    inner] along the middle axis, in the reference's operations: m = max, s = x − m, t = Σ exp(s), then
    exp(s) / t (a division, not a product with 1/t) or s − log(t). Parallel over `outer`.

    Σ runs in numpy's order: pairwise (`reduce.pairwise_sum`) along a contiguous axis, one by one along a
    strided one. With numpy's float32 exp (`vector_exp`) softmax is then bit-identical to the reference
    on x86; log-softmax's log is within 1 ulp of numpy's.
    """
    io = _Io(target, dtype)
    function, builder, (x, out), thread, threads = _parallel_kernel(module, name, [io.storage.element] * 2)
    # Keeping exp(x - max) in the output for the final division is exact only when it stores losslessly.
    keep = not log and io.storage == io.compute

    def passes(b: ir.IRBuilder, reduce, total_of, spread, walk) -> None:
        """The passes given how to reduce over the axis in any order (`reduce(load, combine, identity)`) and
        in numpy's summation order (`total_of(load)`), to widen a statistic to a vector (`spread(builder,
        statistic, width)`) and to visit each vector (`walk(body(builder, index, width))`)."""
        peak = reduce(lambda b2, index, w: io.load(b2, x, index, w), io.max, -math.inf)

        def shifted(b2: ir.IRBuilder, index: ir.Value, w: int) -> ir.Value:
            return b2.fsub(io.load(b2, x, index, w), spread(b2, peak, w))

        def exponential(b2: ir.IRBuilder, index: ir.Value, w: int) -> ir.Value:
            return vector_exp(b2, shifted(b2, index, w))

        if keep:
            walk(lambda b2, index, w: ll.store_vector(b2, exponential(b2, index, w), out, index))
            total = total_of(lambda b2, index, w: ll.load_vector(b2, out, index, w))
        else:
            total = total_of(exponential)
        if log:
            total = vector_log(b, total)

        def result(b2: ir.IRBuilder, index: ir.Value, w: int) -> None:
            if log:
                value = b2.fsub(shifted(b2, index, w), spread(b2, total, w))
            else:
                value = ll.load_vector(b2, out, index, w) if keep else exponential(b2, index, w)
                value = b2.fdiv(value, spread(b2, total, w))
            io.store(b2, value, out, index)

        walk(result)

    if inner == 1:  # rows are contiguous: vectors along the row, statistics reduced across lanes
        def row(b: ir.IRBuilder, o: ir.Value) -> None:
            base = b.mul(o, const(length))

            def at(load):
                return lambda b2, i, w: load(b2, b2.add(base, i), w)

            def reduce(load, combine, identity_value: float) -> ir.Value:
                return reduce_row(b, length, io.lanes, at(load), combine, lambda w: io.splat(identity_value, w))

            def total_of(load) -> ir.Value:
                return pairwise_sum(b, length, at(load), lambda w: io.splat(0.0, w))

            # Not overlapping: the division pass reads what it writes when the exponentials are kept.
            passes(b, reduce, total_of, _first_lane,
                   lambda body: ll.strip_mine(b, base, length, io.lanes, "s", body))

        _thread_rows(builder, thread, threads, outer, "o", row)
    else:  # vectors along the contiguous inner axis, each lane its own softmax
        def column(b: ir.IRBuilder, o: ir.Value, i: ir.Value, w: int) -> None:
            base = b.add(b.mul(o, const(length * inner)), i)

            def each(body, carried: list) -> list:
                return ll.static_loop(b, length, "a", lambda b2, a, c: body(
                    b2, b2.add(base, b2.mul(a, const(inner))), c), carried)

            def reduce(load, combine, identity_value: float) -> ir.Value:
                return each(lambda b2, index, c: [combine(b2, c[0], load(b2, index, w))],
                            [io.splat(identity_value, w)])[0]

            passes(b, reduce, lambda load: reduce(load, io.add, 0.0), lambda b2, value, width: value,
                   lambda body: each(lambda b2, index, c: body(b2, index, w) or c, []))

        _thread_rows(builder, thread, threads, outer, "o", lambda b, o: ll.strip_mine(
            b, const(0), inner, io.lanes, "i", lambda b2, i, w: column(b2, o, i, w), overlap=True))
    builder.ret_void()
    return function


# -- layer / instance normalisation ------------------------------------------------------------------
def _row_statistics(builder: ir.IRBuilder, io: _Io, x: ir.Value, base: ir.Value, size: int,
                    epsilon: float) -> tuple[ir.Value, ir.Value]:
    """(mean, sqrt(variance + epsilon)) of x[base : base + size] as one-lane vectors, as the reference computes
    them: two passes, each a numpy-ordered sum (`pairwise_sum`) divided by the count."""
    def zero(width: int) -> ir.Constant:
        return io.splat(0.0, width)

    total = pairwise_sum(builder, size, lambda b, i, w: io.load(b, x, b.add(base, i), w), zero)
    mean = builder.fdiv(total, io.splat(size, 1))

    def square(b: ir.IRBuilder, i: ir.Value, w: int) -> ir.Value:
        centred = b.fsub(io.load(b, x, b.add(base, i), w), _first_lane(b, mean, w))
        return b.fmul(centred, centred)

    variance = builder.fdiv(pairwise_sum(builder, size, square, zero), io.splat(size, 1))
    return mean, ll.intrinsic(builder, "llvm.sqrt", builder.fadd(variance, io.splat(epsilon, 1)))


def norm_kernel(module: ir.Module, name: str, target: TargetSpec, dtype: DType, rows: int, channels: int,
                size: int, epsilon: float, period: int, has_bias: bool) -> ir.Function:
    """`name(x, scale, [bias,] out, thread, threads)`: each of the rows·channels contiguous rows of `size`
    elements normalised to zero mean and unit variance, then · scale + bias. Parallel over those rows.

    `period` 0: scale and bias hold one value per channel (instance norm, rows = N); otherwise they hold
    `period` values repeated along the row (layer norm, channels = 1; `period` divides `size`).
    """
    io = _Io(target, dtype)
    function, builder, pointers, thread, threads = _parallel_kernel(module, name, [io.storage.element] * (
        4 if has_bias else 3))
    x, scale, out = pointers[0], pointers[1], pointers[-1]
    bias = pointers[2] if has_bias else None

    def row(b: ir.IRBuilder, unit: ir.Value) -> None:
        c = b.urem(unit, const(channels))
        base = b.mul(unit, const(size))
        mean, deviation = _row_statistics(b, io, x, base, size, epsilon)

        def normalise(b2: ir.IRBuilder, index: ir.Value, p: ir.Value | None, w: int) -> None:
            # The reference's roundings: (x − mean) / deviation, then · scale, then + bias (never fused).
            centred = b2.fsub(io.load(b2, x, index, w), _first_lane(b2, mean, w))
            normal = b2.fdiv(centred, _first_lane(b2, deviation, w))
            if period == 0:
                value = b2.fmul(normal, _first_lane(b2, io.load(b2, scale, c, 1), w))
                if bias is not None:
                    value = b2.fadd(value, _first_lane(b2, io.load(b2, bias, c, 1), w))
            else:
                value = b2.fmul(normal, io.load(b2, scale, p, w))
                if bias is not None:
                    value = b2.fadd(value, io.load(b2, bias, p, w))
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

    _thread_rows(builder, thread, threads, rows * channels, "r", row)
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
        # the reference's roundings: (x − mean) · factor, then + bias (not fused)
        io.store(b, b.fadd(b.fmul(b.fsub(io.load(b, x, index, width), centre), factor), shift), out, index)

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
