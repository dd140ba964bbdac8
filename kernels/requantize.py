"""Requantization and the integer ops' element-wise kernels as LLVM IR, bit-exact with docs/quantization.md.

The one rounding: integer terms (int32 accumulators, centred 8/16/32-bit values) are sign-extended to
int64, multiplied by 31-bit multipliers and summed, `2^(s-1)` is added in 64 bits, the sum is shifted
right arithmetically by `s`, the zero point is added and the result clamped to [qmin, qmax] in int64,
then narrowed to the result's storage type. Multipliers, shifts and zero points are compile-time
constants: one value for all (folded into the code) or one per channel (a read-only table in the
module, read as vectors along the lanes or broadcast per row).

Two consumers:
* GEMM epilogues (`ProductEpilogue`, `FloatEpilogue`) that a register tile of `kernels.gemm_int8` runs
  on its accumulators: exact int32 corrections first (compile-time offsets, run-time row and column
  sums of zero-point terms), then the requantization (or dynamic quantization's float scaling), stored
  straight to the result.
* `map_kernel`: a broadcasting element-wise loop over buffers and compile-time tables (the inner axis in
  vectors, power-of-two pieces at its end) with one expression per op: `quantize`, `dequantize`,
  `requantize`, `qadd`, `qmul` and each input of `qconcat`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from llvmlite import ir

from lowbit.ir.dtypes import DType
from lowbit.kernels import llvm as ll
from lowbit.kernels.llvm import F32, I32, I64, TargetSpec
from lowbit.kernels.movement import collapse, loop_nest, new_kernel

TABLE_PADDING = 64  # zeros after every channel table: vector loads at the last channels stay inside it
FLOAT_RANGE = float(1 << 40)  # quantize clamps x / scale to ±2^40 before converting (as the reference)


def _splat(element: ir.Type, value, width: int) -> ir.Constant:
    return ir.Constant(ll.vector(element, width), [value] * width)


def _widen(builder: ir.IRBuilder, value: ir.Value, signed: bool, element: ir.Type = I64) -> ir.Value:
    """An integer vector extended to `element` lanes by its own sign."""
    kind = ll.vector(element, value.type.count)
    if value.type.element.width == element.width:
        return value
    return builder.sext(value, kind) if signed else builder.zext(value, kind)


def clamp(builder: ir.IRBuilder, value: ir.Value, low: int, high: int) -> ir.Value:
    width = value.type.count
    low_v, high_v = _splat(value.type.element, low, width), _splat(value.type.element, high, width)
    value = builder.select(builder.icmp_signed("<", value, low_v), low_v, value)
    return builder.select(builder.icmp_signed(">", value, high_v), high_v, value)


# -- per-channel constants --------------------------------------------------------------------------
class Table:
    """Compile-time values by channel: a constant when they are all equal, else a read-only table."""

    def __init__(self, module: ir.Module, name: str, values: Sequence, element: ir.Type = I64) -> None:
        self.values, self.element = tuple(values), element
        self.uniform = len(set(self.values)) == 1
        self.pointer = None if self.uniform else ll.global_table(
            module, name, element, list(self.values) + [0] * TABLE_PADDING)

    def lanes(self, builder: ir.IRBuilder, index: ir.Value, width: int) -> ir.Value:
        """values[index + i] for i < width."""
        if self.uniform:
            return _splat(self.element, self.values[0], width)
        return ll.load_vector(builder, self.pointer, index, width)

    def splat(self, builder: ir.IRBuilder, index: ir.Value, width: int) -> ir.Value:
        """values[index] in every lane."""
        if self.uniform:
            return _splat(self.element, self.values[0], width)
        return ll.splat(builder, builder.load(builder.gep(self.pointer, [index])), width)


def halves(shifts: Sequence[int]) -> tuple[int, ...]:
    """The rounding terms 2^(s-1) (0 for s = 0)."""
    return tuple((1 << s) >> 1 for s in shifts)


@dataclass(frozen=True)
class Requant:
    """The result side of a requantizing op: multipliers and shifts (one, or one per channel), the result's
    zero point, clamp and storage type, and the residual term's multipliers (sharing the shifts)."""

    multipliers: tuple[int, ...]
    shifts: tuple[int, ...]
    zero_point: int
    qmin: int
    qmax: int
    dtype: DType
    residual_multipliers: tuple[int, ...] = ()

    def tables(self, module: ir.Module, name: str) -> "RequantTables":
        # multipliers as int32 (they are below 2^31): int64 products of two sign-extended int32 values are
        # one instruction on x86 (vpmuldq) and AArch64 (smull)
        return RequantTables(self, Table(module, f"{name}.m", self.multipliers, I32),
                             Table(module, f"{name}.s", self.shifts), Table(module, f"{name}.h", halves(self.shifts)),
                             Table(module, f"{name}.mr", self.residual_multipliers, I32)
                             if self.residual_multipliers else None)


