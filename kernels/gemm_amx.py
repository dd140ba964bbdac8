"""int8 GEMM on Intel AMX tiles (`tdpb[su][su]d`), generated as LLVM IR: the route for targets with
`amx-tile` and `amx-int8` (Sapphire Rapids and later) when a product is big enough to fill tiles.

One instruction multiplies a 16 × 64-byte tile of A by a 16 × 64-byte tile of B (16 columns × 4
consecutive K values per row: the byte layout of the VNNI panels, `packing.pack_weights` with 16
lanes) into a 16 × 16 int32 tile of C, exactly (modular int32, as `vpdpbusd`). AMX has all four
signedness pairs, so operands keep their own signedness: no flip of activations and no correction.

Layout: C[M, N] = A[M, K] · B[K, N]; A as rows with a byte pitch (run-time activations) or stored tile
by tile (constant weights: one sequential stream), K read 64 bytes per step; B as tiles at `BLayout`
offsets (packed weights, im2col panels, or a convolution's padded plane read in place), zero in K
padding (then whatever A holds past K multiplies zeros: exact). A *block* keeps 2 × 2 C tiles over all
of K (4 C + 2 A + 2 B = the 8 tile registers), then stores them to the stack and hands the rows to a
`gemm_int8.Epilogue` (int32 store, requantization) as 16-lane vectors. Row tiles shorter than 16 (the
M edge) run under a tile configuration with fewer rows, so A is never read past its last row; column
edges are padding columns of B the epilogue does not store.

The standalone `AmxInt8Gemm` (tests, benchmarks) has `Int8Gemm`'s interface; `emit_amx_linear` builds
qlinear inside models, `kernels.qconv_amx` the convolutions.

Linux grants tile state per process on request (`enable_amx`, done when code for an AMX target is
loaded: `llvm.check_runs_here`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from llvmlite import ir

from lowbit.errors import TargetError
from lowbit.ir.dtypes import DType
from lowbit.kernels import llvm as ll
from lowbit.kernels.gemm_int8 import (ROUTE_NAMES, Epilogue, Int8Gemm, Int32Store, activation_dtype,
                                      check_accumulator_range, checked_operands, emit_pack_a, remainder_blocks)
from lowbit.kernels.llvm import I8, I32, I64, VOID, TargetSpec
from lowbit.kernels.packing import ALIGNMENT, aligned_empty, pack_weights

AMX = frozenset({"amx-tile", "amx-int8"})
TILE = 16  # rows of a tile, and int32 columns of a C tile
STEP = 64  # K bytes per tile instruction (a tile row)
BLOCK = 2  # C tiles per block side: 2 × 2 C, 2 A, 2 B tiles
# The byte layout AMX's B tiles share with the 16-lane VNNI panels (kr = 4 bytes per int32 column).
BYTES = ROUTE_NAMES["avx512-vnni"]
# Below this many rows or columns, padding a product to 16-row tiles and the tiles' round trip through
# memory cost more than the VNNI tiles, which waste nothing on small M.
MIN_SIDE = 16
C_BYTES = BLOCK * BLOCK * TILE * STEP  # one block's C tiles


def available(target: TargetSpec) -> bool:
    return target.arch == "x86_64" and AMX <= target.features


def worth(target: TargetSpec, rows: int, cols: int) -> bool:
    """Whether a product of `rows` × `cols` outputs takes the AMX route on `target`."""
    return available(target) and rows >= MIN_SIDE and cols >= MIN_SIDE


def steps(k: int) -> int:
    """K steps of 64 bytes (K padded with zeros)."""
    return -(-k // STEP)


def _c(value: int) -> ir.Constant:
    return ir.Constant(I64, value)


def _tile(number: int) -> ir.Constant:
    return ir.Constant(I8, number)


# tile registers: C(i, j) = BLOCK·i + j, A_i after the C tiles, B_j after the A tiles
def _c_tile(i: int, j: int) -> int:
    return BLOCK * i + j


def _a_tile(i: int) -> int:
    return BLOCK * BLOCK + i


def _b_tile(j: int) -> int:
    return BLOCK * BLOCK + BLOCK + j


def tile_config(rows: Sequence[int]) -> bytes:
    """LDTILECFG's 64 bytes (palette 1) for row tiles of `rows` rows each: C and A tiles of row tile i
    have rows[i] rows, B tiles 16 (one K step); every tile row is 64 bytes."""
    config = bytearray(64)
    config[0] = 1
    shapes = {_b_tile(j): TILE for j in range(BLOCK)}
    for i, count in enumerate(rows):
        shapes[_a_tile(i)] = count
        shapes.update({_c_tile(i, j): count for j in range(BLOCK)})
    for tile, count in shapes.items():
        config[16 + 2 * tile:18 + 2 * tile] = STEP.to_bytes(2, "little")
        config[48 + tile] = count
    return bytes(config)


def _intrinsic(builder: ir.IRBuilder, name: str, *args: ir.Value) -> None:
    module = builder.module
    builder.call(ll.declare(module, name, VOID, *(arg.type for arg in args)), list(args))


def configure(builder: ir.IRBuilder, rows: Sequence[int]) -> None:
    """Load the tile configuration for row tiles of `rows` rows (a constant table in the module)."""
    module = builder.module
    name = "lowbit.amx.config." + ".".join(map(str, rows))
    table = module.globals.get(name)
    if table is None:
        table = ll.global_table(module, name, I8, list(tile_config(rows)))
    else:
        table = table.gep([ir.Constant(I32, 0), ir.Constant(I32, 0)])
    _intrinsic(builder, "llvm.x86.ldtilecfg", table)


def release(builder: ir.IRBuilder) -> None:
    _intrinsic(builder, "llvm.x86.tilerelease")


@dataclass(frozen=True)
class BLayout:
    """Where B's tile for column tile j and K step s starts: b + j·`tile` + s·`step` bytes, or
    b + j·`tile` + offsets[s] when K steps are not evenly spaced (a direct convolution's taps); its 16
    rows `stride` bytes apart."""

    stride: int
    tile: int
    step: int = 0
    offsets: tuple[int, ...] | None = None


class AmxTiles:
    """The blocks of one product in a module: `steps` K steps, operands of the given signedness, B tiles
    at `layout`, results to `epilogue`.

    A block function is `block(a, lda, b, row0, col0, epilogue args...)`: a at the block's first row
    (row pitch lda bytes; or with `a_tiled`, A stored tile by tile: each row tile's K steps 1 KiB apart, its
    rows 64 bytes apart, row tiles `a_tiled` bytes apart, one stream the prefetcher follows), b at its first
    column tile; C's column tiles are contiguous (`valid` real columns in all), or with `col_step` each tile is
    a piece of its own, `col_step` columns after the previous, with `valid` real columns (such as one output
    row of a convolution); it computes `row_tiles` × `col_tiles` C tiles,
    of which the first `rows` rows and `valid` columns are real, under the configuration the caller
    loaded (`configure`) for those row tiles.
    """

    def __init__(self, module: ir.Module, name: str, k_steps: int, a_signed: bool, b_signed: bool,
                 layout: BLayout, epilogue: Epilogue, a_tiled: int | None = None,
                 col_step: int | None = None) -> None:
        self.module, self.name, self.steps, self.layout, self.epilogue = module, name, k_steps, layout, epilogue
        self.a_tiled, self.col_step = a_tiled, col_step
        self.dot = f"llvm.x86.tdpb{'s' if a_signed else 'u'}{'s' if b_signed else 'u'}d"
        self.blocks: dict[tuple[int, int, int, int], ir.Function] = {}

    def _layout(self, row_tiles: int, col_tiles: int) -> tuple[int, int]:
        """C's rows in memory: (pitch, bytes between column tiles): whole rows of the block, or column tile by
        column tile when each is a piece of its own (`col_step`), so an epilogue reads every piece's rows."""
        if self.col_step is not None:
            return TILE * 4, row_tiles * TILE * TILE * 4
        return col_tiles * TILE * 4, TILE * 4

    def _epilogue(self, builder: ir.IRBuilder, stored: ir.Value, key: tuple[int, int, int, int], row0: ir.Value,
                  col0: ir.Value, args: Sequence[ir.Value]) -> None:
        """The epilogue of block shape `key` from its C tiles stored at `stored`."""
        row_tiles, rows, col_tiles, valid = key
        pitch, tile_bytes = self._layout(row_tiles, col_tiles)
        vector = ll.vector(I32, TILE)
        heads = [(stored, col_tiles, col0)] if self.col_step is None else \
            [(builder.gep(stored, [_c(v * tile_bytes)]), 1, builder.add(col0, _c(v * self.col_step)))
             for v in range(col_tiles)]
        for at, vectors, first in heads:
            in_place = getattr(self.epilogue, "emit_stored", None)  # requantize's epilogues read the tiles there
            if in_place is not None:
                in_place(builder, at, vector, rows, vectors, row0, first, valid, args)
                continue
            accs = [[builder.load(ll.pointer_at(builder, at, r * pitch + v * TILE * 4, vector), align=ALIGNMENT)
                     for v in range(vectors)] for r in range(rows)]
            self.epilogue.emit(builder, accs, row0, first, valid, args)

    def block(self, row_tiles: int, rows: int, col_tiles: int, valid: int) -> ir.Function:
        key = (row_tiles, rows, col_tiles, valid)
        if key not in self.blocks:
            self.blocks[key] = self._emit_block(*key)
        return self.blocks[key]

    def _emit_block(self, row_tiles: int, rows: int, col_tiles: int, valid: int) -> ir.Function:
        ptr = I8.as_pointer()
        fn = ir.Function(self.module, ir.FunctionType(VOID, [ptr, I64, ptr, I64, I64, *self.epilogue.arg_types]),
                         f"{self.name}.block{row_tiles}x{col_tiles}.{rows}.{valid}")
        fn.linkage = "internal"
        fn.attributes.add("noinline")  # one copy, called from every block position
        a, lda, b, row0, col0, *args = fn.args
        builder = ir.IRBuilder(fn.append_basic_block("entry"))
        layout = self.layout
        pitch, tile_bytes = self._layout(row_tiles, col_tiles)
        pairs = [(i, j) for i in range(row_tiles) for j in range(col_tiles)]
        for i, j in pairs:
            _intrinsic(builder, "llvm.x86.tilezero", _tile(_c_tile(i, j)))
        if self.a_tiled is None:
            a_rows = [builder.gep(a, [builder.mul(lda, _c(i * TILE))]) for i in range(row_tiles)]
            a_step, a_stride = STEP, lda
        else:
            a_rows = [builder.gep(a, [_c(i * self.a_tiled)]) for i in range(row_tiles)]
            a_step, a_stride = TILE * STEP, _c(STEP)
        table = ll.global_table(self.module, f"{fn.name}.steps", I64, layout.offsets) \
            if layout.offsets is not None else None

        def step(b_: ir.IRBuilder, s: ir.Value, carried: list) -> list:
            for i in range(row_tiles):
                _intrinsic(b_, "llvm.x86.tileloadd64", _tile(_a_tile(i)), b_.gep(a_rows[i], [b_.mul(s, _c(a_step))]),
                           a_stride)
            offset = b_.load(b_.gep(table, [s])) if table is not None else b_.mul(s, _c(layout.step))
            for j in range(col_tiles):
                at = b_.add(_c(j * layout.tile), offset)
                _intrinsic(b_, "llvm.x86.tileloadd64", _tile(_b_tile(j)), b_.gep(b, [at]), _c(layout.stride))
            for i, j in pairs:
                _intrinsic(b_, self.dot, _tile(_c_tile(i, j)), _tile(_a_tile(i)), _tile(_b_tile(j)))
            return carried

        ll.static_loop(builder, self.steps, "k", step)
        c_tiles = builder.alloca(ir.ArrayType(I8, C_BYTES))
        c_tiles.align = ALIGNMENT
        stored = builder.bitcast(c_tiles, ptr)
        for i, j in pairs:
            _intrinsic(builder, "llvm.x86.tilestored64", _tile(_c_tile(i, j)),
                       builder.gep(stored, [_c(i * TILE * pitch + j * tile_bytes)]), _c(pitch))
        self._epilogue(builder, stored, (row_tiles, rows, col_tiles, valid), row0, col0, args)
        builder.ret_void()
        return fn

    def a_at(self, builder: ir.IRBuilder, a: ir.Value, lda: ir.Value, row0: ir.Value) -> ir.Value:
        """Where A's row row0 (a multiple of 16 when A is tiled) starts."""
        return builder.gep(a, [builder.mul(row0, lda) if self.a_tiled is None
                               else builder.mul(builder.udiv(row0, _c(TILE)), _c(self.a_tiled))])

    def run_columns(self, builder: ir.IRBuilder, a: ir.Value, lda: ir.Value, row0: ir.Value, row_tiles: int,
                    rows: int, b: ir.Value, n: int, first: ir.Value, last: ir.Value, args: Sequence[ir.Value],
                    col_base: ir.Value | None = None) -> None:
        """Blocks of `row_tiles` row tiles (`rows` real rows) from row0 over column blocks [first, last) of n
        columns (C's column col_base + c for B's column c): whole blocks in a loop, the edge block (fewer or
        padded column tiles) once."""
        width = BLOCK * TILE
        full, rest = divmod(n, width)
        a_at = self.a_at(builder, a, lda, row0)
        col_base = col_base or _c(0)

        def at(b_: ir.IRBuilder, index: ir.Value) -> tuple[ir.Value, ir.Value]:
            return (b_.gep(b, [b_.mul(index, _c(BLOCK * self.layout.tile))]),
                    b_.add(col_base, b_.mul(index, _c(width))))

        def whole(b_: ir.IRBuilder, i: ir.Value, carried: list) -> list:
            index = b_.add(first, i)
            b_block, col0 = at(b_, index)
            b_.call(self.block(row_tiles, rows, BLOCK, width), [a_at, lda, b_block, row0, col0, *args])
            return carried

        stop = builder.select(builder.icmp_signed("<", last, _c(full)), last, _c(full))
        count = builder.sub(stop, first)
        ll.counted_loop(builder, count, "n", body=whole)
        if rest:
            edge = _c(full)
            inside = builder.and_(builder.icmp_signed("<=", first, edge), builder.icmp_signed("<", edge, last))
            with builder.if_then(inside):
                b_block, col0 = at(builder, edge)
                builder.call(self.block(row_tiles, rows, -(-rest // TILE), rest), [a_at, lda, b_block, row0, col0,
                                                                                     *args])

    def run(self, builder: ir.IRBuilder, a: ir.Value, lda: ir.Value, m: ir.Value, b: ir.Value, n: int,
            first: ir.Value, last: ir.Value, args: Sequence[ir.Value]) -> None:
        """C rows [0, m) × column blocks [first, last): blocks of 32 rows, then the rest of M in
        power-of-two row tiles (16, 8, …, 1) each under its own configuration. Leaves tiles released."""
        height = BLOCK * TILE
        configure(builder, (TILE,) * BLOCK)
        static = isinstance(m, ir.Constant)
        full = _c(m.constant // height) if static else builder.sdiv(m, _c(height))
        ll.counted_loop(builder, full, "m", body=lambda b_, i, c: self.run_columns(
            b_, a, lda, b_.mul(i, _c(height)), BLOCK, height, b, n, first, last, args) or c)
        rest = _c(m.constant % height) if static else builder.srem(m, _c(height))
        base = builder.mul(full, _c(height))
        for rows in remainder_blocks(height):
            if static and not m.constant % height & rows:
                continue
            with builder.if_then(builder.icmp_signed("!=", builder.and_(rest, _c(rows)), _c(0))):
                configure(builder, (rows,))
                row0 = builder.add(base, builder.and_(rest, _c(~(2 * rows - 1))))
                self.run_columns(builder, a, lda, row0, 1, rows, b, n, first, last, args)
        release(builder)


# -- linear products: constant B -------------------------------------------------------------------------
def pack_b(weights: np.ndarray) -> np.ndarray:
    """int8 weights [K, N] → B tiles [column tile][K step][16 rows][16 columns × 4 K values] (64-byte aligned
    bytes; K and N zero-padded)."""
    k, n = weights.shape
    padded = np.zeros((steps(k) * STEP, n), np.int8)
    padded[:k] = weights
    return pack_weights(padded, TILE, 1, BYTES.kr, np.int8).data


def weights_layout(k: int) -> BLayout:
    return BLayout(stride=STEP, tile=steps(k) * TILE * STEP, step=TILE * STEP)


@dataclass(frozen=True)
class AmxPlan:
    """A product with constant weights on the AMX route: what `Int8Gemm.run` and the lowerings read."""

    k: int
    n: int
    a_dtype: DType
    data: np.ndarray  # `pack_b`
    offset: np.ndarray | None  # int32 per padded column, or None
    mr: int = BLOCK * TILE  # rows per block: threads split M in multiples of it

    @property
    def packs_a(self) -> bool:
        """A is copied (zero-padded rows of whole K steps) unless K is whole steps: loads of a last row
        must not run past the end of A."""
        return self.k % STEP != 0

    @property
    def packed_row_bytes(self) -> int:
        return steps(self.k) * STEP

    @property
    def weights(self) -> "AmxPlan":  # `Int8Gemm` reads plan.weights.data
        return self

    @property
    def padded_columns(self) -> int:
        return -(-self.n // TILE) * TILE


def plan_amx(weights: np.ndarray, a_dtype: DType | np.dtype | type | str, offset: np.ndarray | None = None
             ) -> AmxPlan:
    """Check and pack: weights int8 [K, N], activations u8 or i8, optional integer offset per column."""
    total = checked_operands(weights, offset)
    dtype = activation_dtype(a_dtype)
    k, n = weights.shape
    check_accumulator_range(weights, total, dtype.min, dtype.max)
    folded = None
    if offset is not None:
        columns = -(-n // TILE) * TILE
        folded = aligned_empty(4 * columns, np.int32)
        folded[:] = 0
        folded[:n] = total
    return AmxPlan(k, n, dtype, pack_b(weights), folded)


def emit_a_rows(builder: ir.IRBuilder, plan: AmxPlan, a: ir.Value, lda: ir.Value, m: ir.Value, scratch: ir.Value,
                name: str) -> tuple[ir.Value, ir.Value]:
    """A as the tiles read it: in place, or copied into scratch (m · packed_row_bytes) when it must be."""
    if not plan.packs_a:
        return a, lda
    pack = emit_pack_a(builder.module, f"{name}.pack_a", BYTES, plan.k, 0, plan.a_dtype.is_signed,
                       plan.packed_row_bytes)
    builder.call(pack, [a, lda, m, scratch])
    return scratch, _c(plan.packed_row_bytes)


def emit_amx_linear(builder: ir.IRBuilder, plan: AmxPlan, name: str, a: ir.Value, lda: ir.Value, m: ir.Value,
                    scratch: ir.Value, b: ir.Value, epilogue: Epilogue, args: Sequence[ir.Value],
                    columns: tuple[ir.Value, ir.Value] | None = None) -> None:
    """C[m, N] = A·B into `epilogue` for the column blocks `columns` = [first, last) (default all; a thread's
    share when the work is split), B the plan's packed weights at `b`."""
    a, lda = emit_a_rows(builder, plan, a, lda, m, scratch, name)
    tiles = AmxTiles(builder.module, name, steps(plan.k), plan.a_dtype.is_signed, True, weights_layout(plan.k),
                     epilogue)
    first, last = columns or (_c(0), _c(-(-plan.n // (BLOCK * TILE))))
    tiles.run(builder, a, lda, m, b, plan.n, first, last, args)


def emit_amx_gemm(module: ir.Module, plan: AmxPlan, name: str) -> ir.Function:
    """`name(a, lda, m, scratch, b, offset, c, ldc)` as `gemm_int8.emit_gemm`: C (int32) = A·B (+ offset)."""
    ptr, i32p = I8.as_pointer(), I32.as_pointer()
    fn = ir.Function(module, ir.FunctionType(VOID, [ptr, I64, I64, ptr, ptr, i32p, i32p, I64]), name)
    a, lda, m, scratch, b, offset, c, ldc = fn.args
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    emit_amx_linear(builder, plan, name, a, lda, m, scratch, b, Int32Store(TILE, plan.offset is not None),
                    [offset, c, ldc])
    builder.ret_void()
    return fn


class AmxInt8Gemm(Int8Gemm):
    """`Int8Gemm` (C = A·B (+ offset), int8 weights fixed at construction) on AMX tiles."""

    def __init__(self, weights: np.ndarray, a_dtype: DType | np.dtype | type | str, target: TargetSpec,
                 offset: np.ndarray | None = None, name: str = "lowbit_gemm_amx") -> None:
        if not available(target):
            raise TargetError(f"the AMX int8 GEMM needs amx-tile and amx-int8, which target {target.name} lacks")
        self._build(plan_amx(weights, a_dtype, offset), emit_amx_gemm, target, name)

    @property
    def route(self) -> str:
        return "amx"
