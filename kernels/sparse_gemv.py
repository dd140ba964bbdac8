"""Sparse matrix × vector, for one row of activations (M = 1): y[n] = epilogue(Σ_k W[n, k] · x[k]) for a
constant sparse W [N, K].

`kernels.sparse` puts the batch along its vectors, so at M = 1 it leaves most of their lanes empty; this
kernel puts each row's nonzeros along them instead.

Packing (`pack_windows`, at compile time): each row's nonzeros are covered greedily by windows of `group`
consecutive columns (a window starts at the first nonzero not yet covered), one window a lane: the byte
offset of its first activation, and its weights as one 32-bit word (4 int8 weights, 2 int16 or one
float32; past K, zero). A row's windows are padded with empty lanes (offset 0, weight 0) to whole vectors
of `lanes`. Layout: the int32 prefix counts of vectors per row (N + 1 of them), then each vector as `lanes`
int32 offsets followed by `lanes` int32 words.

Kernel (`emit_sparse_gemv`): integer activations are first prepared in scratch as the spec's route wants
them (`kernels.sparse`: bytes shifted by `SparseSpec.shift`, or int16 for the pairs route), followed by
padding, since a lane reads 4 bytes from its offset; float32 ones are read where they are. For each row,
every vector gathers the 32-bit words of activations at its lanes' offsets and multiplies them with its
weights (the route's dot product, `kernels.sparse.dot`, or an FMA) into the row's accumulator vector; the
accumulators of `lanes` consecutive rows are summed across their lanes together (`_sums`) into one
vector of totals for the epilogue, which `kernels.sparse`
shares (its m = 0). Threads take shares of those groups of rows; each prepares its own activations.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llvmlite import ir

from lowbit.kernels import llvm as ll
from lowbit.kernels.llvm import F32, I1, I8, I32, I64
from lowbit.kernels.parallel import new_parallel_kernel, share, thread_scratch
from lowbit.kernels.sparse import SparseSpec, activations, dot

PADDING = 4  # bytes after the prepared activations: the last window's 4-byte read stays inside


@dataclass(frozen=True)
class Windows:
    """A packed matrix (`data`, bytes) and its number of vectors of windows."""

    data: np.ndarray
    vectors: int


ROWS_AT_ONCE = 256  # rows whose next-nonzero table is built at a time (a table of int32 per weight)


def windows(matrix: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, first columns) of the windows covering `matrix`'s [N, K] nonzeros, sorted by row, then
    column. All rows step together: from each window's start, the next starts at the first nonzero at
    least `group` columns on (a table of the next nonzero at or after each column)."""
    n, k = matrix.shape
    found_rows, found_starts = [], []
    for r0 in range(0, n, ROWS_AT_ONCE):
        block = matrix[r0:r0 + ROWS_AT_ONCE] != 0
        columns = np.where(block, np.arange(k, dtype=np.int32), np.int32(k))
        following = np.minimum.accumulate(columns[:, ::-1], axis=1)[:, ::-1]
        following = np.concatenate([following, np.full((len(block), 1), k, np.int32)], axis=1)  # [rows, K + 1]
        rows = np.arange(len(block))
        current = following[:, 0]
        while True:
            active = current < k
            if not active.any():
                break
            found_rows.append(rows[active] + r0)
            found_starts.append(current[active])
            current = np.where(active, following[rows, np.minimum(current + group, k)], k)
    if not found_rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows, starts = np.concatenate(found_rows).astype(np.int64), np.concatenate(found_starts).astype(np.int64)
    order = np.lexsort((starts, rows))
    return rows[order], starts[order]


