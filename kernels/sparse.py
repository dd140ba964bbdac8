"""Sparse × dense products: y[M, N] = epilogue(x[M, K] · Wᵀ) for a constant sparse W [N, K].

Packing (`pack_sparse`, at compile time): W is cut into r×c blocks; every block row keeps only its
blocks with a nonzero, in column order. Each stored block is its column *step* from the previous block
of its row (one byte, in units of c; a gap wider than 255 steps is bridged by all-zero filler blocks)
followed by its r·c weights (row-major, int8 or float32). A table of int32 block counts per block row
(prefix sums) comes first. So a 90%-sparse int8 matrix costs about two bytes per nonzero.

Kernel (`emit_sparse_linear`): x is first transposed into scratch xT (float32 [K, Mp]; for int8, the
activations minus their zero point as int16 with rows 2j and 2j + 1 interleaved, [K/2, Mp, 2]; Mp = M
rounded up to the vector width), so that each stored weight multiplies contiguous vectors of xT: an FMA
with the weight broadcast, or for int8 one pmaddwd (vpdpwssd with VNNI) with the weight pair broadcast
(aligned pairs when c is even, else the weight in the half its column selects). Per block row and chunk
of M, r × V accumulator vectors stay in registers over the row's blocks and are stored to accT [N, Mp]
(scratch); the epilogue pass reads accT back a column panel at a time as rows of y and applies the dense
qlinear's requantization (`kernels.requantize.ProductEpilogue`, the bias as per-channel offsets) or
gemm_f32's bias/residual/activation (`gemm_f32.finish`). Integer products are exact: |(x − zx)·w| < 2^15
and the caller checks the int32 accumulator bound. M = 1 takes scalar products (xT is then x itself).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llvmlite import ir

from lowbit.kernels import llvm as ll
from lowbit.kernels.gemm_f32 import Epilogue as FloatEpilogue
from lowbit.kernels.gemm_f32 import finish as float_finish
from lowbit.kernels.llvm import F32, I8, I16, I32, I64
from lowbit.kernels.movement import new_kernel

MAX_STEP = 255  # the widest column step one byte encodes
ACCUMULATORS = 8  # accumulator vectors per register tile (r · V)
TRANSPOSE_K = 32  # columns of x per transposed panel
FMA_CHAINS = 4  # independent float accumulator sets per block row (hides the FMA latency)


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
    """y[m, n] for m < M, n < N from a Packed W of `block` shape. `integer`: int8 weights, 8-bit activations
    of dtype `x_signed` minus `zero_point` (int32 accumulators); else float32. `lanes`: vector width (int32
    or float32 elements)."""

    m: int
    k: int
    n: int
    block: tuple[int, int]
    blocks_at: int
    integer: bool
    lanes: int
    zero_point: int = 0
    x_signed: bool = True
    madd: str = ""  # the target's pmaddwd intrinsic for `lanes` int32 lanes ("" for portable IR)

    def slot(self, builder: ir.IRBuilder, k: ir.Value, m: ir.Value) -> ir.Value:
        """The xT element of (k, m): row-major [K, Mp] floats; for integers, pairs of rows 2j, 2j + 1
        interleaved (int16 [K/2, Mp, 2]) so that one pmaddwd lane takes both."""
        if not self.integer:
            return builder.add(builder.mul(k, ir.Constant(I64, self.padded_m)), m)
        row = builder.add(builder.mul(builder.lshr(k, ir.Constant(I64, 1)), ir.Constant(I64, self.padded_m)), m)
        return builder.add(builder.shl(row, ir.Constant(I64, 1)), builder.and_(k, ir.Constant(I64, 1)))

    @property
    def width(self) -> int:
        """Lanes of one accumulator vector along M."""
        return self.lanes if self.m >= self.lanes else self.m

    @property
    def padded_m(self) -> int:
        return -(-self.m // self.width) * self.width

    @property
    def x_element(self) -> ir.Type:
        return I16 if self.integer else F32

    @property
    def xt_bytes(self) -> int:
        """xT's bytes, rounded up to a cache line (accT follows)."""
        elements = (self.k + self.k % 2) * self.padded_m if self.integer else self.k * self.padded_m
        return -(-elements * (2 if self.integer else 4) // 64) * 64

    @property
    def scratch_bytes(self) -> int:
        return self.xt_bytes + 4 * self.n * self.padded_m


def _transpose(builder: ir.IRBuilder, spec: SparseSpec, x: ir.Value, xt: ir.Value) -> None:
    """xT[k, m] = x[m, k] (− zero point, as int16), the padding (m ≥ M, an odd K's last pair) zero."""
    mp = spec.padded_m
    source = builder.bitcast(x, (I8 if spec.integer else F32).as_pointer())

    if mp > spec.m or (spec.integer and spec.k % 2):  # padding: zeros first
        memset = ll.declare(builder.module, "llvm.memset.p0i8.i64", ir.VoidType(), I8.as_pointer(), I8, I64,
                            ir.IntType(1))
        builder.call(memset, [builder.bitcast(xt, I8.as_pointer()), ir.Constant(I8, 0),
                              ir.Constant(I64, spec.xt_bytes), ir.Constant(ir.IntType(1), 0)])

    def convert(b: ir.IRBuilder, value: ir.Value) -> ir.Value:
        if not spec.integer:
            return value
        wide = (b.sext if spec.x_signed else b.zext)(value, I16)
        return b.sub(wide, ir.Constant(I16, spec.zero_point))

    def panel(b: ir.IRBuilder, k0: ir.Value, count: int) -> None:
        # a panel of TRANSPOSE_K columns at a time: the xT rows it writes stay in L1 over all of M
        def row(b2: ir.IRBuilder, m: ir.Value, _) -> None:
            base = b2.add(b2.mul(m, ir.Constant(I64, spec.k)), k0)

            def column(b3: ir.IRBuilder, kk: ir.Value, _) -> None:
                value = convert(b3, b3.load(b3.gep(source, [b3.add(base, kk)])))
                b3.store(value, b3.gep(xt, [spec.slot(b3, b3.add(k0, kk), m)]))

            ll.counted_loop(b2, ir.Constant(I64, count), "tk", body=column)

        ll.counted_loop(b, ir.Constant(I64, spec.m), "tm", body=row)

    full, rest = divmod(spec.k, TRANSPOSE_K)
    if full:
        ll.counted_loop(builder, ir.Constant(I64, full), "tp", body=lambda b, p, _: panel(
            b, b.mul(p, ir.Constant(I64, TRANSPOSE_K)), TRANSPOSE_K))
    if rest:
        panel(builder, ir.Constant(I64, full * TRANSPOSE_K), rest)


def _madd(builder: ir.IRBuilder, spec: SparseSpec, xv: ir.Value, pair: ir.Value) -> ir.Value:
    """pmaddwd: lane i of the result is xv[2i]·w[2i] + xv[2i+1]·w[2i+1] (int16 pairs, int32 lanes), w the
    int32 `pair` in every lane. Exact: |products| < 2^15."""
    width = xv.type.count // 2
    w = builder.bitcast(ll.splat(builder, pair, width), xv.type)
    if spec.madd and width == spec.lanes:
        result = ll.vector(I32, width)
        return builder.call(ll.declare(builder.module, spec.madd, result, xv.type, xv.type), [xv, w])
    products = builder.mul(builder.sext(xv, ll.vector(I32, 2 * width)), builder.sext(w, ll.vector(I32, 2 * width)))
    undefined = ir.Constant(products.type, ir.Undefined)
    even = builder.shuffle_vector(products, undefined, ll.const_vector(I32, range(0, 2 * width, 2)))
    odd = builder.shuffle_vector(products, undefined, ll.const_vector(I32, range(1, 2 * width, 2)))
    return builder.add(even, odd)


def _integer_step(b: ir.IRBuilder, spec: SparseSpec, xt: ir.Value, values: ir.Value, column: ir.Value,
                  m0: ir.Value, vectors: int, accs: list) -> list:
    """One stored block's products: pairs of weights on pairs of xT rows (aligned pairs when c is even,
    else each weight in the half of its pair that its column selects)."""
    r, c = spec.block
    width, mp = spec.width, spec.padded_m
    if mp == 1:  # one row of x: xT is x itself (slot(k, 0) = k), plain scalar products
        for jj in range(c):
            xk = b.sext(b.load(b.gep(xt, [b.add(column, ir.Constant(I64, jj))])), I32)
            for i in range(r):
                w = b.sext(b.load(b.gep(values, [ir.Constant(I64, i * c + jj)]), align=1), I32)
                product = ir.Constant(ll.vector(I32, 1), None)
                product = b.insert_element(product, b.mul(w, xk), ir.Constant(I32, 0))
                accs[i] = b.add(accs[i], product)
        return accs
    weights = [b.and_(b.sext(b.load(b.gep(values, [ir.Constant(I64, i)]), align=1), I32), ir.Constant(I32, 0xFFFF))
               for i in range(r * c)]
    pairs = []  # (k of the pair's row, [pair value per block row])
    if c % 2 == 0:
        for jj in range(0, c, 2):
            pairs.append((b.add(column, ir.Constant(I64, jj)), [
                b.or_(weights[i * c + jj], b.shl(weights[i * c + jj + 1], ir.Constant(I32, 16))) for i in range(r)]))
    else:
        for jj in range(c):
            k = b.add(column, ir.Constant(I64, jj))
            shift = b.trunc(b.shl(b.and_(k, ir.Constant(I64, 1)), ir.Constant(I64, 4)), I32)
            pairs.append((k, [b.shl(weights[i * c + jj], shift) for i in range(r)]))
    kind = ll.vector(I16, 2 * width)
    for k, row_pairs in pairs:
        base = spec.slot(b, b.and_(k, ir.Constant(I64, ~1)), m0)
        for v in range(vectors):
            at = b.add(base, ir.Constant(I64, 2 * v * width))
            xv = b.load(b.bitcast(b.gep(xt, [at]), kind.as_pointer()), align=2)
            for i in range(r):
                accs[i * vectors + v] = b.add(accs[i * vectors + v], _madd(b, spec, xv, row_pairs[i]))
    return accs


def _block_row(builder: ir.IRBuilder, spec: SparseSpec, packed: ir.Value, xt: ir.Value, acc_t: ir.Value,
               row_block: ir.Value, m0: ir.Value, vectors: int) -> None:
    """accT[rows of block row `row_block`, m0 : m0 + V·width] = the row's blocks × xT (V = `vectors`)."""
    r, c = spec.block
    width, mp = spec.width, spec.padded_m
    acc_element = I32 if spec.integer else F32
    kind = ll.vector(acc_element, width)
    value_element = I8 if spec.integer else F32
    record = 1 + r * c * (1 if spec.integer else 4)
    counts = builder.bitcast(packed, I32.as_pointer())
    first = builder.sext(builder.load(builder.gep(counts, [row_block])), I64)
    last = builder.sext(builder.load(builder.gep(counts, [builder.add(row_block, ir.Constant(I64, 1))])), I64)
    blocks = builder.gep(packed, [ir.Constant(I64, spec.blocks_at)])
    zero = ir.Constant(kind, None)

    count = r * vectors
    # float FMAs of few accumulators wait on each other: rotate several sets so that each set is updated
    # every `chains` blocks (their sum at the end; integer adds are quick enough)
    chains = 1 if spec.integer else max(1, FMA_CHAINS // count)

    def step(b: ir.IRBuilder, j: ir.Value, carried: list) -> list:
        column, accs, waiting = carried[0], carried[1:1 + count], carried[1 + count:]
        at = b.gep(blocks, [b.mul(b.add(first, j), ir.Constant(I64, record))])
        column = b.add(column, b.mul(b.zext(b.load(at), I64), ir.Constant(I64, c)))
        values = b.bitcast(b.gep(at, [ir.Constant(I64, 1)]), value_element.as_pointer())
        if spec.integer:
            return [column, *_integer_step(b, spec, xt, values, column, m0, vectors, list(accs)), *waiting]
        accs = list(accs)
        weights = [ll.splat(b, b.load(b.gep(values, [ir.Constant(I64, i)]), align=1), width) for i in range(r * c)]
        for jj in range(c):
            row_at = b.add(b.mul(b.add(column, ir.Constant(I64, jj)), ir.Constant(I64, mp)), m0)
            for v in range(vectors):
                xv = ll.load_vector(b, xt, b.add(row_at, ir.Constant(I64, v * width)), width)
                for i in range(r):
                    accs[i * vectors + v] = ll.intrinsic(b, "llvm.fma", weights[i * c + jj], xv,
                                                         accs[i * vectors + v])
        return [column, *waiting, *accs]

    carried = ll.counted_loop(builder, builder.sub(last, first), "nz",
                              [ir.Constant(I64, 0), *[zero] * (count * chains)], step)
    accs = carried[1:1 + count]
    for chain in range(1, chains):
        accs = [builder.fadd(a, w) for a, w in zip(accs, carried[1 + chain * count:1 + (chain + 1) * count])]
    n0 = builder.mul(row_block, ir.Constant(I64, r))
    for i in range(r):
        row_at = builder.add(builder.mul(builder.add(n0, ir.Constant(I64, i)), ir.Constant(I64, mp)), m0)
        for v in range(vectors):
            ll.store_vector(builder, accs[i * vectors + v], acc_t, builder.add(row_at, ir.Constant(I64, v * width)))


def emit_sparse_linear(module: ir.Module, name: str, spec: SparseSpec, epilogue, buffers: int) -> ir.Function:
    """`name(x, packed, *middle, out, scratch)` with `buffers` pointers in all. `epilogue(builder, args, acc,
    m, n0, valid)` finishes and stores y[m, n0 : n0 + valid] from the `lanes`-wide vector acc (args: the
    kernel's arguments)."""
    fn, builder = new_kernel(module, name, buffers)
    args = list(fn.args)
    x, packed, scratch = args[0], args[1], args[-1]
    xt = builder.bitcast(scratch, spec.x_element.as_pointer())
    acc_element = I32 if spec.integer else F32
    acc_t = builder.bitcast(builder.gep(scratch, [ir.Constant(I64, spec.xt_bytes)]), acc_element.as_pointer())
    _transpose(builder, spec, x, xt)
    r = spec.block[0]
    vectors = max(1, min(spec.padded_m // spec.width, ACCUMULATORS // r))
    chunk = vectors * spec.width
    full, rest = divmod(spec.m, chunk)

    def over_rows(b: ir.IRBuilder, row_block: ir.Value, _) -> None:
        if full:
            ll.counted_loop(b, ir.Constant(I64, full), "mc", body=lambda b2, t, _: _block_row(
                b2, spec, packed, xt, acc_t, row_block, b2.mul(t, ir.Constant(I64, chunk)), vectors))
        if rest:
            _block_row(b, spec, packed, xt, acc_t, row_block, ir.Constant(I64, full * chunk), -(-rest // spec.width))

    ll.counted_loop(builder, ir.Constant(I64, spec.n // r), "br", body=over_rows)
    lanes, mp = spec.lanes, spec.padded_m
    full_n, edge = divmod(spec.n, lanes)

    def columns(b: ir.IRBuilder, n0: ir.Value, valid: int) -> None:
        # accT [N, Mp] back to rows of y: `lanes` rows of accT at a time (they stay in L1 over all of M)
        def row(b2: ir.IRBuilder, m: ir.Value, _) -> None:
            if mp == 1:
                acc = ll.load_partial(b2, b2.gep(acc_t, [n0]), valid, lanes)
            else:
                acc = ir.Constant(ll.vector(acc_element, lanes), None)
                for lane in range(valid):
                    at = b2.add(b2.mul(b2.add(n0, ir.Constant(I64, lane)), ir.Constant(I64, mp)), m)
                    acc = b2.insert_element(acc, b2.load(b2.gep(acc_t, [at])), ir.Constant(I32, lane))
            epilogue(b2, args, acc, m, n0, valid)

        ll.counted_loop(b, ir.Constant(I64, spec.m), "em", body=row)

    if full_n:
        ll.counted_loop(builder, ir.Constant(I64, full_n), "en", body=lambda b, j, _: columns(
            b, b.mul(j, ir.Constant(I64, lanes)), lanes))
    if edge:
        columns(builder, ir.Constant(I64, full_n * lanes), edge)
    builder.ret_void()
    return fn


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
