"""Elementwise kernels with numpy broadcasting: one loop generator, one expression per op.

The generator gives every operand per-axis strides (0 on broadcast axes), collapses the axes the
strides allow (`movement.collapse`), and walks the outer axes in a loop nest; the innermost axis is
contiguous in the result and either contiguous or broadcast in each operand, so it runs as a vector
loop (operands broadcast along it are loaded and splatted once per row) plus a scalar tail. The
per-op expression (`RULES`) is written once over an `Emit`, which hides whether it is building
scalars or vectors.

Values are computed in a type per storage type: f16 is computed in f32 (numpy's half arithmetic does
the same and rounds the result once), bool as i1, i4/u4 in their i8/u8 storage (as the reference).

Float math: sqrt, floor, ceil, round (half to even), fabs use LLVM intrinsics (one instruction each).
exp, log, tanh and erf of f32 are vectorised: exp is numpy's own float32 algorithm (`exp_f32`), so exp,
sigmoid and softmax match the reference bit for bit on x86 (where numpy runs it); Cephes' logf (and its
expf inside erf, where numpy's exp plays no part), Eigen's rational tanh, and for erf a fit made for this
module (least squares on Chebyshev nodes in float64: erf(x)/x as a polynomial in x² below |x| = 0.921875,
log erfc(x) as a polynomial in x up to 4.5). Measured against float64 on dense grids: exp ≤ 3 ulp (as
numpy's), log ≤ 1 ulp, tanh 3e-7 relative, erf 2e-7, erfc (gelu's negative tail) 3e-6. sigmoid,
softplus, elu, gelu are built from them with the reference's formulas, rearranged where f32 would cancel
(log1p, expm1, 1 + erf): all within 3e-7 relative where |f| > 1e-6. f64 math and the rarely used
functions (sin, cos, tan, inverse and hyperbolic ones, pow, fmod) call libm, in scalar loops.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from llvmlite import ir

from lowbit.ir.dtypes import DType
from lowbit.kernels.llvm import (I1, I8, I16, I32, I64, TargetSpec, counted_loop, declare, intrinsic, pointer_at, splat,
                                 vector)
from lowbit.kernels.movement import broadcast_strides, collapse, contiguous_strides, i64, loop_nest, new_kernel

F16, F32, F64 = ir.HalfType(), ir.FloatType(), ir.DoubleType()
_COMPUTE = {DType.f64: F64, DType.f32: F32, DType.f16: F32, DType.i64: I64, DType.u64: I64, DType.i32: I32,
            DType.u32: I32, DType.i16: I16, DType.u16: I16, DType.i8: I8, DType.u8: I8, DType.i4: I8,
            DType.u4: I8, DType.bool: I1}
_STORAGE = {**_COMPUTE, DType.f16: F16, DType.bool: I8}


def _bytes(scalar: ir.Type) -> int:
    return 4 if isinstance(scalar, ir.FloatType) else 8 if isinstance(scalar, ir.DoubleType) \
        else 2 if isinstance(scalar, ir.HalfType) else max(scalar.width // 8, 1)


def element_bytes(dtype: DType) -> int:
    return _bytes(_STORAGE[dtype])


class Emit:
    """Expression building at one lane count (1: scalars, else vectors of that many lanes).

    `dtype` is the element type the op works on (its first operand's, or the branches' for `where`);
    `attrs` the node's attributes.
    """

    def __init__(self, builder: ir.IRBuilder, lanes: int, dtype: DType, attrs: Mapping[str, Any]) -> None:
        self.b = builder
        self.lanes = lanes
        self.dtype = dtype
        self.attrs = attrs

    def type(self, scalar: ir.Type) -> ir.Type:
        return scalar if self.lanes == 1 else vector(scalar, self.lanes)

    def const(self, like: ir.Value | ir.Type, value: float | int) -> ir.Constant:
        """`value` in the type of `like` (splat in every lane of a vector)."""
        kind = like if isinstance(like, ir.Type) else like.type
        if isinstance(kind, ir.VectorType):
            return ir.Constant(kind, [value] * kind.count)
        return ir.Constant(kind, value)

    @staticmethod
    def scalar(value: ir.Value) -> ir.Type:
        return value.type.element if isinstance(value.type, ir.VectorType) else value.type

    def is_double(self, value: ir.Value) -> bool:
        return isinstance(self.scalar(value), ir.DoubleType)

    # -- calls --------------------------------------------------------------------------------------
    @staticmethod
    def _mangle(kind: ir.Type) -> str:
        if isinstance(kind, ir.VectorType):
            return f"v{kind.count}{Emit._mangle(kind.element)}"
        return {F32: "f32", F64: "f64", F16: "f16"}.get(kind) or f"i{kind.width}"

    def intrinsic(self, name: str, *args: ir.Value, result: ir.Type | None = None) -> ir.Value:
        """`llvm.<name>` overloaded on the result type (and the operand type where it differs)."""
        result = result or args[0].type
        suffix = "." + self._mangle(result)
        if result != args[0].type:
            suffix += "." + self._mangle(args[0].type)
        function = declare(self.b.module, f"llvm.{name}{suffix}", result, *(a.type for a in args))
        return self.b.call(function, list(args))

    def libm(self, name: str, *args: ir.Value) -> ir.Value:
        """The C library's `name` (`namef` for f32) applied lane by lane."""
        scalar = self.scalar(args[0])
        function = declare(self.b.module, name + ("f" if scalar == F32 else ""), scalar, *([scalar] * len(args)))
        if self.lanes == 1:
            return self.b.call(function, list(args))
        result = ir.Constant(args[0].type, ir.Undefined)
        for lane in range(self.lanes):
            index = ir.Constant(I32, lane)
            value = self.b.call(function, [self.b.extract_element(a, index) for a in args])
            result = self.b.insert_element(result, value, index)
        return result

    # -- float helpers ------------------------------------------------------------------------------
    def fma(self, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
        """a·b + c, fused where the target has FMA."""
        return self.intrinsic("fmuladd", a, b, c)

    def poly(self, x: ir.Value, coefficients: Sequence[float]) -> ir.Value:
        """Horner evaluation; coefficients from the highest power down."""
        result = self.const(x, coefficients[0])
        for c in coefficients[1:]:
            result = self.fma(result, x, self.const(x, c))
        return result

    def lt(self, a, b):
        return self.b.fcmp_ordered("<", a, b)

    def gt(self, a, b):
        return self.b.fcmp_ordered(">", a, b)

    def isnan(self, a):
        return self.b.fcmp_unordered("uno", a, a)

    def max_np(self, a, b):
        """numpy's float maximum: a if a >= b or a is NaN, else b (NaN propagates)."""
        return self.b.select(self.b.or_(self.b.fcmp_ordered(">=", a, b), self.isnan(a)), a, b)

    def min_np(self, a, b):
        return self.b.select(self.b.or_(self.b.fcmp_ordered("<=", a, b), self.isnan(a)), a, b)

    def clamp(self, x, low: float, high: float):
        """x limited to [low, high]; NaN stays NaN."""
        x = self.b.select(self.lt(x, self.const(x, low)), self.const(x, low), x)
        return self.b.select(self.gt(x, self.const(x, high)), self.const(x, high), x)

    def copysign(self, magnitude, sign):
        return self.intrinsic("copysign", magnitude, sign)

    def bits(self, x: ir.Value) -> ir.Value:
        return self.b.bitcast(x, self.type(I32))

    def from_bits(self, x: ir.Value) -> ir.Value:
        return self.b.bitcast(x, self.type(F32))


# -- f32 math (f64 goes to libm) ----------------------------------------------------------------------
LOG2E = 1.44269504088896341
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4  # Cody–Waite split of ln 2 (Cephes)
EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
LOG_P = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
         -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)