@dataclass(frozen=True)
class RequantTables:
    requant: Requant
    multipliers: Table
    shifts: Table
    halves: Table
    residual: Table | None


def finish(builder: ir.IRBuilder, requant: Requant, total: ir.Value, shift: ir.Value, half: ir.Value) -> ir.Value:
    """clamp(zp + ((total + half) >> shift)) in int64 (an arithmetic shift: the rounding is half toward
    +infinity), narrowed to the result's storage type."""
    width = total.type.count
    shifted = builder.ashr(builder.add(total, half), shift)
    value = clamp(builder, builder.add(shifted, _splat(I64, requant.zero_point, width)), requant.qmin,
                  requant.qmax)
    return builder.trunc(value, ll.vector(ll.element_type(requant.dtype), width))


# -- GEMM epilogues -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Corrections:
    """Exact int32 terms a tile adds to its raw accumulators before anything else (all modulo 2^32: the
    true sum fits int32, so wrapping intermediate values do not matter):

    * `offsets`: compile-time, per channel (bias and the zero-point terms of constant weights);
    * `col_sums`: a run-time i32 vector per column (argument `colsum`);
    * `row_sums`: a run-time i32 value per row (argument `rowsum`), times `row_coefficients` per column
      when given (a per-channel zero point of the column operand).
    """

    offsets: tuple[int, ...] | None = None
    col_sums: bool = False
    row_sums: bool = False
    row_coefficients: tuple[int, ...] | None = None

    @property
    def arg_types(self) -> tuple[ir.Type, ...]:
        return (I32.as_pointer(),) * (self.col_sums + self.row_sums)


