"""Resampling along axes by compile-time index and weight tables (the `resize` op), as LLVM IR.

The generators take the tables, not the resize attributes: which source index each result index reads
(nearest) or which taps it blends with which weights (linear, cubic), so coordinate modes and rounding
rules live in one place (the lowering computes the tables with the reference's own functions).
- `gather_kernel` picks elements along every axis at once (nearest; exact for every dtype). Result rows
  whose source row equals the previous row's are copied from that row instead of gathered again (an
  upsampled row is built once).
- `blend_axis_kernel` interpolates one axis: rows along a non-contiguous axis are blended as vectors of
  the contiguous remainder; along the contiguous axis, taps are gathered with vector gathers.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from llvmlite import ir

from lowbit.ir.dtypes import DType
from lowbit.kernels import llvm as ll
from lowbit.kernels.llvm import I1, I32, I64, TargetSpec
from lowbit.kernels.reduce import Arith, const, convert, kernel_function, linear_index, nested_loops


def gather(builder: ir.IRBuilder, base: ir.Value, indices: ir.Value) -> ir.Value:
    """base[indices] for a vector of i32 indices (a hardware gather where the target has one)."""
    width, element = indices.type.count, base.type.pointee
    if width == 1:
        return ll.load_vector(builder, base, builder.sext(builder.extract_element(indices, ir.Constant(I32, 0)),
                                                          I64), 1)
    addresses = builder.add(ll.splat(builder, builder.ptrtoint(base, I64), width),
                            builder.mul(builder.sext(indices, ll.vector(I64, width)),
                                        ir.Constant(ll.vector(I64, width), [ll.element_bytes(element)] * width)))
    pointers = builder.inttoptr(addresses, ir.VectorType(element.as_pointer(), width))
    result_type = ll.vector(element, width)
    name = f"llvm.masked.gather.{ll.type_suffix(result_type)}.v{width}p0{ll.type_suffix(element)}"
    function = ll.declare(builder.module, name, result_type, pointers.type, I32, ll.vector(I1, width), result_type)
    every_lane = ir.Constant(ll.vector(I1, width), [1] * width)
    return builder.call(function, [pointers, ir.Constant(I32, ll.element_bytes(element)), every_lane,
                                   ir.Constant(result_type, ir.Undefined)])


def _strides(shape: Sequence[int]) -> list[int]:
    return [math.prod(shape[axis + 1:]) for axis in range(len(shape))]


def gather_kernel(module: ir.Module, name: str, target: TargetSpec, dtype: DType, in_shape: Sequence[int],
                  tables: Sequence[Sequence[int] | None]) -> ir.Function:
    """`name(x, out)`: out[i0, i1, ...] = x[t0[i0], t1[i1], ...] where `tables[a]` lists the source index of
    every result index along axis a (None: the identity). x has `in_shape`."""
    storage = Arith.storage(dtype)
    function, builder, (x, out) = kernel_function(module, name, [storage.element] * 2)
    out_shape = [len(t) if t is not None else n for t, n in zip(tables, in_shape)]
    in_strides, out_strides = _strides(in_shape), _strides(out_shape)
    pointers = [ll.global_table(module, f"{name}.axis{a}", I32, list(t)) if t is not None else None
                for a, t in enumerate(tables)]
    lanes = ll.vector_lanes(target, storage.element)
    length, last = out_shape[-1], pointers[-1]

    def source(b: ir.IRBuilder, axis: int, index: ir.Value) -> ir.Value:
        if pointers[axis] is None:
            return index
        return b.sext(b.load(b.gep(pointers[axis], [index])), I64)

    def fill(b: ir.IRBuilder, src: ir.Value, dst: ir.Value) -> None:
        """The result row at `dst` from the source row at `src` (gathered through the last axis' table)."""
        def chunk(b2: ir.IRBuilder, i: ir.Value, w: int) -> None:
            value = ll.load_vector(b2, x, b2.add(src, i), w) if last is None else \
                gather(b2, b2.gep(x, [src]), ll.load_vector(b2, last, i, w))
            ll.store_vector(b2, value, out, b2.add(dst, i))

        ll.strip_mine(b, const(0), length, lanes, "g", chunk, overlap=True)

    def row(b: ir.IRBuilder, indices: list, carried: list) -> list:
        src = linear_index(b, 0, [source(b, a, i) for a, i in enumerate(indices)], in_strides[:-1])
        dst = linear_index(b, 0, indices, out_strides[:-1])
        rows_axis = len(indices) - 1
        if rows_axis < 0 or pointers[rows_axis] is None:
            fill(b, src, dst)
            return carried
        current = indices[-1]
        first = b.icmp_signed("==", current, const(0))
        previous = source(b, rows_axis, b.select(first, current, b.sub(current, const(1))))
        repeat = b.and_(b.not_(first), b.icmp_signed("==", previous, source(b, rows_axis, current)))
        with b.if_else(repeat) as (again, fresh):
            with again:  # the previous result row is this one: copy it
                prior = b.sub(dst, const(length))
                ll.strip_mine(b, const(0), length, lanes, "c", lambda b2, i, w: ll.store_vector(
                    b2, ll.load_vector(b2, out, b2.add(prior, i), w), out, b2.add(dst, i)), overlap=True)
            with fresh:
                fill(b, src, dst)
        return carried

    nested_loops(builder, out_shape[:-1], "r", row)
    builder.ret_void()
    return function


def blend_axis_kernel(module: ir.Module, name: str, target: TargetSpec, source: DType, result: DType,
                      outer: int, length: int, inner: int, taps: np.ndarray, weights: np.ndarray) -> ir.Function:
    """`name(x, out)`: x [outer, length, inner] of `source` → out [outer, size, inner] of `result` with
    out[o, j, i] = Σ_t weights[j, t] · x[o, taps[j, t], i] (taps, weights: [size, T]), computed in f32
    (f64 when either side is f64)."""
    src, dst = Arith.storage(source), Arith.storage(result)
    compute = Arith.compute(DType.f64 if DType.f64 in (source, result) else DType.f32)
    function, builder, (x, out) = kernel_function(module, name, [src.element, dst.element])
    size, count = taps.shape
    # Tap-major tables: along the contiguous axis a vector of results reads one vector per tap.
    tap_table = ll.global_table(module, f"{name}.taps", I32, [int(v) for v in taps.T.reshape(-1)])
    weight_table = ll.global_table(module, f"{name}.weights", compute.element,
                                   [float(v) for v in weights.T.reshape(-1)])
    lanes = ll.vector_lanes(target, compute.element)

    def blend(b: ir.IRBuilder, load_tap, w: int, weight) -> ir.Value:
        total = compute.splat(0.0, w)
        for t in range(count):
            value = convert(b, load_tap(b, t), src, compute)
            total = ll.intrinsic(b, "llvm.fmuladd", value, weight(b, t), total)
        return convert(b, total, compute, dst)

    if inner > 1:
        def result_row(b: ir.IRBuilder, indices: list, carried: list) -> list:
            o, j = indices
            rows = [b.sext(b.load(b.gep(tap_table, [b.add(j, const(t * size))])), I64) for t in range(count)]
            scalars = [b.load(b.gep(weight_table, [b.add(j, const(t * size))])) for t in range(count)]
            base = b.mul(o, const(length * inner))
            dst_base = b.mul(b.add(b.mul(o, const(size)), j), const(inner))

            def chunk(b2: ir.IRBuilder, i: ir.Value, w: int) -> None:
                def load_tap(b3: ir.IRBuilder, t: int) -> ir.Value:
                    return ll.load_vector(b3, x, b3.add(b3.add(base, b3.mul(rows[t], const(inner))), i), w)

                value = blend(b2, load_tap, w, lambda b3, t: ll.splat(b3, scalars[t], w))
                ll.store_vector(b2, value, out, b2.add(dst_base, i))

            ll.strip_mine(b, const(0), inner, lanes, "i", chunk, overlap=True)
            return carried

        nested_loops(builder, [outer, size], "r", result_row)
    else:
        def result_row(b: ir.IRBuilder, o: ir.Value, carried: list) -> list:
            row = b.gep(x, [b.mul(o, const(length))])

            def chunk(b2: ir.IRBuilder, j: ir.Value, w: int) -> None:
                def load_tap(b3: ir.IRBuilder, t: int) -> ir.Value:
                    return gather(b3, row, ll.load_vector(b3, tap_table, b3.add(j, const(t * size)), w))

                value = blend(b2, load_tap, w,
                              lambda b3, t: ll.load_vector(b3, weight_table, b3.add(j, const(t * size)), w))
                ll.store_vector(b2, value, out, b2.add(b2.mul(o, const(size)), j))

            ll.strip_mine(b, const(0), size, lanes, "j", chunk, overlap=True)
            return carried

        ll.static_loop(builder, outer, "o", result_row)
    builder.ret_void()
    return function
