"""A cheaper instruction sequence for `requantize.ProductEpilogue` where channels run along C's rows
(convolutions: one multiplier, shift and zero point per vector), bit-exact with the generic one.

The generic requantization widens each int32 accumulator vector into two int64 halves (lanes 0–7 and
8–15: two extensions and a cross-lane extract), multiplies, rounds, shifts, clamps in int64 and narrows
each half with a two-µop saturating conversion before merging the halves. Here the int32 vector is read
as 64-bit lanes instead: `vpmuldq` multiplies the even lanes (the low halves, sign-extended) directly, the
odd lanes after one 32-bit shift; the rounding term carries the zero point (zp·2^s). The even sums are
shifted right by s; the odd ones by s − 32 (left by 32 − s when s < 32), which leaves each odd result in
the high half of its 64-bit lane, where it belongs: one blend merges both into int32 results, clamped and
narrowed in int32. On x86 with AVX-512 the per-channel shifts use `vpsravq` (one µop; LLVM's splat shift
`vpsraq zmm, xmm` takes two).

Exactness (`applies`): with |acc| ≤ B (the accumulator bound the lowering proves; 2^31 by default), every
sum X = acc·m + (r − zr)·m_r + 2^(s−1) + zp·2^s is below 2^62 in magnitude, X / 2^s (the result before
clamping) below 2^30, and for s < 32, X·2^(32−s) below 2^62: no int64 step overflows, and the int32
value of the result is the int64 one. Other requantizations keep the generic sequence. Where the lowering
also bounds the accumulators before their compile-time offsets (`raw_bound`: below 2^31, so the int32
values are exact), the offsets join the rounding terms (off·m) instead of an int32 addition.
"""
from __future__ import annotations

from llvmlite import ir

from lowbit.ir.dtypes import DType
from lowbit.kernels import llvm as ll
from lowbit.kernels.llvm import I32, I64
from lowbit.kernels.requantize import Corrections, ProductEpilogue, Requant, Table, clamp

LIMIT = 1 << 62  # every int64 sum (and an odd lane's left-shifted sum) stays below this
RESULT_LIMIT = 1 << 30  # results before clamping stay below this (int32 with room for the clamp)
ACCUMULATOR_LIMIT = 1 << 31


def _residual_range(residual: tuple[DType, int] | None) -> int:
    """The largest |r − zr| of a residual operand."""
    if residual is None:
        return 0
    dtype, zero_point = residual
    low, high = (-(1 << dtype.bits - 1), (1 << dtype.bits - 1) - 1) if dtype.is_signed else (0, (1 << dtype.bits) - 1)
    return max(abs(low - zero_point), abs(high - zero_point))


def applies(requant: Requant, channels_along: str, lanes: int, residual: tuple[DType, int] | None = None,
            bound: int = ACCUMULATOR_LIMIT) -> bool:
    """Whether the paired sequence computes `requant` exactly for accumulators |acc| ≤ `bound` (and pays:
    an even number of int32 lanes, one channel per vector); the shifts must all be ≥ 32 or all ≤ 32."""
    shifts = requant.shifts
    if channels_along != "row" or lanes % 2 or not (min(shifts) >= 32 or max(shifts) <= 32):
        return False
    multipliers = requant.multipliers
    residual_multipliers = requant.residual_multipliers or (0,) * len(multipliers)
    if not all(0 <= m < 1 << 31 for m in multipliers + residual_multipliers) or min(shifts) < 1:
        return False
    count = max(len(shifts), len(multipliers), len(residual_multipliers))
    spread = lambda values: values * count if len(values) == 1 else values  # noqa: E731
    for s, m, mr in zip(spread(shifts), spread(multipliers), spread(residual_multipliers)):
        total = min(bound, ACCUMULATOR_LIMIT) * m + _residual_range(residual) * mr + (1 << s - 1) \
            + abs(requant.zero_point) * (1 << s)
        if total >= LIMIT or total >> s >= RESULT_LIMIT or (s < 32 and total << (32 - s) >= LIMIT):
            return False
    return True


def _fold(requant: Requant, offsets: tuple[int, ...], residual: tuple[DType, int] | None, raw_bound: int
          ) -> tuple[int, ...] | None:
    """The rounding terms off·m + 2^(s−1) + zp·2^s per channel when int32 accumulators that are below `raw_bound`
    before their offsets (no int32 wrap) may take their offsets in the int64 sum instead, without overflow;
    else None."""
    if raw_bound >= ACCUMULATOR_LIMIT:
        return None
    count = len(offsets)
    spread = lambda values: values * count if len(values) == 1 else values  # noqa: E731
    columns = zip(offsets, spread(requant.shifts), spread(requant.multipliers),
                  spread(requant.residual_multipliers or (0,)))
    terms = []
    for off, s, m, mr in columns:
        term = off * m + (1 << s - 1) + (requant.zero_point << s)
        if raw_bound * m + _residual_range(residual) * mr + abs(term) >= LIMIT:
            return None
        terms.append(term)
    return tuple(terms)


