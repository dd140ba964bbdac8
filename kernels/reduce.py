"""Reductions (sum, mean, max, min, prod over any sorted axes) and argmax / argmin, as LLVM IR.

Shared with the pooling, normalisation and resize generators: `Arith` (what type a kernel computes in
and how values convert and combine), `kernel_function`, `nested_loops` and `reduce_row`.

Every reduction accumulates in registers, output by output, never in a memory buffer:
- the axes are canonicalised first (size-1 axes dropped, neighbours of the same kind merged);
- when the innermost axis is kept, vectors run along it and every reduced index adds one vector load
  (strided rows, each cache line read once);
- when it is reduced, each contiguous row is reduced with `reduce_row` (several vector accumulators,
  then a tree across lanes) and rows of the outer reduced axes are combined.
Float sums therefore add in a different order than numpy's pairwise sum; the difference is a few ulps
of the sum of magnitudes. Float max / min propagate NaN, integer sums and products wrap, integer means
divide the int64 sum truncating toward zero, f16 accumulates in f32 (the reference's rules).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from llvmlite import ir

from lowbit.ir.dtypes import DType
from lowbit.kernels import llvm as ll
from lowbit.kernels.llvm import F32, I8, I32, I64, VOID, TargetSpec

Combine = Callable[[ir.IRBuilder, ir.Value, ir.Value], ir.Value]
Load = Callable[[ir.IRBuilder, ir.Value, int], ir.Value]


@dataclass(frozen=True)
class Arith:
    """An element type as arithmetic sees it: its LLVM type, and whether it is float / signed."""

    element: ir.Type
    is_float: bool
    signed: bool

    @staticmethod
    def storage(dtype: DType) -> "Arith":
        return Arith(ll.element_type(dtype), dtype.is_float, dtype.is_signed)

    @staticmethod
    def compute(dtype: DType) -> "Arith":
        """The type arithmetic on `dtype` runs in: f16 widens to f32 (as in the reference)."""
        return Arith(F32, True, True) if dtype is DType.f16 else Arith.storage(dtype)

    @property
    def bytes(self) -> int:
        return ll.element_bytes(self.element)

    def splat(self, value: float | int, width: int) -> ir.Constant:
        """`value` in every lane of a `width`-lane vector constant."""
        value = float(value) if self.is_float else int(value)
        return ir.Constant(ll.vector(self.element, width), [value] * width)

    def lowest(self) -> float | int:
        if self.is_float:
            return -math.inf
        return -(1 << (self.element.width - 1)) if self.signed else 0

    def highest(self) -> float | int:
        if self.is_float:
            return math.inf
        return (1 << (self.element.width - (1 if self.signed else 0))) - 1


def convert(builder: ir.IRBuilder, value: ir.Value, source: Arith, target: Arith) -> ir.Value:
    """`value` (a vector of `source`) as a vector of `target` (extending, truncating or converting)."""
    if source.element == target.element:
        return value
    result_type = ll.vector(target.element, value.type.count)
    if source.is_float and target.is_float:
        grow = target.bytes > source.bytes
        return builder.fpext(value, result_type) if grow else builder.fptrunc(value, result_type)
    if not source.is_float and not target.is_float:
        if target.bytes < source.bytes:
            return builder.trunc(value, result_type)
        return builder.sext(value, result_type) if source.signed else builder.zext(value, result_type)
    if target.is_float:
        return builder.sitofp(value, result_type) if source.signed else builder.uitofp(value, result_type)
    return builder.fptosi(value, result_type) if target.signed else builder.fptoui(value, result_type)


def _pick(builder: ir.IRBuilder, take_first: ir.Value, first: ir.Value, second: ir.Value) -> ir.Value:
    return builder.select(take_first, first, second)


def combiner(kind: str, arith: Arith, propagate_nan: bool = True) -> Combine:
    """How two vectors merge for `kind` in sum / prod / max / min. Float max and min propagate NaN unless
    `propagate_nan` is off (then they are one instruction, and a NaN operand may be dropped)."""
    if kind == "sum":
        return (lambda b, x, y: b.fadd(x, y)) if arith.is_float else (lambda b, x, y: b.add(x, y))
    if kind == "prod":
        return (lambda b, x, y: b.fmul(x, y)) if arith.is_float else (lambda b, x, y: b.mul(x, y))
    order = ">" if kind == "max" else "<"
    if arith.is_float and not propagate_nan:
        return lambda b, x, y: _pick(b, b.fcmp_ordered(order, x, y), x, y)
    if arith.is_float:
        # x wins when it is strictly better or NaN; so NaN in either operand survives.
        return lambda b, x, y: _pick(b, b.or_(b.fcmp_ordered(order, x, y), b.fcmp_unordered("uno", x, x)), x, y)
    compare = "icmp_signed" if arith.signed else "icmp_unsigned"
    return lambda b, x, y: _pick(b, getattr(b, compare)(order, x, y), x, y)


def identity(kind: str, arith: Arith) -> float | int:
    return {"sum": 0, "prod": 1, "max": arith.lowest(), "min": arith.highest()}[kind]


def kernel_function(module: ir.Module, name: str, elements: Sequence[ir.Type]
                    ) -> tuple[ir.Function, ir.IRBuilder, list[ir.Value]]:
    """An internal kernel `name(i8*, ...)` with one buffer per entry of `elements`; returns it, a builder at
    its entry and the buffers as pointers to their element types."""
    byte_pointer = I8.as_pointer()
    function = ir.Function(module, ir.FunctionType(VOID, [byte_pointer] * len(elements)), name)
    function.linkage = "internal"
    for argument in function.args:
        argument.add_attribute("noalias")
    builder = ir.IRBuilder(function.append_basic_block("entry"))
    pointers = [builder.bitcast(arg, element.as_pointer()) for arg, element in zip(function.args, elements)]
    return function, builder, pointers


def const(value: int) -> ir.Constant:
    return ir.Constant(I64, value)


def linear_index(builder: ir.IRBuilder, base: ir.Value | int, indices: Sequence[ir.Value],
                 strides: Sequence[int]) -> ir.Value:
    """base + Σ index·stride as an i64 value."""
    total = base if isinstance(base, ir.Value) else const(base)
    for index, stride in zip(indices, strides):
        if stride:
            total = builder.add(total, builder.mul(index, const(stride)))
    return total


def nested_loops(builder: ir.IRBuilder, counts: Sequence[int], name: str, body,
                 carried: Sequence[ir.Value] = ()) -> list[ir.Value]:
    """`for index in ndindex(counts): carried = body(builder, [i0, i1, ...], carried)`; returns carried."""
    def level(b: ir.IRBuilder, depth: int, indices: list, values: list) -> list:
        if depth == len(counts):
            return list(body(b, indices, values))
        return ll.static_loop(b, counts[depth], f"{name}{depth}",
                              lambda b2, i, c: level(b2, depth + 1, indices + [i], c), values)

    return level(builder, 0, [], list(carried))


def reduce_row(builder: ir.IRBuilder, count: int, lanes: int, load: Load, combine: Combine,
               start: Callable[[int], ir.Value], unroll: int = 4) -> ir.Value:
    """Combine `load(builder, offset, width)` over offsets [0, count) into a one-lane vector.

    `start(width)` is the identity vector. `unroll` independent accumulators hide the combine's latency;
    the remainder after full vectors is loaded in halving power-of-two widths.
    """
    step = lanes * unroll
    blocks = count // step
    accumulators = [start(lanes)] * unroll
    if blocks:
        def block(b: ir.IRBuilder, i: ir.Value, accs: list) -> list:
            base = b.mul(i, const(step))
            return [combine(b, acc, load(b, b.add(base, const(j * lanes)), lanes)) for j, acc in enumerate(accs)]

        accumulators = ll.static_loop(builder, blocks, "row", block, accumulators)
    offset, used = blocks * step, unroll if blocks else 0
    for j in range((count - offset) // lanes):
        accumulators[j] = combine(builder, accumulators[j], load(builder, const(offset), lanes))
        offset += lanes
        used = max(used, j + 1)
    result = start(1)
    if used:
        live = accumulators[:used]
        while len(live) > 1:  # pairwise, for the same reason numpy sums pairwise
            live = [combine(builder, live[k], live[k + 1]) if k + 1 < len(live) else live[k]
                    for k in range(0, len(live), 2)]
        result = ll.tree_reduce(builder, live[0], combine)
    width = lanes
    while offset < count:
        width = min(width, 1 << ((count - offset).bit_length() - 1))
        result = combine(builder, result, ll.tree_reduce(builder, load(builder, const(offset), width), combine))
        offset += width
    return result


PAIRWISE_BLOCK = 128  # numpy's PW_BLOCKSIZE
PAIRWISE_LANES = 8  # numpy's unroll: eight running sums per block


def pairwise_sum(builder: ir.IRBuilder, count: int, load: Load, zero: Callable[[int], ir.Value]) -> ir.Value:
    """Σ of the floats `load(builder, offset, width)` over offsets [0, count) in numpy's order, as a one-lane
    vector: np.sum along a contiguous axis (`pairwise_sum` in numpy/_core/src/umath/loops_utils.h.src), so
    the result is bit-identical to the reference's.

    Below 8 values: one running sum from 0. Up to 128: eight running sums (one 8-lane vector) over the
    multiples of 8, combined as ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7)), then the rest one by one.
    Longer: the two halves (the first a multiple of 8 long) summed recursively and added. The reduction's
    initial 0 is added last, as numpy's reduce loop does.
    """
    def add(a: ir.Value, b: ir.Value) -> ir.Value:
        return builder.fadd(a, b)

    def parts(starts: list[int], n: int) -> list[ir.Value]:
        """The sums of the equally long pieces at `starts`; blocks of the same length share one loop, so
        their running sums are independent chains the CPU overlaps (the order within each is numpy's)."""
        if n < PAIRWISE_LANES:
            totals = []
            for start in starts:
                total = zero(1)
                for i in range(start, start + n):
                    total = add(total, load(builder, const(i), 1))
                totals.append(total)
            return totals
        if n <= PAIRWISE_BLOCK:
            blocks = n // PAIRWISE_LANES
            sums = [load(builder, const(start), PAIRWISE_LANES) for start in starts]
            if blocks > 1:
                def step(b: ir.IRBuilder, i: ir.Value, carried: list) -> list:
                    offset = b.mul(i, const(PAIRWISE_LANES))
                    return [b.fadd(c, load(b, b.add(const(start + PAIRWISE_LANES), offset), PAIRWISE_LANES))
                            for start, c in zip(starts, carried)]

                sums = ll.static_loop(builder, blocks - 1, "pairwise", step, sums)
            totals = []
            for start, vector in zip(starts, sums):
                while vector.type.count > 1:  # neighbours first: lanes (0, 1), (2, 3), ... then their sums
                    undefined = ir.Constant(vector.type, ir.Undefined)
                    half = vector.type.count // 2
                    even = builder.shuffle_vector(vector, undefined, ll.const_vector(I32, range(0, 2 * half, 2)))
                    odd = builder.shuffle_vector(vector, undefined, ll.const_vector(I32, range(1, 2 * half, 2)))
                    vector = add(even, odd)
                for i in range(start + blocks * PAIRWISE_LANES, start + n):
                    vector = add(vector, load(builder, const(i), 1))
                totals.append(vector)
            return totals
        half = n // 2
        half -= half % PAIRWISE_LANES
        if half == n - half:  # both halves alike: one group twice as large
            sums = parts([s + h for s in starts for h in (0, half)], half)
            return [add(sums[2 * k], sums[2 * k + 1]) for k in range(len(starts))]
        firsts, seconds = parts(starts, half), parts([s + half for s in starts], n - half)
        return [add(a, b) for a, b in zip(firsts, seconds)]

    return add(zero(1), parts([0], count)[0])


# -- reduce_* ------------------------------------------------------------------------------------------
def canonical_axes(shape: Sequence[int], axes: Sequence[int]) -> list[tuple[int, bool]]:
    """(size, reduced) per axis with size-1 axes dropped and neighbours of the same kind merged."""
    dims: list[tuple[int, bool]] = []
    for axis, size in enumerate(shape):
        if size == 1:
            continue
        reduced = axis in axes
        if dims and dims[-1][1] == reduced:
            dims[-1] = (dims[-1][0] * size, reduced)
        else:
            dims.append((size, reduced))
    return dims


def _strides(sizes: Sequence[int]) -> list[int]:
    strides, step = [], 1
    for size in reversed(sizes):
        strides.append(step)
        step *= size
    return strides[::-1]


def accumulator(dtype: DType, kind: str) -> Arith:
    """Where a reduction accumulates: f32 for f16, int64 for integer means, the element type otherwise."""
    if kind == "mean" and dtype.is_integer:
        return Arith(I64, False, True)
    return Arith.compute(dtype)


def reduce_kernel(module: ir.Module, name: str, target: TargetSpec, dtype: DType, shape: Sequence[int],
                  axes: Sequence[int], kind: str) -> ir.Function:
    """`name(x, out)`: `kind` (sum / mean / max / min / prod) of x over `axes` (sorted, non-negative);
    the result is laid out as with keepdims (size-1 axes do not change the bytes)."""
    storage, acc = Arith.storage(dtype), accumulator(dtype, kind)  # bool: unsigned bytes
    function, builder, (x, out) = kernel_function(module, name, [storage.element, storage.element])
    dims = canonical_axes(shape, axes)
    strides = _strides([size for size, _ in dims])
    kept = [(size, stride) for (size, reduced), stride in zip(dims, strides) if not reduced]
    reduced = [(size, stride) for (size, reduced), stride in zip(dims, strides) if reduced]
    count = math.prod(size for size, _ in reduced)
    merge = "sum" if kind == "mean" else kind
    combine = combiner(merge, acc)

    def start(width: int) -> ir.Constant:
        return acc.splat(identity(merge, acc), width)

    def finish(b: ir.IRBuilder, value: ir.Value) -> ir.Value:
        if kind == "mean" and acc.is_float:
            value = b.fdiv(value, acc.splat(count, value.type.count))
        elif kind == "mean":  # truncating division of the int64 sum (onnxruntime's rule)
            value = b.sdiv(value, acc.splat(max(count, 1), value.type.count))
        return convert(b, value, acc, storage)

    def load(b: ir.IRBuilder, index: ir.Value, width: int) -> ir.Value:
        return convert(b, ll.load_vector(b, x, index, width), storage, acc)

    inner_kept = bool(dims) and not dims[-1][1]
    inner_size = (kept if inner_kept else reduced).pop()[0] if dims else 1
    out_strides = _strides([size for size, _ in kept] + ([inner_size] if inner_kept else []))
    reduced_counts, reduced_strides = [size for size, _ in reduced], [stride for _, stride in reduced]
    lanes = ll.vector_lanes(target, acc.element)

    def output(b: ir.IRBuilder, indices: list, _: list) -> list:
        """One result (a vector of them when the innermost axis is kept), accumulated in registers."""
        x_base = linear_index(b, 0, indices, [stride for _, stride in kept])
        out_base = linear_index(b, 0, indices, out_strides)
        if inner_kept:
            def chunk(b2: ir.IRBuilder, k: ir.Value, width: int) -> None:
                def add(b3: ir.IRBuilder, r: list, carried: list) -> list:
                    index = b3.add(linear_index(b3, x_base, r, reduced_strides), k)
                    return [combine(b3, carried[0], load(b3, index, width))]

                total, = nested_loops(b2, reduced_counts, "r", add, [start(width)])
                ll.store_vector(b2, finish(b2, total), out, b2.add(out_base, k))

            ll.strip_mine(b, const(0), inner_size, lanes, "k", chunk, overlap=True)
            return []

        def add_row(b2: ir.IRBuilder, r: list, carried: list) -> list:
            row = linear_index(b2, x_base, r, reduced_strides)

            def load_row(b3: ir.IRBuilder, offset: ir.Value, width: int) -> ir.Value:
                return load(b3, b3.add(row, offset), width)

            return [combine(b2, carried[0], reduce_row(b2, inner_size, lanes, load_row, combine, start))]

        total, = nested_loops(b, reduced_counts, "r", add_row, [start(1)])
        ll.store_vector(b, finish(b, total), out, out_base)
        return []

    nested_loops(builder, [size for size, _ in kept], "o", output)
    builder.ret_void()
    return function


# -- argmax / argmin -----------------------------------------------------------------------------------
def _orders(arith: Arith, largest: bool) -> tuple[Combine, Combine]:
    """(strictly better, equal) as lane masks; NaN counts as better than every number (numpy's rule)."""
    order = ">" if largest else "<"
    if arith.is_float:
        def better(b, x, y):
            nan_over_number = b.and_(b.fcmp_unordered("uno", x, x), b.fcmp_ordered("ord", y, y))
            return b.or_(b.fcmp_ordered(order, x, y), nan_over_number)

        def equal(b, x, y):
            both_nan = b.and_(b.fcmp_unordered("uno", x, x), b.fcmp_unordered("uno", y, y))
            return b.or_(b.fcmp_ordered("==", x, y), both_nan)

        return better, equal
    compare = "icmp_signed" if arith.signed else "icmp_unsigned"
    return (lambda b, x, y: getattr(b, compare)(order, x, y)), (lambda b, x, y: b.icmp_signed("==", x, y))


def arg_reduce_kernel(module: ir.Module, name: str, target: TargetSpec, dtype: DType, shape: Sequence[int],
                      axis: int, largest: bool, last: bool) -> ir.Function:
    """`name(x, out)`: the int64 index of the largest (or smallest) element along `axis`; ties pick the
    first index, or the last with `last`."""
    arith = Arith.storage(dtype)
    function, builder, (x, out) = kernel_function(module, name, [arith.element, I64])
    outer, length, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])
    better, equal = _orders(arith, largest)
    lanes = ll.vector_lanes(target, arith.element if arith.bytes >= 4 else I32)

    def update(b: ir.IRBuilder, value: ir.Value, index: ir.Value, best: ir.Value, where: ir.Value) -> tuple:
        """Scanning forward: the new value replaces the best when better (or equal, for the last index)."""
        take = better(b, value, best)
        if last:
            take = b.or_(take, equal(b, value, best))
        return b.select(take, value, best), b.select(take, index, where)

    def store(b: ir.IRBuilder, where: ir.Value, index: ir.Value) -> None:
        ll.store_vector(b, b.sext(where, ll.vector(I64, where.type.count)), out, index)

    if inner > 1:
        def column(b: ir.IRBuilder, o: ir.Value, i: ir.Value, width: int) -> None:
            base = b.add(b.mul(o, const(length * inner)), i)
            best = ll.load_vector(b, x, base, width)

            def step(b2: ir.IRBuilder, a: ir.Value, carried: list) -> list:
                a = b2.add(a, const(1))
                value = ll.load_vector(b2, x, b2.add(base, b2.mul(a, const(inner))), width)
                return list(update(b2, value, ll.splat(b2, b2.trunc(a, I32), width), *carried))

            _, where = ll.static_loop(b, length - 1, "a", step, [best, ir.Constant(ll.vector(I32, width), [0] * width)])
            store(b, where, b.add(b.mul(o, const(inner)), i))

        ll.static_loop(builder, outer, "o", lambda b, o, c: ll.strip_mine(
            b, const(0), inner, lanes, "i", lambda b2, i, width: column(b2, o, i, width), overlap=True) or c)
    else:
        def row(b: ir.IRBuilder, o: ir.Value, carried: list) -> list:
            base = b.mul(o, const(length))
            vectors = length // lanes if length >= 2 * lanes else 0
            if vectors:
                lane_ids = ll.const_vector(I32, range(lanes))
                best = ll.load_vector(b, x, base, lanes)

                def step(b2: ir.IRBuilder, v: ir.Value, c: list) -> list:
                    v = b2.add(v, const(1))
                    offset = b2.mul(v, const(lanes))
                    value = ll.load_vector(b2, x, b2.add(base, offset), lanes)
                    ids = b2.add(ll.splat(b2, b2.trunc(offset, I32), lanes), lane_ids)
                    return list(update(b2, value, ids, *c))

                best, where = ll.static_loop(b, vectors - 1, "v", step, [best, lane_ids])
                best, where = _lane_winner(b, best, where, better, equal, last)
            else:
                best, where = ll.load_vector(b, x, base, 1), ir.Constant(ll.vector(I32, 1), [0])
            done = max(vectors * lanes, 1)

            def tail(b2: ir.IRBuilder, j: ir.Value, c: list) -> list:
                index = b2.add(j, const(done))
                value = ll.load_vector(b2, x, b2.add(base, index), 1)
                return list(update(b2, value, ll.splat(b2, b2.trunc(index, I32), 1), *c))

            if length > done:
                best, where = ll.static_loop(b, length - done, "t", tail, [best, where])
            store(b, where, o)
            return carried

        ll.static_loop(builder, outer, "o", row)
    builder.ret_void()
    return function


def _lane_winner(builder: ir.IRBuilder, best: ir.Value, where: ir.Value, better: Combine, equal: Combine,
                 last: bool) -> tuple[ir.Value, ir.Value]:
    """The winning lane of (best value, its index) vectors: the better value, ties to the smaller index (the
    larger with `last`); one-lane vectors."""
    while best.type.count > 1:
        half = best.type.count // 2
        lo, hi = (ll.const_vector(I32, range(half)), ll.const_vector(I32, range(half, 2 * half)))
        undefined_best, undefined_where = ir.Constant(best.type, ir.Undefined), ir.Constant(where.type, ir.Undefined)
        best_a, best_b = (builder.shuffle_vector(best, undefined_best, m) for m in (lo, hi))
        where_a, where_b = (builder.shuffle_vector(where, undefined_where, m) for m in (lo, hi))
        tie_break = builder.icmp_signed(">" if last else "<", where_b, where_a)
        take_b = builder.or_(better(builder, best_b, best_a), builder.and_(equal(builder, best_b, best_a), tie_break))
        best, where = builder.select(take_b, best_b, best_a), builder.select(take_b, where_b, where_a)
    return best, where
