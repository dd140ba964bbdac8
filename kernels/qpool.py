"""Integer average pooling (`qavg_pool2d`, `qglobal_avg_pool`) as LLVM IR, bit-exact with the reference.

Both compute S = Σ (x − zx) over a window's taps inside the input (padding holds zx, so it adds 0) and
the mean rounded half toward +infinity, zx + floor((2·S + n) / (2n)), in int64 with a flooring division
(n: the taps avg_pool2d divides by). Max pooling needs nothing new: `kernels.pool` is exact on integers.
"""
from __future__ import annotations

from typing import Sequence

from llvmlite import ir

from lowbit.ir.dtypes import DType
from lowbit.kernels import llvm as ll
from lowbit.kernels.llvm import I32, I64, TargetSpec
from lowbit.kernels.pool import PoolAxis
from lowbit.kernels.reduce import kernel_function, nested_loops, reduce_row


def _const(value: int) -> ir.Constant:
    return ir.Constant(I64, value)


def floor_divide(builder: ir.IRBuilder, a: ir.Value, d: ir.Value) -> ir.Value:
    """floor(a / d) for int64 a and d > 0 (sdiv truncates toward zero; step down when the remainder is
    negative)."""
    q = builder.sdiv(a, d)
    negative = builder.icmp_signed("<", builder.sub(a, builder.mul(q, d)), _const(0))
    return builder.sub(q, builder.zext(negative, I64))


def rounded_mean(builder: ir.IRBuilder, centred: ir.Value, count: ir.Value, zero_point: ir.Value) -> ir.Value:
    """zero_point + floor((2·centred + count) / (2·count)): the mean rounded half toward +infinity."""
    twice = builder.add(builder.mul(centred, _const(2)), count)
    return builder.add(zero_point, floor_divide(builder, twice, builder.mul(count, _const(2))))


def _zero_point(builder: ir.IRBuilder, table: ir.Value | None, zero_points: Sequence[int], plane: ir.Value,
                channels: int) -> ir.Value:
    """The zero point of `plane`'s channel (planes run over [N, C])."""
    if table is None:
        return _const(zero_points[0])
    return builder.load(builder.gep(table, [builder.srem(plane, _const(channels))]))


def _table(module: ir.Module, name: str, zero_points: Sequence[int]) -> ir.Value | None:
    return None if len(set(zero_points)) == 1 else ll.global_table(module, name, I64, list(zero_points))


def global_average_kernel(module: ir.Module, name: str, target: TargetSpec, dtype: DType, planes: int,
                          channels: int, size: int, zero_points: Sequence[int]) -> ir.Function:
    """`name(x, out)`: x [planes, size] → out [planes], zero points one or one per channel."""
    element = ll.element_type(dtype)
    # the plane's sum needs int64 only when `size` values of the type can leave int32
    largest = max(-int(dtype.min), int(dtype.max)) * size
    acc = I32 if largest < (1 << 31) else I64
    fn, builder, (x, out) = kernel_function(module, name, [element, element])
    table = _table(module, f"{name}.zp", zero_points)
    lanes = ll.vector_lanes(target, acc)

    def load(b: ir.IRBuilder, base: ir.Value, offset: ir.Value, width: int) -> ir.Value:
        values = ll.load_vector(b, x, b.add(base, offset), width)
        kind = ll.vector(acc, width)
        return b.sext(values, kind) if dtype.is_signed else b.zext(values, kind)

    def plane_body(b: ir.IRBuilder, plane: ir.Value, carried: list) -> list:
        base = b.mul(plane, _const(size))
        total = reduce_row(b, size, lanes, lambda b2, offset, width: load(b2, base, offset, width),
                           lambda b2, u, v: b2.add(u, v), lambda width: ir.Constant(ll.vector(acc, width), None))
        total = b.extract_element(total, ir.Constant(I32, 0))
        total = b.sext(total, I64) if acc is I32 else total
        zero_point = _zero_point(b, table, zero_points, plane, channels)
        centred = b.sub(total, b.mul(zero_point, _const(size)))
        b.store(b.trunc(rounded_mean(b, centred, _const(size), zero_point), element), b.gep(out, [plane]))
        return carried

    ll.static_loop(builder, planes, "plane", plane_body)
    builder.ret_void()
    return fn


def average_pool_kernel(module: ir.Module, name: str, dtype: DType, planes: int, channels: int,
                        axes: Sequence[PoolAxis], include_pad: bool, zero_points: Sequence[int]) -> ir.Function:
    """`name(x, out)`: avg_pool2d's windows of x [planes, H, W] on the integers (qavg_pool2d's rounding).

    Per output row and column, compile-time tables give the first valid tap, how many lie inside the
    input and how many the divisor counts; the window's sum runs over the valid taps only."""
    rows, cols = axes
    element = ll.element_type(dtype)
    fn, builder, (x, out) = kernel_function(module, name, [element, element])
    table = _table(module, f"{name}.zp", zero_points)

    def axis_table(axis: PoolAxis, suffix: str) -> ir.Value:
        entries = []
        for o in range(axis.out):
            taps = axis.valid_taps(o)
            entries += [taps[0] if taps else 0, len(taps), axis.counted_taps(o, include_pad)]
        return ll.global_table(module, f"{name}.{suffix}", I64, entries)

    row_table, col_table = axis_table(rows, "rows"), axis_table(cols, "cols")

    def entry(b: ir.IRBuilder, table_: ir.Value, o: ir.Value, field: int) -> ir.Value:
        return b.load(b.gep(table_, [b.add(b.mul(o, _const(3)), _const(field))]))

    def output(b: ir.IRBuilder, plane: ir.Value, oh: ir.Value, ow: ir.Value) -> None:
        first_row, row_count, row_counted = (entry(b, row_table, oh, f) for f in range(3))
        first_col, col_count, col_counted = (entry(b, col_table, ow, f) for f in range(3))
        top = b.sub(b.mul(oh, _const(rows.stride)), _const(rows.pad_begin))
        left = b.sub(b.mul(ow, _const(cols.stride)), _const(cols.pad_begin))

        def window_row(b2: ir.IRBuilder, r: ir.Value, carried: list) -> list:
            ih = b2.add(top, b2.mul(b2.add(first_row, r), _const(rows.dilation)))
            line = b2.mul(b2.add(b2.mul(plane, _const(rows.size)), ih), _const(cols.size))

            def tap(b3: ir.IRBuilder, c: ir.Value, inner: list) -> list:
                iw = b3.add(left, b3.mul(b3.add(first_col, c), _const(cols.dilation)))
                value = b3.load(b3.gep(x, [b3.add(line, iw)]))
                wide = b3.sext(value, I64) if dtype.is_signed else b3.zext(value, I64)
                return [b3.add(inner[0], wide)]

            return ll.counted_loop(b2, col_count, "kw", carried, tap)

        total, = ll.counted_loop(b, row_count, "kh", [_const(0)], window_row)
        zero_point = _zero_point(b, table, zero_points, plane, channels)
        centred = b.sub(total, b.mul(zero_point, b.mul(row_count, col_count)))
        y = rounded_mean(b, centred, b.mul(row_counted, col_counted), zero_point)
        at = b.add(b.mul(b.add(b.mul(plane, _const(rows.out)), oh), _const(cols.out)), ow)
        b.store(b.trunc(y, element), b.gep(out, [at]))

    nested_loops(builder, [planes, rows.out, cols.out], "o", lambda b, indices, _: output(b, *indices) or [])
    builder.ret_void()
    return fn