# tanh(x) = x·P(x²)/Q(x²) on |x| ≤ TANH_END (Eigen's fast rational tanh; 4e-7 relative measured here).
TANH_END = 7.90531110763549805
TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
          1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)
ERF_SPLIT, ERFC_END = 0.921875, 4.5
ERF_SMALL = (-0.0006024643662385643, 0.005000903271138668, -0.026772962883114815, 0.11282039433717728,
             -0.3761252462863922, 1.1283791065216064)
ERFC_LOG = (1.4901471558914636e-06, -4.3244450353085995e-05, 0.0005739744519814849, -0.004657210782170296,
            0.02614409662783146, -0.10961753875017166, -0.6322910189628601, -1.1299761533737183,
            0.00026010331930592656)


def _f32(value: float) -> float:
    """`value` rounded to float32, as C's `1.0e-1f` literals are."""
    return float(struct.unpack("f", struct.pack("f", value))[0])


# numpy's float32 exp (`simd_exp_f32`, numpy/_core/src/umath/loops_exponent_log.dispatch.c.src and the
# constants of npy_simd_data.h), the one the reference interpreter runs on x86 with AVX2 or AVX-512F:
# Cody–Waite reduction by round(x·log2 e), a rational P5/Q2 approximation and an exact scaling by 2^k.
NP_EXP_MAX, NP_EXP_MIN = _f32(88.72283935546875), _f32(-103.97208404541015625)
NP_LOG2E = _f32(1.442695040888963407359924681001892137)
NP_LN2_HI, NP_LN2_LO = _f32(-6.93145752e-1), _f32(-1.42860677e-6)
NP_EXP_P = tuple(_f32(c) for c in (5.082762527590693718096e-04, 6.757896990527504603057e-03,
                                   5.114512081637298353406e-02, 2.473615434895520810817e-01,
                                   7.257664613233124478488e-01, 9.999999999980870924916e-01))
NP_EXP_Q = tuple(_f32(c) for c in (2.159509375685829852307e-02, -2.742335390411667452936e-01, 1.0))