def pack_windows(matrix: np.ndarray, spec: SparseSpec) -> Windows:
    """`matrix` [N, K] (int8 values for integer routes, float32 ones) packed for `emit_sparse_gemv`."""
    n, k = matrix.shape
    group, lanes = spec.group, spec.lanes
    element = {1: np.float32, 2: np.int16, 4: np.int8}[group]
    padded = np.zeros((n, k + group), element)
    padded[:, :k] = matrix
    rows, starts = windows(matrix, group)
    per_row = np.bincount(rows, minlength=n)
    counts = -(-per_row // lanes)  # vectors per row
    first_lane = (np.concatenate([[0], np.cumsum(counts)[:-1]]) * lanes)[rows]
    rank = np.arange(len(rows)) - np.concatenate([[0], np.cumsum(per_row)[:-1]])[rows]
    lane = first_lane + rank
    offsets = np.zeros(int(counts.sum()) * lanes, np.int32)
    words = np.zeros(int(counts.sum()) * lanes, np.uint32)
    offsets[lane] = starts * padded.itemsize  # bytes (activations are as wide as the weights)
    words[lane] = np.ascontiguousarray(padded[rows[:, None], starts[:, None] + np.arange(group)]).view(np.uint32)[:, 0]
    body = np.stack([offsets.reshape(-1, lanes).view(np.uint32), words.reshape(-1, lanes)], axis=1)
    head = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    data = np.concatenate([head.view(np.uint8), body.reshape(-1).view(np.uint8)])
    return Windows(data, int(counts.sum()))


def prepared_bytes(spec: SparseSpec) -> int:
    """Scratch bytes per thread: the prepared activations (none for floats)."""
    return 0 if spec.route == "float" else spec.k * (2 if spec.route == "pairs" else 1) + PADDING


def _prepare(builder: ir.IRBuilder, spec: SparseSpec, x: ir.Value, prepared: ir.Value) -> None:
    """prepared = x as the route wants it: bytes (shifted) or int16, then zero padding."""
    element = ir.IntType(16) if spec.route == "pairs" else I8
    out = builder.bitcast(prepared, element.as_pointer())

    def step(b: ir.IRBuilder, index: ir.Value, width: int) -> None:
        ll.store_vector(b, activations(b, spec, ll.load_vector(b, x, index, width)), out, index)

    ll.strip_mine(builder, ir.Constant(I64, 0), spec.k, 4 * spec.lanes, "prep", step)
    for byte in range(PADDING):
        builder.store(ir.Constant(I8, 0), builder.gep(prepared, [ir.Constant(I64, prepared_bytes(spec) - 1 - byte)]))


def _sums(builder: ir.IRBuilder, vectors: list[ir.Value], add) -> ir.Value:
    """The vector whose lane i is the sum of the lanes of vectors[i] (as many vectors as lanes): pairs of
    neighbours combined level by level, each level halving the lanes that hold a vector's partial sums
    (2(L − 1) two-source shuffles and L − 1 additions for L vectors, instead of a reduction each)."""
    lanes = vectors[0].type.count
    block = lanes  # lanes per vector's partial sums
    while len(vectors) > 1:
        half = block // 2
        starts = [t * block for t in range(lanes // block)]
        low = [base + at + j for base in (0, lanes) for at in starts for j in range(half)]
        high = [index + half for index in low]
        vectors = [add(builder.shuffle_vector(a, b, ll.const_vector(I32, low)),
                       builder.shuffle_vector(a, b, ll.const_vector(I32, high)))
                   for a, b in zip(vectors[::2], vectors[1::2])]
        block = half
    return vectors[0]


def _gatherer(builder: ir.IRBuilder, spec: SparseSpec, base: ir.Value):
    """`gather(b, offsets)`: the 32-bit words at base + offsets (bytes, an int32 vector). On x86 the gather
    instruction itself (LLVM's generic gather becomes single loads where it rates gathers slow), elsewhere
    the generic one."""
    lanes, module = spec.lanes, builder.module
    words = ll.vector(I32, lanes)
    if spec.x86 and lanes == 8:  # (the lowering uses at most 8 lanes: `sparse_selection.GEMV_LANES`)
        function = ll.declare(module, "llvm.x86.avx2.gather.d.d.256", words, words, I8.as_pointer(), words, words, I8)
        everything = ir.Constant(words, [-1] * lanes)
        return lambda b, offsets: b.call(function, [ir.Constant(words, None), base, offsets, everything,
                                                    ir.Constant(I8, 1)])
    pointers = ir.VectorType(I32.as_pointer(), lanes)
    function = ll.declare(module, f"llvm.masked.gather.v{lanes}i32.v{lanes}p0", words, pointers, I32,
                          ll.vector(I1, lanes), words)
    start = ll.splat(builder, builder.ptrtoint(base, I64), lanes)
    everything = ir.Constant(ll.vector(I1, lanes), [1] * lanes)
    return lambda b, offsets: b.call(function, [
        b.inttoptr(b.add(start, b.sext(offsets, ll.vector(I64, lanes))), pointers), ir.Constant(I32, 1), everything,
        ir.Constant(words, ir.Undefined)])


def emit_sparse_gemv(module: ir.Module, name: str, spec: SparseSpec, epilogue, buffers: int) -> ir.Function:
    """`name(x, packed, *middle, out, scratch, thread, threads)` with `buffers` pointers in all (the
    `kernels.parallel` convention; scratch holds `prepared_bytes(spec)` per thread, at least 1) for a spec
    with m = 1 and windows from `pack_windows`. `epilogue(builder, args, acc, m, n0, valid)` as in
    `kernels.sparse.emit_sparse_linear`."""
    fn, builder, thread, threads = new_parallel_kernel(module, name, buffers)
    args = list(fn.args)[:buffers]
    x, packed = args[0], args[1]
    lanes, n = spec.lanes, spec.n
    i64 = lambda value: ir.Constant(I64, value)  # noqa: E731
    element = F32 if spec.route == "float" else I32
    kind = ll.vector(element, lanes)
    groups, edge = -(-n // lanes), n % lanes
    begin, end = share(builder, thread, threads, groups)
    with builder.if_then(builder.icmp_signed("<", begin, end)):
        if spec.route == "float":
            source = x
        else:
            source = thread_scratch(builder, args[buffers - 1], thread, prepared_bytes(spec))
            _prepare(builder, spec, builder.bitcast(x, I8.as_pointer()), source)
        gather = _gatherer(builder, spec, builder.bitcast(source, I8.as_pointer()))
        counts = builder.bitcast(packed, I32.as_pointer())
        vectors = builder.bitcast(builder.gep(packed, [i64(4 * (n + 1))]), I32.as_pointer())

        def row_accumulator(b: ir.IRBuilder, row: ir.Value) -> ir.Value:
            first = b.sext(b.load(b.gep(counts, [row])), I64)
            last = b.sext(b.load(b.gep(counts, [b.add(row, i64(1))])), I64)

            def vector(b2: ir.IRBuilder, j: ir.Value, carried: list) -> list:
                at = b2.mul(b2.add(first, j), i64(2 * lanes))
                offsets = ll.load_vector(b2, vectors, at, lanes)
                words = ll.load_vector(b2, vectors, b2.add(at, i64(lanes)), lanes)
                found = gather(b2, offsets)
                if spec.route == "float":
                    return [ll.intrinsic(b2, "llvm.fma", b2.bitcast(found, kind), b2.bitcast(words, kind), carried[0])]
                return [dot(b2, spec, carried[0], found, words)]

            return ll.counted_loop(b, b.sub(last, first), "win", [ir.Constant(kind, None)], vector)[0]

        def rows(b: ir.IRBuilder, group: ir.Value, valid: int) -> None:
            n0 = b.mul(group, i64(lanes))
            accs = [row_accumulator(b, b.add(n0, i64(i))) for i in range(valid)]
            accs += [ir.Constant(kind, None)] * (lanes - valid)
            epilogue(b, args, _sums(b, accs, b.fadd if spec.route == "float" else b.add), i64(0), n0, valid)

        full = builder.select(builder.icmp_signed("<", end, i64(n // lanes)), end, i64(n // lanes))
        whole = builder.select(builder.icmp_signed("<", begin, full), builder.sub(full, begin), i64(0))
        ll.counted_loop(builder, whole, "grp", body=lambda b, g, _: rows(b, b.add(begin, g), lanes))
        if edge:
            with builder.if_then(builder.icmp_signed("==", end, i64(groups))):
                rows(builder, i64(groups - 1), edge)
    builder.ret_void()
    return fn