class PairedEpilogue(ProductEpilogue):
    """`ProductEpilogue` with the even/odd requantization where `applies` (else exactly the parent);
    `bound`: the largest |accumulator| (corrections included) the lowering proves; `raw_bound`, when known,
    the largest before the compile-time offsets: then the offsets join the int64 rounding terms (one int32
    addition less per vector) where that cannot overflow."""

    def __init__(self, module: ir.Module, name: str, lanes: int, ld: int, channels_along: str, requant: Requant,
                 corrections: Corrections = Corrections(), residual: tuple[DType, int] | None = None,
                 bound: int = ACCUMULATOR_LIMIT, raw_bound: int | None = None) -> None:
        super().__init__(module, name, lanes, ld, channels_along, requant, corrections, residual)
        self.paired = applies(requant, channels_along, lanes, residual, bound)
        self.folded = False
        if self.paired:
            shifts = requant.shifts
            rounding = [(1 << (s - 1)) + (requant.zero_point << s) for s in shifts]
            if raw_bound is not None and corrections.offsets is not None and not corrections.col_sums \
                    and not corrections.row_sums:
                folded = _fold(requant, corrections.offsets, residual, raw_bound)
                self.folded = folded is not None
                rounding = list(folded) if self.folded else rounding
            self.rounding = Table(module, f"{name}.round", rounding)
            self.left = max(shifts) <= 32  # the odd sums move left (else right; `applies`: one or the other)
            self.odd_shifts = Table(module, f"{name}.sodd", [abs(s - 32) for s in shifts])
            # vpsravq where the vectors are AVX-512's
            self.variable_shift = module.triple.startswith("x86_64") and lanes == 16

    def corrected(self, builder, acc, row, col, channel0, sums):
        if self.folded and acc.type.element == I32:  # the offsets are in the rounding terms
            return acc
        return super().corrected(builder, acc, row, col, channel0, sums)

    def one(self, builder, bound, acc, row, col, count, channel0) -> None:
        if not self.paired or acc.type.element != I32:  # (the wide routes' int64 accumulators)
            super().one(builder, bound, acc, row, col, count, channel0)
            return
        t, lanes = self.tables, self.lanes
        half = lanes // 2
        wide = ll.vector(I64, half)
        channel = builder.add(channel0, row)

        def scalar(table: Table) -> ir.Value:
            return table.splat(builder, channel, half)

        def pairs(values: ir.Value) -> tuple[ir.Value, ir.Value]:
            """int32 lanes as int64 (even lanes, odd lanes), each sign-extended."""
            as64 = builder.bitcast(values, wide)
            low = builder.ashr(builder.shl(as64, ll.const_vector(I64, [32] * half)), ll.const_vector(I64, [32] * half))
            return low, builder.ashr(as64, ll.const_vector(I64, [32] * half))


        def widened(table: Table) -> ir.Value:  # (sign-extended int32: LLVM multiplies with vpmuldq)
            return builder.sext(scalar(table), wide)

        def shift_right(value: ir.Value, table: Table) -> ir.Value:
            if self.variable_shift and not table.uniform:
                return builder.call(ll.declare(builder.module, "llvm.x86.avx512.psrav.q.512", wide, wide, wide),
                                    [value, scalar(table)])
            return builder.ashr(value, scalar(table))

        even, odd = pairs(acc)
        m = widened(t.multipliers)
        even, odd = builder.mul(even, m), builder.mul(odd, m)
        if self.residual:
            dtype, zero_point = self.residual
            values = ll.load_partial(builder, self.at(builder, bound[1], row, col), count, lanes)
            values = builder.sext(values, ll.vector(I32, lanes)) if dtype.is_signed \
                else builder.zext(values, ll.vector(I32, lanes))
            r_even, r_odd = pairs(builder.sub(values, ll.const_vector(I32, [zero_point] * lanes)))
            mr = widened(t.residual)
            even, odd = builder.add(even, builder.mul(r_even, mr)), builder.add(odd, builder.mul(r_odd, mr))
        rounding = scalar(self.rounding)
        even = shift_right(builder.add(even, rounding), t.shifts)
        odd = builder.add(odd, rounding)
        odd = builder.shl(odd, scalar(self.odd_shifts)) if self.left else shift_right(odd, self.odd_shifts)
        kind = ll.vector(I32, lanes)
        odd_lanes = ll.const_vector(ll.I1, [i % 2 for i in range(lanes)])
        q = builder.select(odd_lanes, builder.bitcast(odd, kind), builder.bitcast(even, kind))
        requant = t.requant
        y = clamp(builder, q, requant.qmin, requant.qmax)
        if requant.dtype.bits < 32:
            y = builder.trunc(y, ll.vector(ll.element_type(requant.dtype), lanes))
        ll.store_partial(builder, y, self.at(builder, bound[0], row, col), count)