class _Product:
    """What both epilogues share: orientation, output pitch, the corrections, channel indexing, and the
    walk over a tile's accumulators.

    `channels_along`: "col" when channels run along C's columns (linear layers: lanes read per-channel
    tables), "row" when C's rows are channels (convolutions: one value per row, broadcast). The output
    (and residual) element of C[row, col] is at row · `ld` + col. Arguments: the subclass's pointers,
    channel0 (added to the channel index: a convolution group's first channel), then the corrections'
    sums. Tiles of more than two vectors hand their accumulators to a helper function that loops over
    them (one per edge width), so each tile carries a few stores instead of the whole requantization.
    """

    def __init__(self, module: ir.Module, name: str, lanes: int, ld: int, channels_along: str,
                 corrections: Corrections, head: tuple[ir.Type, ...]) -> None:
        self.module, self.name = module, name
        self.lanes, self.ld, self.along, self.corrections = lanes, ld, channels_along, corrections
        self.arg_types = head + (I64,) + corrections.arg_types
        self.offsets = Table(module, f"{name}.offset", corrections.offsets, I32) \
            if corrections.offsets is not None else None
        self.row_coefficients = Table(module, f"{name}.rowcoef", corrections.row_coefficients, I32) \
            if corrections.row_coefficients is not None else None
        self.helpers: dict[tuple, ir.Function] = {}

    # -- what subclasses provide ---------------------------------------------------------------------
    def bind(self, builder: ir.IRBuilder, pointers: list[ir.Value]) -> list[ir.Value]:
        """The subclass's pointer arguments, typed."""
        raise NotImplementedError

    def one(self, builder: ir.IRBuilder, bound: list[ir.Value], acc: ir.Value, row: ir.Value, col: ir.Value,
            count: int, channel0: ir.Value) -> None:
        """Finish and store one corrected accumulator vector (its first `count` lanes are real columns)."""
        raise NotImplementedError

    # -- the walk -----------------------------------------------------------------------------------
    def emit(self, builder: ir.IRBuilder, accs: list[list[ir.Value]], row0: ir.Value, col0: ir.Value, valid: int,
             args: Sequence[ir.Value]) -> None:
        rows, vectors = len(accs), len(accs[0])
        if rows * vectors <= 2:
            self._vectors(builder, accs, row0, col0, valid, list(args))
            return
        kind = accs[0][0].type
        here = builder.block
        builder.position_at_start(builder.function.entry_basic_block)  # a static stack slot
        spill = builder.alloca(kind, rows * vectors)
        builder.position_at_end(here)
        for r, row_accs in enumerate(accs):
            for v, acc in enumerate(row_accs):
                builder.store(acc, builder.gep(spill, [ir.Constant(I32, r * vectors + v)]))
        builder.call(self._helper(kind, vectors, valid), [spill, ir.Constant(I64, rows), row0, col0, *args])

    def emit_stored(self, builder: ir.IRBuilder, stored: ir.Value, kind: ir.Type, rows: int | ir.Value, vectors: int,
                    row0: ir.Value, col0: ir.Value, valid: int, args: Sequence[ir.Value]) -> None:
        """`emit` for accumulators already in memory (AMX tiles stored): `rows` × `vectors` vectors of `kind`
        at `stored` (any pointer), row by row; no copy."""
        rows = rows if isinstance(rows, ir.Value) else ir.Constant(I64, rows)
        builder.call(self._helper(kind, vectors, valid),
                     [builder.bitcast(stored, kind.as_pointer()), rows, row0, col0, *args])

    def _vectors(self, builder, accs, row0, col0, valid, args) -> None:
        head = len(self.arg_types) - 1 - len(self.corrections.arg_types)
        bound, channel0, sums = self.bind(builder, args[:head]), args[head], args[head + 1:]
        for r, row_accs in enumerate(accs):
            row = builder.add(row0, ir.Constant(I64, r))
            for v, acc in enumerate(row_accs):
                col = builder.add(col0, ir.Constant(I64, v * self.lanes))
                acc = self.corrected(builder, acc, row, col, channel0, sums)
                self.one(builder, bound, acc, row, col, valid - v * self.lanes, channel0)

    def _helper(self, kind: ir.Type, vectors: int, valid: int) -> ir.Function:
        """`helper(accs, rows, row0, col0, args...)`: every accumulator of a rows × `vectors` tile."""
        key = (str(kind), vectors, valid)
        if key in self.helpers:
            return self.helpers[key]
        fn = ir.Function(self.module, ir.FunctionType(ir.VoidType(), [kind.as_pointer(), I64, I64, I64,
                                                                        *self.arg_types]),
                         f"{self.name}.epilogue{vectors}.{valid}")
        fn.linkage = "internal"
        fn.attributes.add("noinline")
        spill, rows, row0, col0, *args = fn.args
        builder = ir.IRBuilder(fn.append_basic_block("entry"))
        full, edge = divmod(valid, self.lanes)
        full = min(full, vectors)

        def row_body(b: ir.IRBuilder, r: ir.Value, carried: list) -> list:
            row = b.add(row0, r)
            base = b.mul(r, ir.Constant(I64, vectors))

            def vector(b2: ir.IRBuilder, v: ir.Value, count: int) -> None:
                acc = b2.load(b2.gep(spill, [b2.add(base, v)]))
                self._vectors(b2, [[acc]], row, b2.add(col0, b2.mul(v, ir.Constant(I64, self.lanes))), count, args)

            if full:
                ll.counted_loop(b, ir.Constant(I64, full), "v", body=lambda b2, v, _: vector(b2, v, self.lanes))
            if edge and full < vectors:
                vector(b, ir.Constant(I64, full), edge)
            return carried

        ll.counted_loop(builder, rows, "r", body=row_body)
        builder.ret_void()
        self.helpers[key] = fn
        return fn

    # -- shared pieces ------------------------------------------------------------------------------
    def channel(self, builder: ir.IRBuilder, table: Table, channel0: ir.Value, row: ir.Value, col: ir.Value
                ) -> ir.Value:
        if self.along == "col":
            return table.lanes(builder, builder.add(channel0, col), self.lanes)
        return table.splat(builder, builder.add(channel0, row), self.lanes)

    def corrected(self, builder: ir.IRBuilder, acc: ir.Value, row: ir.Value, col: ir.Value, channel0: ir.Value,
                  sums: Sequence[ir.Value]) -> ir.Value:
        c = self.corrections
        sums = list(sums)
        if self.offsets is not None:  # (int64 accumulators of the wide GEMM take them sign-extended)
            offsets = self.channel(builder, self.offsets, channel0, row, col)
            acc = builder.add(acc, _widen(builder, offsets, True, acc.type.element))
        if c.col_sums:
            acc = builder.add(acc, ll.load_vector(builder, sums.pop(0), col, self.lanes))
        if c.row_sums:
            rows = ll.splat(builder, builder.load(builder.gep(sums.pop(0), [row])), self.lanes)
            if self.row_coefficients is not None:
                rows = builder.mul(rows, self.row_coefficients.lanes(builder, col, self.lanes))
            acc = builder.add(acc, rows)
        return acc

    def at(self, builder: ir.IRBuilder, base: ir.Value, row: ir.Value, col: ir.Value) -> ir.Value:
        return builder.gep(base, [builder.add(builder.mul(row, ir.Constant(I64, self.ld)), col)])


