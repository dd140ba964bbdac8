"""Products of two run-time 8-bit operands (`qmatmul`, `dynamic_matmul`): C[M, N] = A[M, K]·B[K, N] for every
batch index, on AMX tiles (`AmxProduct`) or on the int8 routes' register tiles (`TileProduct`).

B is an activation, so it is packed at run time into the layout the tiles read: for AMX the layout of
constant weights (`gemm_amx.pack_b`: column tiles of whole 64-byte K steps, 4 consecutive K values per
int32 column, zero in the K padding), for the register tiles the route's panels (`gemm_int8`), converted
(u8 flipped to s8 where the route wants signed bytes). That costs one pass over B, small beside the
product at attention sizes (M multiply-adds per packed byte). A is read in place when its rows are what
the tiles read, else copied (K padded; converted for the register tiles).

The tiles' raw sums are exact modulo 2^32; the zero-point terms (and the conversions' shifts) come from
the caller's row sums of A and column sums of B (`Corrections`), computed per batch index before the
tiles by its `Sums`. The caller proves the corrected sums fit int32, so wrapping intermediate values do
not matter.

Threads share units (batch index, block of columns[, row chunk]); each packs what its units read into its
own scratch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from llvmlite import ir

from lowbit.kernels import llvm as ll
from lowbit.kernels.gemm_amx import BLOCK, BYTES, STEP, TILE, AmxTiles, BLayout, steps
from lowbit.ir.dtypes import DType
from lowbit.kernels.gemm_int8 import (Epilogue, Route, TileEmitter, activation_shift, emit_pack_a, emit_pack_b_panel,
                                      runtime_route, weight_shift)
from lowbit.kernels.llvm import I8, I32, I64, VOID, TargetSpec
from lowbit.kernels.packing import Panel, column_panels
from lowbit.kernels.parallel import chunk_bounds, for_units, split_rows

# (builder, a, b, row sums (i32*), column sums (i32*)) of one batch index: fills the sums
Sums = Callable[[ir.IRBuilder, ir.Value, ir.Value, ir.Value, ir.Value], None]
# (builder, flat batch index) -> (a, b, out) of that index
Operands = Callable[[ir.IRBuilder, ir.Value], Sequence[ir.Value]]
# (out, row sums, column sums) -> the epilogue's arguments
Arguments = Callable[[ir.Value, ir.Value, ir.Value], list[ir.Value]]


def _c(value: int) -> ir.Constant:
    return ir.Constant(I64, value)


def _aligned(size: int) -> int:
    return -(-size // 64) * 64


@dataclass(frozen=True)
class AmxProduct:
    """One matrix product of the batch on AMX: A [m, k] (row pitch k bytes), B [k, n] (row pitch n bytes);
    the tiles multiply the stored bytes with their own signedness (no conversion)."""

    m: int
    k: int
    n: int
    a_signed: bool
    b_signed: bool

    @property
    def packs_a(self) -> bool:
        """Rows of A are whole K steps only when K is (then A is read in place)."""
        return self.k % STEP != 0

    @property
    def a_row_bytes(self) -> int:
        return steps(self.k) * STEP if self.packs_a else self.k

    @property
    def col_tiles(self) -> int:
        return -(-self.n // TILE)

    @property
    def tile_bytes(self) -> int:
        """One packed column tile of B: all K steps of 16 rows × 64 bytes."""
        return steps(self.k) * TILE * STEP

    @property
    def blocks(self) -> int:
        return -(-self.n // (BLOCK * TILE))

    @property
    def layout(self) -> BLayout:
        return BLayout(stride=STEP, tile=self.tile_bytes, step=TILE * STEP)

    def _sizes(self) -> list[int]:
        """packed A, packed B, row sums (i32), column sums (i32, padded to whole blocks plus a vector)."""
        return [self.m * self.a_row_bytes if self.packs_a else 0, self.col_tiles * self.tile_bytes,
                4 * self.m, 4 * self.blocks * BLOCK * TILE + 64]

    def starts(self) -> list[int]:
        return np.cumsum([0] + [_aligned(size) for size in self._sizes()]).tolist()

    @property
    def scratch_bytes(self) -> int:
        """Per-thread scratch of `emit_amx_product`."""
        return self.starts()[-1]


def emit_pack_b(module: ir.Module, name: str, product: AmxProduct) -> ir.Function:
    """`name(b, dst)`: B [k, n] (row pitch n bytes) as packed column tiles at dst (`product.layout`), zero in
    the K padding (whole steps) and past column n."""
    fn = ir.Function(module, ir.FunctionType(VOID, [I8.as_pointer(), I8.as_pointer()]), name)
    fn.linkage = "internal"
    b, dst = fn.args
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    k, n = product.k, product.n
    kr = BYTES.kr
    groups, padded = -(-k // kr), steps(k) * TILE  # groups of 4 K values written / in the tile layout
    group_bytes = TILE * kr
    panels = {valid: emit_pack_b_panel(module, f"{name}.{valid}", BYTES, k, 0, product.b_signed, valid, TILE)
              for valid in {min(TILE, n - t * TILE) for t in range(product.col_tiles)}}
    zeros = ir.Constant(ll.vector(I8, group_bytes), None)

    def tile(bld: ir.IRBuilder, t: ir.Value, valid: int) -> None:
        at = bld.gep(dst, [bld.mul(t, _c(product.tile_bytes))])
        bld.call(panels[valid], [bld.gep(b, [bld.mul(t, _c(TILE))]), _c(n), at])
        for g in range(groups, padded):
            bld.store(zeros, ll.pointer_at(bld, at, g * group_bytes, zeros.type), align=1)

    full, edge = divmod(n, TILE)
    if full:
        ll.static_loop(builder, full, "tile", lambda bld, t, c: tile(bld, t, TILE) or c)
    if edge:
        tile(builder, _c(full), edge)
    builder.ret_void()
    return fn


def emit_product(amx: bool, num_threads: int, *arguments) -> None:
    """The product on AMX tiles (`emit_amx_product`) or on register tiles (`emit_tile_product`, which also
    takes the team's thread count); `arguments` are the two emitters' common ones."""
    if amx:
        emit_amx_product(*arguments)
    else:
        emit_tile_product(*arguments, num_threads)


def emit_amx_product(builder: ir.IRBuilder, name: str, product: AmxProduct, batch: int, operands: Operands,
                     sums: Sums, scratch: ir.Value, epilogue: Epilogue, args: Arguments, thread: ir.Value,
                     threads: ir.Value) -> None:
    """This thread's share of C = A·B over `batch` batch indices into `epilogue`, its arguments
    `args(out, row sums, column sums)`; `scratch`: this thread's `product.scratch_bytes`."""
    module = builder.module
    packed_a, packed_b, rows, cols = (builder.gep(scratch, [_c(start)]) for start in product.starts()[:4])
    rows, cols = builder.bitcast(rows, I32.as_pointer()), builder.bitcast(cols, I32.as_pointer())
    pack_a = emit_pack_a(module, f"{name}.pack_a", BYTES, product.k, 0, product.a_signed, product.a_row_bytes) \
        if product.packs_a else None
    pack_b = emit_pack_b(module, f"{name}.pack_b", product)
    tiles = AmxTiles(module, name, steps(product.k), product.a_signed, product.b_signed, product.layout, epilogue)
    lda = _c(product.a_row_bytes)

    def prepare(bld: ir.IRBuilder, indices: list[ir.Value]) -> None:
        a_t, b_t, _ = operands(bld, indices[0])
        if pack_a is not None:
            bld.call(pack_a, [a_t, _c(product.k), _c(product.m), packed_a])
        bld.call(pack_b, [b_t, packed_b])
        sums(bld, a_t, b_t, rows, cols)

    def unit(bld: ir.IRBuilder, indices: list[ir.Value]) -> None:
        index, block = indices
        a_t, _, out_t = operands(bld, index)
        tiles.run(bld, packed_a if pack_a is not None else a_t, lda, _c(product.m), packed_b, product.n, block,
                  bld.add(block, _c(1)), args(out_t, rows, cols))

    for_units(builder, thread, threads, [batch, product.blocks], "unit", unit, {0: prepare})


# -- the int8 routes' register tiles -------------------------------------------------------------------
@dataclass(frozen=True)
class TileProduct:
    """One matrix product of the batch on the register tiles of `route` (`gemm_int8.runtime_route`: one that
    cannot saturate): A's rows broadcast (shifted by `shift_a`), B packed into panels of `vectors` vectors
    (shifted by `shift_b`), MR = `mr` rows per tile."""

    m: int
    k: int
    n: int
    a_dtype: DType
    b_dtype: DType
    route: Route
    mr: int
    vectors: int

    @staticmethod
    def plan(target: TargetSpec, m: int, k: int, n: int, a_dtype: DType, b_dtype: DType) -> "TileProduct":
        route = runtime_route(target)
        return TileProduct(m, k, n, a_dtype, b_dtype, route, *route.tile(target))

    @property
    def shift_a(self) -> int:
        return activation_shift(self.route, self.a_dtype)

    @property
    def shift_b(self) -> int:
        return weight_shift(self.route, self.b_dtype)

    @property
    def groups(self) -> int:
        return -(-self.k // self.route.kr)

    @property
    def packs_a(self) -> bool:
        return self.shift_a != 0 or self.route.bits != 8 or self.k % self.route.kr != 0

    @property
    def a_row_bytes(self) -> int:
        return _aligned(self.groups * self.route.group_bytes) if self.packs_a else self.k

    @property
    def width(self) -> int:
        return self.vectors * self.route.lanes

    @property
    def panels(self) -> tuple[Panel, ...]:
        return column_panels(self.n, self.route.lanes, self.vectors)

    def starts(self) -> list[int]:
        """packed A, one packed panel, row sums, column sums."""
        sizes = [self.m * self.a_row_bytes if self.packs_a else 0, self.groups * self.width * self.route.group_bytes,
                 4 * self.m + 64, 4 * self.n + 256]
        return np.cumsum([0] + [_aligned(size) for size in sizes]).tolist()

    @property
    def scratch_bytes(self) -> int:
        """Per-thread scratch of `emit_tile_product`."""
        return self.starts()[-1]


def emit_tile_product(builder: ir.IRBuilder, name: str, product: TileProduct, batch: int, operands: Operands,
                      sums: Sums, scratch: ir.Value, epilogue: Epilogue, args: Arguments, thread: ir.Value,
                      threads: ir.Value, num_threads: int) -> None:
    """This thread's share of C = A·B over `batch` batch indices into `epilogue`, its arguments
    `args(out, row sums, column sums)`; `scratch`: this thread's `product.scratch_bytes`. Units (batch
    index, column panel, row chunk), chunks sized for `num_threads`; a thread packs A and the sums when its
    batch index changes, a panel of B when its panel does."""
    module, route, m, k, n = builder.module, product.route, product.m, product.k, product.n
    packed_a, panel, rows, cols = (builder.gep(scratch, [_c(start)]) for start in product.starts()[:4])
    rows, cols = builder.bitcast(rows, I32.as_pointer()), builder.bitcast(cols, I32.as_pointer())
    tiles = TileEmitter(module, name, route, product.groups, product.mr, epilogue, aligned=False)
    pack = emit_pack_a(module, f"{name}.pack_a", route, k, product.shift_a, product.a_dtype.is_signed,
                       product.a_row_bytes) if product.packs_a else None
    panels, width = product.panels, product.width
    pack_b = {shape: emit_pack_b_panel(module, f"{name}.pack_b{shape[1]}", route, k, product.shift_b,
                                       product.b_dtype.is_signed, shape[1], shape[0] * route.lanes)
              for shape in {(p.vectors, p.valid) for p in panels}}
    lda = _c(product.a_row_bytes)
    full = sum(p.valid == width for p in panels)  # all but an edge panel
    chunk = split_rows(m, product.mr, batch * len(panels), num_threads)

    def prepare(bld: ir.IRBuilder, indices: list[ir.Value]) -> None:
        a_t, b_t, _ = operands(bld, indices[0])
        if pack is not None:
            bld.call(pack, [a_t, _c(k), _c(m), packed_a])
        sums(bld, a_t, b_t, rows, cols)

    def by_panel(bld: ir.IRBuilder, index: ir.Value, visit) -> None:
        """visit(builder, panel shape, its first column) for panel number `index`."""
        edge = panels[-1]
        if full == len(panels):
            visit(bld, panels[0], bld.mul(index, _c(width)))
            return
        if full == 0:
            visit(bld, edge, _c(edge.start))
            return
        with bld.if_else(bld.icmp_unsigned("<", index, _c(full))) as (whole, last):
            with whole:
                visit(bld, panels[0], bld.mul(index, _c(width)))
            with last:
                visit(bld, edge, _c(edge.start))

    def pack_panel(bld: ir.IRBuilder, indices: list[ir.Value]) -> None:
        b_t = operands(bld, indices[0])[1]
        by_panel(bld, indices[1], lambda b2, p, column: b2.call(pack_b[(p.vectors, p.valid)], [
            b2.gep(b_t, [column]), _c(n), panel]))

    def unit(bld: ir.IRBuilder, indices: list[ir.Value]) -> None:
        index, panel_index, part = indices
        a_t, _, out_t = operands(bld, index)
        first, count = chunk_bounds(bld, part, chunk, m)
        by_panel(bld, panel_index, lambda b2, p, column: tiles.run_panel(
            b2, a_t if pack is None else packed_a, lda, count, panel, column, p.vectors, p.valid,
            args(out_t, rows, cols), first))

    for_units(builder, thread, threads, [batch, len(panels), -(-m // chunk)], "unit", unit,
              {0: prepare, 1: pack_panel})
