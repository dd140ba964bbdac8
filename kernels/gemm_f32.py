"""float32 GEMM: C[M, N] = epilogue(A[M, K] · B[K, N]), generated as LLVM IR for a target.

One parameterised template serves every float product of the native backend (linear, matmul, the
convolutions' GEMMs, attention):

* The register tile is `rows` × (`vectors` · lanes): each K step loads `vectors` vectors of B,
  broadcasts `rows` values of A and issues rows·vectors FMAs (`llvm.fma`: vfmadd on x86, fmla on
  AArch64). Lanes follow the target's vector width (AVX-512 16, AVX2 8, NEON 4).
* A (the broadcast side) is row-major with a row stride (activations), or packed at compile time
  into panels of `rows` rows stored [K][rows] (convolution weights), so each step's broadcasts are
  one contiguous read.
* B (the vector side) is always packed into column panels [K][width], zero-padded to whole vectors:
  constant weights at compile time (`pack_b`), run-time operands by `emit_pack_b`, im2col matrices
  straight from the convolution's packing (`lowbit.kernels.conv`). Reading B in place with a row
  stride was measured at about half the speed for large N (a panel's K rows then sit on K pages).
* Tiles are functions shared by every GEMM of a module with the same A layout and epilogue: K,
  C's and the residual's row strides and the width of the last vector are run-time arguments (the
  edge vector goes through masked loads and stores), so a model needs few of them.
* The epilogue runs on the accumulators before they are stored: × scale, + bias (one value per row
  or per column), + residual (C-shaped, or one value per row), then the activation, with the
  elementwise kernels' expressions (`lowbit.kernels.elementwise`).

The driver walks C's columns as runs of panels (`Columns`) and the rows in tiles (the M edge gets
one smaller tile); which loop is outside follows from what stays in L2 (`prefer_m_outer`).
Batched products (`emit_batched_gemm`: matmul, linear) and attention (`emit_attention`: two
products around a row softmax, a block of score rows at a time) are built on it.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
from llvmlite import ir

from lowbit.ir.dtypes import DType
from lowbit.ir.ops.epilogue import activation_attrs
from lowbit.kernels import elementwise
from lowbit.kernels import llvm as ll
from lowbit.kernels.elementwise import Emit
from lowbit.kernels.llvm import F32, I1, I8, I32, I64, VOID, TargetSpec
from lowbit.kernels.parallel import for_units, new_parallel_kernel, split_rows, thread_scratch

BYTE_PTR = I8.as_pointer()
K_UNROLL = 2  # K steps per loop iteration of a tile
MAX_VECTORS = 8  # widest register tile (few rows): more loads per FMA do not pay
L2_BYTES = 1 << 20  # what a loop order may assume stays cached between micro-kernel calls


# -- tiles --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tile:
    """The register tile: `rows` broadcasts × `vectors` vectors of `lanes` floats."""

    rows: int
    vectors: int
    lanes: int

    @property
    def width(self) -> int:
        return self.vectors * self.lanes


def _registers(target: TargetSpec) -> int:
    return 32 if target.arch == "aarch64" or "avx512f" in target.features else 16


def default_tile(target: TargetSpec) -> Tile:
    """rows·vectors accumulators plus `vectors` B registers and a broadcast fit the register file:
    12×2 of AVX-512's 32 registers (14 loads per 24 FMAs), 8×3 of NEON's 32, the classic 6×16 of
    AVX2's 16."""
    lanes = max(4, target.vector_bytes // 4)
    if "avx512f" in target.features:
        return Tile(12, 2, lanes)
    if target.arch == "aarch64":
        return Tile(8, 3, lanes)
    return Tile(6, 2, lanes)


def choose_tile(target: TargetSpec, m: int, n: int) -> Tile:
    """The default tile, or for fewer rows than it has (a batch-1 linear layer, a grouped convolution
    with few channels per group) a tile of exactly m rows made wider, so that enough independent FMA
    chains hide the FMA latency."""
    tile = default_tile(target)
    if m >= tile.rows:
        return tile
    vectors = min(MAX_VECTORS, (_registers(target) - 1) // (m + 1), -(-n // tile.lanes))
    return Tile(m, max(vectors, 1), tile.lanes)


# -- compile-time packing ---------------------------------------------------------------------------
def pack_b(b: np.ndarray, tile: Tile) -> np.ndarray:
    """B [K, N] → column panels of `tile.width` columns, each [K][width] (the last one zero-padded to
    whole vectors), concatenated: the layout every GEMM here reads B in. Keeps B's dtype."""
    k, n = b.shape
    width = tile.width
    parts = []
    for start in range(0, n, width):
        columns = min(width, n - start)
        padded = -(-columns // tile.lanes) * tile.lanes
        panel = np.zeros((k, padded), b.dtype)
        panel[:, :columns] = b[:, start:start + columns]
        parts.append(panel.ravel())
    return np.concatenate(parts)


def packed_b_elements(k: int, n: int, tile: Tile) -> int:
    full, rest = divmod(n, tile.width)
    return k * (full * tile.width + -(-rest // tile.lanes) * tile.lanes)


def packed_b_bytes(k: int, n: int, tile: Tile) -> int:
    return 4 * packed_b_elements(k, n, tile)


def pack_a(a: np.ndarray, tile: Tile) -> np.ndarray:
    """A [M, K] → row panels of `tile.rows` rows (the last may be shorter), each [K][rows]: the layout
    `GemmSpec(a_packed=True)` reads. A pure permutation, so it also packs an array of indices."""
    m = a.shape[0]
    return np.concatenate([np.ascontiguousarray(a[start:start + tile.rows].T).ravel()
                           for start in range(0, m, tile.rows)])


def emit_gather(module: ir.Module, count: int, name: str) -> ir.Function:
    """`name(src, table, dst)`: dst[i] = src[table[i]] for `count` floats (table: int32, −1 for 0):
    packing of run-time weights along an order worked out at compile time."""
    fn, builder = new_kernel(module, name, 3)
    src, table, dst = fn.args

    def copy(builder, i):
        index = builder.sext(builder.load(ll.pointer_at(builder, table, builder.mul(i, ir.Constant(I64, 4)), I32),
                                          align=4), I64)
        padding = builder.icmp_signed("<", index, ir.Constant(I64, 0))
        value = builder.load(float_at(builder, src, builder.select(padding, ir.Constant(I64, 0), index)), align=4)
        builder.store(builder.select(padding, fconst(F32, 0.0), value), float_at(builder, dst, i), align=4)

    loop(builder, count, "i", copy)
    builder.ret_void()
    return fn


# -- vector math ------------------------------------------------------------------------------------
def fconst(like: ir.Type, value: float) -> ir.Constant:
    """A float constant (splat for vector types)."""
    if isinstance(like, ir.VectorType):
        return ir.Constant(like, [float(np.float32(value))] * like.count)
    return ir.Constant(like, float(np.float32(value)))


def fma(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    return ll.intrinsic(builder, "llvm.fma", a, b, c)


def _emit(builder: ir.IRBuilder, x: ir.Value, attrs: dict) -> Emit:
    lanes = x.type.count if isinstance(x.type, ir.VectorType) else 1
    return Emit(builder, lanes, DType.f32, attrs)


def exp(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """e^x of a float or float vector: the elementwise kernels' vectorised polynomial."""
    return elementwise.exp(_emit(builder, x, {}), x)


def activate(builder: ir.IRBuilder, x: ir.Value, activation: str, params: Sequence[float]) -> ir.Value:
    """The fused activation (lowbit.ir.ops.epilogue) on a float or float vector: exactly the standalone
    elementwise op's expression."""
    if activation == "none":
        return x
    attrs = activation_attrs(activation, tuple(params))
    return elementwise.RULES[activation].emit(_emit(builder, x, attrs), x)


# -- memory helpers ---------------------------------------------------------------------------------
def float_at(builder: ir.IRBuilder, base: ir.Value, index: ir.Value | int) -> ir.Value:
    """Pointer to float number `index` of the i8* `base`."""
    offset = index * 4 if isinstance(index, int) else builder.mul(index, ir.Constant(I64, 4))
    return ll.pointer_at(builder, base, offset, F32)


def byte_at(builder: ir.IRBuilder, base: ir.Value, index: ir.Value | int) -> ir.Value:
    """i8* to float number `index` of `base`."""
    offset = ir.Constant(I64, index * 4) if isinstance(index, int) else builder.mul(index, ir.Constant(I64, 4))
    return builder.gep(base, [offset])


def advance(builder: ir.IRBuilder, base: ir.Value | None, index: ir.Value, stride: int) -> ir.Value | None:
    """`base` moved on by index · stride floats; None stays None (an absent optional buffer)."""
    return None if base is None else byte_at(builder, base, builder.mul(index, ir.Constant(I64, stride)))


def splat_at(builder: ir.IRBuilder, base: ir.Value, index: ir.Value | int, lanes: int) -> ir.Value:
    """The float at `index` of the i8* `base` in every lane."""
    return ll.splat(builder, builder.load(float_at(builder, base, index), align=4), lanes)


def _mask(lanes: int, valid: int) -> ir.Constant:
    return ir.Constant(ir.VectorType(I1, lanes), [1] * valid + [0] * (lanes - valid))


def masked_load(builder: ir.IRBuilder, pointer: ir.Value, mask: ir.Value, fill: float = 0.0) -> ir.Value:
    """The vector at `pointer` (a vector pointer), lanes where `mask` is off read as `fill` (and not
    read at all: no fault past a buffer's end)."""
    kind = pointer.type.pointee
    load = ll.declare(builder.module, f"llvm.masked.load.{ll.type_suffix(kind)}.p0", kind, kind.as_pointer(),
                      I32, ir.VectorType(I1, kind.count), kind)
    return builder.call(load, [pointer, ir.Constant(I32, 4), mask, fconst(kind, fill)])


def load_vector(builder: ir.IRBuilder, base: ir.Value, index: ir.Value | int, lanes: int,
                valid: int | None = None, fill: float = 0.0) -> ir.Value:
    """`lanes` floats at float `index` of the i8* `base`; with `valid` < lanes only those are read
    (the rest are `fill`)."""
    kind = ir.VectorType(F32, lanes)
    pointer = builder.bitcast(float_at(builder, base, index), kind.as_pointer())
    if valid is None or valid >= lanes:
        return builder.load(pointer, align=4)
    return masked_load(builder, pointer, _mask(lanes, valid), fill)


def store_vector(builder: ir.IRBuilder, value: ir.Value, base: ir.Value, index: ir.Value | int,
                 valid: int | None = None) -> None:
    """Store `value` at float `index` of the i8* `base`; with `valid` < lanes only those lanes."""
    lanes = value.type.count
    pointer = builder.bitcast(float_at(builder, base, index), value.type.as_pointer())
    if valid is None or valid >= lanes:
        builder.store(value, pointer, align=4)
        return
    masked_store(builder, value, pointer, _mask(lanes, valid))


def _intrinsic_call(builder: ir.IRBuilder, name: str, result: ir.Type, *args: ir.Value) -> ir.Value:
    """A call of an intrinsic overloaded on its first vector argument and its pointer vector."""
    vector = result if result is not VOID else args[0].type
    pointers = next(arg.type for arg in args if isinstance(arg.type, ir.VectorType)
                    and isinstance(arg.type.element, ir.PointerType))
    function = ll.declare(builder.module, f"{name}.{ll.type_suffix(vector)}.v{pointers.count}p0", result,
                          *(arg.type for arg in args))
    return builder.call(function, list(args))


def masked_store(builder: ir.IRBuilder, value: ir.Value, pointer: ir.Value, mask: ir.Value) -> None:
    store = ll.declare(builder.module, f"llvm.masked.store.{ll.type_suffix(value.type)}.p0", VOID, value.type,
                       value.type.as_pointer(), I32, mask.type)
    builder.call(store, [value, pointer, ir.Constant(I32, 4), mask])


def new_kernel(module: ir.Module, name: str, buffers: int) -> tuple[ir.Function, ir.IRBuilder]:
    """An internal function `name(i8* × buffers)` and a builder at its entry."""
    function = ir.Function(module, ir.FunctionType(VOID, [BYTE_PTR] * buffers), name)
    function.linkage = "internal"
    return function, ir.IRBuilder(function.append_basic_block("entry"))


def loop(builder: ir.IRBuilder, count: int | ir.Value, name: str, body) -> None:
    """`for i in range(count)`: body(builder, i), for a static or a run-time count (no carried values)."""
    def step(b: ir.IRBuilder, i: ir.Value, carried: list) -> list:
        body(b, i)
        return carried

    if isinstance(count, int):
        if count > 0:
            ll.static_loop(builder, count, name, step)
    else:
        ll.counted_loop(builder, count, name, body=step)


def scaled(builder: ir.IRBuilder, index: ir.Value, factor: int, plus: int = 0) -> ir.Value:
    """index · factor + plus (i64)."""
    value = builder.mul(index, ir.Constant(I64, factor))
    return builder.add(value, ir.Constant(I64, plus)) if plus else value


# -- the GEMM ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Epilogue:
    """What happens to C's tile in registers: y = act(acc·scale + bias + residual).

    bias: "none", "row" (one value per row of C: output channels of an NCHW conv) or "col" (per
    column: output features of linear). residual: C-shaped with row stride `residual_ld` (0: the same
    row for every row of C) and column stride `residual_col` (1, or 0: one value per row).
    """

    scale: float = 1.0
    bias: str = "none"
    residual: bool = False
    residual_ld: int = 0
    residual_col: int = 1
    activation: str = "none"
    params: tuple[float, ...] = ()


@dataclass(frozen=True)
class Columns:
    """A run of C's columns as B panels: `groups` repetitions of `panels` ((first column, width)
    relative to the group), group g starting at column `first` + g·`stride`.

    Packed B holds the panels in the same order, each [K][width rounded up to whole vectors]; a call
    covers a tuple of runs whose panels follow each other in B.
    """

    panels: tuple[tuple[int, int], ...]
    stride: int
    groups: int
    first: int = 0

    def padded(self, tile: Tile) -> int:
        """Floats of packed B per K row of one group."""
        return sum(-(-width // tile.lanes) * tile.lanes for _, width in self.panels)


def plain_columns(n: int, tile: Tile) -> tuple[Columns, ...]:
    """N plain columns in `pack_b` order: full panels, then the edge panel."""
    full, rest = divmod(n, tile.width)
    runs = (Columns(((0, tile.width),), tile.width, full),) if full else ()
    return runs + ((Columns(((0, rest),), 0, 1, n - rest),) if rest else ())


@dataclass(frozen=True)
class GemmSpec:
    """Static description of C[M, ·] = epilogue(A[M, K] · B[K, ·]); strides in floats.

    A is `pack_a`'s panels (`a_packed`) or row-major with row stride `lda`; B is always packed
    panels; C has row stride `ldc`, or with `c_transposed` C is stored as Cᵀ (column stride `ldc`,
    the residual likewise), each vector scattered. `m_outer`: row tiles in the outer loop (A's tile
    stays cached while B streams) instead of panels outside (B's panel stays cached while A streams).
    """

    m: int
    k: int
    tile: Tile
    ldc: int
    a_packed: bool = False
    lda: int = 0
    epilogue: Epilogue = Epilogue()
    m_outer: bool = False
    c_transposed: bool = False


def prefer_m_outer(m: int, k: int, n: int) -> bool:
    """Stream the operand that does not stay in L2 anyway: rows outside when A is too big and B is not."""
    return 4 * m * k > L2_BYTES >= 4 * k * n


def fma_step(builder: ir.IRBuilder, a_k: ir.Value, a_row: int, b_row: ir.Value | None, rows: int, vectors: int,
             lanes: int, accs: list[ir.Value], vecs: list[ir.Value] | None = None) -> list[ir.Value]:
    """One K step of a register tile: `vectors` vectors of B at `b_row` (or the given `vecs`), each
    times `rows` values of A (`a_row` floats apart from `a_k`) broadcast: accs[r·vectors + v] += a_r · b_v."""
    vecs = vecs or [load_vector(builder, b_row, v * lanes, lanes) for v in range(vectors)]
    out = []
    for r in range(rows):
        value = splat_at(builder, a_k, r * a_row, lanes)
        out += [fma(builder, value, vecs[v], accs[r * vectors + v]) for v in range(vectors)]
    return out


def finish(builder: ir.IRBuilder, epilogue: Epilogue, acc: ir.Value, bias: ir.Value | None,
           residual: ir.Value | None) -> ir.Value:
    """The epilogue's value: act(acc·scale + bias + residual), bias and residual already vectors."""
    if epilogue.scale != 1.0:
        acc = builder.fmul(acc, fconst(acc.type, epilogue.scale))
    if bias is not None:
        acc = builder.fadd(acc, bias)
    if residual is not None:
        acc = builder.fadd(acc, residual)
    return activate(builder, acc, epilogue.activation, epilogue.params)


def tile_function(module: ir.Module, prefix: str, key: tuple, params: list[ir.Type]) -> tuple[ir.Function, bool]:
    """The register tile named by `key` (a module-wide cache: equal keys share one function), and
    whether it is new (then its body is still to be written)."""
    name = f"{prefix}.{hashlib.sha1(repr(key).encode()).hexdigest()[:12]}"
    existing = module.globals.get(name)
    if existing is not None:
        return existing, False
    fn = ir.Function(module, ir.FunctionType(VOID, params), name)
    fn.linkage = "internal"
    fn.attributes.add("noinline")  # compiled once, called from every loop that needs the shape
    fn.attributes.add("noduplicate")  # not cloned per call site either (function specialization)
    return fn, True


def over_row_tiles(builder: ir.IRBuilder, m: int, rows: int, visit) -> None:
    """visit(builder, first row (i64), tile rows) for every row tile of M: full tiles, then the rest."""
    full, rest = divmod(m, rows)
    loop(builder, full, "m", lambda b, t: visit(b, b.mul(t, ir.Constant(I64, rows)), rows))
    if rest:
        visit(builder, ir.Constant(I64, full * rows), rest)


def over_row_chunk(builder: ir.IRBuilder, part: ir.Value, size: int, m: int, rows: int, visit) -> None:
    """`over_row_tiles` for chunk number `part` of `size` rows of M (the last chunk may be shorter):
    visit(builder, first row, tile rows) with rows counted from row 0 of M."""
    first = builder.mul(part, ir.Constant(I64, size))
    last = m - (-(-m // size) - 1) * size

    def tiles(bld: ir.IRBuilder, count: int) -> None:
        over_row_tiles(bld, count, rows, lambda b, row, height: visit(b, b.add(first, row), height))

    if last == size:
        tiles(builder, size)
        return
    with builder.if_else(builder.icmp_unsigned("<", first, ir.Constant(I64, m - last))) as (full, tail):
        with full:
            tiles(builder, size)
        with tail:
            tiles(builder, last)


class GemmEmitter:
    """Emits the GEMM entry points of one spec into a module; they share the register tiles."""

    def __init__(self, module: ir.Module, spec: GemmSpec, name: str) -> None:
        self.module, self.spec, self.name = module, spec, name
        self._entries: dict[Columns, ir.Function] = {}

    def entry(self, runs: tuple[Columns, ...]) -> ir.Function:
        """`f(a, b, c, bias, residual)` over the column `runs`; pointers at column 0 of C (bias at its
        first row / column, as the epilogue reads it)."""
        if runs not in self._entries:
            self._entries[runs] = self._emit_entry(runs, f"{self.name}.{len(self._entries)}")
        return self._entries[runs]

    def call(self, builder: ir.IRBuilder, runs: tuple[Columns, ...], a: ir.Value, b: ir.Value, c: ir.Value,
             bias: ir.Value | None = None, residual: ir.Value | None = None) -> None:
        """Call `entry(runs)` (absent bias/residual pass any pointer)."""
        builder.call(self.entry(runs), [a, b, c, bias or a, residual or a])

    def tile(self, rows: int, vectors: int) -> ir.Function:
        """tile(a, b, c, bias, residual, i64 k, i64 ldc, i64 ldr, i64 valid): one rows × (vectors·lanes)
        block of C whose last vector has `valid` lanes; every pointer at the block's origin. Shared by
        every GEMM of the module whose A layout and epilogue match."""
        spec, lanes = self.spec, self.spec.tile.lanes
        key = (rows, vectors, lanes, spec.a_packed or spec.lda, replace(spec.epilogue, residual_ld=0),
               spec.c_transposed)
        fn, new = tile_function(self.module, f"gemm_f32.tile{rows}x{vectors}x{lanes}", key,
                                [BYTE_PTR] * 5 + [I64] * 4)
        if not new:
            return fn
        for arg in fn.args[:5]:
            arg.add_attribute("noalias")
        a, b, c, bias, residual, k, ldc, ldr, valid = fn.args
        builder = ir.IRBuilder(fn.append_basic_block("entry"))
        a_row, a_step = (1, rows) if spec.a_packed else (spec.lda, 1)
        b_step = vectors * lanes

        def step(builder: ir.IRBuilder, index: ir.Value, accs: list[ir.Value]) -> list[ir.Value]:
            b_row = byte_at(builder, b, builder.mul(index, ir.Constant(I64, b_step)))
            a_k = byte_at(builder, a, builder.mul(index, ir.Constant(I64, a_step)))
            return fma_step(builder, a_k, a_row, b_row, rows, vectors, lanes, accs)

        def unrolled(builder, i, accs):
            for u in range(K_UNROLL):
                accs = step(builder, scaled(builder, i, K_UNROLL, u), accs)
            return accs

        accs = [fconst(ir.VectorType(F32, lanes), 0.0)] * (rows * vectors)
        unroll = ir.Constant(I64, K_UNROLL)
        accs = ll.counted_loop(builder, builder.udiv(k, unroll), "k", accs, unrolled)
        done = builder.sub(k, builder.urem(k, unroll))
        accs = ll.counted_loop(builder, builder.urem(k, unroll), "k_rest", accs,  # single steps: small code
                               lambda b, i, accs: step(b, b.add(i, done), accs))
        mask = builder.icmp_unsigned("<", ir.Constant(ir.VectorType(I64, lanes), list(range(lanes))),
                                     ll.splat(builder, valid, lanes))
        self._epilogue(builder, accs, rows, vectors, mask, c, bias, residual, ldc, ldr)
        builder.ret_void()
        return fn

    def _epilogue(self, builder, accs, rows, vectors, mask, c, bias, residual, ldc, ldr) -> None:
        """y = act(acc·scale + bias + residual), stored; the last vector of each row through `mask`."""
        spec, epi, lanes = self.spec, self.spec.epilogue, self.spec.tile.lanes
        kind = ir.VectorType(F32, lanes)
        everything = ir.Constant(mask.type, [1] * lanes)

        def vector_at(base: ir.Value, index: ir.Value | int) -> ir.Value:
            return builder.bitcast(float_at(builder, base, index), kind.as_pointer())

        def load(base: ir.Value, index: ir.Value | int, last: bool) -> ir.Value:
            return masked_load(builder, vector_at(base, index), mask) if last else builder.load(
                vector_at(base, index), align=4)

        def lane_pointers(base: ir.Value, r: int, v: int, stride: ir.Value) -> ir.Value:
            """Cᵀ: the addresses of row r's lanes v·lanes + i, `stride` floats apart."""
            lane = ir.Constant(ir.VectorType(I64, lanes), list(range(v * lanes, (v + 1) * lanes)))
            offsets = builder.mul(builder.add(builder.mul(lane, ll.splat(builder, stride, lanes)),
                                              ir.Constant(lane.type, [r] * lanes)), ir.Constant(lane.type, [4] * lanes))
            start = ll.splat(builder, builder.ptrtoint(base, I64), lanes)
            return builder.inttoptr(builder.add(start, offsets), ir.VectorType(F32.as_pointer(), lanes))

        col_bias = [load(bias, v * lanes, v == vectors - 1) for v in range(vectors)] if epi.bias == "col" else None
        for r in range(rows):
            row_bias = splat_at(builder, bias, r, lanes) if epi.bias == "row" else None
            res_row = builder.mul(ldr, ir.Constant(I64, r)) if epi.residual else None
            c_row = builder.mul(ldc, ir.Constant(I64, r))
            for v in range(vectors):
                last = v == vectors - 1
                lanes_mask = mask if last else everything
                extra = None
                if epi.residual and spec.c_transposed:
                    extra = _intrinsic_call(builder, "llvm.masked.gather", kind, lane_pointers(residual, r, v, ldr),
                                            ir.Constant(I32, 4), lanes_mask, fconst(kind, 0.0))
                elif epi.residual:
                    extra = (load(residual, builder.add(res_row, ir.Constant(I64, v * lanes)), last)
                             if epi.residual_col else splat_at(builder, residual, res_row, lanes))
                y = finish(builder, epi, accs[r * vectors + v], row_bias if col_bias is None else col_bias[v], extra)
                if spec.c_transposed:
                    _intrinsic_call(builder, "llvm.masked.scatter", VOID, y, lane_pointers(c, r, v, ldc),
                                    ir.Constant(I32, 4), lanes_mask)
                elif last:
                    masked_store(builder, y, vector_at(c, builder.add(c_row, ir.Constant(I64, v * lanes))), mask)
                else:
                    builder.store(y, vector_at(c, builder.add(c_row, ir.Constant(I64, v * lanes))), align=4)

    def _emit_entry(self, runs: tuple[Columns, ...], name: str) -> ir.Function:
        spec, tile, epi = self.spec, self.spec.tile, self.spec.epilogue
        fn, builder = new_kernel(self.module, name, 5)
        a, b, c, bias, residual = fn.args
        a_row = spec.k if spec.a_packed else spec.lda  # a packed panel of r rows holds r·K floats
        panels, b_offset = [], 0  # per run: (first column, vectors, valid lanes, B offset) per panel
        for run in runs:
            run_panels = []
            for first, width in run.panels:
                vectors = -(-width // tile.lanes)
                run_panels.append((first, vectors, width - (vectors - 1) * tile.lanes, b_offset))
                b_offset += spec.k * vectors * tile.lanes
            panels.append(run_panels)
            b_offset += (run.groups - 1) * spec.k * run.padded(tile)

        def call(builder, row: ir.Value, run: Columns, group: ir.Value, panel, rows: int) -> None:
            first, vectors, valid, b_at = panel
            column = builder.add(builder.mul(group, ir.Constant(I64, run.stride)), ir.Constant(I64, run.first + first))
            a_at = byte_at(builder, a, builder.mul(row, ir.Constant(I64, a_row)))
            b_at = byte_at(builder, b, scaled(builder, group, spec.k * run.padded(tile), b_at))
            major, minor = (column, row) if spec.c_transposed else (row, column)
            c_at = byte_at(builder, c, builder.add(builder.mul(major, ir.Constant(I64, spec.ldc)), minor))
            bias_at = bias
            if epi.bias != "none":
                bias_at = byte_at(builder, bias, row if epi.bias == "row" else column)
            res_at = residual
            if epi.residual:
                res_at = byte_at(builder, residual, builder.add(
                    builder.mul(major, ir.Constant(I64, epi.residual_ld)),
                    builder.mul(minor, ir.Constant(I64, 1 if spec.c_transposed else epi.residual_col))))
            builder.call(self.tile(rows, vectors), [a_at, b_at, c_at, bias_at, res_at] + [
                ir.Constant(I64, value) for value in (spec.k, spec.ldc, epi.residual_ld, valid)])

        def over_columns(builder, visit) -> None:
            for run, run_panels in zip(runs, panels):
                def group_body(b, g, run=run, run_panels=run_panels):
                    for panel in run_panels:
                        visit(b, run, g, panel)
                loop(builder, run.groups, "g", group_body)

        if spec.m_outer:
            over_row_tiles(builder, spec.m, tile.rows, lambda b, row, rows: over_columns(
                b, lambda b, run, g, panel: call(b, row, run, g, panel, rows)))
        else:
            over_columns(builder, lambda b, run, g, panel: over_row_tiles(
                b, spec.m, tile.rows, lambda b, row, rows: call(b, row, run, g, panel, rows)))
        builder.ret_void()
        return fn


class RowChunks:
    """A GEMM's M rows cut into chunks of `size` rows (whole register tiles; the last chunk may be
    shorter): the work units of threads that share one product (`kernels.parallel`). The emitters of
    the two chunk heights share the register tiles."""

    def __init__(self, module: ir.Module, spec: GemmSpec, name: str, size: int) -> None:
        self.spec, self.size = spec, size
        self.parts = -(-spec.m // size)
        last = spec.m - (self.parts - 1) * size
        self.full = GemmEmitter(module, replace(spec, m=min(size, spec.m)), name)
        self.last = GemmEmitter(module, replace(spec, m=last), name + ".last") if last != self.full.spec.m \
            else self.full

    def call(self, builder: ir.IRBuilder, part: ir.Value, runs: tuple[Columns, ...], a: ir.Value, b: ir.Value,
             c: ir.Value, bias: ir.Value | None = None, residual: ir.Value | None = None) -> None:
        """Chunk number `part` of `GemmEmitter.call(runs, a, b, c, bias, residual)`."""
        spec, epi = self.spec, self.spec.epilogue
        first = builder.mul(part, ir.Constant(I64, self.size))
        a = advance(builder, a, first, spec.k if spec.a_packed else spec.lda)
        c = advance(builder, c, first, 1 if spec.c_transposed else spec.ldc)
        if epi.bias == "row":
            bias = advance(builder, bias, first, 1)
        if epi.residual:
            residual = advance(builder, residual, first, 1 if spec.c_transposed else epi.residual_ld)
        if self.last is self.full:
            self.full.call(builder, runs, a, b, c, bias, residual)
            return
        with builder.if_else(builder.icmp_unsigned("<", part, ir.Constant(I64, self.parts - 1))) as (full, last):
            with full:
                self.full.call(builder, runs, a, b, c, bias, residual)
            with last:
                self.last.call(builder, runs, a, b, c, bias, residual)

    def call_panel(self, builder: ir.IRBuilder, part: ir.Value, n: int, panel: ir.Value, a: ir.Value, b: ir.Value,
                   c: ir.Value, bias: ir.Value | None = None, residual: ir.Value | None = None) -> None:
        """Chunk `part` of the product with `plain_columns(n)`'s panel number `panel` (B `pack_b`'s panels)."""
        spec, tile, epi = self.spec, self.spec.tile, self.spec.epilogue
        full, rest = divmod(n, tile.width)

        def one(bld: ir.IRBuilder, width: int, column: ir.Value) -> None:
            b_at = advance(bld, b, column, spec.k)  # a panel of `width` columns holds K · width floats
            c_at = advance(bld, c, column, spec.ldc if spec.c_transposed else 1)
            bias_at = advance(bld, bias, column, 1) if epi.bias == "col" else bias
            res_at = residual
            if epi.residual:
                res_at = advance(bld, residual, column, epi.residual_ld if spec.c_transposed else epi.residual_col)
            self.call(bld, part, (Columns(((0, width),), width, 1),), a, b_at, c_at, bias_at, res_at)

        if not rest:
            one(builder, tile.width, builder.mul(panel, ir.Constant(I64, tile.width)))
        elif not full:
            one(builder, rest, ir.Constant(I64, 0))
        else:
            with builder.if_else(builder.icmp_unsigned("<", panel, ir.Constant(I64, full))) as (whole, edge):
                with whole:
                    one(builder, tile.width, builder.mul(panel, ir.Constant(I64, tile.width)))
                with edge:
                    one(builder, rest, ir.Constant(I64, full * tile.width))


def panel_count(n: int, tile: Tile) -> int:
    """Panels of `plain_columns(n)`."""
    return -(-n // tile.width)


def emit_pack_b(module: ir.Module, k: int, n: int, k_stride: int, n_stride: int, tile: Tile,
                name: str) -> ir.Function:
    """`name(src, dst)`: B[k, j] = src[k·k_stride + j·n_stride] → `pack_b`'s panel layout at dst (zero
    padding included). Unit column stride copies vectors; other strides (a transpose) copy floats."""
    fn, builder = new_kernel(module, name, 2)
    src, dst = fn.args
    lanes = tile.lanes
    offset = 0
    for run in plain_columns(n, tile):
        (_, width), = run.panels
        vectors = -(-width // lanes)
        valid = width - (vectors - 1) * lanes

        def panel_body(builder, p, run=run, vectors=vectors, valid=valid, offset=offset):
            column = scaled(builder, p, run.stride, run.first)
            out = byte_at(builder, dst, scaled(builder, p, k * vectors * lanes, offset))
            source = byte_at(builder, src, builder.mul(column, ir.Constant(I64, n_stride)))

            def row_body(builder, r):
                row_in = byte_at(builder, source, builder.mul(r, ir.Constant(I64, k_stride)))
                row_out = byte_at(builder, out, builder.mul(r, ir.Constant(I64, vectors * lanes)))
                for v in range(vectors):
                    count = valid if v == vectors - 1 else lanes
                    if n_stride == 1:
                        value = load_vector(builder, row_in, v * lanes, lanes, count)
                    else:
                        value = fconst(ir.VectorType(F32, lanes), 0.0)
                        for lane in range(count):
                            scalar = builder.load(float_at(builder, row_in, (v * lanes + lane) * n_stride))
                            value = builder.insert_element(value, scalar, ir.Constant(I32, lane))
                    store_vector(builder, value, row_out, v * lanes)

            loop(builder, k, "k", row_body)

        loop(builder, run.groups, "p", panel_body)
        offset += run.groups * k * vectors * lanes
    builder.ret_void()
    return fn


# -- batched products (matmul, linear) --------------------------------------------------------------
@dataclass(frozen=True)
class Batched:
    """C[i] = epilogue(A[i] · B[i]) for every index i of the broadcast `batch` shape (C contiguous).

    `a_strides` / `b_strides`: floats between consecutive indices of each batch axis (0 where the
    operand is broadcast). B is `packed` at compile time (strides then count packed copies' floats)
    or a run-time matrix [K, N] with strides `b_layout` = (k_stride, n_stride), packed into scratch
    per batch index (once when it is broadcast over every axis). Operand order of the kernel:
    a, b, bias (if `has_bias`), residual (if the epilogue has one), c, then scratch (run-time B:
    `scratch_bytes` per thread), then (thread, threads): threads share units (batch index, column
    panel, chunk of rows), chunks cut only where there are too few of the others for `threads`.
    """

    gemm: GemmSpec
    n: int
    batch: tuple[int, ...] = ()
    a_strides: tuple[int, ...] = ()
    b_strides: tuple[int, ...] = ()
    packed: bool = True
    b_layout: tuple[int, int] = (0, 1)
    has_bias: bool = False
    threads: int = 1

    @property
    def scratch_bytes(self) -> int:
        return 0 if self.packed else packed_b_bytes(self.gemm.k, self.n, self.gemm.tile)


def batch_offset(builder: ir.IRBuilder, index: ir.Value, shape: Sequence[int], strides: Sequence[int]) -> ir.Value:
    """Σ_d index_d · strides[d] for the flat (row-major) `index` into `shape`."""
    total = ir.Constant(I64, 0)
    inner = 1
    for size, stride in reversed(list(zip(shape, strides))):
        if stride and size > 1:
            digit = builder.urem(builder.udiv(index, ir.Constant(I64, inner)), ir.Constant(I64, size))
            total = builder.add(total, builder.mul(digit, ir.Constant(I64, stride)))
        inner *= size
    return total


def emit_batched_gemm(module: ir.Module, spec: Batched, name: str) -> ir.Function:
    gemm = spec.gemm
    buffers = 3 + spec.has_bias + gemm.epilogue.residual + (not spec.packed)
    fn, builder, thread, threads = new_parallel_kernel(module, name, buffers)
    args = list(fn.args)[:buffers]
    a, b = args[0], args[1]
    bias = args[2] if spec.has_bias else None
    residual = args[2 + spec.has_bias] if gemm.epilogue.residual else None
    c = args[2 + spec.has_bias + gemm.epilogue.residual]
    scratch = None if spec.packed else thread_scratch(builder, args[-1], thread, spec.scratch_bytes)
    count, panels = math.prod(spec.batch), panel_count(spec.n, gemm.tile)
    chunks = RowChunks(module, gemm, name + ".gemm", split_rows(gemm.m, gemm.tile.rows, count * panels,
                                                                spec.threads))
    pack = None if spec.packed else emit_pack_b(module, gemm.k, spec.n, *spec.b_layout, gemm.tile, name + ".pack")
    shared_b = not any(spec.b_strides)
    c_size = gemm.m * spec.n

    def b_of(builder: ir.IRBuilder, i: ir.Value) -> ir.Value:
        return byte_at(builder, b, batch_offset(builder, i, spec.batch, spec.b_strides))

    def unit(builder: ir.IRBuilder, indices: list[ir.Value]) -> None:
        i, panel, part = indices
        a_at = byte_at(builder, a, batch_offset(builder, i, spec.batch, spec.a_strides))
        c_at = byte_at(builder, c, builder.mul(i, ir.Constant(I64, c_size)))
        res_at = byte_at(builder, residual, builder.mul(i, ir.Constant(I64, c_size))) if residual else None
        chunks.call_panel(builder, part, spec.n, panel, a_at, scratch if pack else b_of(builder, i), c_at, bias,
                          res_at)

    prepare = {}
    if pack is not None:
        if shared_b:
            prepare[-1] = lambda bld, _: bld.call(pack, [b, scratch])
        else:
            prepare[0] = lambda bld, indices: bld.call(pack, [b_of(bld, indices[0]), scratch])
    for_units(builder, thread, threads, [count, panels, chunks.parts], "unit", unit, prepare)
    builder.ret_void()
    return fn


# -- attention --------------------------------------------------------------------------------------
SCORES_BYTES = 1 << 20  # a block of score rows stays in L2 between its two products


@dataclass(frozen=True)
class AttentionSpec:
    """softmax(q @ k_t · scale + mask) @ v per index of the broadcast `batch` shape.

    q [sq, d], k_t [d, sk], v [sk, dv] per batch index; `*_strides` are floats per batch axis (0 where
    broadcast), `mask_rows` / `mask_cols` the mask's strides along sq and sk (0 where broadcast).
    Kernel operands: q, k_t, v, mask (if `mask`), out, scratch.
    """

    batch: tuple[int, ...]
    q_strides: tuple[int, ...]
    k_strides: tuple[int, ...]
    v_strides: tuple[int, ...]
    sq: int
    d: int
    sk: int
    dv: int
    scale: float
    tile: Tile
    zero_nan_probs: bool = False
    mask: bool = False
    mask_strides: tuple[int, ...] = ()
    mask_rows: int = 0
    mask_cols: int = 1

    @property
    def block(self) -> int:
        """Score rows per block."""
        rows = max(1, SCORES_BYTES // (4 * self.sk)) // self.tile.rows * self.tile.rows
        return min(self.sq, max(rows, self.tile.rows))

    @property
    def scratch_floats(self) -> tuple[int, int, int]:
        """(packed k_t, packed v, score block) floats."""
        return (packed_b_elements(self.d, self.sk, self.tile), packed_b_elements(self.sk, self.dv, self.tile),
                self.block * self.sk)

    @property
    def scratch_bytes(self) -> int:
        return 4 * sum(self.scratch_floats)


def emit_softmax_rows(builder: ir.IRBuilder, scores: ir.Value, rows: int, count: int, lanes: int,
                      zero_nan: bool) -> None:
    """Softmax in place over each of `rows` rows of `count` contiguous floats: max, exp(x − max) and
    its sum, then × 1/sum (NaN → 0 with `zero_nan`)."""
    kind = ir.VectorType(F32, lanes)
    full, rest = divmod(count, lanes)

    def sweep(builder, row, visit, carried):
        """visit(builder, index, valid, carried) over the row's vectors, the last one `rest` wide."""
        carried = ll.static_loop(builder, full, "v", lambda b, i, c: visit(b, b.mul(i, ir.Constant(I64, lanes)),
                                                                           None, c), carried) if full else carried
        if rest:
            carried = visit(builder, ir.Constant(I64, full * lanes), rest, carried)
        return carried

    def across(builder, vector, combine) -> ir.Value:
        return builder.extract_element(ll.tree_reduce(builder, vector, combine), ir.Constant(I32, 0))

    def maximum(b, x, y):
        return b.select(b.fcmp_ordered(">", x, y), x, y)

    def row_body(builder, r):
        row = byte_at(builder, scores, builder.mul(r, ir.Constant(I64, count)))

        def find_max(b, at, valid, carried):
            return [maximum(b, carried[0], load_vector(b, row, at, lanes, valid, -math.inf))]

        top, = sweep(builder, row, find_max, [fconst(kind, -math.inf)])
        top = ll.splat(builder, across(builder, top, maximum), lanes)

        def exponentiate(b, at, valid, carried):
            e = exp(b, b.fsub(load_vector(b, row, at, lanes, valid, -math.inf), top))
            store_vector(b, e, row, at, valid)
            return [b.fadd(carried[0], e)]

        total, = sweep(builder, row, exponentiate, [fconst(kind, 0.0)])
        total = across(builder, total, lambda b, x, y: b.fadd(x, y))
        inverse = ll.splat(builder, builder.fdiv(fconst(F32, 1.0), total), lanes)

        def normalise(b, at, valid, carried):
            p = b.fmul(load_vector(b, row, at, lanes, valid), inverse)
            if zero_nan:
                p = b.select(b.fcmp_unordered("uno", p, p), fconst(kind, 0.0), p)
            store_vector(b, p, row, at, valid)
            return carried

        sweep(builder, row, normalise, [])

    loop(builder, rows, "row", row_body)


def emit_attention(module: ir.Module, spec: AttentionSpec, name: str) -> ir.Function:
    """`name(q, k_t, v, [mask], out, scratch, thread, threads)`: threads share units (batch index, block of
    score rows), each packing the keys and values of its batch indices into its own scratch
    (`scratch_bytes` per thread)."""
    fn, builder, thread, threads = new_parallel_kernel(module, name, 5 + spec.mask)
    args = list(fn.args)[:5 + spec.mask]
    q, k_t, v = args[:3]
    mask = args[3] if spec.mask else None
    out, scratch = args[-2], thread_scratch(builder, args[-1], thread, spec.scratch_bytes)
    keys_floats, values_floats, _ = spec.scratch_floats
    keys, values = scratch, byte_at(builder, scratch, keys_floats)
    scores = byte_at(builder, scratch, keys_floats + values_floats)
    tile = spec.tile
    pack_keys = emit_pack_b(module, spec.d, spec.sk, spec.sk, 1, tile, name + ".pack_k")
    pack_values = emit_pack_b(module, spec.sk, spec.dv, spec.dv, 1, tile, name + ".pack_v")
    epilogue = Epilogue(scale=spec.scale, residual=spec.mask, residual_ld=spec.mask_rows, residual_col=spec.mask_cols)
    blocks = [(spec.block, spec.sq // spec.block, 0)]
    if spec.sq % spec.block:
        blocks.append((spec.sq % spec.block, 1, spec.sq - spec.sq % spec.block))
    emitters = {rows: (GemmEmitter(module, GemmSpec(rows, spec.d, tile, spec.sk, lda=spec.d, epilogue=epilogue),
                                   f"{name}.scores{rows}"),
                       GemmEmitter(module, GemmSpec(rows, spec.sk, tile, spec.dv, lda=spec.sk), f"{name}.values{rows}"))
                for rows, _, _ in blocks}

    def product(builder, emitter, n, a, b, c, residual=None):
        emitter.call(builder, plain_columns(n, tile), a, b, c, residual=residual)

    def at(builder, i: ir.Value, base: ir.Value, strides: Sequence[int]) -> ir.Value:
        return byte_at(builder, base, batch_offset(builder, i, spec.batch, strides))

    def pack(builder, indices: list[ir.Value]) -> None:
        builder.call(pack_keys, [at(builder, indices[0], k_t, spec.k_strides), keys])
        builder.call(pack_values, [at(builder, indices[0], v, spec.v_strides), values])

    def block(builder, i: ir.Value, row: ir.Value, rows: int) -> None:
        q_i = at(builder, i, q, spec.q_strides)
        mask_i = at(builder, i, mask, spec.mask_strides) if mask is not None else None
        out_i = byte_at(builder, out, builder.mul(i, ir.Constant(I64, spec.sq * spec.dv)))
        score_gemm, value_gemm = emitters[rows]
        mask_at = byte_at(builder, mask_i, builder.mul(row, ir.Constant(I64, spec.mask_rows))) \
            if mask_i is not None else None
        product(builder, score_gemm, spec.sk, byte_at(builder, q_i, builder.mul(row, ir.Constant(I64, spec.d))),
                keys, scores, mask_at)
        emit_softmax_rows(builder, scores, rows, spec.sk, tile.lanes, spec.zero_nan_probs)
        product(builder, value_gemm, spec.dv, scores, values,
                byte_at(builder, out_i, builder.mul(row, ir.Constant(I64, spec.dv))))

    (rows, count, _), tail = blocks[0], blocks[1:]

    def unit(builder, indices: list[ir.Value]) -> None:
        i, j = indices
        if not tail:
            block(builder, i, builder.mul(j, ir.Constant(I64, rows)), rows)
            return
        short = lambda b: block(b, i, ir.Constant(I64, tail[0][2]), tail[0][0])  # noqa: E731
        if not count:
            short(builder)
            return
        with builder.if_else(builder.icmp_unsigned("<", j, ir.Constant(I64, count))) as (whole, last):
            with whole:
                block(builder, i, builder.mul(j, ir.Constant(I64, rows)), rows)
            with last:
                short(builder)

    for_units(builder, thread, threads, [math.prod(spec.batch), count + len(tail)], "unit", unit, {0: pack})
    builder.ret_void()
    return fn
