"""Sparse × dense products: y[M, N] = epilogue(x[M, K] · Wᵀ) for a constant sparse W [N, K].

Packing (`pack_sparse`, at compile time): W is cut into r×c blocks; every block row keeps only its
blocks with a nonzero, in column order. Each stored block is its column *step* from the previous block
of its row (one byte, in units of c; a gap wider than 255 steps is bridged by all-zero filler blocks)
followed by its r·c weights (row-major, int8 or float32). A table of int32 block counts per block row
(prefix sums) comes first. So a 90%-sparse int8 matrix costs about two bytes per nonzero.

Kernel (`emit_sparse_linear`): x is first transposed into scratch xT, 32-bit elements at a time (16 × 16
tiles transposed in registers): float32 [K, Mp], or for int8 the quads x[m, 4j : 4j + 4] as unsigned bytes
(int8 activations + 128, the caller's offsets correct the shift) [⌈K/4⌉, Mp, 4]; Mp = M rounded up to the
vector width. Each stored weight then multiplies contiguous vectors of xT: an FMA with the weight
broadcast, or for int8 one 4-byte dot product (`vpdpbusd` with VNNI, portable IR elsewhere) with a
broadcast int32 of four weights: a whole quad when c is a multiple of 4 (1×4 packing of an unstructured
matrix stores the zeros beside a weight), else the block's bytes shifted to their place in their quad.
Per block row and chunk of M, r × V accumulator vectors (several sets in rotation, to hide the latency)
stay in registers over the row's blocks. A group of output rows (`row_group`) at a time is stored to
accT (scratch, so it stays in L1) and finished at once: accT tiles transposed back to rows of y and the
dense qlinear's requantization (`kernels.requantize.ProductEpilogue`, the bias as per-channel offsets) or
gemm_f32's bias/residual/activation (`gemm_f32.finish`). Integer sums wrap in int32 like the dense
kernels' (the caller checks the bound of the exact result). Threads (`kernels.parallel`) share the row
groups; each transposes x into its own scratch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from llvmlite import ir

from lowbit.kernels import llvm as ll
from lowbit.kernels.gemm_f32 import Epilogue as FloatEpilogue
from lowbit.kernels.gemm_f32 import finish as float_finish
from lowbit.kernels.llvm import F32, I8, I32, I64
from lowbit.kernels.parallel import new_parallel_kernel, share, thread_scratch

MAX_STEP = 255  # the widest column step one byte encodes
ACCUMULATORS = 8  # accumulator vectors per register tile (r · V)
IN_FLIGHT = 12  # independent accumulator vectors a block row keeps busy (hides FMA / vpdpbusd latency)


@dataclass(frozen=True)
class Packed:
    """A packed sparse matrix: `data` (bytes) holds block-row prefix counts (int32, rows/r + 1) at 0, then
    at `blocks_at` the `count` stored blocks of 1 + r·c·itemsize bytes each."""

    data: np.ndarray
    block: tuple[int, int]
    count: int
    blocks_at: int
    nonzeros: int


def fit_block(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """`block` when it tiles a [N, K] matrix, else 1×1 (CSR)."""
    r, c = block
    return (r, c) if shape[0] % r == 0 and shape[1] % c == 0 else (1, 1)


def pack_sparse(matrix: np.ndarray, block: tuple[int, int], dtype: np.dtype) -> Packed:
    """`matrix` [N, K] (values castable to `dtype`: int8 or float32) in the packed block format."""
    n, k = matrix.shape
    r, c = fit_block(matrix.shape, block)
    blocks = np.asarray(matrix, dtype).reshape(n // r, r, k // c, c).transpose(0, 2, 1, 3)  # [N/r, K/c, r, c]
    nonempty = np.any(blocks != 0, axis=(2, 3))
    rows_i, cols_i = np.nonzero(nonempty)
    # steps between consecutive blocks of a row; first block's step from column block 0
    previous = np.where(np.r_[True, rows_i[1:] != rows_i[:-1]], 0, np.r_[0, cols_i[:-1]])
    steps = cols_i - previous
    fillers = np.maximum(steps - 1, 0) // MAX_STEP  # zero blocks bridging wide gaps
    total = len(rows_i) + int(fillers.sum())
    itemsize = np.dtype(dtype).itemsize
    record = 1 + r * c * itemsize
    counts = np.zeros(n // r + 1, np.int64)
    np.add.at(counts, rows_i + 1, 1 + fillers)
    prefix = np.cumsum(counts).astype(np.int32)
    body = np.zeros((total, record), np.uint8)
    position = np.arange(len(rows_i)) + np.cumsum(fillers)  # where each real block lands
    filler_rows = np.repeat(position, fillers) - _ranks(fillers) - 1
    body[filler_rows, 0] = MAX_STEP
    body[position, 0] = steps - fillers * MAX_STEP
    body[position, 1:] = np.ascontiguousarray(blocks[rows_i, cols_i]).view(np.uint8).reshape(len(rows_i), record - 1)
    head = prefix.view(np.uint8)
    data = np.concatenate([head, body.ravel(), np.zeros(64, np.uint8)])  # padding: over-reads stay inside
    return Packed(data, (r, c), total, head.size, int(np.count_nonzero(matrix)))


def _ranks(counts: np.ndarray) -> np.ndarray:
    """For each repeat made by np.repeat(·, counts): its distance from the last copy (counts−1 … 0)."""
    ends = np.repeat(np.cumsum(counts), counts)
    return ends - np.arange(int(counts.sum())) - 1


@dataclass(frozen=True)
class SparseSpec:
    """y[m, n] for m < M, n < N from a Packed W of `block` shape. `integer`: int8 weights times 8-bit
    activations taken as unsigned bytes (`x_signed`: int8 activations + 128; the caller's offsets correct
    for the shift), int32 accumulators; else float32. `lanes`: vector width (int32 or float32 elements);
    `vnni`: the vector widths (int32 lanes) that have x86 `vpdpbusd` here."""

    m: int
    k: int
    n: int
    block: tuple[int, int]
    blocks_at: int
    integer: bool
    lanes: int
    x_signed: bool = False
    vnni: tuple[int, ...] = ()

    @property
    def width(self) -> int:
        """Lanes of one accumulator vector along M (integers: a width with a 4-byte dot product)."""
        if self.m >= self.lanes:
            return self.lanes
        return min(self.lanes, next(w for w in (4, 8, 16) if w >= self.m)) if self.integer else self.m

    @property
    def padded_m(self) -> int:
        return -(-self.m // self.width) * self.width

    @property
    def xt_rows(self) -> int:
        """Rows of xT: K for floats, the ⌈K/4⌉ quads of K for integers."""
        return -(-self.k // 4) if self.integer else self.k

    @property
    def x_element(self) -> ir.Type:
        return I32 if self.integer else F32

    @property
    def xt_bytes(self) -> int:
        """xT's bytes, rounded up to a cache line (accT follows)."""
        return -(-self.xt_rows * self.padded_m * 4 // 64) * 64

    @property
    def scratch_bytes(self) -> int:
        """Scratch of one thread."""
        return self.xt_bytes + 4 * self.row_group * self.padded_m

    @property
    def row_group(self) -> int:
        """Output rows a thread takes at a time: whole block rows and whole epilogue vectors."""
        return math.lcm(self.block[0], self.lanes)


def _transpose_tile(builder: ir.IRBuilder, rows: list[ir.Value]) -> list[ir.Value]:
    """The L × L transpose of L vectors of L lanes: log2(L) rounds of two-source shuffles, round h pairing
    vectors i and i + h and exchanging their h-lane halves of every 2h lanes."""
    size = len(rows)
    rows, half = list(rows), size // 2
    while half:
        low = [g + j + side * size for g in range(0, size, 2 * half) for side in (0, 1) for j in range(half)]
        high = [index + half for index in low]
        for i in (i for i in range(size) if not i & half):
            a, b = rows[i], rows[i + half]
            rows[i] = builder.shuffle_vector(a, b, ll.const_vector(I32, low))
            rows[i + half] = builder.shuffle_vector(a, b, ll.const_vector(I32, high))
        half //= 2
    return rows


def _tiles(builder: ir.IRBuilder, rows: int, columns: int, size: int, name: str, tile, edge) -> None:
    """tile(b, r0, c0) over the full size × size tiles of a rows × columns grid; edge(b, r, c) for every
    element outside them (r, c: i64)."""
    full_r, full_c = rows // size * size, columns // size * size
    c64 = lambda value: ir.Constant(I64, value)  # noqa: E731
    if full_r and full_c:
        def row_of_tiles(b: ir.IRBuilder, i: ir.Value, _) -> None:
            ll.counted_loop(b, c64(full_c // size), f"{name}.tc",
                            body=lambda b2, j, _: tile(b2, b2.mul(i, c64(size)), b2.mul(j, c64(size))))

        ll.counted_loop(builder, c64(full_r // size), f"{name}.tr", body=row_of_tiles)

    def rectangle(b: ir.IRBuilder, r0: int, r_count: int, c0: int, c_count: int, label: str) -> None:
        if not (r_count and c_count):
            return

        def row(b2: ir.IRBuilder, r: ir.Value, _) -> None:
            ll.counted_loop(b2, c64(c_count), f"{name}.{label}c",
                            body=lambda b3, c, _: edge(b3, b3.add(r, c64(r0)), b3.add(c, c64(c0))))

        ll.counted_loop(b, c64(r_count), f"{name}.{label}r", body=row)

    rectangle(builder, 0, full_r, full_c, columns - full_c, "e1")
    rectangle(builder, full_r, rows - full_r, 0, columns, "e2")


def _transpose(builder: ir.IRBuilder, spec: SparseSpec, x: ir.Value, xt: ir.Value) -> None:
    """xT[j, m] = x's 32-bit element j of row m: a float, or for integers the quad x[m, 4j : 4j + 4] as
    unsigned bytes (int8 activations + 128), bytes past K zero. Rows m ≥ M of xT are left as they are
    (their lanes are never read back)."""
    size = spec.lanes
    row_bytes = spec.k * (1 if spec.integer else 4)
    whole = spec.k // 4 if spec.integer else spec.k  # 32-bit elements that lie wholly inside a row
    kind = ll.vector(I32, size)
    flip = 0x80808080 if spec.integer and spec.x_signed else 0
    xt32 = builder.bitcast(xt, I32.as_pointer())
    mp = ir.Constant(I64, spec.padded_m)

    def address(b: ir.IRBuilder, m: ir.Value, j: ir.Value) -> ir.Value:
        return b.gep(x, [b.add(b.mul(m, ir.Constant(I64, row_bytes)), b.shl(j, ir.Constant(I64, 2)))])

    def convert(b: ir.IRBuilder, value: ir.Value) -> ir.Value:
        return b.xor(value, ir.Constant(value.type, flip if value.type == I32 else [flip] * size)) if flip else value

    def tile(b: ir.IRBuilder, m0: ir.Value, j0: ir.Value) -> None:
        rows = [convert(b, b.load(b.bitcast(address(b, b.add(m0, ir.Constant(I64, i)), j0), kind.as_pointer()),
                                  align=1)) for i in range(size)]
        for i, column in enumerate(_transpose_tile(b, rows)):
            ll.store_vector(b, column, xt32, b.add(b.mul(b.add(j0, ir.Constant(I64, i)), mp), m0))

    def edge(b: ir.IRBuilder, m: ir.Value, j: ir.Value) -> None:
        value = convert(b, b.load(b.bitcast(address(b, m, j), I32.as_pointer()), align=1))
        b.store(value, b.gep(xt32, [b.add(b.mul(j, mp), m)]))

    _tiles(builder, spec.m, whole, size, "xt", tile, edge)
    tail = spec.k % 4 if spec.integer else 0
    if tail:  # the last quad's bytes one at a time, the rest zero: no read past x

        def last(b: ir.IRBuilder, m: ir.Value, _) -> None:
            word = ir.Constant(I32, 0)
            for byte in range(tail):
                at = b.add(b.mul(m, ir.Constant(I64, row_bytes)), ir.Constant(I64, 4 * whole + byte))
                value = b.xor(b.zext(b.load(b.gep(x, [at])), I32), ir.Constant(I32, 0x80 if flip else 0))
                word = b.or_(word, b.shl(value, ir.Constant(I32, 8 * byte)))
            b.store(word, b.gep(xt32, [b.add(b.mul(ir.Constant(I64, whole), mp), m)]))

        ll.counted_loop(builder, ir.Constant(I64, spec.m), "xt.tail", body=last)


def _dot(builder: ir.IRBuilder, spec: SparseSpec, acc: ir.Value, a: ir.Value, w: ir.Value) -> ir.Value:
    """acc + the sums of 4 byte products per lane: a unsigned, w signed (vpdpbusd; exact, modular int32)."""
    width = acc.type.count
    if width in spec.vnni:
        function = ll.declare(builder.module, f"llvm.x86.avx512.vpdpbusd.{32 * width}", acc.type, acc.type,
                              acc.type, acc.type)
        return builder.call(function, [acc, a, w])
    wide = ll.vector(I32, 4 * width)
    products = builder.mul(builder.zext(builder.bitcast(a, ll.vector(I8, 4 * width)), wide),
                           builder.sext(builder.bitcast(w, ll.vector(I8, 4 * width)), wide))
    undefined = ir.Constant(wide, ir.Undefined)
    for byte in range(4):
        acc = builder.add(acc, builder.shuffle_vector(products, undefined,
                                                      ll.const_vector(I32, range(byte, 4 * width, 4))))
    return acc


def _quads(b: ir.IRBuilder, spec: SparseSpec, values: ir.Value, column: ir.Value) -> list:
    """A stored block's weights as (xT row, [int32 of 4 weight bytes per block row]) pairs: whole quads
    when c is a multiple of 4, else the block's bytes shifted to their place in the quad of their column."""
    r, c = spec.block
    i64 = lambda value: ir.Constant(I64, value)  # noqa: E731

    def byte(i: int, jj: int) -> ir.Value:
        return b.zext(b.load(b.gep(values, [i64(i * c + jj)])), I32)

    def placed(k: ir.Value, words: list) -> tuple:
        shift = b.trunc(b.shl(b.and_(k, i64(3)), i64(3)), I32)
        return b.lshr(k, i64(2)), [b.shl(word, shift) for word in words]

    if c % 4 == 0:
        row = b.lshr(column, i64(2))
        return [(b.add(row, i64(q)), [b.load(b.bitcast(b.gep(values, [i64(i * c + 4 * q)]), I32.as_pointer()),
                                             align=1) for i in range(r)]) for q in range(c // 4)]
    if 4 % c == 0:  # the block lies in one quad (K % c == 0 and aligned columns)
        words = []
        for i in range(r):
            word = byte(i, 0)
            for jj in range(1, c):
                word = b.or_(word, b.shl(byte(i, jj), ir.Constant(I32, 8 * jj)))
            words.append(word)
        return [placed(column, words)]
    return [placed(b.add(column, i64(jj)), [byte(i, jj) for i in range(r)]) for jj in range(c)]


def _integer_step(b: ir.IRBuilder, spec: SparseSpec, xt: ir.Value, values: ir.Value, column: ir.Value,
                  m0: ir.Value, vectors: int, accs: list) -> list:
    """One stored block's products: each quad of weights broadcast against `vectors` vectors of xT."""
    r, width, mp = spec.block[0], spec.width, spec.padded_m
    for row, words in _quads(b, spec, values, column):
        base = b.add(b.mul(row, ir.Constant(I64, mp)), m0)
        weights = [ll.splat(b, word, width) for word in words]
        for v in range(vectors):
            xv = ll.load_vector(b, xt, b.add(base, ir.Constant(I64, v * width)), width)
            for i in range(r):
                accs[i * vectors + v] = _dot(b, spec, accs[i * vectors + v], xv, weights[i])
    return accs


def _float_step(b: ir.IRBuilder, spec: SparseSpec, xt: ir.Value, values: ir.Value, column: ir.Value,
                m0: ir.Value, vectors: int, accs: list) -> list:
    """One stored block's products: each weight broadcast into FMAs with `vectors` vectors of xT."""
    r, c = spec.block
    width, mp = spec.width, spec.padded_m
    weights = [ll.splat(b, b.load(b.gep(values, [ir.Constant(I64, i)]), align=1), width) for i in range(r * c)]
    for jj in range(c):
        row_at = b.add(b.mul(b.add(column, ir.Constant(I64, jj)), ir.Constant(I64, mp)), m0)
        for v in range(vectors):
            xv = ll.load_vector(b, xt, b.add(row_at, ir.Constant(I64, v * width)), width)
            for i in range(r):
                accs[i * vectors + v] = ll.intrinsic(b, "llvm.fma", weights[i * c + jj], xv, accs[i * vectors + v])
    return accs


def _block_row(builder: ir.IRBuilder, spec: SparseSpec, packed: ir.Value, xt: ir.Value, acc_t: ir.Value,
               row_block: ir.Value, m0: ir.Value, vectors: int) -> None:
    """accT[rows of block row `row_block`, m0 : m0 + V·width] = the row's blocks × xT (V = `vectors`)."""
    r, c = spec.block
    width, mp = spec.width, spec.padded_m
    kind = ll.vector(spec.x_element, width)
    value_element = I8 if spec.integer else F32
    record = 1 + r * c * (1 if spec.integer else 4)
    counts = builder.bitcast(packed, I32.as_pointer())
    first = builder.sext(builder.load(builder.gep(counts, [row_block])), I64)
    last = builder.sext(builder.load(builder.gep(counts, [builder.add(row_block, ir.Constant(I64, 1))])), I64)
    blocks = builder.gep(packed, [ir.Constant(I64, spec.blocks_at)])
    count = r * vectors
    # FMAs / dot products into few accumulators wait on each other: rotate several sets so that each set is
    # updated every `chains` blocks (their sum at the end)
    chains = max(1, IN_FLIGHT // count)
    products = _integer_step if spec.integer else _float_step

    def step(b: ir.IRBuilder, j: ir.Value, carried: list) -> list:
        column, accs, waiting = carried[0], carried[1:1 + count], carried[1 + count:]
        at = b.gep(blocks, [b.mul(b.add(first, j), ir.Constant(I64, record))])
        column = b.add(column, b.mul(b.zext(b.load(at), I64), ir.Constant(I64, c)))
        values = b.bitcast(b.gep(at, [ir.Constant(I64, 1)]), value_element.as_pointer())
        return [column, *waiting, *products(b, spec, xt, values, column, m0, vectors, list(accs))]

    carried = ll.counted_loop(builder, builder.sub(last, first), "nz",
                              [ir.Constant(I64, 0), *[ir.Constant(kind, None)] * (count * chains)], step)
    accs = carried[1:1 + count]
    for chain in range(1, chains):
        add = builder.add if spec.integer else builder.fadd
        accs = [add(a, w) for a, w in zip(accs, carried[1 + chain * count:1 + (chain + 1) * count])]
    n0 = builder.mul(row_block, ir.Constant(I64, r))
    for i in range(r):
        row_at = builder.add(builder.mul(builder.add(n0, ir.Constant(I64, i)), ir.Constant(I64, mp)), m0)
        for v in range(vectors):
            ll.store_vector(builder, accs[i * vectors + v], acc_t, builder.add(row_at, ir.Constant(I64, v * width)))


def emit_sparse_linear(module: ir.Module, name: str, spec: SparseSpec, epilogue, buffers: int) -> ir.Function:
    """`name(x, packed, *middle, out, scratch, thread, threads)` with `buffers` pointers in all (the
    `kernels.parallel` convention: a thread takes its share of the groups of `row_group` output rows;
    scratch holds `scratch_bytes` per thread). `epilogue(builder, args, acc, m, n0, valid)` finishes and
    stores y[m, n0 : n0 + valid] from the `lanes`-wide vector acc (args: the kernel's arguments)."""
    fn, builder, thread, threads = new_parallel_kernel(module, name, buffers)
    args = list(fn.args)[:buffers]
    x, packed = args[0], args[1]
    scratch = thread_scratch(builder, args[buffers - 1], thread, spec.scratch_bytes)
    xt = builder.bitcast(scratch, spec.x_element.as_pointer())
    acc_t = builder.bitcast(builder.gep(scratch, [ir.Constant(I64, spec.xt_bytes)]), spec.x_element.as_pointer())
    r, group = spec.block[0], spec.row_group
    begin, end = share(builder, thread, threads, -(-spec.n // group))
    with builder.if_then(builder.icmp_signed("<", begin, end)):
        _transpose(builder, spec, builder.bitcast(x, I8.as_pointer()), xt)
        vectors = max(1, min(spec.padded_m // spec.width, ACCUMULATORS // r))
        chunk = vectors * spec.width
        full, rest = divmod(spec.m, chunk)

        def over_group(b: ir.IRBuilder, u: ir.Value, _) -> None:
            # a group's accumulators stay in L1 between its products and its epilogue
            n0 = b.mul(b.add(begin, u), ir.Constant(I64, group))
            n1 = b.select(b.icmp_signed("<", b.add(n0, ir.Constant(I64, group)), ir.Constant(I64, spec.n)),
                          b.add(n0, ir.Constant(I64, group)), ir.Constant(I64, spec.n))
            acc_g = b.gep(acc_t, [b.neg(b.mul(n0, ir.Constant(I64, spec.padded_m)))])  # indexed by n

            def over_rows(b2: ir.IRBuilder, j: ir.Value, _) -> None:
                row_block = b2.add(b2.udiv(n0, ir.Constant(I64, r)), j)
                if full:
                    ll.counted_loop(b2, ir.Constant(I64, full), "mc", body=lambda b3, t, _: _block_row(
                        b3, spec, packed, xt, acc_g, row_block, b3.mul(t, ir.Constant(I64, chunk)), vectors))
                if rest:
                    _block_row(b2, spec, packed, xt, acc_g, row_block, ir.Constant(I64, full * chunk),
                               -(-rest // spec.width))

            ll.counted_loop(b, b.udiv(b.sub(n1, n0), ir.Constant(I64, r)), "br", body=over_rows)
            _finish(b, spec, epilogue, args, acc_g, n0, n1)

        ll.counted_loop(builder, builder.sub(end, begin), "grp", body=over_group)
    builder.ret_void()
    return fn


def _finish(builder: ir.IRBuilder, spec: SparseSpec, epilogue, args: list, acc_t: ir.Value, n_begin: ir.Value,
            n_end: ir.Value) -> None:
    """accT [N, Mp] (rows n_begin ≤ n < n_end there) back to rows of y: lanes × lanes tiles transposed in
    registers, the edges (m or n short of a tile) a lane at a time."""
    lanes, mp = spec.lanes, spec.padded_m
    kind = ll.vector(spec.x_element, lanes)
    i64 = lambda value: ir.Constant(I64, value)  # noqa: E731

    def tile(b: ir.IRBuilder, n0: ir.Value, m0: ir.Value) -> None:
        rows = [ll.load_vector(b, acc_t, b.add(b.mul(b.add(n0, i64(i)), i64(mp)), m0), lanes) for i in range(lanes)]
        for i, acc in enumerate(_transpose_tile(b, rows)):
            epilogue(b, args, acc, b.add(m0, i64(i)), n0, lanes)

    def lanewise(b: ir.IRBuilder, n0: ir.Value, m: ir.Value, valid: int) -> None:
        acc = ir.Constant(kind, None)
        for lane in range(valid):
            at = b.add(b.mul(b.add(n0, i64(lane)), i64(mp)), m)
            acc = b.insert_element(acc, b.load(b.gep(acc_t, [at])), ir.Constant(I32, lane))
        epilogue(b, args, acc, m, n0, valid)

    def chunk(b: ir.IRBuilder, n0: ir.Value, valid: int) -> None:
        tiles = spec.m // lanes if valid == lanes else 0
        if tiles:
            ll.counted_loop(b, i64(tiles), "et", body=lambda b2, t, _: tile(b2, n0, b2.mul(t, i64(lanes))))
        rest = ir.Constant(I64, tiles * lanes)
        ll.counted_loop(b, i64(spec.m - tiles * lanes), "em",
                        body=lambda b2, m, _: lanewise(b2, n0, b2.add(m, rest), valid))

    full_end = builder.select(builder.icmp_signed("<", n_end, i64(spec.n // lanes * lanes)), n_end,
                              i64(spec.n // lanes * lanes))
    whole = builder.udiv(builder.sub(builder.select(builder.icmp_signed("<", n_begin, full_end), full_end, n_begin),
                                     n_begin), i64(lanes))
    ll.counted_loop(builder, whole, "en", body=lambda b, j, _: chunk(b, b.add(n_begin, b.mul(j, i64(lanes))), lanes))
    edge = spec.n % lanes
    if edge:
        with builder.if_then(builder.icmp_signed("==", n_end, i64(spec.n))):
            chunk(builder, i64(spec.n - edge), edge)


def integer_epilogue(product):
    """The epilogue of `emit_sparse_linear` for int8: `product` (a requantize.ProductEpilogue whose
    arguments are out, [residual]) on each int32 vector."""
    def apply(builder: ir.IRBuilder, args: list, acc: ir.Value, m: ir.Value, n0: ir.Value, valid: int) -> None:
        pointers = [args[-2], *args[2:-2]]  # out, then the residual when there is one
        product.emit(builder, [[acc]], m, n0, valid, [*pointers, ir.Constant(I64, 0)])
    return apply


def float_epilogue(epilogue: FloatEpilogue, n: int):
    """The epilogue of `emit_sparse_linear` for float32: act(acc + bias + residual) (the kernel's arguments
    after the packed weights: [bias], [residual])."""
    def apply(builder: ir.IRBuilder, args: list, acc: ir.Value, m: ir.Value, n0: ir.Value, valid: int) -> None:
        middle, lanes = args[2:-2], acc.type.count
        at = builder.add(builder.mul(m, ir.Constant(I64, n)), n0)
        bias = residual = None
        if epilogue.bias != "none":
            bias = ll.load_partial(builder, builder.gep(builder.bitcast(middle[0], F32.as_pointer()), [n0]), valid,
                                   lanes)
        if epilogue.residual:
            residual = ll.load_partial(builder, builder.gep(builder.bitcast(middle[-1], F32.as_pointer()), [at]),
                                       valid, lanes)
        out = builder.gep(builder.bitcast(args[-2], F32.as_pointer()), [at])
        ll.store_partial(builder, float_finish(builder, epilogue, acc, bias, residual), out, valid)
    return apply