class ProductEpilogue(_Product):
    """acc (+ corrections) → requantized integers stored to the output, with the optional residual term
    (r − zr)·m_r; the result of qconv2d, qlinear and qmatmul. Arguments: out, [residual], channel0, sums."""

    def __init__(self, module: ir.Module, name: str, lanes: int, ld: int, channels_along: str, requant: Requant,
                 corrections: Corrections = Corrections(), residual: tuple[DType, int] | None = None) -> None:
        pointer = ir.IntType(8).as_pointer()
        super().__init__(module, name, lanes, ld, channels_along, corrections,
                         (pointer, pointer) if residual else (pointer,))
        self.tables = requant.tables(module, name)
        self.residual = residual

    def bind(self, builder, pointers):
        types = [ll.element_type(self.tables.requant.dtype)] + ([ll.element_type(self.residual[0])]
                                                                if self.residual else [])
        return [builder.bitcast(p, t.as_pointer()) for p, t in zip(pointers, types)]

    def one(self, builder, bound, acc, row, col, count, channel0) -> None:
        t = self.tables

        def channel(table: Table) -> ir.Value:
            return self.channel(builder, table, channel0, row, col)

        total = builder.mul(_widen(builder, acc, True), _widen(builder, channel(t.multipliers), True))
        if self.residual:
            dtype, zero_point = self.residual
            values = ll.load_partial(builder, self.at(builder, bound[1], row, col), count, self.lanes)
            centred = builder.sub(_widen(builder, values, dtype.is_signed), _splat(I64, zero_point, self.lanes))
            total = builder.add(total, builder.mul(centred, _widen(builder, channel(t.residual), True)))
        y = finish(builder, t.requant, total, channel(t.shifts), channel(t.halves))
        ll.store_partial(builder, y, self.at(builder, bound[0], row, col), count)


class FloatEpilogue(_Product):
    """Dynamic quantization's result: float32(acc + corrections) · factor + bias, as two float32 operations
    (never fused). `factor` is read at run time: one float per column (argument `factors`) or one for all
    (`scalar_factor`); the optional bias is a float32 operand, one per column. Arguments: out, factors,
    [bias], channel0, sums."""

    def __init__(self, module: ir.Module, name: str, lanes: int, ld: int, corrections: Corrections,
                 scalar_factor: bool, bias: bool) -> None:
        pointer = ir.IntType(8).as_pointer()
        super().__init__(module, name, lanes, ld, "col", corrections, (pointer,) * (2 + bias))
        self.scalar_factor, self.bias = scalar_factor, bias

    def bind(self, builder, pointers):
        return [builder.bitcast(p, F32.as_pointer()) for p in pointers]

    def one(self, builder, bound, acc, row, col, count, channel0) -> None:
        out, factors = bound[:2]
        factor = ll.splat(builder, builder.load(factors), self.lanes) if self.scalar_factor \
            else ll.load_vector(builder, factors, col, self.lanes)
        y = builder.fmul(builder.sitofp(acc, ll.vector(F32, self.lanes)), factor)
        if self.bias:
            y = builder.fadd(y, ll.load_partial(builder, builder.gep(bound[2], [col]), count, self.lanes))
        ll.store_partial(builder, y, self.at(builder, out, row, col), count)


