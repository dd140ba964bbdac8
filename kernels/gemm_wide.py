"""The exact integer GEMM for products the int8 routes do not take: 16-bit operands, accumulators that
can leave int32, weights whose centred values leave int8, run-time zero points.

C[m, n] = Σ_k (A[m, k] − za)·(B[k, n] − zb[n]) with both operands widened to int64 lanes, so nothing
can wrap for any 16-bit (or centred 32-bit) operand and any depth the verifier accepts. Vectors run
along B's rows (contiguous); a block of rows shares each B vector. The accumulators go to the same
epilogues as the int8 GEMM's tiles (`kernels.requantize`), as int64 lanes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from llvmlite import ir

from lowbit.ir.dtypes import DType
from lowbit.kernels import llvm as ll
from lowbit.kernels.llvm import I64

ROWS = 4  # rows of A per block


def _const(value: int) -> ir.Constant:
    return ir.Constant(I64, value)


@dataclass(frozen=True)
class Side:
    """One operand as the wide GEMM reads it: a typed pointer (built in the calling function), its
    element type, the elements between rows, and its zero point: an int64 constant or run-time scalar,
    or for B one per column (`columns`: an i64 table pointer)."""

    pointer: ir.Value
    dtype: DType
    pitch: int
    zero_point: ir.Value
    columns: ir.Value | None = None


def _widen(builder: ir.IRBuilder, value: ir.Value, signed: bool) -> ir.Value:
    kind = ll.vector(I64, value.type.count) if isinstance(value.type, ir.VectorType) else I64
    if value.type == kind:
        return value
    return builder.sext(value, kind) if signed else builder.zext(value, kind)


def emit_wide_gemm(builder: ir.IRBuilder, m: int, n: int, k: int, a: Side, b: Side, epilogue, args: Sequence,
                   lanes: int) -> None:
    """C[m rows, n columns] into `epilogue` (its `emit(builder, accs, row0, col0, valid, args)`), int64
    accumulators of `lanes` lanes."""
    kind = ll.vector(I64, lanes)

    def block(b_: ir.IRBuilder, rows: int, row0: ir.Value, col0: ir.Value, valid: int) -> None:
        zb = ll.splat(b_, b.zero_point, lanes) if b.columns is None else ll.load_vector(b_, b.columns, col0, lanes)
        a_rows = [b_.gep(a.pointer, [b_.mul(b_.add(row0, _const(r)), _const(a.pitch))]) for r in range(rows)]

        def step(b2: ir.IRBuilder, i: ir.Value, accs: list) -> list:
            row = b2.gep(b.pointer, [b2.add(b2.mul(i, _const(b.pitch)), col0)])
            values = ll.load_partial(b2, row, valid, lanes)
            centred = b2.sub(_widen(b2, values, b.dtype.is_signed), zb)
            out = []
            for r in range(rows):
                scalar = b2.sub(_widen(b2, b2.load(b2.gep(a_rows[r], [i])), a.dtype.is_signed), a.zero_point)
                out.append(b2.add(accs[r], b2.mul(ll.splat(b2, scalar, lanes), centred)))
            return out

        accs = ll.counted_loop(b_, _const(k), "k", [ir.Constant(kind, None)] * rows, step)
        epilogue.emit(b_, [[acc] for acc in accs], row0, col0, valid, args)

    def columns(b_: ir.IRBuilder, rows: int, row0: ir.Value) -> None:
        full, rest = divmod(n, lanes)
        if full:
            ll.static_loop(b_, full, "n", lambda b2, j, c: block(b2, rows, row0, b2.mul(j, _const(lanes)), lanes) or c)
        if rest:
            block(b_, rows, row0, _const(full * lanes), rest)

    blocks, rest = divmod(m, ROWS)
    if blocks:
        ll.static_loop(builder, blocks, "m", lambda b_, i, c: columns(b_, ROWS, b_.mul(i, _const(ROWS))) or c)
    if rest:
        ll.static_loop(builder, rest, "r", lambda b_, i, c: columns(b_, 1, b_.add(i, _const(blocks * ROWS))) or c)
