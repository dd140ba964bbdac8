"""Sparse × dense products: y[M, N] = epilogue(x[M, K] · Wᵀ) for a constant sparse W [N, K].

Packing (`pack_sparse`, at compile time): W is cut into r×c blocks; every block row keeps only its blocks
with a nonzero, in column order. Each stored block is its column *step* from the previous block of its row
(one byte, in units of c; a gap wider than 255 steps is bridged by all-zero filler blocks) followed by its
r·c weights (row-major, int8, int16 for the int16-pair route, or float32). A table of int32 block counts
per block row (prefix sums) comes first. So a 90%-sparse int8 matrix costs about two bytes per nonzero.
The int16-pair route has one more packing (`pack_paired`): records of two weights, one at an even k and
one at an odd k anywhere in the row, whose rows of xT are blended so that one `vpmaddwd` takes both
(single weights otherwise fill half of one); about 20% fewer vector operations at 90% unstructured
sparsity.

Kernel (`emit_sparse_linear`): x is first transposed into scratch xT, 32-bit elements at a time (16 × 16
tiles transposed in registers): float32 [K, Mp]; for int8 either quads x[m, 4j : 4j + 4] of bytes [⌈K/4⌉,
Mp, 4] (as unsigned bytes for `vpdpbusd`, int8 + 128; as signed ones for `sdot`, uint8 − 128; the caller's
offsets correct the shift) or, where the target has no 4-byte dot product, pairs x[m, 2j : 2j + 2] extended
to int16 [⌈K/2⌉, Mp, 2] for `vpmaddwd` (AVX2; exact for any weights, unlike `vpmaddubsw`) or portable IR;
Mp = M rounded up to the vector width. Each stored weight then multiplies contiguous vectors of xT: an FMA
with the weight broadcast, or for int8 one dot product with a broadcast int32 of a group of weights: a whole
group when c is a multiple of it (1×4 packing of an unstructured matrix stores the zeros beside a weight),
else the block's weights shifted to their place in their group.
Per block row and chunk of M, r × V accumulator vectors (for FMAs and 4-byte dot products several sets
in rotation, to hide their latency) stay in registers over the row's blocks. xT is stored chunk by chunk
(`xt_index`), and a group of output rows (`row_group`) takes one chunk at a time (a pass over the group's
rows): the AVX2 pairs route narrows its chunks where one would read more than `PASS_BYTES` (L1). Each
row's finished accumulators go to accT (scratch, in L1 or L2): for qlinear without a residual requantized
first, in registers (`integer_row_epilogue`; 8-bit results as bytes, `spec.narrow`), else as they are.
A group's accT is then transposed back to rows of y in tiles (`_finish`), with the rest of the dense
qlinear's requantization (`kernels.requantize.ProductEpilogue`, the bias as per-channel offsets) or
gemm_f32's bias/residual/activation (`gemm_f32.finish`). Integer sums wrap in int32 like the dense
kernels' (the caller checks the bound of the exact result). Threads (`kernels.parallel`) share units of
`row_unit` rows, each thread's taken in groups; each transposes x into its own scratch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from llvmlite import ir

from lowbit.ir.dtypes import DType
from lowbit.kernels import llvm as ll
from lowbit.kernels.gemm_f32 import Epilogue as FloatEpilogue
from lowbit.kernels.gemm_f32 import finish as float_finish
from lowbit.kernels.gemm_int8 import mac_pmaddwd, mac_sdot, mac_vpdpbusd
from lowbit.kernels.llvm import F32, I8, I32, I64
from lowbit.kernels.parallel import new_parallel_kernel, share, thread_scratch

MAX_STEP = 255  # the widest column step one byte encodes
ACCUMULATORS = 8  # accumulator vectors per register tile (r · V)
IN_FLIGHT = 12  # independent accumulator vectors a block row keeps busy (hides FMA / vpdpbusd latency)
UNROLL = 4  # stored blocks an iteration of the block row loop (about 5% on AVX2 at 90%)
# The pairs route on x86 takes M in passes of PASS_VECTORS accumulator vectors where one pass would read
# more than PASS_BYTES (L1) of xT; its groups of rows then keep accT within GROUP_BYTES (L2). AVX2, 512 ×
# K × 64, 90% (Emerald Rapids, quiet): K = 512, 61.5 µs against 68 for one pass of 8 (2 vectors: 68.5);
# K = 1024, 128 against 147; K = 2048, 300 against 323 (2 vectors: 293). Any split of the other routes
# (less work per vector) was slower.
PASS_BYTES = 32 << 10
PASS_VECTORS = 4
GROUP_BYTES = 128 << 10


@dataclass(frozen=True)
class Packed:
    """A packed sparse matrix: `data` (bytes) holds block-row prefix counts (int32, rows/r + 1) at 0, then
    at `blocks_at` the `count` stored blocks of 1 + r·c·itemsize bytes each (`pack_paired`: its records)."""

    data: np.ndarray
    block: tuple[int, int]
    count: int
    blocks_at: int
    nonzeros: int
    aligned_at: int = 0  # (`pack_paired`)


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


def pack_paired(matrix: np.ndarray) -> Packed:
    """`matrix` [N, K] (int8 values, K even) for the pairs route's parity pairing. Per row, *crossed*
    records join a weight at an even k with one at an odd k from different pairs of K: their xT rows are
    blended, one int16 from each, so that one `vpmaddwd` multiplies both (an unstructured matrix has few
    pairs with two nonzeros); *aligned* records hold the rest, one pair of K each (both its weights, or
    one and a zero). Crossed: pair rows j_even, j_odd (uint16) and the int32 of the two int16 weights (the
    even k's low); aligned: j and its int32. A table of int32 crossed counts per row (prefix sums), then
    one of aligned counts, come first; `blocks_at` is where the crossed records begin, `aligned_at` the
    aligned ones."""
    n, k = matrix.shape
    pairs = np.asarray(matrix, np.int16).reshape(n, k // 2, 2)
    nonzero, evens, odds, crossing = _lone(pairs)
    even_crossed = _rank_in_row(evens[0], n) < crossing[evens[0]]  # a row's first evens with its first odds
    odd_crossed = _rank_in_row(odds[0], n) < crossing[odds[0]]
    rows, j_even, j_odd = evens[0][even_crossed], evens[1][even_crossed], odds[1][odd_crossed]
    crossed = np.zeros(len(rows), CROSSED)
    crossed["j_even"], crossed["j_odd"] = j_even, j_odd
    crossed["weights"][:, 0], crossed["weights"][:, 1] = pairs[rows, j_even, 0], pairs[rows, j_odd, 1]
    rest = nonzero.any(axis=2)
    rest[rows, j_even] = rest[rows, j_odd] = False
    aligned_rows, j = np.nonzero(rest)
    aligned = np.zeros(len(aligned_rows), ALIGNED)
    aligned["j"], aligned["weights"] = j, pairs[aligned_rows, j]
    tables = [np.r_[0, np.cumsum(np.bincount(which, minlength=n))].astype(np.int32) for which in (rows, aligned_rows)]
    head = np.concatenate(tables).view(np.uint8)
    blocks_at = head.size
    data = np.concatenate([head, crossed.view(np.uint8), aligned.view(np.uint8), np.zeros(64, np.uint8)])
    return Packed(data, (1, 1), len(crossed) + len(aligned), blocks_at, int(np.count_nonzero(matrix)),
                  blocks_at + crossed.nbytes)


def paired_counts(matrix: np.ndarray) -> tuple[int, int]:
    """(crossed, aligned) records of `pack_paired(matrix)`."""
    n, k = matrix.shape
    nonzero, _, _, crossing = _lone(np.asarray(matrix).reshape(n, k // 2, 2))
    crossed = int(crossing.sum())
    return crossed, int(nonzero.any(axis=2).sum()) - 2 * crossed


def _lone(pairs: np.ndarray) -> tuple:
    """For weights [N, K/2, 2]: which are nonzero; (rows, pair rows) of the pairs whose only nonzero is the
    even k, then of those whose only nonzero is the odd k (in row order); and per row how many of each
    cross (the fewer of the two)."""
    nonzero = pairs != 0
    evens = np.nonzero(nonzero[..., 0] & ~nonzero[..., 1])
    odds = np.nonzero(nonzero[..., 1] & ~nonzero[..., 0])
    n = len(pairs)
    return nonzero, evens, odds, np.minimum(np.bincount(evens[0], minlength=n), np.bincount(odds[0], minlength=n))


CROSSED = np.dtype([("j_even", "<u2"), ("j_odd", "<u2"), ("weights", "<i2", 2)])
ALIGNED = np.dtype([("j", "<u2"), ("weights", "<i2", 2)])
MAX_PAIR_ROWS = 1 << 16  # (uint16 pair rows: K ≤ 131072 for the parity pairing)


def _rank_in_row(rows: np.ndarray, n: int) -> np.ndarray:
    """Each element's place among those of its row (`rows` sorted)."""
    counts = np.bincount(rows, minlength=n)
    return np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)