# -- element-wise kernels -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Operand:
    """One input of `map_kernel`: buffer argument `arg`, or compile-time `values` (a constant when they are
    all equal, else a table), of `dtype`, read at `strides` (elements per axis of the iterated shape, 0
    where broadcast) from element `offset`."""

    dtype: DType
    strides: tuple[int, ...]
    arg: int | None = None
    values: tuple | None = None
    offset: int = 0


def table_operand(array: np.ndarray, dtype: DType, shape: Sequence[int]) -> Operand:
    """Compile-time `array` (broadcastable to `shape`) as an operand."""
    array = np.asarray(array)
    padded = array.reshape((1,) * (len(shape) - array.ndim) + array.shape)
    strides = ll_strides(padded.shape)
    values = tuple(padded.ravel().tolist())
    if len(set(values)) == 1:
        return Operand(dtype, (0,) * len(shape), values=values[:1])
    return Operand(dtype, tuple(0 if d == 1 else s for d, s in zip(padded.shape, strides)), values=values)


def ll_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major element strides."""
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


Body = Callable[[ir.IRBuilder, list[ir.Value], int], ir.Value]


def map_kernel(module: ir.Module, name: str, target: TargetSpec, buffers: int, shape: Sequence[int],
               operands: Sequence[Operand], result: tuple[DType, int, tuple[int, ...], int], body: Body
               ) -> ir.Function:
    """`name(buffer 0, ..., buffer n-1)`: result[i] = body(operands at i) over `shape`.

    `result` is (dtype, buffer argument, element strides, element offset) — a block of a larger tensor
    for qconcat. Vectors run along the innermost axis when it is contiguous or broadcast in every operand
    and contiguous in the result (else elements one by one). `body(builder, values, width)` gets each
    operand as a `width`-lane vector of its storage type and returns the result's.
    """
    out_dtype, out_arg, out_strides, out_offset = result
    fn, builder = new_kernel(module, name, buffers)
    if 0 in shape:
        builder.ret_void()
        return fn
    shape = tuple(shape) or (1,)
    sets = [op.strides or (0,) for op in operands] + [tuple(out_strides) or (1,)]
    dims, strides = collapse(shape, sets)
    if not dims:  # a single element
        dims, strides = (1,), [(0,)] * len(operands) + [(1,)]
    elements = [ll.element_type(op.dtype) for op in operands] + [ll.element_type(out_dtype)]
    pointers = []
    for i, op in enumerate(operands):
        if op.arg is not None:
            pointers.append(builder.bitcast(fn.args[op.arg], elements[i].as_pointer()))
        elif len(op.values) > 1:
            pointers.append(ll.global_table(module, f"{name}.t{i}", elements[i], op.values))
        else:
            pointers.append(None)
    pointers.append(builder.bitcast(fn.args[out_arg], elements[-1].as_pointer()))
    inner = [s[-1] for s in strides]
    # vectors along the innermost axis when it is contiguous (or broadcast); else element by element
    lanes = max(target.vector_bytes // 4, 4) if all(s in (0, 1) for s in inner) and inner[-1] == 1 else 1
    bases = [ir.Constant(I64, op.offset) for op in operands] + [ir.Constant(I64, out_offset)]

    def row(b: ir.IRBuilder, offsets: list[ir.Value]) -> None:
        held = {}
        for i, op in enumerate(operands):
            if pointers[i] is None:
                held[i] = lambda width, v=op.values[0], e=elements[i]: _splat(e, v, width)
            elif strides[i][-1] == 0:
                scalar = b.load(b.gep(pointers[i], [offsets[i]]))
                held[i] = lambda width, s=scalar: ll.splat(b, s, width)

        def step(b2: ir.IRBuilder, index: ir.Value, width: int) -> None:
            at = [b2.add(offset, b2.mul(index, ir.Constant(I64, stride))) for offset, stride in zip(offsets, inner)]
            values = [held[i](width) if i in held else ll.load_vector(b2, pointers[i], at[i], width)
                      for i in range(len(operands))]
            ll.store_vector(b2, body(b2, values, width), pointers[-1], at[-1])

        ll.strip_mine(b, ir.Constant(I64, 0), dims[-1], lanes, "x", step)

    loop_nest(builder, dims[:-1], bases, [s[:-1] for s in strides], row)
    builder.ret_void()
    return fn


def quantize_body(dtype: DType, qmin: int, qmax: int) -> Body:
    """clamp(round_half_even(float32(x) / scale) + zero_point): operands x (float), scale (f32), zero point
    (i64). NaN becomes qmin; x / scale is clamped to ±2^40 before it becomes an integer."""
    def body(b: ir.IRBuilder, values: list[ir.Value], width: int) -> ir.Value:
        x, scale, zero_point = values
        kind = ll.vector(F32, width)
        if x.type.element != F32:
            x = b.fpext(x, kind) if isinstance(x.type.element, ir.HalfType) else b.fptrunc(x, kind)
        ratio = ll.intrinsic(b, "llvm.rint", b.fdiv(x, scale))
        low, high = _splat(F32, -FLOAT_RANGE, width), _splat(F32, FLOAT_RANGE, width)
        ratio = b.select(b.fcmp_ordered(">=", ratio, low), ratio, low)  # NaN fails: lowest
        ratio = b.select(b.fcmp_ordered("<=", ratio, high), ratio, high)
        q = clamp(b, b.add(b.fptosi(ratio, ll.vector(I64, width)), zero_point), qmin, qmax)
        return b.trunc(q, ll.vector(ll.element_type(dtype), width))
    return body


def quantize_by_inverse_body(dtype: DType, qmin: int, qmax: int, scale: float, zero_point: int) -> Body:
    """`quantize_body` for float32 x, one compile-time scale and zero point and results of at most 16 bits,
    cheaper and with the same results: the quotients as `emit_dynamic_quantize` forms them (a product with
    float32(1 / scale), the division only where a lane is too close to a rounding boundary), then the
    zero point added and the clamp done in float32 (exact below 2^24; beyond, both clamp to the same end;
    NaN fails the ordered comparisons and becomes qmin), and a 32-bit conversion. Operand: x."""
    scale32 = np.float32(scale)
    with np.errstate(over="ignore", divide="ignore"):  # (unusable inverses are never used)
        inverse = np.float32(1) / scale32
    usable = 2.0 ** -125 <= float(scale32) <= 2.0 ** 125

    def body(b: ir.IRBuilder, values: list[ir.Value], width: int) -> ir.Value:
        quotients = _rounded_quotients(b, values[0], ir.Constant(F32, float(scale32)), ir.Constant(F32, float(inverse)),
                                       ir.Constant(ll.I1, int(usable)))
        return _shifted_and_clamped(b, quotients, _splat(F32, float(zero_point), width), qmin, qmax,
                                    ll.element_type(dtype))
    return body


def _shifted_and_clamped(builder: ir.IRBuilder, quotients: ir.Value, zero_point: ir.Value, qmin: int, qmax: int,
                         element: ir.Type) -> ir.Value:
    """clamp(quotients + zero_point, qmin, qmax) in float32, as `element` integers: exact for integer-valued
    quotients below 2^24 (beyond, the int64 sum clamps to the same end); NaN fails the ordered comparisons
    and becomes qmin; a 32-bit conversion suffices (|qmin|, |qmax| < 2^31)."""
    width = quotients.type.count
    shifted = builder.fadd(quotients, zero_point)
    low, high = _splat(F32, float(qmin), width), _splat(F32, float(qmax), width)
    shifted = builder.select(builder.fcmp_ordered(">=", shifted, low), shifted, low)
    shifted = builder.select(builder.fcmp_ordered("<=", shifted, high), shifted, high)
    return builder.trunc(builder.fptosi(shifted, ll.vector(I32, width)), ll.vector(element, width))


def dequantize_body(signed: bool) -> Body:
    """float32(q − zero_point) · scale: operands q, zero point (i64), scale (f32)."""
    def body(b: ir.IRBuilder, values: list[ir.Value], width: int) -> ir.Value:
        q, zero_point, scale = values
        centred = b.sub(_widen(b, q, signed), zero_point)
        return b.fmul(b.sitofp(centred, ll.vector(F32, width)), scale)
    return body


def requantize_body(signed: Sequence[bool], requant: Requant, product: bool = False) -> Body:
    """R(Σ (x_i − z_i) · m_i) (or R((a − za)(b − zb) · m) with `product`): operands x_0, z_0, [x_1, z_1],
    then the multipliers m_i (int32), the shift and its rounding term (int64), tables or constants."""
    count = len(signed)

    def body(b: ir.IRBuilder, values: list[ir.Value], width: int) -> ir.Value:
        terms = [b.sub(_widen(b, values[2 * i], signed[i]), values[2 * i + 1]) for i in range(count)]
        rest = values[2 * count:]
        multipliers = [_widen(b, m, True) for m in rest[:-2]]
        if product:
            total = b.mul(b.mul(terms[0], terms[1]), multipliers[0])
        else:
            products = [b.mul(term, multiplier) for term, multiplier in zip(terms, multipliers)]
            total = products[0]
            for part in products[1:]:
                total = b.add(total, part)
        return finish(b, requant, total, *rest[-2:])
    return body


# -- dynamic quantization -----------------------------------------------------------------------------
def _range(builder: ir.IRBuilder, target: TargetSpec, x: ir.Value, count: int) -> tuple[ir.Value, ir.Value]:
    """(min(x, 0), max(x, 0)) of the `count` floats at x in one pass: both extremes per load, from zeros,
    so the lanes past count that a last partial load fills with zeros change nothing."""
    lanes, unroll = ll.vector_lanes(target, F32), 4
    zeros = _splat(F32, 0.0, lanes)

    def pick(b: ir.IRBuilder, order: str, u: ir.Value, v: ir.Value) -> ir.Value:
        return b.select(b.fcmp_ordered(order, u, v), u, v)

    def take(b: ir.IRBuilder, values: ir.Value, pair: list) -> list:
        return [pick(b, "<", pair[0], values), pick(b, ">", pair[1], values)]

    def block(b: ir.IRBuilder, i: ir.Value, accs: list) -> list:
        base = b.mul(i, ir.Constant(I64, unroll * lanes))
        loads = [ll.load_vector(b, x, b.add(base, ir.Constant(I64, j * lanes)), lanes) for j in range(unroll)]
        return [v for j in range(unroll) for v in take(b, loads[j], accs[2 * j:2 * j + 2])]

    blocks, offset = divmod(count, unroll * lanes)
    accs = ll.static_loop(builder, blocks, "range", block, [zeros] * (2 * unroll)) if blocks else [zeros] * 2
    low, high = accs[0::2], accs[1::2]
    for _ in range(0, offset - offset % lanes, lanes):
        low[0], high[0] = take(builder, ll.load_vector(builder, x, ir.Constant(I64, count - offset), lanes),
                               [low[0], high[0]])
        offset -= lanes
    if offset:
        low[0], high[0] = take(builder, ll.load_partial(builder, builder.gep(x, [ir.Constant(I64, count - offset)]),
                                                        offset, lanes), [low[0], high[0]])

    def reduce(order: str, values: list) -> ir.Value:
        while len(values) > 1:
            values = [pick(builder, order, values[k], values[k + 1]) for k in range(0, len(values), 2)]
        value = ll.tree_reduce(builder, values[0], lambda b, u, v: pick(b, order, u, v))
        return builder.extract_element(value, ir.Constant(I32, 0))

    return reduce("<", low), reduce(">", high)


def _exact_quotients(module: ir.Module, kind: ir.VectorType) -> ir.Function:
    """`rint(x / scale)` lane by lane, out of line: LLVM would otherwise speculate the division into the
    path that avoids it."""
    name = f"lowbit.quotients.{kind.count}"
    if name in module.globals:
        return module.globals[name]
    fn = ir.Function(module, ir.FunctionType(kind, [kind, F32]), name)
    fn.linkage = "internal"
    fn.attributes.add("noinline")
    x, scale = fn.args
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    builder.ret(ll.intrinsic(builder, "llvm.rint", builder.fdiv(x, ll.splat(builder, scale, kind.count))))
    return fn


def _rounded_quotients(builder: ir.IRBuilder, x: ir.Value, scale: ir.Value, inverse: ir.Value, usable: ir.Value
                       ) -> ir.Value:
    """rint(float32(x / scale)) for a vector x, mostly without dividing: y = x · float32(1 / scale), and
    rint(y) where every lane of y is farther than |y|·2^-21 from the nearest half-integer; else the division.

    Why that is exact: with `usable` (scale and its inverse normal), y = (x / scale)(1 + e1)(1 + e2) and
    f = float32(x / scale) = (x / scale)(1 + e3), |e_i| ≤ 2^-24, so |y − f| < |y|·2^-22. When the distance
    from y to the nearest half-integer (0.5 − |y − rint(y)|, computed exactly where it is below 0.25) is
    larger, y and f lie in the same open interval between half-integers: rint(y) = rint(f), ties included.
    A y that underflows is within 2^-149 of f and far from ±0.5; an infinite or NaN y fails the comparison
    and takes the division."""
    width = x.type.count
    y = builder.fmul(x, ll.splat(builder, inverse, width))
    rounded = ll.intrinsic(builder, "llvm.rint", y)
    margin = builder.fsub(_splat(F32, 0.5, width), ll.intrinsic(builder, "llvm.fabs", builder.fsub(y, rounded)))
    bound = builder.fmul(ll.intrinsic(builder, "llvm.fabs", y), _splat(F32, 2.0 ** -21, width))
    lanes = builder.bitcast(builder.fcmp_ordered(">", margin, bound), ir.IntType(width))
    safe = builder.and_(usable, builder.icmp_unsigned("==", lanes, ir.Constant(ir.IntType(width), (1 << width) - 1)))
    start = builder.block
    exact = builder.append_basic_block("quotient.exact")
    join = builder.append_basic_block("quotient.join")
    builder.cbranch(safe, join, exact)
    builder.position_at_end(exact)
    divided = builder.call(_exact_quotients(builder.module, x.type), [x, scale])
    builder.branch(join)
    builder.position_at_end(join)
    result = builder.phi(x.type)
    result.add_incoming(rounded, start)
    result.add_incoming(divided, exact)
    return result


def emit_dynamic_quantize(builder: ir.IRBuilder, target: TargetSpec, x: ir.Value, count: int,
                          q: ir.Value) -> tuple[ir.Value, ir.Value]:
    """ONNX DynamicQuantizeLinear of the `count` floats at `x` (f32*) into u8 at `q` (i8*), as the reference's
    `dynamic_quantize`: the range widened to include 0, scale = (max − min) / 255 in float32 (1 for an
    all-zero tensor), zero point = clamp(round_half_even(−min / scale), 0, 255). Returns (scale, zero
    point) as f32 and i64 scalars.

    The values are clamped in float32 after the zero point is added: rint(x / scale) + zp is exact below
    2^24 in magnitude, and beyond it clamps to the same end as the reference's int64 sum; NaN becomes 0
    (the ordered comparisons fail), as there. Then a 32-bit conversion suffices."""
    zero = ir.Constant(F32, 0.0)
    low, high = _range(builder, target, x, count)
    scale = builder.fdiv(builder.fsub(high, low), ir.Constant(F32, 255.0))
    scale = builder.select(builder.fcmp_ordered(">", high, low), scale, ir.Constant(F32, 1.0))
    ratio = ll.intrinsic(builder, "llvm.rint", builder.fdiv(builder.fneg(low), scale))
    ratio = builder.select(builder.fcmp_ordered(">", ratio, zero), ratio, zero)
    ratio = builder.select(builder.fcmp_ordered("<", ratio, ir.Constant(F32, 255.0)), ratio, ir.Constant(F32, 255.0))
    zero_point = builder.fptosi(ratio, I64)

    inverse = builder.fdiv(ir.Constant(F32, 1.0), scale)
    usable = builder.and_(builder.fcmp_ordered(">=", scale, ir.Constant(F32, 2.0 ** -125)),
                          builder.fcmp_ordered("<=", scale, ir.Constant(F32, 2.0 ** 125)))

    def step(b: ir.IRBuilder, index: ir.Value, width: int) -> None:
        quotients = _rounded_quotients(b, ll.load_vector(b, x, index, width), scale, inverse, usable)
        ll.store_vector(b, _shifted_and_clamped(b, quotients, ll.splat(b, ratio, width), 0, 255, ll.I8), q, index)

    ll.strip_mine(builder, ir.Constant(I64, 0), count, max(target.vector_bytes // 4, 4), "quantize", step)
    return scale, zero_point