def exp_f32(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """exp of a float32 scalar or vector, bit-identical to numpy's SIMD float32 exp (the reference's on x86
    with AVX2/AVX-512F; elsewhere numpy calls libm's expf, which differs from it by at most 3 ulp).

    Lanes at or beyond the limits give inf and 0, NaN stays NaN. The final scaling by 2^k, k in [-150, 128],
    is exact with one rounding (what AVX-512's `vscalefps` does): the value is first scaled into the normal
    range by 2^(k∓64) or 2^(k−1), exactly, then by the power of two that remains, rounding once.
    """
    vector_type = x.type if isinstance(x.type, ir.VectorType) else None

    def const(kind: ir.Type, value) -> ir.Constant:
        return ir.Constant(vector(kind, vector_type.count), [value] * vector_type.count) if vector_type \
            else ir.Constant(kind, value)

    def f(value: float) -> ir.Constant:
        return const(F32, value)

    def fma(a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:  # numpy's FMA: always fused
        return _call_intrinsic(builder, "fma", a, b, c)

    def power_of_two(k: ir.Value) -> ir.Value:
        return builder.bitcast(builder.shl(builder.add(k, const(I32, 127)), const(I32, 23)), x.type)

    b = builder
    number = b.fcmp_ordered("ord", x, x)
    over = b.fcmp_ordered(">=", x, f(NP_EXP_MAX))
    under = b.fcmp_ordered("<=", x, f(NP_EXP_MIN))
    inside = b.select(b.or_(over, under), f(0.0), b.select(number, x, f(0.0)))
    k = _call_intrinsic(b, "rint", b.fmul(inside, f(NP_LOG2E)))
    r = fma(k, f(NP_LN2_LO), fma(k, f(NP_LN2_HI), inside))
    numerator, denominator = f(NP_EXP_P[0]), f(NP_EXP_Q[0])
    for c in NP_EXP_P[1:]:
        numerator = fma(numerator, r, f(c))
    for c in NP_EXP_Q[1:]:
        denominator = fma(denominator, r, f(c))
    poly = b.fdiv(numerator, denominator)
    whole = b.fptosi(k, vector(I32, vector_type.count) if vector_type else I32)
    low, high = b.icmp_signed("<", whole, const(I32, -64)), b.icmp_signed(">", whole, const(I32, 64))
    rest = b.select(low, const(I32, -64), b.select(high, const(I32, 1), const(I32, 0)))
    y = b.fmul(b.fmul(poly, power_of_two(b.sub(whole, rest))), power_of_two(rest))
    y = b.select(over, f(math.inf), b.select(under, f(0.0), y))
    return b.select(number, y, x)


ROUND_MAGIC = 12582912.0  # 1.5·2^23: adding it leaves a float's integer value in the low mantissa bits


def _exp_polynomial(e: Emit, x: ir.Value) -> ir.Value:
    """Cephes' expf: within about 1 ulp, subnormal results included, 0 and inf beyond the range, and no
    division; for approximations whose reference is not numpy's exp (erf's tail), where `exp_f32` would
    only cost time."""
    b = e.b
    x = e.clamp(x, -104.0, 88.73)  # beyond: 0 and inf come out of the scaling below
    n = e.intrinsic("roundeven", b.fmul(x, e.const(x, LOG2E)))
    r = e.fma(n, e.const(x, -LN2_HI), x)
    r = e.fma(n, e.const(x, -LN2_LO), r)
    p = e.fma(e.poly(r, EXP_P), b.fmul(r, r), r)
    p = b.fadd(p, e.const(x, 1.0))
    # 2^n as two factors 2^(n/2) so that n in [-150, 128] (subnormal to overflowing) stays exact.
    whole = b.sub(e.bits(b.fadd(n, e.const(x, ROUND_MAGIC))), e.const(e.type(I32), 0x4B400000))
    half = b.ashr(whole, e.const(whole, 1))
    scales = [e.from_bits(b.shl(b.add(k, e.const(k, 127)), e.const(k, 23))) for k in (half, b.sub(whole, half))]
    return b.fmul(b.fmul(p, scales[0]), scales[1])


def _call_intrinsic(builder: ir.IRBuilder, name: str, *args: ir.Value) -> ir.Value:
    kind = args[0].type
    suffix = f"v{kind.count}f32" if isinstance(kind, ir.VectorType) else "f32"
    return builder.call(declare(builder.module, f"llvm.{name}.{suffix}", kind, *(a.type for a in args)), list(args))


def exp(e: Emit, x: ir.Value) -> ir.Value:
    if e.is_double(x):
        return e.intrinsic("exp", x)
    return exp_f32(e.b, x)


def log(e: Emit, x: ir.Value) -> ir.Value:
    if e.is_double(x):
        return e.intrinsic("log", x)
    b = e.b
    tiny = e.lt(x, e.const(x, 1.17549435e-38))  # subnormal: scale into the normal range first
    scaled = b.select(tiny, b.fmul(x, e.const(x, 8388608.0)), x)
    bits = e.bits(scaled)
    exponent = b.sub(b.lshr(bits, e.const(bits, 23)), e.const(bits, 126))
    exponent = b.select(tiny, b.sub(exponent, e.const(bits, 23)), exponent)
    m = e.from_bits(b.or_(b.and_(bits, e.const(bits, 0x007FFFFF)), e.const(bits, 0x3F000000)))  # [0.5, 1)
    low = e.lt(m, e.const(m, 0.707106781186547524))
    exponent = b.select(low, b.sub(exponent, e.const(bits, 1)), exponent)
    m = b.fsub(b.select(low, b.fadd(m, m), m), e.const(m, 1.0))
    k = b.sitofp(exponent, m.type)
    z = b.fmul(m, m)
    y = b.fmul(b.fmul(e.poly(m, LOG_P), m), z)
    y = e.fma(k, e.const(m, LN2_LO), y)
    y = e.fma(z, e.const(m, -0.5), y)
    result = e.fma(k, e.const(m, LN2_HI), b.fadd(m, y))
    result = b.select(b.fcmp_ordered("==", x, e.const(x, 0.0)), e.const(x, -math.inf), result)
    result = b.select(b.fcmp_ordered("==", x, e.const(x, math.inf)), x, result)
    return b.select(b.fcmp_unordered("<", x, e.const(x, 0.0)), e.const(x, math.nan), result)


def log1p(e: Emit, u: ir.Value) -> ir.Value:
    """log(1 + u) without losing u's small digits (u ≥ 0 here): log(v)·u/(v−1) for v = 1 + u."""
    if e.is_double(u):
        return e.libm("log1p", u)
    b = e.b
    v = b.fadd(e.const(u, 1.0), u)
    ratio = b.fmul(log(e, v), b.fdiv(u, b.fsub(v, e.const(u, 1.0))))
    return b.select(b.fcmp_ordered("==", v, e.const(u, 1.0)), u, ratio)


def expm1(e: Emit, x: ir.Value) -> ir.Value:
    """exp(x) − 1 without cancellation (Kahan: (u−1)·x/log u for u = exp x)."""
    if e.is_double(x):
        return e.libm("expm1", x)
    b = e.b
    u = exp(e, x)
    less = b.fsub(u, e.const(x, 1.0))
    ratio = b.fmul(less, b.fdiv(x, log(e, u)))
    ratio = b.select(b.fcmp_ordered("==", less, e.const(x, -1.0)), less, ratio)
    return b.select(b.fcmp_ordered("==", u, e.const(x, 1.0)), x, ratio)


def tanh(e: Emit, x: ir.Value) -> ir.Value:
    if e.is_double(x):
        return e.libm("tanh", x)
    b = e.b
    x = e.clamp(x, -TANH_END, TANH_END)  # beyond, tanh is 1 to within f32 precision
    z = b.fmul(x, x)
    return b.fdiv(b.fmul(e.poly(z, TANH_P), x), e.poly(z, TANH_Q))


def sigmoid(e: Emit, x: ir.Value) -> ir.Value:
    """The reference's form: exp(−|x|) never overflows, and each branch keeps its small values."""
    b = e.b
    t = exp(e, b.fneg(e.intrinsic("fabs", x)))
    denominator = b.fadd(e.const(x, 1.0), t)
    return b.select(b.fcmp_ordered(">=", x, e.const(x, 0.0)), b.fdiv(e.const(x, 1.0), denominator),
                    b.fdiv(t, denominator))


def _erf_parts(e: Emit, z: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
    """(erf(z) where |z| < ERF_SPLIT, erfc(|z|) where not, whether |z| < ERF_SPLIT)."""
    b = e.b
    small = b.fmul(e.poly(b.fmul(z, z), ERF_SMALL), z)
    a = e.intrinsic("fabs", z)
    tail = _exp_polynomial(e, e.poly(e.clamp(a, ERF_SPLIT, ERFC_END), ERFC_LOG))
    tail = b.select(e.gt(a, e.const(z, ERFC_END)), e.const(z, 0.0), tail)
    return small, tail, e.lt(a, e.const(z, ERF_SPLIT))


def erf(e: Emit, z: ir.Value) -> ir.Value:
    if e.is_double(z):
        return e.libm("erf", z)
    small, tail, inside = _erf_parts(e, z)
    return e.b.select(inside, small, e.copysign(e.b.fsub(e.const(z, 1.0), tail), z))


def one_plus_erf(e: Emit, z: ir.Value) -> ir.Value:
    """1 + erf(z), accurate where erf(z) is close to −1 (it is erfc(−z))."""
    if e.is_double(z):
        return e.libm("erfc", e.b.fneg(z))
    b = e.b
    small, tail, inside = _erf_parts(e, z)
    large = b.select(e.gt(z, e.const(z, 0.0)), b.fsub(e.const(z, 2.0), tail), tail)
    return b.select(inside, b.fadd(e.const(z, 1.0), small), large)


# -- per-op rules -------------------------------------------------------------------------------------
Rule = Callable[..., ir.Value]


def _never(dtype: DType) -> bool:
    return False


def _always(dtype: DType) -> bool:
    return True


def _integers(dtype: DType) -> bool:
    return not dtype.is_float


def _f64(dtype: DType) -> bool:
    return dtype is DType.f64


@dataclass(frozen=True)
class OpRule:
    emit: Rule
    bool_ok: bool = False  # whether bool operands are accepted (others: numeric or float by declaration)
    # Whether the op on this element type is computed a lane at a time anyway (libm calls, integer
    # division): then the kernel is a scalar loop, which also compiles much faster.
    scalar: Callable[[DType], bool] = _never


def _by_kind(float_op: str, int_op: str, bool_op: str | None = None) -> Rule:
    def rule(e: Emit, a, b):
        if e.dtype.is_float:
            return getattr(e.b, float_op)(a, b)
        return getattr(e.b, bool_op if e.dtype is DType.bool and bool_op else int_op)(a, b)

    return rule


def _extreme(larger: bool) -> Rule:
    def rule(e: Emit, a, b):
        if e.dtype.is_float:
            return e.max_np(a, b) if larger else e.min_np(a, b)
        compare = e.b.icmp_signed if e.dtype.is_signed else e.b.icmp_unsigned
        return e.b.select(compare(">" if larger else "<", a, b), a, b)

    return rule


def _compare(op: str) -> Rule:
    def rule(e: Emit, a, b):
        if e.dtype.is_float:
            return e.b.fcmp_ordered(op, a, b)
        return (e.b.icmp_signed if e.dtype.is_signed else e.b.icmp_unsigned)(op, a, b)

    return rule


def _divide(e: Emit, a, b):
    if e.dtype.is_float:
        return e.b.fdiv(a, b)
    # Truncating division; x/0 is 0 and MIN/−1 wraps to MIN (the hardware would trap on both).
    builder, zero = e.b, e.const(a, 0)
    by_zero = builder.icmp_unsigned("==", b, zero)
    if not e.dtype.is_signed:
        return builder.select(by_zero, zero, builder.udiv(a, builder.select(by_zero, e.const(a, 1), b)))
    by_minus_one = builder.icmp_signed("==", b, e.const(a, -1))
    safe = builder.select(builder.or_(by_zero, by_minus_one), e.const(a, 1), b)
    quotient = builder.select(by_minus_one, builder.sub(zero, a), builder.sdiv(a, safe))
    return builder.select(by_zero, zero, quotient)


def _remainder(e: Emit, a, b):
    builder = e.b
    if e.dtype.is_float:
        remainder = builder.frem(a, b)
        if e.attrs["fmod"]:
            return remainder
        # numpy's floor-mod: move a nonzero remainder to the divisor's sign; a zero one takes it too.
        zero = e.const(a, 0.0)
        differ = builder.xor(e.lt(b, zero), e.lt(remainder, zero))
        moved = builder.select(differ, builder.fadd(remainder, b), remainder)
        nonzero = builder.fcmp_unordered("!=", remainder, zero)
        result = builder.select(nonzero, moved, e.copysign(zero, b))
        return builder.select(builder.fcmp_ordered("==", b, zero), remainder, result)
    zero = e.const(a, 0)
    unsafe = builder.icmp_unsigned("==", b, zero)
    if e.dtype.is_signed:
        unsafe = builder.or_(unsafe, builder.icmp_signed("==", b, e.const(a, -1)))  # MIN % −1 traps
        remainder = builder.srem(a, builder.select(unsafe, e.const(a, 1), b))
        if not e.attrs["fmod"]:
            differ = builder.xor(builder.icmp_signed("<", b, zero), builder.icmp_signed("<", remainder, zero))
            fix = builder.and_(differ, builder.icmp_unsigned("!=", remainder, zero))
            remainder = builder.select(fix, builder.add(remainder, b), remainder)
    else:
        remainder = builder.urem(a, builder.select(unsafe, e.const(a, 1), b))
    return builder.select(unsafe, zero, remainder)


def float_to_int(e: Emit, x: ir.Value, target: DType) -> ir.Value:
    """Truncation toward zero; NaN gives 0. Out of range (implementation-defined in the reference):
    wraps modulo 2^bits for values within i32 (i64 for u32 and 64-bit targets), saturates beyond."""
    builder = e.b
    # Through i32 where that holds every value of the target: one vector instruction on x86.
    bits = 32 if target.bits <= 16 or target is DType.i32 else 64
    wide = _truncate(e, x, 2.0 ** (bits - 1), ir.IntType(bits), builder.fptosi)
    if target is DType.u64:  # values from 2^63 on need the unsigned conversion
        unsigned = _truncate(e, x, 2.0 ** 64, I64, builder.fptoui, low=2.0 ** 63)
        wide = builder.select(builder.fcmp_ordered(">=", x, e.const(x, 2.0 ** 63)), unsigned, wide)
    return _wrap_narrow(e, _resize(e, wide, True, _COMPUTE[target]), target)


def _truncate(e: Emit, x: ir.Value, limit: float, scalar: ir.IntType, convert, low: float | None = None) -> ir.Value:
    """`convert` (fptosi/fptoui) of x clamped into [low (−limit), the largest float below limit], NaN
    as 0: never out of range, so never poison, and vector code (llvm.fptosi.sat is scalarised on x86)."""
    digits = 53 if e.is_double(x) else 24
    clamped = e.clamp(x, -limit if low is None else low, limit * (1 - 2.0 ** -digits))
    clamped = e.b.select(e.isnan(x), e.const(x, 0.0 if low is None else low), clamped)
    return convert(clamped, e.type(scalar))


def _resize(e: Emit, x: ir.Value, signed: bool, scalar: ir.Type) -> ir.Value:
    have = Emit.scalar(x).width
    if have > scalar.width:
        return e.b.trunc(x, e.type(scalar))
    if have < scalar.width:
        return (e.b.sext if signed and have > 1 else e.b.zext)(x, e.type(scalar))
    return x


def _wrap_narrow(e: Emit, x: ir.Value, target: DType) -> ir.Value:
    """Sub-byte targets keep the low four bits (sign-extended for i4), as the reference wraps."""
    if target is DType.i4:
        return e.b.ashr(e.b.shl(x, e.const(x, 4)), e.const(x, 4))
    if target is DType.u4:
        return e.b.and_(x, e.const(x, 15))
    return x


def _cast(e: Emit, x):
    source, target, builder = e.dtype, e.attrs["to"], e.b
    if target is DType.bool:
        if source.is_float:
            return builder.fcmp_unordered("!=", x, e.const(x, 0.0))  # NaN is true, as in numpy
        return builder.icmp_unsigned("!=", x, e.const(x, 0))
    if target.is_float:
        if source.is_float:
            if target is DType.f16:
                return x  # the store rounds once, from whatever precision x has
            have, want = Emit.scalar(x), _COMPUTE[target]
            if have == want:
                return x
            return (builder.fpext if _bytes(want) > _bytes(have) else builder.fptrunc)(x, e.type(want))
        convert = builder.sitofp if source.is_signed and source is not DType.bool else builder.uitofp
        return convert(x, e.type(_COMPUTE[target]))
    if source.is_float:
        return float_to_int(e, x, target)
    return _wrap_narrow(e, _resize(e, x, source.is_signed, _COMPUTE[target]), target)


def _pow(e: Emit, a, b):
    if e.dtype.is_float:
        return e.intrinsic("pow", a, b)
    # The reference computes integer powers in f64 and converts back.
    convert = e.b.sitofp if e.dtype.is_signed else e.b.uitofp
    wide = [convert(v, e.type(F64)) for v in (a, b)]
    return float_to_int(e, e.intrinsic("pow", *wide), e.dtype)


def _shift(left: bool) -> Rule:
    """numpy's shifts: amounts outside [0, bits) give 0 (or −1 for negative values shifted right)."""
    def rule(e: Emit, a, b):
        builder = e.b
        bits = Emit.scalar(a).width
        inside = builder.icmp_unsigned("<", b, e.const(b, bits))
        if left:
            return builder.select(inside, builder.shl(a, builder.select(inside, b, e.const(b, 0))), e.const(a, 0))
        if e.dtype.is_signed:
            return builder.ashr(a, builder.select(inside, b, e.const(b, bits - 1)))
        return builder.select(inside, builder.lshr(a, builder.select(inside, b, e.const(b, 0))), e.const(a, 0))

    return rule


def _neg(e: Emit, x):
    return e.b.fneg(x) if e.dtype.is_float else e.b.sub(e.const(x, 0), x)


def _abs(e: Emit, x):
    if e.dtype.is_float:
        return e.intrinsic("fabs", x)
    if not e.dtype.is_signed:
        return x
    return e.b.select(e.b.icmp_signed("<", x, e.const(x, 0)), e.b.sub(e.const(x, 0), x), x)


def _relu(e: Emit, x):
    if e.dtype.is_float:
        return e.max_np(x, e.const(x, 0.0))
    if not e.dtype.is_signed:
        return x
    return e.b.select(e.b.icmp_signed("<", x, e.const(x, 0)), e.const(x, 0), x)


def _sign(e: Emit, x):
    builder = e.b
    if e.dtype.is_float:  # NaN stays NaN, −0 gives 0
        zero = e.const(x, 0.0)
        inner = builder.select(builder.fcmp_ordered("==", x, zero), zero, x)
        return builder.select(e.gt(x, zero), e.const(x, 1.0),
                              builder.select(e.lt(x, zero), e.const(x, -1.0), inner))
    compare = builder.icmp_signed if e.dtype.is_signed else builder.icmp_unsigned
    positive = builder.zext(compare(">", x, e.const(x, 0)), x.type)
    negative = builder.zext(compare("<", x, e.const(x, 0)), x.type)
    return builder.sub(positive, negative)


def _clip(e: Emit, x):
    low, high = e.attrs["min"], e.attrs["max"]
    if e.dtype.is_float:
        return e.min_np(e.max_np(x, e.const(x, low)), e.const(x, high))
    # The reference's integer bounds: rounded inward, limited to the storage type's range.
    lowest, highest = _storage_range(e.dtype)
    low = lowest if low == -math.inf else max(math.ceil(low), lowest)
    high = highest if high == math.inf else min(math.floor(high), highest)
    larger = e.b.icmp_signed if e.dtype.is_signed else e.b.icmp_unsigned
    x = e.b.select(larger("<", x, e.const(x, low)), e.const(x, low), x)
    return e.b.select(larger(">", x, e.const(x, high)), e.const(x, high), x)


def _storage_range(dtype: DType) -> tuple[int, int]:
    bits = _STORAGE[dtype].width
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if dtype.is_signed else (0, (1 << bits) - 1)


def _hard_swish(e: Emit, x):
    b = e.b
    gate = e.min_np(e.max_np(b.fadd(x, e.const(x, 3.0)), e.const(x, 0.0)), e.const(x, 6.0))
    return b.fdiv(b.fmul(x, gate), e.const(x, 6.0))


def _leaky_relu(e: Emit, x):
    negative = e.b.fmul(x, e.const(x, e.attrs["alpha"]))
    return e.b.select(e.b.fcmp_ordered(">=", x, e.const(x, 0.0)), x, negative)


def _elu(e: Emit, x):
    negative = e.b.fmul(e.const(x, e.attrs["alpha"]), expm1(e, e.min_np(x, e.const(x, 0.0))))
    return e.b.select(e.b.fcmp_ordered(">=", x, e.const(x, 0.0)), x, negative)


def _hard_sigmoid(e: Emit, x):
    line = e.b.fadd(e.b.fmul(x, e.const(x, e.attrs["alpha"])), e.const(x, e.attrs["beta"]))
    return e.min_np(e.max_np(line, e.const(x, 0.0)), e.const(x, 1.0))


def _gelu(e: Emit, x):
    b = e.b
    if e.attrs["approximate"] == "tanh":
        # 0.5·(1 + tanh y) = sigmoid(2y): no cancellation for large negative x.
        cube = e.fma(b.fmul(x, x), e.const(x, 0.044715), e.const(x, 1.0))
        return b.fmul(x, sigmoid(e, b.fmul(b.fmul(x, e.const(x, 2 * math.sqrt(2 / math.pi))), cube)))
    return b.fmul(b.fmul(x, e.const(x, 0.5)), one_plus_erf(e, b.fmul(x, e.const(x, math.sqrt(0.5)))))


def _softplus(e: Emit, x):
    b = e.b
    return b.fadd(e.max_np(x, e.const(x, 0.0)), log1p(e, exp(e, b.fneg(e.intrinsic("fabs", x)))))


def _prelu(e: Emit, x, slope):
    if e.dtype.is_float:
        return e.b.select(e.lt(x, e.const(x, 0.0)), e.b.fmul(x, slope), x)
    if not e.dtype.is_signed:
        return x
    return e.b.select(e.b.icmp_signed("<", x, e.const(x, 0)), e.b.mul(x, slope), x)


def _intrinsic(name: str) -> Rule:
    return lambda e, x: e.intrinsic(name, x)


def _libm(name: str) -> OpRule:
    return OpRule(lambda e, *xs: e.libm(name, *xs), scalar=_always)


RULES: dict[str, OpRule] = {
    "add": OpRule(_by_kind("fadd", "add", "or_"), True),
    "sub": OpRule(_by_kind("fsub", "sub")),
    "mul": OpRule(_by_kind("fmul", "mul", "and_"), True),
    "div": OpRule(_divide, scalar=_integers),
    "pow": OpRule(_pow, scalar=_always),
    "mod": OpRule(_remainder, scalar=_always),
    "maximum": OpRule(_extreme(True), True),
    "minimum": OpRule(_extreme(False), True),
    "equal": OpRule(_compare("=="), True),
    "less": OpRule(_compare("<"), True),
    "greater": OpRule(_compare(">"), True),
    "less_equal": OpRule(_compare("<="), True),
    "greater_equal": OpRule(_compare(">="), True),
    "logical_and": OpRule(lambda e, a, b: e.b.and_(a, b), True),
    "logical_or": OpRule(lambda e, a, b: e.b.or_(a, b), True),
    "logical_xor": OpRule(lambda e, a, b: e.b.xor(a, b), True),
    "logical_not": OpRule(lambda e, x: e.b.not_(x), True),
    "bitwise_and": OpRule(lambda e, a, b: e.b.and_(a, b)),
    "bitwise_or": OpRule(lambda e, a, b: e.b.or_(a, b)),
    "bitwise_xor": OpRule(lambda e, a, b: e.b.xor(a, b)),
    "bitwise_not": OpRule(lambda e, x: e.b.not_(x)),
    "shift_left": OpRule(_shift(True)),
    "shift_right": OpRule(_shift(False)),
    "neg": OpRule(_neg),
    "abs": OpRule(_abs),
    "relu": OpRule(_relu),
    "sign": OpRule(_sign),
    "prelu": OpRule(_prelu),
    "clip": OpRule(_clip),
    "sqrt": OpRule(_intrinsic("sqrt")),
    "floor": OpRule(_intrinsic("floor")),
    "ceil": OpRule(_intrinsic("ceil")),
    "round": OpRule(_intrinsic("roundeven")),
    "reciprocal": OpRule(lambda e, x: e.b.fdiv(e.const(x, 1.0), x)),
    "exp": OpRule(exp, scalar=_f64),
    "log": OpRule(log, scalar=_f64),
    "tanh": OpRule(tanh, scalar=_f64),
    "erf": OpRule(erf, scalar=_f64),
    "sigmoid": OpRule(sigmoid, scalar=_f64),
    "softplus": OpRule(_softplus, scalar=_f64),
    "sin": _libm("sin"),
    "cos": _libm("cos"),
    "tan": _libm("tan"),
    "asin": _libm("asin"),
    "acos": _libm("acos"),
    "atan": _libm("atan"),
    "sinh": _libm("sinh"),
    "cosh": _libm("cosh"),
    "asinh": _libm("asinh"),
    "acosh": _libm("acosh"),
    "atanh": _libm("atanh"),
    "hard_swish": OpRule(_hard_swish),
    "leaky_relu": OpRule(_leaky_relu),
    "elu": OpRule(_elu, scalar=_f64),
    "hard_sigmoid": OpRule(_hard_sigmoid),
    "gelu": OpRule(_gelu, scalar=_f64),
    "where": OpRule(lambda e, c, a, b: e.b.select(c, a, b), True),
    "cast": OpRule(_cast, True),
}


def unsupported_reason(op: str, operand_dtypes: Sequence[DType]) -> str | None:
    """Why `op` on these operand types has no kernel here, or None when it has one."""
    rule = RULES.get(op)
    if rule is None:
        return f"no elementwise kernel for op '{op}'"
    if not rule.bool_ok and DType.bool in operand_dtypes:
        return f"'{op}' of bool tensors has no native kernel"
    return None


# -- the loop generator -------------------------------------------------------------------------------
def _load(builder: ir.IRBuilder, base: ir.Value, offset: ir.Value, dtype: DType, lanes: int) -> ir.Value:
    storage = _STORAGE[dtype]
    kind = storage if lanes == 1 else vector(storage, lanes)
    value = builder.load(pointer_at(builder, base, offset, kind), align=_bytes(storage))
    if dtype is DType.bool:
        return builder.icmp_unsigned("!=", value, ir.Constant(kind, 0 if lanes == 1 else [0] * lanes))
    if dtype is DType.f16:
        return builder.fpext(value, F32 if lanes == 1 else vector(F32, lanes))
    return value


def _store(builder: ir.IRBuilder, base: ir.Value, offset: ir.Value, dtype: DType, value: ir.Value) -> None:
    storage = _STORAGE[dtype]
    lanes = value.type.count if isinstance(value.type, ir.VectorType) else 1
    kind = storage if lanes == 1 else vector(storage, lanes)
    if dtype is DType.bool:
        value = builder.zext(value, kind)
    elif dtype is DType.f16:
        value = builder.fptrunc(_double_to_odd_float(builder, value), kind)
    builder.store(value, pointer_at(builder, base, offset, kind), align=_bytes(storage))


def _double_to_odd_float(builder: ir.IRBuilder, value: ir.Value) -> ir.Value:
    """A float64 `value` as float32 rounded to odd (truncated, its last bit set when inexact), else `value`.

    Only x86 with AVX512-FP16 and AArch64 convert float64 to float16 in one instruction; elsewhere LLVM
    calls a runtime helper that the generated code cannot link. Through float32 rounded to odd, the one
    rounding to float16 that follows gives the correctly rounded result (float32 keeps more than the
    11 + 2 bits that needs)."""
    scalar = value.type.element if isinstance(value.type, ir.VectorType) else value.type
    if not isinstance(scalar, ir.DoubleType):
        return value
    lanes = value.type.count if isinstance(value.type, ir.VectorType) else None
    as_type = (lambda element: vector(element, lanes)) if lanes else (lambda element: element)  # noqa: E731
    narrow = builder.fptrunc(value, as_type(ir.FloatType()))  # (to nearest)
    back = builder.fpext(narrow, value.type)
    inexact = builder.fcmp_ordered("!=", back, value)
    magnitudes = [intrinsic(builder, "llvm.fabs", operand) for operand in (back, value)]
    rounded_away = builder.fcmp_ordered(">", *magnitudes)
    bits = builder.bitcast(narrow, as_type(I32))
    one = ir.Constant(as_type(I32), 1 if lanes is None else [1] * lanes)
    truncated = builder.select(builder.and_(inexact, rounded_away), builder.sub(bits, one), bits)
    odd = builder.select(inexact, builder.or_(truncated, one), truncated)
    return builder.bitcast(odd, as_type(ir.FloatType()))


def elementwise_kernel(module: ir.Module, name: str, op: str, attrs: Mapping[str, Any], shape: Sequence[int],
                       operands: Sequence[tuple[Sequence[int], DType]], result: DType,
                       target: TargetSpec) -> ir.Function:
    """`name(operands..., result)`: result[shape] = op(operands broadcast to shape), row-major buffers."""
    dtype = operands[1][1] if op == "where" else operands[0][1]
    rule = RULES[op].emit
    dtypes = [d for _, d in operands]
    sizes = [element_bytes(d) for d in dtypes] + [element_bytes(result)]
    element_strides = [broadcast_strides(shape, s) for s, _ in operands] + [contiguous_strides(shape)]
    dims, strides = collapse(shape, element_strides)
    strides = [tuple(s * size for s in set_) for set_, size in zip(strides, sizes)]
    widest = max(_bytes(_COMPUTE[d]) for d in [*dtypes, result])
    lanes = 1 if RULES[op].scalar(dtype) else max(target.vector_bytes // widest, 1)
    function, builder = new_kernel(module, name, len(operands) + 1)
    args = list(function.args)
    if 0 in shape:
        builder.ret_void()
        return function
    if not dims:  # a single element
        dims, strides = (1,), [(0,)] * len(strides)
    inner = dims[-1]

    def row(b: ir.IRBuilder, offsets: list[ir.Value]) -> None:
        broadcast = {k: _load(b, args[k], offsets[k], dtypes[k], 1) for k in range(len(operands))
                     if strides[k][-1] == 0}

        def step(count: int, start: ir.Value | int, width: int) -> Callable:
            held = {k: v if width == 1 else splat(b, v, width) for k, v in broadcast.items()}

            def body(b2: ir.IRBuilder, index: ir.Value, _):
                position = b2.add(b2.mul(index, i64(width)), i64(start))
                at = [b2.add(offsets[k], b2.mul(position, i64(sizes[k]))) for k in range(len(sizes))]
                values = [held[k] if k in held else _load(b2, args[k], at[k], dtypes[k], width)
                          for k in range(len(operands))]
                _store(b2, args[-1], at[-1], result, rule(Emit(b2, width, dtype, attrs), *values))
                return []

            counted_loop(b, i64(count), "vector" if width > 1 else "scalar", (), body)

        vectors = inner // lanes if lanes > 1 else 0
        if vectors:
            step(vectors, 0, lanes)
        if inner > vectors * lanes:
            step(inner - vectors * lanes, vectors * lanes, 1)

    loop_nest(builder, dims[:-1], [i64(0)] * len(args), [s[:-1] for s in strides], row)
    builder.ret_void()
    return function