def _ranks(counts: np.ndarray) -> np.ndarray:
    """For each repeat made by np.repeat(·, counts): its distance from the last copy (counts−1 … 0)."""
    ends = np.repeat(np.cumsum(counts), counts)
    return ends - np.arange(int(counts.sum())) - 1


@dataclass(frozen=True)
class SparseSpec:
    """y[m, n] for m < M, n < N from a Packed W of `block` shape. `integer`: int8 weights times 8-bit
    activations (`x_signed`: int8, else uint8), int32 accumulators; else float32. `lanes`: vector width
    (int32 or float32 elements). The instructions the target has, by int32 vector width: `vnni` x86
    `vpdpbusd`, `madd` x86 `vpmaddwd`; `sdot`: AArch64 `sdot` (4 lanes)."""

    m: int
    k: int
    n: int
    block: tuple[int, int]
    blocks_at: int
    integer: bool
    lanes: int
    x_signed: bool = False
    vnni: tuple[int, ...] = ()
    madd: tuple[int, ...] = ()
    sdot: bool = False
    compact: bool = False  # optimising for size: no unrolling; the pairs route's weights as int8, widened
    aligned_at: int = 0  # nonzero: the pairs route's parity pairing (`pack_paired`), its aligned records
    x86: bool = False  # x86 with AVX2 (the M = 1 kernel's gathers; the pairs route's passes)
    narrow: bool = False  # accT holds each row's 8-bit results, requantized in registers (`integer_row_epilogue`)

    @property
    def width(self) -> int:
        """Lanes of one accumulator vector along M (integers: a width with a 4-byte dot product)."""
        if self.m >= self.lanes:
            return self.lanes
        return min(self.lanes, next(w for w in (4, 8, 16) if w >= self.m)) if self.integer else self.m

    @property
    def route(self) -> str:
        """How an int8 product is formed: "vpdpbusd" (unsigned activation bytes) or "sdot" (signed) over
        quads of K, else "pairs": int16 pairs of K (`vpmaddwd` or portable IR); "float" for float32."""
        if not self.integer:
            return "float"
        if self.width in self.vnni:
            return "vpdpbusd"
        return "sdot" if self.sdot and self.width == 4 else "pairs"

    @property
    def group(self) -> int:
        """Values of K in one 32-bit element of xT: 4 bytes, 2 int16 or 1 float."""
        return {"float": 1, "pairs": 2}.get(self.route, 4)

    @property
    def shift(self) -> int:
        """What the kernel adds to every activation on its way into xT (the caller's offsets correct for
        it): +128 turns int8 into the unsigned bytes `vpdpbusd` wants, −128 uint8 into `sdot`'s signed."""
        if self.route == "vpdpbusd" and self.x_signed:
            return 128
        return -128 if self.route == "sdot" and not self.x_signed else 0

    @property
    def padded_m(self) -> int:
        return -(-self.m // self.width) * self.width

    @property
    def weight(self) -> np.dtype:
        """How the packed weights are stored: int8, int16 for the pairs route unless `compact` (a group of
        weights is then one int32 in memory, broadcast as it is), float32."""
        if self.route == "pairs" and not self.compact:
            return np.dtype(np.int16)
        return np.dtype(np.float32 if self.route == "float" else np.int8)

    @property
    def xt_rows(self) -> int:
        """Rows of xT: K for floats, ⌈K / group⌉ for integers."""
        return -(-self.k // self.group)

    @property
    def x_element(self) -> ir.Type:
        return I32 if self.integer else F32

    @property
    def vectors(self) -> int:
        """Accumulator vectors along M per block row in one pass over the rows: as many as ACCUMULATORS allows;
        for the pairs route on x86 no more than PASS_VECTORS where a pass would read more than PASS_BYTES."""
        most = max(1, min(self.padded_m // self.width, ACCUMULATORS // self.block[0]))
        if self.route == "pairs" and self.x86 and self.xt_rows * most * self.width * 4 > PASS_BYTES:
            return min(most, PASS_VECTORS)
        return most

    @property
    def chunk(self) -> int:
        """Columns of M (of xT and accT) one pass takes."""
        return self.vectors * self.width

    @property
    def passes(self) -> int:
        return -(-self.padded_m // self.chunk)

    @property
    def xt_bytes(self) -> int:
        """xT's bytes (`passes` × rows × `chunk`), rounded up to a cache line (accT follows)."""
        return -(-self.passes * self.xt_rows * self.chunk * 4 // 64) * 64

    @property
    def acc_bytes(self) -> int:
        """Bytes of an element of accT."""
        return 1 if self.narrow else 4

    @property
    def scratch_bytes(self) -> int:
        """Scratch of one thread."""
        return self.xt_bytes + self.acc_bytes * self.row_group * self.padded_m

    @property
    def tile(self) -> int:
        """Side of the square tiles of accT transposed back in registers: a vector of `lanes` 32-bit
        elements, or of 16 bytes."""
        return 16 if self.narrow else self.lanes

    @property
    def row_unit(self) -> int:
        """Output rows threads share out: whole block rows and whole tiles of the transpose back."""
        return math.lcm(self.block[0], self.tile)

    @property
    def row_group(self) -> int:
        """Output rows a thread finishes at a time: one unit, or with several passes as many units as keep
        accT within GROUP_BYTES (each pass over them reuses its columns of xT)."""
        unit = self.row_unit
        if self.passes == 1:
            return unit
        return unit * max(1, min(-(-self.n // unit), GROUP_BYTES // (unit * self.padded_m * self.acc_bytes)))


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


def _interleave_transpose(builder: ir.IRBuilder, rows: list[ir.Value]) -> list[ir.Value]:
    """The L × L transpose of L vectors of L lanes in log2(L) rounds of the same step: vectors 2i and
    2i + 1 become the interleaved low halves and the interleaved high halves of vectors i and i + L/2 (each
    round rotates the bits of (vector, lane) left by one). An interleave is one `punpckl/h` on x86, which
    the exchanges of `_transpose_tile` are not for bytes."""
    size = len(rows)
    low = ll.const_vector(I32, [j // 2 + (j % 2) * size for j in range(size)])
    high = ll.const_vector(I32, [size // 2 + j // 2 + (j % 2) * size for j in range(size)])
    for _ in range(size.bit_length() - 1):
        halves = [(rows[i], rows[i + size // 2]) for i in range(size // 2)]
        rows = [builder.shuffle_vector(a, b, mask) for a, b in halves for mask in (low, high)]
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


def activations(b: ir.IRBuilder, spec: SparseSpec, data: ir.Value) -> ir.Value:
    """8-bit activations (a vector of bytes) as the integer route multiplies them: extended to int16 for
    the pairs route, else bytes shifted by `spec.shift`."""
    if spec.group == 2:
        return (b.sext if spec.x_signed else b.zext)(data, ll.vector(ir.IntType(16), data.type.count))
    return b.xor(data, ir.Constant(data.type, [0x80] * data.type.count)) if spec.shift else data


def _widen(b: ir.IRBuilder, spec: SparseSpec, data: ir.Value) -> ir.Value:
    """`data` (count · group bytes of x, a vector) as `count` 32-bit elements of xT."""
    return b.bitcast(activations(b, spec, data), ll.vector(I32, data.type.count // spec.group))


def xt_index(b: ir.IRBuilder, spec: SparseSpec, j: ir.Value, m: ir.Value) -> ir.Value:
    """Where xT's element (j, m) lies: xT is stored pass by pass, each pass's `chunk` columns row after row."""
    chunk = ir.Constant(I64, spec.chunk)
    pass_at = b.mul(b.udiv(m, chunk), ir.Constant(I64, spec.xt_rows * spec.chunk))
    return b.add(pass_at, b.add(b.mul(j, chunk), b.urem(m, chunk)))


def _transpose(builder: ir.IRBuilder, spec: SparseSpec, x: ir.Value, xt: ir.Value) -> None:
    """xT[j, m] = x's 32-bit element j of row m: a float, or for integers `_widen` of the bytes
    x[m, g·j : g·j + g] (g = spec.group); past K, padding (its weights are zero). Columns m ≥ M of xT are
    left as they are (their lanes are never read back)."""
    size, group = spec.lanes, spec.group
    row_bytes = spec.k * (1 if spec.integer else 4)
    whole = spec.k // group  # 32-bit elements that lie wholly inside a row
    element = ll.vector(I8, group) if spec.integer else F32
    xt32 = builder.bitcast(xt, spec.x_element.as_pointer())

    def address(b: ir.IRBuilder, m: ir.Value, j: ir.Value) -> ir.Value:
        at = b.add(b.mul(m, ir.Constant(I64, row_bytes)), b.mul(j, ir.Constant(I64, group if spec.integer else 4)))
        return b.gep(x, [at])

    def load(b: ir.IRBuilder, m: ir.Value, j: ir.Value, count: int) -> ir.Value:
        """`count` 32-bit elements of xT from row m of x, from element j."""
        kind = ll.vector(I8, count * group) if spec.integer else ll.vector(F32, count)
        data = b.load(b.bitcast(address(b, m, j), kind.as_pointer()), align=1)
        return _widen(b, spec, data) if spec.integer else data

    def tile(b: ir.IRBuilder, m0: ir.Value, j0: ir.Value) -> None:
        rows = [b.bitcast(load(b, b.add(m0, ir.Constant(I64, i)), j0, size), ll.vector(I32, size))
                for i in range(size)]
        for i, column in enumerate(_transpose_tile(b, rows)):
            column = b.bitcast(column, ll.vector(spec.x_element, size))
            ll.store_vector(b, column, xt32, xt_index(b, spec, b.add(j0, ir.Constant(I64, i)), m0))

    def edge(b: ir.IRBuilder, m: ir.Value, j: ir.Value) -> None:
        value = b.extract_element(load(b, m, j, 1), ir.Constant(I32, 0))
        b.store(value, b.gep(xt32, [xt_index(b, spec, j, m)]))

    _tiles(builder, spec.m, whole, size, "xt", tile, edge)
    tail = spec.k % group if spec.integer else 0
    if tail:  # the last element's bytes one at a time, the rest zero: no read past x

        def last(b: ir.IRBuilder, m: ir.Value, _) -> None:
            data = ir.Constant(element, [0] * group)
            for byte in range(tail):
                at = b.add(b.mul(m, ir.Constant(I64, row_bytes)), ir.Constant(I64, group * whole + byte))
                data = b.insert_element(data, b.load(b.gep(x, [at])), ir.Constant(I32, byte))
            value = b.extract_element(_widen(b, spec, data), ir.Constant(I32, 0))
            b.store(value, b.gep(xt32, [xt_index(b, spec, ir.Constant(I64, whole), m)]))

        ll.counted_loop(builder, ir.Constant(I64, spec.m), "xt.tail", body=last)


def dot(builder: ir.IRBuilder, spec: SparseSpec, acc: ir.Value, a: ir.Value, w: ir.Value) -> ir.Value:
    """acc + per int32 lane the sum of the products of a's and w's `group` values (bytes: a unsigned for
    `vpdpbusd`, signed for `sdot`; w signed; int16 pairs: both signed) — exact, in modular int32."""
    width, module = acc.type.count, builder.module
    if spec.route == "vpdpbusd":
        return mac_vpdpbusd(builder, module, acc, a, w)
    if spec.route == "sdot":
        return mac_sdot(builder, module, acc, a, w)
    if width in spec.madd:
        return mac_pmaddwd(builder, module, acc, a, w)
    wide, pairs = ll.vector(I32, 2 * width), ll.vector(ir.IntType(16), 2 * width)
    products = builder.mul(builder.sext(builder.bitcast(a, pairs), wide), builder.sext(builder.bitcast(w, pairs), wide))
    for half in range(2):
        acc = builder.add(acc, builder.shuffle_vector(products, ir.Constant(wide, ir.Undefined),
                                                      ll.const_vector(I32, range(half, 2 * width, 2))))
    return acc


def _words(b: ir.IRBuilder, spec: SparseSpec, values: ir.Value, column: ir.Value) -> list:
    """A stored block's weights as (xT row, [int32 of `group` weights per block row]) pairs: whole groups
    when c is a multiple of the group, else the block's weights shifted to their place in the group of
    their column."""
    r, c = spec.block
    group = spec.group
    bits = 32 // group  # (the packed weights' width)
    i64 = lambda value: ir.Constant(I64, value)  # noqa: E731

    widen = bits == 16 and spec.compact  # int8 weights for 16-bit places

    def weight(i: int, jj: int) -> ir.Value:
        value = b.load(b.gep(values, [i64(i * c + jj)]))
        return b.zext(b.sext(value, ir.IntType(16)) if widen else value, I32)

    def whole(i: int, q: int) -> ir.Value:
        if not widen:
            return b.load(b.bitcast(b.gep(values, [i64(i * c + group * q)]), I32.as_pointer()), align=1)
        data = b.load(b.bitcast(b.gep(values, [i64(i * c + group * q)]), ll.vector(I8, group).as_pointer()), align=1)
        return b.bitcast(b.sext(data, ll.vector(ir.IntType(16), group)), I32)

    def placed(k: ir.Value, words: list) -> tuple:
        shift = b.trunc(b.mul(b.and_(k, i64(group - 1)), i64(bits)), I32)
        return b.udiv(k, i64(group)), [b.shl(word, shift) for word in words]

    if c % group == 0:
        row = b.udiv(column, i64(group))
        return [(b.add(row, i64(q)), [whole(i, q) for i in range(r)]) for q in range(c // group)]
    if group % c == 0:  # the block lies in one group (K % c == 0 and aligned columns)
        words = []
        for i in range(r):
            word = weight(i, 0)
            for jj in range(1, c):
                word = b.or_(word, b.shl(weight(i, jj), ir.Constant(I32, bits * jj)))
            words.append(word)
        return [placed(column, words)]
    return [placed(b.add(column, i64(jj)), [weight(i, jj) for i in range(r)]) for jj in range(c)]


def _integer_step(b: ir.IRBuilder, spec: SparseSpec, xt: ir.Value, values: ir.Value, column: ir.Value,
                  vectors: int, accs: list) -> list:
    """One stored block's products: each group of weights broadcast against `vectors` vectors of a pass's xT."""
    r, width = spec.block[0], spec.width
    for row, words in _words(b, spec, values, column):
        # a pointer to the row, then constant offsets: addressing modes take them (an index sum is not
        # always folded into one)
        base = b.gep(xt, [b.mul(row, ir.Constant(I64, spec.chunk))])
        weights = [ll.splat(b, word, width) for word in words]
        for v in range(vectors):
            xv = ll.load_vector(b, base, ir.Constant(I64, v * width), width)
            for i in range(r):
                accs[i * vectors + v] = dot(b, spec, accs[i * vectors + v], xv, weights[i])
    return accs


def _float_step(b: ir.IRBuilder, spec: SparseSpec, xt: ir.Value, values: ir.Value, column: ir.Value,
                vectors: int, accs: list) -> list:
    """One stored block's products: each weight broadcast into FMAs with `vectors` vectors of a pass's xT."""
    r, c = spec.block
    width = spec.width
    weights = [ll.splat(b, b.load(b.gep(values, [ir.Constant(I64, i)]), align=1), width) for i in range(r * c)]
    for jj in range(c):
        row_at = b.gep(xt, [b.mul(b.add(column, ir.Constant(I64, jj)), ir.Constant(I64, spec.chunk))])
        for v in range(vectors):
            xv = ll.load_vector(b, row_at, ir.Constant(I64, v * width), width)
            for i in range(r):
                accs[i * vectors + v] = ll.intrinsic(b, "llvm.fma", weights[i * c + jj], xv, accs[i * vectors + v])
    return accs


def _block_row(builder: ir.IRBuilder, spec: SparseSpec, packed: ir.Value, xt: ir.Value, store_row,
               row_block: ir.Value, m0: ir.Value, vectors: int) -> None:
    """store_row(builder, acc, n, m) of each vector of accumulators of the rows n of block row `row_block`,
    columns m0 : m0 + V·width: the row's blocks × the pass's xT (`xt`, the pass of columns m0: V =
    `vectors`)."""
    r, c = spec.block
    width = spec.width
    count = r * vectors
    # FMAs / dot products into few accumulators wait on each other: rotate several sets so that each set is
    # updated every `chains` blocks (their sum at the end). The pairs route adds its products in a separate
    # one-cycle addition: one set.
    chains = 1 if spec.route == "pairs" else max(1, IN_FLIGHT // count)
    zero = [ir.Constant(ll.vector(spec.x_element, width), None)] * (count * chains)
    if spec.aligned_at:
        carried = _paired_row(builder, spec, packed, xt, row_block, vectors, zero, count)
    else:
        value_element = ll.element_type(DType.from_numpy(spec.weight))
        record = 1 + r * c * spec.weight.itemsize
        blocks = builder.gep(packed, [ir.Constant(I64, spec.blocks_at)])
        products = _integer_step if spec.integer else _float_step

        def step(b: ir.IRBuilder, j: ir.Value, carried: list) -> list:
            column, accs, waiting = carried[0], carried[1:1 + count], carried[1 + count:]
            at = b.gep(blocks, [b.mul(j, ir.Constant(I64, record))])
            column = b.add(column, b.mul(b.zext(b.load(at), I64), ir.Constant(I64, c)))
            values = b.bitcast(b.gep(at, [ir.Constant(I64, 1)]), value_element.as_pointer())
            return [column, *waiting, *products(b, spec, xt, values, column, vectors, list(accs))]

        carried = _records(builder, spec, *_row_span(builder, packed, row_block), [ir.Constant(I64, 0), *zero],
                           step)[1:]
    accs = carried[:count]
    for chain in range(1, chains):
        add = builder.add if spec.integer else builder.fadd
        accs = [add(a, w) for a, w in zip(accs, carried[chain * count:(chain + 1) * count])]
    n0 = builder.mul(row_block, ir.Constant(I64, r))
    for i in range(r):
        for v in range(vectors):
            store_row(builder, accs[i * vectors + v], builder.add(n0, ir.Constant(I64, i)),
                      builder.add(m0, ir.Constant(I64, v * width)))


def _records(builder: ir.IRBuilder, spec: SparseSpec, first: ir.Value, last: ir.Value, carried: list, step
             ) -> list:
    """step(b, i, carried) -> carried for first ≤ i < last: UNROLL records an iteration (one when optimising
    for size), then the rest one by one."""
    times = 1 if spec.compact else UNROLL
    total, unroll = builder.sub(last, first), ir.Constant(I64, times)

    def steps(b: ir.IRBuilder, j: ir.Value, carried: list) -> list:
        for u in range(times):
            carried = step(b, b.add(first, b.add(b.mul(j, unroll), ir.Constant(I64, u))), carried)
        return carried

    carried = ll.counted_loop(builder, builder.udiv(total, unroll), "nz", carried, steps)
    done = builder.add(first, builder.mul(builder.udiv(total, unroll), unroll))
    return ll.counted_loop(builder, builder.urem(total, unroll), "nz1", carried,
                           lambda b, j, c: step(b, b.add(done, j), c))


def _paired_row(builder: ir.IRBuilder, spec: SparseSpec, packed: ir.Value, xt: ir.Value, row: ir.Value,
                vectors: int, carried: list, count: int) -> list:
    """A row's products from `pack_paired` records (the accumulator sets `carried`, rotated as in
    `_block_row`): crossed records, then aligned ones."""
    if spec.route != "pairs":
        raise ValueError(f"the parity pairing is for the int16-pair route, not {spec.route!r}")
    width, i64 = spec.width, lambda value: ir.Constant(I64, value)  # noqa: E731
    halves = ll.vector(ir.IntType(16), 2 * width)
    blend = ll.const_vector(I32, [i + (i % 2) * 2 * width for i in range(2 * width)])  # odd int16s from the second

    def row_of(b: ir.IRBuilder, at: ir.Value) -> ir.Value:
        j = b.zext(b.load(b.bitcast(at, ir.IntType(16).as_pointer()), align=1), I64)
        return b.gep(xt, [b.mul(j, i64(spec.chunk))])

    def word(b: ir.IRBuilder, at: ir.Value) -> ir.Value:
        return ll.splat(b, b.load(b.bitcast(at, I32.as_pointer()), align=1), width)

    def products(b: ir.IRBuilder, accs: list, weights: ir.Value, vector_at) -> list:
        return [dot(b, spec, acc, vector_at(v), weights) for v, acc in enumerate(accs)]

    def crossed(b: ir.IRBuilder, i: ir.Value, carried: list) -> list:
        at = b.gep(packed, [b.add(i64(spec.blocks_at), b.mul(i, i64(CROSSED.itemsize)))])
        even, odd = row_of(b, at), row_of(b, b.gep(at, [i64(2)]))

        def blended(v: int) -> ir.Value:
            a, c = (b.bitcast(ll.load_vector(b, base, i64(v * width), width), halves) for base in (even, odd))
            return b.bitcast(b.shuffle_vector(a, c, blend), ll.vector(I32, width))

        return [*carried[count:], *products(b, carried[:count], word(b, b.gep(at, [i64(4)])), blended)]

    def aligned(b: ir.IRBuilder, i: ir.Value, carried: list) -> list:
        at = b.gep(packed, [b.add(i64(spec.aligned_at), b.mul(i, i64(ALIGNED.itemsize)))])
        base = row_of(b, at)
        return [*carried[count:], *products(b, carried[:count], word(b, b.gep(at, [i64(2)])),
                                            lambda v: ll.load_vector(b, base, i64(v * width), width))]

    carried = _records(builder, spec, *_row_span(builder, packed, row), carried, crossed)
    return _records(builder, spec, *_row_span(builder, packed, builder.add(row, i64(spec.n + 1))), carried, aligned)


def _row_span(builder: ir.IRBuilder, packed: ir.Value, at: ir.Value) -> tuple[ir.Value, ir.Value]:
    """(first, last) records of a row from int32 prefix counts at element `at` of `packed`."""
    counts = builder.bitcast(packed, I32.as_pointer())
    return tuple(builder.sext(builder.load(builder.gep(counts, [builder.add(at, ir.Constant(I64, end))])), I64)
                 for end in (0, 1))


def emit_sparse_linear(module: ir.Module, name: str, spec: SparseSpec, epilogue, buffers: int,
                       row_epilogue=None) -> ir.Function:
    """`name(x, packed, *middle, out, scratch, thread, threads)` with `buffers` pointers in all (the
    `kernels.parallel` convention: a thread takes its share of units of `row_unit` output rows; scratch
    holds `scratch_bytes` per thread). `row_epilogue(builder, acc, n, m, acc_t)`, when given, stores a
    finished vector of accumulators of row n, columns m.. (channel n) to accT (`acc_t`, indexed n · Mp + m;
    bytes when `spec.narrow`), else they are stored as they are. `epilogue(builder, args, acc, m, n0,
    valid)` then finishes and stores y[m, n0 : n0 + valid] from a vector acc of accT's elements, `spec.tile`
    wide (args: the kernel's arguments)."""
    fn, builder, thread, threads = new_parallel_kernel(module, name, buffers)
    args = list(fn.args)[:buffers]
    x, packed = args[0], args[1]
    scratch = thread_scratch(builder, args[buffers - 1], thread, spec.scratch_bytes)
    xt = builder.bitcast(scratch, spec.x_element.as_pointer())
    acc_element = I8 if spec.narrow else spec.x_element
    acc_t = builder.bitcast(builder.gep(scratch, [ir.Constant(I64, spec.xt_bytes)]), acc_element.as_pointer())
    r, group, unit = spec.block[0], spec.row_group, spec.row_unit
    i64 = lambda value: ir.Constant(I64, value)  # noqa: E731
    begin, end = share(builder, thread, threads, -(-spec.n // unit))
    last = builder.mul(end, i64(unit))
    last = builder.select(builder.icmp_signed("<", last, i64(spec.n)), last, i64(spec.n))
    with builder.if_then(builder.icmp_signed("<", begin, end)):
        _transpose(builder, spec, builder.bitcast(x, I8.as_pointer()), xt)
        chunk = spec.chunk
        full, rest = divmod(spec.m, chunk)

        def over_group(b: ir.IRBuilder, u: ir.Value, _) -> None:
            # a group's accumulators stay in L1 (or L2) between its products and its epilogue
            n0 = b.add(b.mul(begin, i64(unit)), b.mul(u, i64(group)))
            n1 = b.select(b.icmp_signed("<", b.add(n0, i64(group)), last), b.add(n0, i64(group)), last)
            acc_g = b.gep(acc_t, [b.neg(b.mul(n0, ir.Constant(I64, spec.padded_m)))])  # indexed by n

            def store_row(b2: ir.IRBuilder, acc: ir.Value, n: ir.Value, m: ir.Value) -> None:
                if row_epilogue is not None:
                    row_epilogue(b2, acc, n, m, acc_g)
                else:
                    ll.store_vector(b2, acc, acc_g, b2.add(b2.mul(n, i64(spec.padded_m)), m))

            def over_rows(b2: ir.IRBuilder, m0: ir.Value, vectors: int) -> None:
                """One pass: the group's rows × the columns from m0."""
                xt_pass = b2.gep(xt, [xt_index(b2, spec, i64(0), m0)])  # (m0: a pass's first column)
                ll.counted_loop(b2, b2.udiv(b2.sub(n1, n0), i64(r)), "br", body=lambda b3, j, _: _block_row(
                    b3, spec, packed, xt_pass, store_row, b3.add(b3.udiv(n0, i64(r)), j), m0, vectors))

            if full:
                ll.counted_loop(b, i64(full), "mc", body=lambda b2, t, _: over_rows(b2, b2.mul(t, i64(chunk)),
                                                                                   spec.vectors))
            if rest:
                over_rows(b, i64(full * chunk), -(-rest // spec.width))
            _finish(b, spec, epilogue, args, acc_g, n0, n1)

        groups = builder.udiv(builder.add(builder.sub(end, begin), i64(group // unit - 1)), i64(group // unit))
        ll.counted_loop(builder, groups, "grp", body=over_group)
    builder.ret_void()
    return fn


def _finish(builder: ir.IRBuilder, spec: SparseSpec, epilogue, args: list, acc_t: ir.Value, n_begin: ir.Value,
            n_end: ir.Value) -> None:
    """accT [N, Mp] (rows n_begin ≤ n < n_end there) back to rows of y: `spec.tile`-sided tiles transposed
    in registers, the edges (m or n short of a tile) a lane at a time."""
    lanes, mp = spec.tile, spec.padded_m
    kind = ll.vector(acc_t.type.pointee, lanes)
    i64 = lambda value: ir.Constant(I64, value)  # noqa: E731

    def tile(b: ir.IRBuilder, n0: ir.Value, m0: ir.Value) -> None:
        rows = [ll.load_vector(b, acc_t, b.add(b.mul(b.add(n0, i64(i)), i64(mp)), m0), lanes) for i in range(lanes)]
        for i, acc in enumerate((_interleave_transpose if spec.narrow else _transpose_tile)(b, rows)):
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


def integer_row_epilogue(spec: SparseSpec, row_product, dtype, n: int):
    """(row_epilogue, epilogue) for `emit_sparse_linear` when int8 results need no residual and whole
    vectors tile accT's rows (`padded_m` a multiple of `lanes`): `row_product` (a requantize.ProductEpilogue
    over accT, channels along its rows, pitch `padded_m`, storing `dtype` when `spec.narrow` (8 bits), else
    int32 with the result's clamp) requantizes each row's accumulators while they are in registers, one
    channel per vector — the orientation in which `fast_requant`'s paired sequence applies — and the
    transposed vectors are then only narrowed to `dtype` where they are not yet, and stored."""
    i64 = lambda value: ir.Constant(I64, value)  # noqa: E731

    def row_epilogue(builder: ir.IRBuilder, acc: ir.Value, channel: ir.Value, m: ir.Value, acc_t: ir.Value) -> None:
        row_product.emit(builder, [[acc]], channel, m, spec.lanes, [builder.bitcast(acc_t, I8.as_pointer()), i64(0)])

    def store(builder: ir.IRBuilder, args: list, acc: ir.Value, m: ir.Value, n0: ir.Value, valid: int) -> None:
        element = ll.element_type(dtype)
        out = builder.gep(builder.bitcast(args[-2], element.as_pointer()), [builder.add(builder.mul(m, i64(n)), n0)])
        narrower = acc.type.element.width > element.width
        value = builder.trunc(acc, ll.vector(element, acc.type.count)) if narrower else acc
        ll.store_partial(builder, value, out, valid)

    return row_epilogue, store


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
