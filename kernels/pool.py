"""2-D max and average pooling over NCHW planes, as LLVM IR.

Vectors run along an output row (W is contiguous); no tap tests a bound at run time:
- output rows whose windows lie wholly inside the input unroll the window rows; for the others a
  compile-time table gives the window rows inside the input;
- a row is cut into vector-wide chunks, computed GROUP at a time (independent dependency chains, the
  window's taps combined as a tree); with a stride, each tap's inputs come from as few contiguous loads
  as cover them exactly (never past the last element needed) and one shuffle;
- chunks with taps outside the row (the borders) mask those loads at generation time, so padding reads
  as the identity: it never wins a maximum (the reference's lowest-value fill) nor adds to a sum.
Average pooling multiplies the sum by compile-time reciprocals of the row and column tap counts (the
counts are separable), within an ulp or two of dividing. Max pooling works on every numeric type
(integers bit-exact); averages compute in f32 (f64 for f64). A float maximum that keeps NaN costs four
instructions a tap, a plain one one; so each plane is first checked with one FMA a vector (Σ x·0 is NaN
exactly when the plane holds a NaN or an infinity) and takes the plain route when the check allows it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from llvmlite import ir

from lowbit.ir.dtypes import DType
from lowbit.kernels import llvm as ll
from lowbit.kernels.llvm import I32, I64, TargetSpec
from lowbit.kernels.reduce import Arith, Combine, combiner, const, convert, identity, kernel_function, reduce_row

UNROLLED_TAPS = 8  # window widths up to this are unrolled along W; wider ones loop
GROUP = 4  # output vectors computed together (independent dependency chains)


@dataclass(frozen=True)
class PoolAxis:
    """One spatial axis of a pooling window: input size, output size, window, stride, dilation, padding."""

    size: int
    out: int
    kernel: int
    stride: int
    dilation: int
    pad_begin: int
    pad_end: int

    def position(self, o: int, k: int) -> int:
        """The input index that tap k of output o reads (negative or >= size: padding)."""
        return o * self.stride + k * self.dilation - self.pad_begin

    def valid_taps(self, o: int) -> list[int]:
        return [k for k in range(self.kernel) if 0 <= self.position(o, k) < self.size]

    def counted_taps(self, o: int, include_pad: bool) -> int:
        """Taps of output o an average divides by: inside the input, plus the explicit padding when
        `include_pad`; never the taps beyond it that ceil_mode adds."""
        low, high = (-self.pad_begin, self.size + self.pad_end) if include_pad else (0, self.size)
        return sum(low <= self.position(o, k) < high for k in range(self.kernel))

    def interior(self) -> tuple[int, int]:
        """The outputs [first, stop) whose every tap lies inside the input (first >= stop: none)."""
        first = max((max(0, -(-(self.pad_begin - k * self.dilation) // self.stride)) for k in range(self.kernel)))
        stop = min((self.size - 1 + self.pad_begin - k * self.dilation) // self.stride + 1
                   for k in range(self.kernel))
        return min(first, self.out), max(min(stop, self.out), 0)


def _value(index: ir.Value | int) -> ir.Value:
    return const(index) if isinstance(index, int) else index


def _reciprocals(axis: PoolAxis, include_pad: bool) -> list[float]:
    counts = [axis.counted_taps(o, include_pad) for o in range(axis.out)]
    return [1.0 / c if c else math.inf for c in counts]


def strided_load(builder: ir.IRBuilder, base: ir.Value, index: ir.Value, width: int, stride: int,
                 valid: Sequence[bool] | None = None, fill: ir.Constant | None = None) -> ir.Value:
    """base[index + stride·j] for j < width: contiguous `width`-lane loads that end exactly at the last element
    needed (none reads past it), and one shuffle picking every stride-th element.

    `valid`: which elements of the span [index, index + stride·(width - 1)] may be read (known now); the
    others read as `fill`'s lanes (masked loads: nothing outside the valid elements is touched)."""
    span = stride * (width - 1) + 1
    starts = list(range(0, span - width, width)) + [span - width] if stride > 1 else [0]
    loads = []
    for start in starts:
        mask = [True] * width if valid is None else valid[start:start + width]
        if all(mask):
            loads.append(ll.load_vector(builder, base, builder.add(index, const(start)), width))
        elif any(mask):
            loads.append(ll.masked_load(builder, base, builder.add(index, const(start)), mask, fill))
        else:
            loads.append(fill)
    if stride == 1:
        return loads[0]
    picks = []
    for lane in range(width):
        position = stride * lane
        part = next(j for j, s in enumerate(starts) if s <= position < s + width)
        picks.append(part * width + position - starts[part])
    while len(loads) & (len(loads) - 1):  # pad to a power of two for pairwise concatenation
        loads.append(ir.Constant(loads[0].type, ir.Undefined))
    while len(loads) > 1:
        size = loads[0].type.count
        loads = [builder.shuffle_vector(a, b, ll.const_vector(I32, range(2 * size)))
                 for a, b in zip(loads[::2], loads[1::2])]
    return builder.shuffle_vector(loads[0], ir.Constant(loads[0].type, ir.Undefined), ll.const_vector(I32, picks))


