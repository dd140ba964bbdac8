"""int8 GEMM: C[M, N] (int32) = A[M, K] · B[K, N], generated as LLVM IR for a target.

A holds run-time activations (u8 or i8, row-major); B holds int8 weights known at compile time, packed
into column panels (`packing.pack_weights`). The result is the raw integer product, optionally plus a
per-column int32 offset (bias and zero-point terms folded at compile time, see `packing`).

One generator serves every instruction route; a `Route` names the multiply-accumulate step and the
data shapes it wants:

* `kr` consecutive K values share one i32 accumulator lane per step, so both operands are handled in
  groups of kr values (`bits` wide each): A's group is broadcast to all lanes, B's groups for `lanes`
  columns form one vector.
* 8-bit routes want A unsigned (x86 `vpdpbusd`, `vpmaddubsw`) or signed (ARM `sdot`). Activations of
  the other signedness are flipped while A is packed (x ^ 0x80 = x ± 128) and the exact correction
  ∓128·colsum(B) joins the compile-time offset. 16-bit routes widen A by its own sign instead.
* `vpmaddubsw` sums two u8×s8 products in saturating int16, so that route is chosen only where the
  known weights (and the activation range) prove no pair sum can exceed int16.
* Accumulation is modular int32 (no instruction here saturates), exact whenever the true result fits
  int32, which `plan_gemm` checks from the weights.

The generated function first packs A when the route needs it (flip, widen, or K not a multiple of
kr; packed rows are zero-padded to whole groups) and otherwise reads the caller's rows in place. It
then walks column panels (outer, so a panel of B stays in L1) and row tiles (inner); a tile keeps an
MR × (NV·lanes) block of C in registers over all of K, one A broadcast per row and step. Remainder rows
use power-of-two tiles, the edge panel is narrower and stores only its real columns.

The pieces also build the native backend's integer products inside a model's module (`TileEmitter`,
`emit_panels`): a tile hands its accumulators to an `Epilogue` (requantization, `kernels.requantize`)
instead of storing int32; B may be packed at run time, panel by panel, into scratch (`store_groups`,
`emit_pack_b_panel`: a matmul's second operand, a convolution's im2col panels); and with `swapped`
operands the broadcast side holds the weights and the packed side the activations (convolutions, whose
outputs then run along the vector lanes).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Protocol, Sequence

import numpy as np
from llvmlite import ir

from lowbit.errors import ShapeError, TargetError
from lowbit.ir.dtypes import DType
from lowbit.kernels import llvm as ll
from lowbit.kernels.llvm import I8, I16, I32, I64, VOID, TargetSpec
from lowbit.kernels.packing import (ALIGNMENT, PackedWeights, Panel, aligned_empty, column_sums,
                                    pack_weights)
from lowbit.kernels.parallel import Prepare, chunk_bounds, for_units

INT16_MAX = (1 << 15) - 1
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
K_UNROLL = 2  # K groups per loop iteration of a tile
PACK_CHUNK = 16  # activations converted per vector operation while packing A

# mac(builder, module, acc <lanes x i32>, a <lanes x iG>, b <lanes x iG>) -> acc + Σ a·b per lane
Mac = Callable[[ir.IRBuilder, ir.Module, ir.Value, ir.Value, ir.Value], ir.Value]


def _as(builder: ir.IRBuilder, value: ir.Value, element: ir.Type) -> ir.Value:
    """`value` reinterpreted as a vector of `element` of the same total width."""
    count = value.type.count * value.type.element.width // element.width
    return builder.bitcast(value, ll.vector(element, count))


def _intrinsic(builder: ir.IRBuilder, module: ir.Module, name: str, result: ir.Type,
               *args: ir.Value) -> ir.Value:
    return builder.call(ll.declare(module, name, result, *(arg.type for arg in args)), list(args))


def mac_vpdpbusd(builder, module, acc, a, b):
    # i32-vector operands: the form every LLVM since 12 accepts (22 auto-upgrades it to i8 vectors)
    return _intrinsic(builder, module, f"llvm.x86.avx512.vpdpbusd.{acc.type.count * 32}", acc.type,
                      acc, a, b)


def _mac_pmaddubsw(builder, module, acc, a, b):
    pairs = _intrinsic(builder, module, "llvm.x86.avx2.pmadd.ub.sw", ll.vector(I16, 16),
                       _as(builder, a, I8), _as(builder, b, I8))
    ones = ir.Constant(ll.vector(I16, 16), [1] * 16)
    quads = _intrinsic(builder, module, "llvm.x86.avx2.pmadd.wd", acc.type, pairs, ones)
    return builder.add(acc, quads)


PMADDWD = {4: "llvm.x86.sse2.pmadd.wd", 8: "llvm.x86.avx2.pmadd.wd", 16: "llvm.x86.avx512.pmaddw.d.512"}


def mac_pmaddwd(builder, module, acc, a, b):
    """acc + the sums of the two int16 products in each int32 lane of a and b (x86 `vpmaddwd`)."""
    pairs = _intrinsic(builder, module, PMADDWD[acc.type.count], acc.type,
                       _as(builder, a, I16), _as(builder, b, I16))
    return builder.add(acc, pairs)


def mac_sdot(builder, module, acc, a, b):
    return _intrinsic(builder, module, "llvm.aarch64.neon.sdot.v4i32.v16i8", acc.type, acc,
                      _as(builder, a, I8), _as(builder, b, I8))


def _mac_widen(builder, module, acc, a, b):
    # plain vector IR (one 16-bit value per lane): AArch64 selects smlal, x86 vpmulld
    wide = builder.mul(builder.sext(a, acc.type), builder.sext(b, acc.type))
    return builder.add(acc, wide)


@dataclass(frozen=True)
class Route:
    """An instruction sequence for the multiply-accumulate step and the data layout it wants."""

    name: str
    arch: str | None  # None: plain vector IR, any architecture
    requires: tuple[frozenset[str], ...]  # alternatives: the target must have one of these sets
    lanes: int  # i32 accumulator lanes per vector
    kr: int  # K values per lane and step
    bits: int  # width of packed A and B values: 8 (bytes as the instruction wants) or 16 (extended)
    a_signed: bool | None  # signedness an 8-bit route wants for A; None for 16-bit routes
    saturates: bool  # pairs of u8×s8 products saturate at int16
    tile16: tuple[int, int]  # (MR rows, NV vectors) with 16 vector registers
    tile32: tuple[int, int]  # ... with 32
    mac: Mac = field(compare=False)

    def available(self, target: TargetSpec) -> bool:
        arch_ok = self.arch is None or self.arch == target.arch
        return arch_ok and (not self.requires or any(needs <= target.features for needs in self.requires))

    def tile(self, target: TargetSpec) -> tuple[int, int]:
        many = target.arch == "aarch64" or "avx512f" in target.features
        return self.tile32 if many else self.tile16

    @property
    def element_bytes(self) -> int:
        return self.bits // 8

    @property
    def group_bytes(self) -> int:
        return self.kr * self.element_bytes


def _set(*features: str) -> frozenset[str]:
    return frozenset(features)


# In order of preference: the first available (and exact) route is chosen.
ROUTES: tuple[Route, ...] = (
    Route("avx512-vnni", "x86_64", (_set("avx512vnni", "avx512bw"),), 16, 4, 8, False, False,
          (6, 4), (6, 4), mac_vpdpbusd),
    Route("avx-vnni", "x86_64", (_set("avxvnni"), _set("avx512vnni", "avx512vl")), 8, 4, 8, False,
          False, (4, 3), (6, 4), mac_vpdpbusd),
    Route("avx2-maddubs", "x86_64", (_set("avx2"),), 8, 4, 8, False, True, (4, 2), (8, 2),
          _mac_pmaddubsw),
    Route("avx2-madd16", "x86_64", (_set("avx2"),), 8, 2, 16, None, False, (4, 2), (8, 2),
          mac_pmaddwd),
    Route("neon-dotprod", "aarch64", (_set("neon", "dotprod"),), 4, 4, 8, True, False, (4, 3), (8, 3),
          mac_sdot),
    Route("widen", None, (), 4, 1, 16, None, False, (4, 2), (8, 2), _mac_widen),
)
ROUTE_NAMES = {route.name: route for route in ROUTES}


def activation_dtype(a_dtype: DType | np.dtype | type | str) -> DType:
    try:
        dtype = a_dtype if isinstance(a_dtype, DType) else DType.from_numpy(np.dtype(a_dtype))
    except TypeError:
        dtype = None
    if dtype not in (DType.u8, DType.i8):
        raise ShapeError(f"int8 GEMM: activations must be u8 or i8, not {a_dtype}")
    return dtype


def _activation_range(a_dtype: DType, guarantee_7bit: bool) -> tuple[int, int]:
    return (0, 127) if guarantee_7bit else (a_dtype.min, a_dtype.max)


def _flips(route: Route, a_dtype: DType, guarantee_7bit: bool) -> bool:
    """Whether A is flipped (x ^ 0x80) on its way to an 8-bit route of the other signedness."""
    # values in [0, 127] read the same as u8 and as i8
    return route.a_signed is not None and not guarantee_7bit and route.a_signed != a_dtype.is_signed


def _pairs_fit_int16(weights: np.ndarray, a_max: int) -> bool:
    """Whether u8 values in [0, a_max] times each pair of consecutive weights sum inside int16."""
    k = weights.shape[0]
    padded = np.zeros((k + k % 2, weights.shape[1]), dtype=np.int64)
    padded[:k] = weights
    pairs = padded.reshape(-1, 2, weights.shape[1])
    positive = np.clip(pairs, 0, None).sum(axis=1)
    negative = np.clip(-pairs, 0, None).sum(axis=1)
    return a_max * int(max(positive.max(initial=0), negative.max(initial=0))) <= INT16_MAX


def _exact(route: Route, weights: np.ndarray, guarantee_7bit: bool) -> bool:
    # after packing, an 8-bit route sees A as u8 in [0, 255], or [0, 127] under the guarantee
    return not route.saturates or _pairs_fit_int16(weights, 127 if guarantee_7bit else 255)


def choose_route(target: TargetSpec, weights: np.ndarray, guarantee_7bit: bool,
                 forced: str | None = None) -> Route:
    """The fastest exact route for `target`, or the route named `forced` (checked)."""
    if forced is not None:
        route = ROUTE_NAMES.get(forced)
        if route is None:
            raise TargetError(f"unknown int8 GEMM route '{forced}'; routes: {', '.join(ROUTE_NAMES)}")
        if not route.available(target):
            raise TargetError(f"int8 GEMM route '{forced}' needs features target {target.name} lacks")
        if not _exact(route, weights, guarantee_7bit):
            raise TargetError(f"int8 GEMM route '{forced}' would saturate int16 pair sums with these "
                              f"weights; it needs 7-bit weights or activations guaranteed in [0, 127]")
        return route
    for route in ROUTES:
        if route.available(target) and _exact(route, weights, guarantee_7bit):
            return route
    raise TargetError(f"no int8 GEMM route for target {target.name}")  # unreachable: widen fits all


@dataclass(frozen=True)
class GemmPlan:
    """Everything static about one GEMM: route, tile, packed weights and the folded offset."""

    route: Route
    k: int
    n: int
    a_dtype: DType
    flip: bool
    mr: int
    weights: PackedWeights
    offset: np.ndarray | None  # int32 [padded columns], or None when nothing is added

    @property
    def groups(self) -> int:
        return self.weights.groups

    @property
    def packs_a(self) -> bool:
        """Whether A is copied before use: to flip it, widen it or pad K to whole groups. Otherwise
        the tiles read the caller's rows directly."""
        return self.flip or self.route.bits != 8 or self.k % self.route.kr != 0

    @property
    def packed_row_bytes(self) -> int:
        """Row pitch of packed A: whole groups, rounded up to a cache line."""
        return -(-self.groups * self.route.group_bytes // ALIGNMENT) * ALIGNMENT

    def panel_bytes(self, panel: Panel) -> int:
        return self.weights.panel_bytes(panel, self.route.lanes, self.route.kr, self.route.element_bytes)


def check_accumulator_range(weights: np.ndarray, offset: np.ndarray, a_low: int, a_high: int) -> None:
    """int32 lanes wrap, which is exact as long as every true result fits int32: check that here."""
    w = weights.astype(np.int64)
    positive = np.clip(w, 0, None).sum(axis=0)
    negative = np.clip(-w, 0, None).sum(axis=0)
    highest = a_high * positive - a_low * negative + offset
    lowest = a_low * positive - a_high * negative + offset
    if highest.max(initial=0) > INT32_MAX or lowest.min(initial=0) < INT32_MIN:
        raise ShapeError(f"int8 GEMM with K={weights.shape[0]}: results (with the offset) can exceed "
                         f"int32 for activations in [{a_low}, {a_high}]")


def checked_operands(weights: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
    """The per-column offset as int64 (zeros without one), after checking that `weights` is a non-empty
    int8 [K, N] array and `offset` an integer vector of N values; a ShapeError otherwise."""
    if not isinstance(weights, np.ndarray) or weights.dtype != np.int8 or weights.ndim != 2 \
            or 0 in weights.shape:
        described = (f"{weights.dtype} {list(weights.shape)}" if isinstance(weights, np.ndarray)
                     else type(weights).__name__)
        raise ShapeError(f"int8 GEMM: weights must be a non-empty 2-D int8 array [K, N], not {described}")
    n = weights.shape[1]
    total = np.zeros(n, dtype=np.int64)
    if offset is not None:
        offset = np.asarray(offset)
        if offset.shape != (n,) or not np.issubdtype(offset.dtype, np.integer):
            raise ShapeError(f"int8 GEMM: offset must be an integer vector of {n} values, "
                             f"not {offset.dtype} {list(offset.shape)}")
        total += offset
    return total


def plan_gemm(weights: np.ndarray, a_dtype: DType | np.dtype | type | str, target: TargetSpec,
              guarantee_7bit: bool = False, offset: np.ndarray | None = None,
              route: str | None = None, tile: tuple[int, int] | None = None) -> GemmPlan:
    """Check the inputs, choose the route and tile, pack the weights and fold the offset.

    `tile` (MR rows, NV vectors) overrides the route's register tile (tests, tuning).
    """
    total = checked_operands(weights, offset)
    dtype = activation_dtype(a_dtype)
    k, n = weights.shape
    chosen = choose_route(target, weights, guarantee_7bit, route)
    flip = _flips(chosen, dtype, guarantee_7bit)
    a_low, a_high = _activation_range(dtype, guarantee_7bit)
    check_accumulator_range(weights, total, a_low, a_high)
    if flip:
        # the kernel computes Σ (a ± 128)·b: + for i8 fed as u8, − for u8 fed as s8
        total -= (128 if dtype.is_signed else -128) * column_sums(weights)
    mr, vectors = tile or chosen.tile(target)
    if mr < 1 or vectors < 1:
        raise ValueError(f"int8 GEMM tile {tile}: rows and vectors must be positive")
    packed = pack_weights(weights, chosen.lanes, vectors, chosen.kr,
                          np.int8 if chosen.bits == 8 else np.int16)
    folded = None
    if offset is not None or flip:
        folded = aligned_empty(4 * packed.padded_columns, np.int32)
        folded[:] = 0
        folded[:n] = total  # fits int32 modulo 2^32, which is all the wrapping lanes need
    return GemmPlan(chosen, k, n, dtype, flip, mr, packed, folded)


# -- activations on their way to a route ---------------------------------------------------------
def activation_shift(route: Route, a_dtype: DType, guarantee_7bit: bool = False) -> int:
    """What packing adds to 8-bit activations for `route`: +128 for i8 fed as u8, −128 for u8 fed as
    s8 (both a flip, x ^ 0x80), 0 when they are used as they are (16-bit routes widen instead)."""
    if not _flips(route, a_dtype, guarantee_7bit):
        return 0
    return 128 if a_dtype.is_signed else -128


def weight_shift(route: Route, dtype: DType) -> int:
    """What packing adds to 8-bit values on the weights' side of `route` (signed bytes on every 8-bit
    route): −128 for u8 run-time operands, 0 otherwise."""
    return -128 if route.bits == 8 and not dtype.is_signed else 0


def convert_values(builder: ir.IRBuilder, values: ir.Value, shift: int, bits: int, signed: bool) -> ir.Value:
    """Bytes (an i8 vector) as a route stores them: flipped when `shift` is ±128, widened by their own
    sign for 16-bit routes."""
    if shift:
        values = builder.xor(values, ir.Constant(values.type, [0x80] * values.type.count))
    if bits == 16:
        extend = builder.sext if signed else builder.zext
        values = extend(values, ll.vector(I16, values.type.count))
    return values


def store_groups(builder: ir.IRBuilder, route: Route, rows: Sequence[ir.Value], target: ir.Value) -> None:
    """Write one K group of a packed panel at `target`: `route.kr` converted rows of W values each become
    W groups, row j's value the j-th of group c (the layout `pack_weights` makes).

    Written as LLVM's canonical interleaved store (a shuffle of the concatenated rows with an interleave
    mask, then one store), which its InterleavedAccess pass turns into unpack sequences on x86 and st2 /
    st4 on AArch64."""
    width, factor = rows[0].type.count, len(rows)
    if factor == 1:
        value = rows[0]
    else:
        pairs = [builder.shuffle_vector(rows[j], rows[j + 1], ll.const_vector(I32, range(2 * width)))
                 for j in range(0, factor, 2)]
        value = pairs[0] if factor == 2 else builder.shuffle_vector(
            pairs[0], pairs[1], ll.const_vector(I32, range(4 * width)))
        value = builder.shuffle_vector(value, ir.Constant(value.type, ir.Undefined), ll.const_vector(
            I32, [j * width + c for c in range(width) for j in range(factor)]))
    builder.store(value, builder.bitcast(target, value.type.as_pointer()), align=1)


def emit_pack_a(module: ir.Module, name: str, route: Route, k: int, shift: int, signed: bool,
                row_bytes: int) -> ir.Function:
    """`name(a, lda, rows, dst)`: rows of 8-bit A → rows of `row_bytes` at dst as `route` reads them
    (`convert_values`), K zero-padded to whole groups."""
    fn = ir.Function(module, ir.FunctionType(VOID, [I8.as_pointer(), I64, I64, I8.as_pointer()]), name)
    fn.linkage = "internal"
    a, lda, rows, packed = fn.args
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    chunk, size = PACK_CHUNK, route.element_bytes
    element = I8 if route.bits == 8 else I16
    groups = -(-k // route.kr)

    def convert(builder: ir.IRBuilder, values: ir.Value) -> ir.Value:
        return convert_values(builder, values, shift, route.bits, signed)

    def row_body(builder, r, _):
        source = builder.gep(a, [builder.mul(r, lda)])
        target = builder.gep(packed, [builder.mul(r, ir.Constant(I64, row_bytes))])

        def chunk_body(builder, i, _):
            at = builder.mul(i, ir.Constant(I64, chunk))
            values = builder.load(ll.pointer_at(builder, source, at, ll.vector(I8, chunk)), align=1)
            builder.store(convert(builder, values),
                          ll.pointer_at(builder, target, builder.mul(at, ir.Constant(I64, size)),
                                        ll.vector(element, chunk)), align=1)

        ll.counted_loop(builder, ir.Constant(I64, k // chunk), "c", body=chunk_body)
        for index in range(k - k % chunk, groups * route.kr):
            if index < k:
                value = builder.load(builder.gep(source, [ir.Constant(I64, index)]))
                value = builder.extract_element(
                    convert(builder, builder.insert_element(
                        ir.Constant(ll.vector(I8, 1), ir.Undefined), value, ir.Constant(I32, 0))),
                    ir.Constant(I32, 0))
            else:
                value = ir.Constant(element, 0)  # K padding: B is zero there, zero keeps it tidy
            builder.store(value, ll.pointer_at(builder, target, index * size, element), align=1)

    ll.counted_loop(builder, rows, "r", body=row_body)
    builder.ret_void()
    return fn


# -- epilogues ------------------------------------------------------------------------------------
class Epilogue(Protocol):
    """What a register tile does with its accumulators. The GEMM hands every tile the epilogue's own
    arguments (`arg_types`, after the tile's), so outputs, tables and run-time sums reach it."""

    arg_types: tuple[ir.Type, ...]

    def emit(self, builder: ir.IRBuilder, accs: list[list[ir.Value]], row0: ir.Value, col0: ir.Value,
             valid: int, args: Sequence[ir.Value]) -> None:
        """`accs[r][v]`: the i32 lanes of C[row0 + r, col0 + v·lanes ...]; columns from col0 + valid on
        are padding."""


@dataclass(frozen=True)
class Int32Store:
    """The plain GEMM's epilogue: C (int32, row pitch `ldc`) = acc (+ the per-column offset)."""

    lanes: int
    offset: bool
    arg_types = (I32.as_pointer(), I32.as_pointer(), I64)  # offset, c, ldc

    def emit(self, builder, accs, row0, col0, valid, args) -> None:
        offset, c, ldc = args
        acc_type = accs[0][0].type
        adds = [builder.load(builder.bitcast(builder.gep(offset, [builder.add(col0, ir.Constant(I64, v * self.lanes))]),
                                             acc_type.as_pointer()), align=4)
                for v in range(len(accs[0]))] if self.offset else []
        for r, row_accs in enumerate(accs):
            row = builder.gep(c, [builder.add(builder.mul(builder.add(row0, ir.Constant(I64, r)), ldc), col0)])
            for v, acc in enumerate(row_accs):
                if adds:
                    acc = builder.add(acc, adds[v])
                ll.store_partial(builder, acc, builder.gep(row, [ir.Constant(I64, v * self.lanes)]),
                                 valid - v * self.lanes)


# -- register tiles ---------------------------------------------------------------------------------
class TileEmitter:
    """The register tiles of one GEMM in a module: a tile keeps an MR × (NV·lanes) block of C in registers
    over all of K, one broadcast per row and K group, then runs the epilogue.

    A (the broadcast side) is rows of whole groups with a byte pitch `lda`; B (the vector side) is one
    packed panel [groups][panel columns][kr]. `swapped`: A holds the weights and B the activations (a
    convolution's im2col panels), so the operands reach the route's instruction the other way round.
    """

    def __init__(self, module: ir.Module, name: str, route: Route, groups: int, mr: int, epilogue: Epilogue,
                 swapped: bool = False, aligned: bool = True) -> None:
        self.module, self.name, self.route, self.groups, self.mr = module, name, route, groups, mr
        self.epilogue, self.swapped = epilogue, swapped
        self.panel_align = min(route.lanes * route.group_bytes, ALIGNMENT) if aligned else 1
        self.group = ir.IntType(route.group_bytes * 8)  # one group of kr values
        self.acc_type = ll.vector(I32, route.lanes)
        self.group_vec = ll.vector(self.group, route.lanes)
        self.ptr = I8.as_pointer()
        self.tiles: dict[tuple[int, int, int], ir.Function] = {}

    def row_blocks(self, builder: ir.IRBuilder, m: ir.Value,
                   visit: Callable[[ir.IRBuilder, int, ir.Value], None]) -> None:
        """Call visit(builder, rows, first_row) for every block of rows: full MR tiles, then the
        remainder as power-of-two blocks (4, 2, 1 rows …) so that few tile variants cover every M.
        A constant M gets only the blocks it needs."""
        if isinstance(m, ir.Constant):
            full, rest = divmod(m.constant, self.mr)
            if full:
                ll.static_loop(builder, full, "m", lambda builder, t, c: visit(
                    builder, self.mr, builder.mul(t, ir.Constant(I64, self.mr))) or c)
            for rows in remainder_blocks(self.mr):
                if rest & rows:
                    visit(builder, rows, ir.Constant(I64, full * self.mr + (rest & ~(2 * rows - 1))))
            return
        mr = ir.Constant(I64, self.mr)
        full_tiles = builder.sdiv(m, mr)
        ll.counted_loop(builder, full_tiles, "m",
                        body=lambda builder, t, _: visit(builder, self.mr, builder.mul(t, mr)))
        rest = builder.srem(m, mr)
        base = builder.mul(full_tiles, mr)
        for rows in remainder_blocks(self.mr):
            with builder.if_then(builder.icmp_signed("!=", builder.and_(rest, ir.Constant(I64, rows)),
                                                     ir.Constant(I64, 0))):
                before = builder.and_(rest, ir.Constant(I64, ~(2 * rows - 1)))  # the larger blocks
                visit(builder, rows, builder.add(base, before))

    def run_panel(self, builder: ir.IRBuilder, a: ir.Value, lda: ir.Value, m: ir.Value, b: ir.Value,
                  col0: ir.Value, vectors: int, valid: int, args: Sequence[ir.Value],
                  first_row: ir.Value | None = None) -> None:
        """Rows first_row .. first_row + m (default 0 .. m) of A against the panel at `b` (columns col0 ..
        col0 + valid of C)."""
        def visit(builder: ir.IRBuilder, rows: int, first: ir.Value) -> None:
            if first_row is not None:
                first = builder.add(first_row, first)
            builder.call(self.tile(rows, vectors, valid),
                         [builder.gep(a, [builder.mul(first, lda)]), lda, b, first, col0, *args])

        self.row_blocks(builder, m, visit)

    def tile(self, rows: int, vectors: int, valid: int) -> ir.Function:
        """The micro-kernel for `rows` rows of one panel shape (full panels share one)."""
        key = (rows, vectors, valid)
        if key not in self.tiles:
            self.tiles[key] = self._emit_tile(*key)
        return self.tiles[key]

    def _emit_tile(self, rows: int, vectors: int, valid: int) -> ir.Function:
        """tile(a, lda, b, row0, col0, epilogue args...)."""
        route = self.route
        lanes, gb = route.lanes, route.group_bytes
        fn = ir.Function(self.module, ir.FunctionType(VOID, [self.ptr, I64, self.ptr, I64, I64,
                                                             *self.epilogue.arg_types]),
                         f"{self.name}.tile{rows}x{vectors}.{valid}")
        fn.linkage = "internal"
        fn.attributes.add("noinline")  # compiled once, called from each row block
        a, lda, b, row0, col0, *args = fn.args
        for arg in fn.args:
            if isinstance(arg.type, ir.PointerType):
                arg.add_attribute("noalias")
        builder = ir.IRBuilder(fn.append_basic_block("entry"))
        accs = [ir.Constant(self.acc_type, [0] * lanes)] * (rows * vectors)  # row-major [rows][vectors]
        a_rows = [builder.gep(a, [builder.mul(ir.Constant(I64, r), lda)]) for r in range(rows)]
        b_step = vectors * lanes * gb

        def step(builder: ir.IRBuilder, g: ir.Value, accs: list[ir.Value]) -> list[ir.Value]:
            b_row = builder.gep(b, [builder.mul(g, ir.Constant(I64, b_step))])
            a_at = builder.mul(g, ir.Constant(I64, gb))
            # panels are whole vectors long (and start 64-byte aligned unless `aligned` is off)
            panel = [builder.load(ll.pointer_at(builder, b_row, v * lanes * gb, self.group_vec),
                                  align=self.panel_align) for v in range(vectors)]
            out = []
            for r in range(rows):
                group = builder.load(ll.pointer_at(builder, a_rows[r], a_at, self.group), align=1)
                broadcast = ll.splat(builder, group, lanes)
                for v in range(vectors):
                    # the route's unsigned-side operand first: A's broadcast, or B's vector when swapped
                    first, second = (panel[v], broadcast) if self.swapped else (broadcast, panel[v])
                    out.append(route.mac(builder, self.module, accs[r * vectors + v], first, second))
            return out

        def unrolled(builder, i, accs):
            for u in range(K_UNROLL):
                accs = step(builder, builder.add(builder.mul(i, ir.Constant(I64, K_UNROLL)),
                                                 ir.Constant(I64, u)), accs)
            return accs

        accs = ll.counted_loop(builder, ir.Constant(I64, self.groups // K_UNROLL), "k", accs, unrolled)
        for g in range(self.groups - self.groups % K_UNROLL, self.groups):
            accs = step(builder, ir.Constant(I64, g), accs)
        self.epilogue.emit(builder, [accs[r * vectors:(r + 1) * vectors] for r in range(rows)], row0, col0,
                           valid, args)
        builder.ret_void()
        return fn


def remainder_blocks(mr: int) -> list[int]:
    """Power-of-two block heights, largest first, that sum to any remainder in [0, mr)."""
    return [1 << bit for bit in reversed(range((mr - 1).bit_length()))]


def emit_panels(builder: ir.IRBuilder, tiles: TileEmitter, plan: GemmPlan, a: ir.Value, lda: ir.Value,
                m: ir.Value, b: ir.Value, args: Sequence[ir.Value]) -> None:
    """All of C for the plan's packed weights at `b`: full panels in a loop, then the edge panel."""
    full = _full_panels(plan)
    if full:
        ll.counted_loop(builder, ir.Constant(I64, full), "n", body=lambda builder, p, _: emit_panel(
            builder, tiles, plan, a, lda, m, b, p, args))
    if full < len(plan.weights.panels):
        emit_panel(builder, tiles, plan, a, lda, m, b, ir.Constant(I64, full), args)


def emit_shared_panels(builder: ir.IRBuilder, tiles: TileEmitter, plan: GemmPlan, a: ir.Value, lda: ir.Value,
                       rows: int, b: ir.Value, args: Sequence[ir.Value], thread: ir.Value, threads: ir.Value,
                       chunk: int, prepare: Prepare | None = None) -> None:
    """`thread`'s share of `emit_panels` over `rows` rows (a parallel kernel, `kernels.parallel`): the units
    are (panel, chunk of `chunk` rows), panel-major so that a thread reads few panels of B; `prepare` runs
    before the thread's first unit (e.g. packing A into its own scratch)."""
    def unit(bld: ir.IRBuilder, indices: list[ir.Value]) -> None:
        panel, part = indices
        first, count = chunk_bounds(bld, part, chunk, rows)
        emit_panel(bld, tiles, plan, a, lda, count, b, panel, args, first)

    for_units(builder, thread, threads, [len(plan.weights.panels), -(-rows // chunk)], "unit", unit,
              {-1: prepare} if prepare else None)


def _full_panels(plan: GemmPlan) -> int:
    """How many of the plan's panels are full width (all but an edge panel)."""
    panels = plan.weights.panels
    return sum(panel.valid == panels[0].vectors * plan.route.lanes for panel in panels)


def emit_panel(builder: ir.IRBuilder, tiles: TileEmitter, plan: GemmPlan, a: ir.Value, lda: ir.Value,
               m: ir.Value, b: ir.Value, index: ir.Value, args: Sequence[ir.Value],
               first_row: ir.Value | None = None) -> None:
    """Rows first_row .. first_row + m (default 0 .. m) of C against packed panel number `index` (i64, run
    time: a parallel kernel's unit) of the plan's weights at `b`."""
    panels, full = plan.weights.panels, _full_panels(plan)
    width = panels[0].vectors * plan.route.lanes

    def full_panel(bld: ir.IRBuilder) -> None:
        at = bld.gep(b, [bld.mul(index, ir.Constant(I64, plan.panel_bytes(panels[0])))])
        tiles.run_panel(bld, a, lda, m, at, bld.mul(index, ir.Constant(I64, width)), panels[0].vectors, width,
                        args, first_row)

    def edge_panel(bld: ir.IRBuilder) -> None:
        edge = panels[-1]
        at = bld.gep(b, [ir.Constant(I64, full * plan.panel_bytes(panels[0]) if full else 0)])
        tiles.run_panel(bld, a, lda, m, at, ir.Constant(I64, edge.start), edge.vectors, edge.valid, args, first_row)

    if full == len(panels):
        full_panel(builder)
    elif full == 0:
        edge_panel(builder)
    elif isinstance(index, ir.Constant):
        (full_panel if index.constant < full else edge_panel)(builder)
    else:
        with builder.if_else(builder.icmp_unsigned("<", index, ir.Constant(I64, full))) as (is_full, is_edge):
            with is_full:
                full_panel(builder)
            with is_edge:
                edge_panel(builder)


def emit_gemm(module: ir.Module, plan: GemmPlan, name: str) -> ir.Function:
    """Add `name(a, lda, m, scratch, b, offset, c, ldc)`: C[m, N] = A[m, K]·B (+ offset), and its
    internal helpers `name.*`, to `module`.

    `scratch` holds m · packed_row_bytes bytes when the plan packs A (unused otherwise).
    """
    route = plan.route
    ptr, i32p = I8.as_pointer(), I32.as_pointer()
    fn = ir.Function(module, ir.FunctionType(VOID, [ptr, I64, I64, ptr, ptr, i32p, i32p, I64]), name)
    a, lda, m, scratch, b, offset, c, ldc = fn.args
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    if plan.packs_a:
        builder.call(emit_plan_pack_a(module, f"{name}.pack_a", plan), [a, lda, m, scratch])
        a, lda = scratch, ir.Constant(I64, plan.packed_row_bytes)
    tiles = TileEmitter(module, name, route, plan.groups, plan.mr, Int32Store(route.lanes, plan.offset is not None))
    emit_panels(builder, tiles, plan, a, lda, m, b, [offset, c, ldc])
    builder.ret_void()
    return fn


def emit_plan_pack_a(module: ir.Module, name: str, plan: GemmPlan) -> ir.Function:
    """The plan's packing of A (`emit_pack_a`)."""
    shift = activation_shift(plan.route, plan.a_dtype) if plan.flip else 0
    return emit_pack_a(module, name, plan.route, plan.k, shift, plan.a_dtype.is_signed, plan.packed_row_bytes)


def runtime_route(target: TargetSpec) -> Route:
    """The fastest route for a B known only at run time: one that cannot saturate."""
    return next(route for route in ROUTES if route.available(target) and not route.saturates)


def emit_pack_b_panel(module: ir.Module, name: str, route: Route, k: int, shift: int, signed: bool, valid: int,
                      width: int) -> ir.Function:
    """`name(b, ldb, dst)`: columns [0, valid) of the 8-bit row-major B [k, ·] at b (row pitch ldb bytes) as
    one packed panel of `width` columns at dst, converted (`convert_values`), K and columns zero-padded."""
    fn = ir.Function(module, ir.FunctionType(VOID, [I8.as_pointer(), I64, I8.as_pointer()]), name)
    fn.linkage = "internal"
    b, ldb, dst = fn.args
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    kr = route.kr
    group_bytes = width * route.group_bytes

    def row(bld: ir.IRBuilder, index: ir.Value) -> ir.Value:
        values = ll.load_partial(bld, bld.gep(b, [bld.mul(index, ldb)]), valid, width)
        return convert_values(bld, values, shift, route.bits, signed)

    def group(bld: ir.IRBuilder, g: ir.Value, carried: list) -> list:
        rows = [row(bld, bld.add(bld.mul(g, ir.Constant(I64, kr)), ir.Constant(I64, j))) for j in range(kr)]
        store_groups(bld, route, rows, bld.gep(dst, [bld.mul(g, ir.Constant(I64, group_bytes))]))
        return carried

    full = k // kr
    if full:
        ll.counted_loop(builder, ir.Constant(I64, full), "g", body=group)
    if k % kr:
        zero = convert_values(builder, ir.Constant(ll.vector(I8, width), None), 0, route.bits, signed)
        rows = [row(builder, ir.Constant(I64, full * kr + j)) if full * kr + j < k else zero for j in range(kr)]
        store_groups(builder, route, rows, builder.gep(dst, [ir.Constant(I64, full * group_bytes)]))
    builder.ret_void()
    return fn


# C type of the generated entry point (see `_Emitter.emit`)
SIGNATURE = "void(*)(uint8_t *, int64_t, int64_t, uint8_t *, uint8_t *, int32_t *, int32_t *, int64_t)"


class Int8Gemm:
    """C = A·B (+ offset) for fixed int8 weights B [K, N], compiled for `target`.

    `guarantee_7bit`: the quantizer guarantees activations lie in [0, 127], which lets the saturating
    AVX2 `vpmaddubsw` route be exact for any weights (weights are known here, so 7-bit weights are
    recognised without the flag) and spares the sign flip on 8-bit routes. `route` forces a route by
    name (tests, benchmarks); by default the fastest exact one for the target is chosen. Code is
    JIT-compiled on the first `run`; `assembly()` works for any target.
    """

    def __init__(self, weights: np.ndarray, a_dtype: DType | np.dtype | type | str, target: TargetSpec,
                 guarantee_7bit: bool = False, offset: np.ndarray | None = None, route: str | None = None,
                 tile: tuple[int, int] | None = None, name: str = "lowbit_gemm_int8") -> None:
        self._build(plan_gemm(weights, a_dtype, target, guarantee_7bit, offset, route, tile), emit_gemm, target,
                    name)

    def _build(self, plan, emit, target: TargetSpec, name: str) -> None:
        """Generate `plan`'s module with `emit(module, plan, name)`; it is compiled on the first run."""
        self.plan = plan
        self.target, self.name = target, name
        self.module = ll.new_module(name, target)
        emit(self.module, plan, name)
        self._function = None
        self._lock = threading.Lock()
        self._scratch_cache = threading.local()
        self.compile_seconds: float | None = None

    @property
    def route(self) -> str:
        return self.plan.route.name

    def assembly(self) -> str:
        return ll.emit_assembly(self.module, self.target, hand_vectorized=True)

    def object_code(self) -> bytes:
        return ll.emit_object(self.module, self.target, hand_vectorized=True)

    def _compiled(self):
        with self._lock:
            if self._function is None:
                self._jit = ll.JitModule(self.module, self.target, hand_vectorized=True)
                self.compile_seconds = self._jit.compile_seconds
                self._weights = ll.FFI.from_buffer("uint8_t[]", self.plan.weights.data)
                self._offset = (ll.FFI.from_buffer("int32_t[]", self.plan.offset)
                                if self.plan.offset is not None else ll.FFI.NULL)
                self._function = self._jit.cffi_function(self.name, SIGNATURE)
        return self._function

    def _check(self, a: np.ndarray) -> np.ndarray:
        plan = self.plan
        if not isinstance(a, np.ndarray):
            raise ShapeError(f"int8 GEMM: activations must be a numpy array, not {type(a).__name__}")
        if a.dtype != plan.a_dtype.numpy or a.ndim != 2 or a.shape[1] != plan.k:
            kind = DType.from_numpy(a.dtype) if a.dtype.kind in "iuf" and a.dtype.itemsize <= 8 else a.dtype
            raise ShapeError(f"int8 GEMM: activations must be {plan.a_dtype} [M, {plan.k}], "
                             f"not {kind} {list(a.shape)}")
        if a.strides[1] != 1 or a.strides[0] < 0:
            a = np.ascontiguousarray(a)
        return a

    def _output(self, m: int, out: np.ndarray | None) -> np.ndarray:
        if out is None:
            return np.empty((m, self.plan.n), dtype=np.int32)
        if not isinstance(out, np.ndarray) or out.dtype != np.int32 or out.shape != (m, self.plan.n) \
                or not out.flags.c_contiguous:
            described = f"{out.dtype} {list(out.shape)}" if isinstance(out, np.ndarray) else type(out).__name__
            raise ShapeError(f"int8 GEMM: out must be a C-contiguous int32 [{m}, {self.plan.n}] array, "
                             f"not {described}")
        return out

    def _scratch(self, nbytes: int, source: int) -> np.ndarray:
        """Packed-A space, kept per calling thread: fresh large buffers cost page faults every call."""
        cached = getattr(self._scratch_cache, "buffer", None)
        if cached is None or cached.nbytes < nbytes or (cached.ctypes.data - source) % 4096 < 256:
            cached = self._scratch_cache.buffer = _scratch(nbytes, source)
        return cached

    def run(self, a: np.ndarray, num_threads: int = 1, out: np.ndarray | None = None) -> np.ndarray:
        """int32 [M, N] (into `out` if given); `num_threads` > 1 splits the rows over Python threads
        (the calls release the GIL)."""
        a = self._check(a)
        plan, function = self.plan, self._function or self._compiled()
        m, n = a.shape[0], plan.n
        c = self._output(m, out)
        if m == 0:
            return c
        a_at = (ll.FFI.from_buffer("uint8_t[]", a) if a.flags.c_contiguous
                else ll.FFI.cast("uint8_t *", a.ctypes.data))  # rows with gaps: no buffer protocol
        lda, c_at = a.strides[0], ll.FFI.from_buffer("int32_t[]", c)
        pitch = plan.packed_row_bytes if plan.packs_a else 0
        scratch_at = ll.FFI.from_buffer("uint8_t[]", self._scratch(m * pitch, a.ctypes.data)) if pitch \
            else ll.FFI.NULL
        if num_threads <= 1:
            function(a_at, lda, m, scratch_at, self._weights, self._offset, c_at, n)
            return c

        def rows(first: int, last: int) -> None:
            function(a_at + first * lda, lda, last - first, scratch_at + first * pitch if pitch else scratch_at,
                     self._weights, self._offset, c_at + first * n, n)

        bounds = _row_split(m, plan.mr, num_threads)
        others = [_pool().submit(rows, first, last) for first, last in zip(bounds[1:-1], bounds[2:])]
        rows(bounds[0], bounds[1])
        for other in others:
            other.result()
        return c


@lru_cache(maxsize=None)
def _pool() -> ThreadPoolExecutor:
    """Worker threads for `Int8Gemm.run(num_threads > 1)`, started once."""
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="lowbit-gemm")


def _scratch(nbytes: int, source: int) -> np.ndarray:
    """A buffer half a page away from `source` modulo 4096 (so 64-byte aligned when source is): copies
    whose destination trails the source by a few bytes modulo 4 KiB run many times slower."""
    raw = np.empty(nbytes + 4096, dtype=np.uint8)
    start = (source + 2048 - raw.ctypes.data) % 4096
    return raw[start:start + nbytes]


def _row_split(m: int, mr: int, parts: int) -> list[int]:
    """Row boundaries splitting m rows into at most `parts` chunks of whole MR tiles."""
    tiles = -(-m // mr)
    parts = max(1, min(parts, tiles))
    bounds = [min(m, (tiles * i // parts) * mr) for i in range(parts + 1)]
    bounds[-1] = m
    return bounds