def _chunks(axis: PoolAxis, width: int) -> tuple[int, list[tuple[int, bool]]]:
    """How an output row is cut into `width`-wide chunks: the number of full chunks from the interior's
    start (every tap inside the row; run-time loops handle them), and the rest as (start, masked) pairs
    known now: an interior chunk ending exactly at the interior's end, and chunks covering the borders,
    whose taps outside the row are masked. Chunks may overlap (recomputing an output is harmless)."""
    first, stop = axis.interior()

    def cover(low: int, high: int) -> list[tuple[int, bool]]:
        return [(start, True) for start in sorted({min(s, axis.out - width) for s in range(low, high, width)})]

    if stop - first < width:
        return 0, cover(0, axis.out)
    full = (stop - first) // width
    tail = [(stop - width, False)] if (stop - first) % width else []
    return full, tail + cover(0, first) + cover(stop, axis.out)


def pool_kernel(module: ir.Module, name: str, target: TargetSpec, dtype: DType, planes: int,
                axes: Sequence[PoolAxis], kind: str, include_pad: bool = False) -> ir.Function:
    """`name(x, out)`: `kind` (max / avg) pooling of x [planes, H, W] into out [planes, OH, OW]."""
    rows, cols = axes
    storage, acc = Arith.storage(dtype), Arith.compute(dtype)
    function, builder, (x, out) = kernel_function(module, name, [storage.element] * 2)
    merge = "max" if kind == "max" else "sum"
    start_value = identity(merge, acc)
    lanes = ll.vector_lanes(target, acc.element)
    width = min(lanes, 1 << (cols.out.bit_length() - 1))
    fill = ir.Constant(ll.vector(storage.element, width), [start_value] * width)
    span = cols.stride * (width - 1) + 1
    # Per output row: the first window row inside the input and how many are (the rest read padding).
    valid_rows = [rows.valid_taps(o) for o in range(rows.out)]
    row_table = ll.global_table(module, f"{name}.rows", I32,
                                [v for taps in valid_rows for v in (taps[0] if taps else 0, len(taps))])
    if kind == "avg":
        row_scale = ll.global_table(module, f"{name}.row_scale", acc.element, _reciprocals(rows, include_pad))
        col_scale = ll.global_table(module, f"{name}.col_scale", acc.element, _reciprocals(cols, include_pad))
    full, fixed = _chunks(cols, width)
    first = cols.interior()[0]

    def windows(b: ir.IRBuilder, combine: Combine, plane: ir.Value, oh: ir.Value,
                chunks: Sequence[tuple[ir.Value | int, bool]], inside: bool) -> list[ir.Value]:
        """The windows of several chunks (start, masked) of one output row, combined together row by row of
        the window: independent chains that the processor overlaps. `inside`: every window row lies
        inside the input (a loop of known count, unrolled), else the table says which do."""
        top = b.sub(b.mul(oh, const(rows.stride)), const(rows.pad_begin))
        if inside:
            first_row = const(0)
        else:
            entry = b.mul(oh, const(2))
            first_row = b.sext(b.load(b.gep(row_table, [entry])), I64)
            count = b.sext(b.load(b.gep(row_table, [b.add(entry, const(1))])), I64)

        def tap(b2: ir.IRBuilder, line: ir.Value, start: ir.Value | int, masked: bool, k: ir.Value | int
                ) -> ir.Value:
            """Tap k of the chunk from output `start`: its inputs for every output of the chunk."""
            valid = None
            if isinstance(start, int) and isinstance(k, int):
                position = cols.position(start, k)
                column = const(position)
                if masked:
                    valid = [0 <= position + j < cols.size for j in range(span)]
            else:
                column = b2.sub(b2.add(b2.mul(_value(start), const(cols.stride)),
                                       b2.mul(_value(k), const(cols.dilation))), const(cols.pad_begin))
            loaded = strided_load(b2, x, b2.add(line, column), width, cols.stride, valid, fill)
            return convert(b2, loaded, storage, acc)

        def window_row(b2: ir.IRBuilder, r: ir.Value, carried: list) -> list:
            ih = b2.add(top, b2.mul(b2.add(first_row, r), const(rows.dilation)))
            line = b2.mul(b2.add(b2.mul(plane, const(rows.size)), ih), const(cols.size))
            if cols.kernel > UNROLLED_TAPS and not any(masked for _, masked in chunks):
                return ll.static_loop(b2, cols.kernel, "kw", lambda b3, k, c: [
                    combine(b3, value, tap(b3, line, start, False, k)) for (start, _), value in zip(chunks, c)],
                    carried)
            totals = []
            for (start, masked), value in zip(chunks, carried):
                values = [tap(b2, line, start, masked, k) for k in range(cols.kernel)]
                while len(values) > 1:  # a tree, so the chain through the rows is one operation a row
                    values = [combine(b2, *values[i:i + 2]) if i + 1 < len(values) else values[i]
                              for i in range(0, len(values), 2)]
                totals.append(combine(b2, value, values[0]))
            return totals

        identities = [acc.splat(start_value, width)] * len(chunks)
        if inside:
            return ll.static_loop(b, rows.kernel, "kh", window_row, identities)
        return ll.counted_loop(b, count, "kh", identities, window_row)

    def finish(b: ir.IRBuilder, total: ir.Value, plane: ir.Value, oh: ir.Value, ow: ir.Value) -> None:
        if kind == "avg":
            scale = ll.splat(b, b.load(b.gep(row_scale, [oh])), width)
            total = b.fmul(b.fmul(total, scale), ll.load_vector(b, col_scale, ow, width))
        index = b.add(b.mul(b.add(b.mul(plane, const(rows.out)), oh), const(cols.out)), ow)
        ll.store_vector(b, convert(b, total, acc, storage), out, index)

    def output_rows(b: ir.IRBuilder, plane: ir.Value, combine: Combine) -> None:
        def output_row(b2: ir.IRBuilder, oh: ir.Value, inside: bool) -> None:
            def group(b3: ir.IRBuilder, chunks: Sequence[tuple[ir.Value | int, bool]]) -> None:
                for (start, _), total in zip(chunks, windows(b3, combine, plane, oh, chunks, inside)):
                    finish(b3, total, plane, oh, _value(start))

            if full >= GROUP:
                def run(b3: ir.IRBuilder, g: ir.Value, c: list) -> list:
                    start = b3.add(const(first), b3.mul(g, const(GROUP * width)))
                    group(b3, [(b3.add(start, const(j * width)), False) for j in range(GROUP)])
                    return c

                ll.static_loop(b2, full // GROUP, "ow", run)
            rest = [(first + j * width, False) for j in range(full - full % GROUP, full)] + fixed
            for j in range(0, len(rest), GROUP):
                group(b2, rest[j:j + GROUP])

        # Output rows whose window rows all lie inside the input unroll them; the others use the table.
        top, bottom = rows.interior()
        top = min(top, bottom)
        for low, high, inside in ((0, top, False), (top, bottom, True), (bottom, rows.out, False)):
            if high > low:
                ll.static_loop(b, high - low, "oh", lambda b2, oh, c, low=low, inside=inside: output_row(
                    b2, b2.add(oh, const(low)), inside) or c)

    def output_plane(b: ir.IRBuilder, plane: ir.Value, carried: list) -> list:
        exact = combiner(merge, acc)
        if not (kind == "max" and acc.is_float):
            output_rows(b, plane, exact)
            return carried
        size = rows.size * cols.size
        base = b.mul(plane, const(size))

        def check(b2: ir.IRBuilder, offset: ir.Value, count: int) -> ir.Value:
            return convert(b2, ll.load_vector(b2, x, b2.add(base, offset), count), storage, acc)

        poisoned = reduce_row(b, size, lanes, check, lambda b2, total, value: ll.intrinsic(
            b2, "llvm.fmuladd", value, acc.splat(0.0, value.type.count), total), lambda w: acc.splat(0.0, w))
        special = b.extract_element(b.fcmp_unordered("uno", poisoned, poisoned), ir.Constant(I32, 0))
        with b.if_else(special) as (slow, fast):
            with slow:
                output_rows(b, plane, exact)
            with fast:
                output_rows(b, plane, combiner(merge, acc, propagate_nan=False))
        return carried

    ll.static_loop(builder, planes, "plane", output_plane)
    builder.ret_void()
    return function
