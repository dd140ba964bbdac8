"""Sparse or dense? The cost model that picks a kernel for linear / qlinear weights with a sparse layout,
and the sparse lowerings themselves (`kernels.sparse`).

Estimated nanoseconds per call, with vec = ⌈M / lanes⌉ accumulator vectors along M:

    sparse = per_value · vector operations · vec + per_block · stored blocks
             + per_output · M·N + per_input · M·K
    dense  = per_mac · N·K·(M + dense_rows)

(vector operations: FMAs per stored float; for int8, dot products per quad of K, or per pair of K where
the target has no 4-byte dot product (kind int8-pairs: AVX2 `vpmaddwd`, plain NEON; its parity pairing,
PAIRED, counts a crossed record as CROSSED_PRODUCTS); a block's fixed cost is its step and its weights'
loads). `dense_rows` is what weight streaming costs the dense kernel in rows of
arithmetic (it dominates at M = 1). Constants per kind (int8, int8-pairs, f32) are built in, or
measured on this machine by `lowbit tune` / `python -m lowbit.backends.native.sparse_selection --tune`
(written to `tuning_path()`, JSON). A weight
without a layout always stays dense; so does one the sparse kernels cannot take exactly.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import NamedTuple
from pathlib import Path

import numpy as np

from lowbit.backends.native.lowering import LowerContext
from lowbit.ir import DType, Graph, Node, TensorType, constant_value
from lowbit.kernels.gemm_f32 import Epilogue
from lowbit.kernels.sparse import (MAX_PAIR_ROWS, SparseSpec, emit_sparse_linear, fit_block, float_epilogue,
                                   integer_epilogue, integer_row_epilogue, pack_paired, pack_sparse, paired_counts)
from lowbit.kernels.sparse_gemv import Windows, emit_sparse_gemv, pack_windows, prepared_bytes

KINDS = ("int8", "int8-pairs", "f32")
PAIRED = "paired"  # the packing (in place of a block shape) of `kernels.sparse.pack_paired`
CROSSED_PRODUCTS = 1.5  # a crossed record's vector operations in dot products: a blend, a product, a sum


@dataclass(frozen=True)
class Costs:
    per_value: float
    per_block: float
    per_output: float
    per_input: float
    per_mac: float
    dense_rows: float
    per_window_vector: float  # the M = 1 kernel (`kernels.sparse_gemv`): a vector of windows gathered
    per_row: float  # ... and a row of it (its total, the epilogue)


DEFAULTS = {  # measured on an Emerald Rapids core (AVX-512 VNNI, dense int8 on AMX) with 512×512 weights,
    # M = 1 and 64 (int8); float32 on a Sapphire Rapids core
    "int8": Costs(per_value=0.21, per_block=0.42, per_output=0.15, per_input=0.15, per_mac=0.00116,
                  dense_rows=5.6, per_window_vector=2.2, per_row=2.5),
    # int8-pairs: the x86_64-avx2 target's kernels (sparse `vpmaddwd`, dense AVX2) on the same core
    "int8-pairs": Costs(per_value=0.15, per_block=1.7, per_output=0.5, per_input=0.5, per_mac=0.0195,
                        dense_rows=0.45, per_window_vector=1.9, per_row=2.2),
    "f32": Costs(per_value=0.6, per_block=0.05, per_output=0.3, per_input=0.3, per_mac=0.0123, dense_rows=2.3,
                 per_window_vector=2.3, per_row=0.9),
}


def tuning_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lowbit" / "sparse_tuning.json"


@lru_cache(maxsize=None)
def costs(kind: str) -> Costs:
    """The measured constants when `--tune` has written them, else the built-in ones."""
    try:
        measured = json.loads(tuning_path().read_text())[kind]
        return Costs(**measured)
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULTS[kind]


def tuning_fingerprint() -> bytes:
    """What the compile cache must key on besides the source: the measured constants, if any."""
    try:
        return tuning_path().read_bytes()
    except OSError:
        return b"defaults"


def structure(kind: str, matrix: np.ndarray, block: tuple[int, int] | str) -> tuple[float, int]:
    """(vector operations per accumulator vector, stored blocks) of `matrix` [N, K] packed with `block`
    (fillers ignored): an FMA per stored float; for int8 a dot product per group of K (a quad, or a pair
    for int8-pairs) that a block row touches (a block narrower than a group lies in one). PAIRED
    (int8-pairs): its records, a crossed one counting CROSSED_PRODUCTS."""
    if block == PAIRED:
        crossed, aligned = paired_counts(_padded(matrix, (1, 2)))
        return CROSSED_PRODUCTS * crossed + aligned, crossed + aligned
    if kind != "f32":
        matrix = _padded(matrix, block)
    n, k = matrix.shape
    r, c = fit_block(matrix.shape, block)
    blocks = int(np.any(matrix.reshape(n // r, r, k // c, c) != 0, axis=(1, 3)).sum())
    if kind == "f32":
        return blocks * r * c, blocks
    group = 2 if kind == "int8-pairs" else 4
    groups = c // group if c % group == 0 else 1 if group % c == 0 else c
    return blocks * r * groups, blocks


def estimates(kind: str, matrix: np.ndarray, m: int, block: tuple[int, int] | str, lanes: int
              ) -> tuple[float, float]:
    """(sparse, dense) estimated nanoseconds for x [m, K] · matrixᵀ."""
    c = costs(kind)
    n, k = matrix.shape
    values, blocks = structure(kind, matrix, block)
    vec = math.ceil(m / lanes)
    sparse = c.per_value * values * vec + c.per_block * blocks + c.per_output * m * n + c.per_input * m * k
    return sparse, c.per_mac * n * k * (m + c.dense_rows)


def prefer_sparse(kind: str, matrix: np.ndarray, m: int, block: tuple[int, int] | str, lanes: int) -> bool:
    sparse, dense = estimates(kind, matrix, m, block, lanes)
    return sparse < dense


def prefer_gemv(kind: str, vectors: int, n: int, k: int) -> bool:
    """Whether the M = 1 kernel with `vectors` vectors of windows beats the dense kernel for [N, K]."""
    c = costs(kind)
    return c.per_window_vector * vectors + c.per_row * n < c.per_mac * n * k * (1 + c.dense_rows)


GEMV_LANES = 8  # the M = 1 kernel's widest vectors: 16-lane gathers were about 10% slower (Emerald Rapids)


def gemv_windows(ctx: LowerContext, kind: str, spec: SparseSpec, matrix: np.ndarray, layout
                 ) -> tuple[SparseSpec, Windows] | None:
    """The M = 1 kernel's spec and packed windows when it is the one to use: one row of activations, a
    sparse layout, optimising for speed (its packing is not the smallest) and the cost model's choice."""
    if spec.m != 1 or layout is None or ctx.optimize == "size":
        return None
    spec = one_row(spec)
    fewest = -(-int(np.count_nonzero(matrix)) // (spec.group * spec.lanes))  # (windows all full: a bound)
    if not prefer_gemv(kind, fewest, spec.n, spec.k):
        return None  # (before the packing, which takes a while for large matrices)
    windows = pack_windows(matrix, spec)
    return (spec, windows) if prefer_gemv(kind, windows.vectors, spec.n, spec.k) else None


def one_row(spec: SparseSpec) -> SparseSpec:
    """`spec` as the M = 1 kernel takes it (at most GEMV_LANES lanes)."""
    return dataclasses.replace(spec, lanes=min(spec.lanes, GEMV_LANES))


def candidate_blocks(kind: str, layout) -> list[tuple[int, int]]:
    """Packing blocks to choose from: the bsr layout's block, single weights (CSR, also for csr and N:M)
    or, for int8, 1×4 blocks (the kernel's quads, storing the zeros beside a weight) and for int8-pairs
    also 1×2 (its pairs)."""
    candidates = [tuple(layout.block)] if layout.format == "bsr" else []
    return candidates + [(1, 1)] + {"int8": [(1, 4)], "int8-pairs": [(1, 2), (1, 4)]}.get(kind, [])


def best_block(kind: str, matrix: np.ndarray, m: int, layout, lanes: int) -> tuple[int, int] | str:
    """The packing the model finds fastest: a block, or for int8-pairs also PAIRED (when K allows)."""
    candidates = candidate_blocks(kind, layout)
    if kind == "int8-pairs" and -(-matrix.shape[1] // 2) <= MAX_PAIR_ROWS:
        candidates.append(PAIRED)
    return min(candidates, key=lambda block: estimates(kind, matrix, m, block, lanes)[0])


def choose_packing(ctx: LowerContext, kind: str, matrix: np.ndarray, m: int, layout
                   ) -> tuple[int, int] | str | None:
    """The block (or PAIRED) to pack `matrix` [N, K] with for x [m, K] · matrixᵀ, or None for the dense
    kernel: the fastest by the cost model, or with `ctx.optimize == "size"` the block with the fewest
    bytes, when it is smaller than the dense weights (int8: 1 byte a weight, f32: 4)."""
    if ctx.optimize == "size":
        dtype = np.float32 if kind == "f32" else np.int8  # (the pairs route widens int8 weights at run time)
        sizes = {block: pack_sparse(matrix if kind == "f32" else _padded(matrix, block), block, dtype).data.nbytes
                 for block in candidate_blocks(kind, layout)}
        block = min(sizes, key=sizes.get)
        return block if sizes[block] < matrix.size * np.dtype(dtype).itemsize else None
    lanes = _lanes(ctx.target)
    block = best_block(kind, matrix, m, layout, lanes)
    return block if prefer_sparse(kind, matrix, m, block, lanes) else None


def _lanes(target) -> int:
    return max(target.vector_bytes // 4, 4)


def integer_spec(target, m: int, k: int, n: int, x_signed: bool) -> SparseSpec:
    """The int8 kernel's spec for `target`, before a packing is chosen: the instructions it may use."""
    features, x86 = target.features, target.arch == "x86_64"
    vnni = (16,) if x86 and "avx512vnni" in features else ()
    if x86 and ("avxvnni" in features or {"avx512vnni", "avx512vl"} <= features):
        vnni += (4, 8)
    madd = ((4, 8) if "avx2" in features else (4,)) + ((16,) if "avx512bw" in features else ()) if x86 else ()
    sdot = target.arch == "aarch64" and "dotprod" in features
    return SparseSpec(m, k, n, (1, 1), 0, True, _lanes(target), x_signed, vnni, madd, sdot,
                      x86=x86 and "avx2" in features)


def float_spec(target, m: int, k: int, n: int) -> SparseSpec:
    """The float32 kernel's spec for `target`, before a packing is chosen."""
    return SparseSpec(m, k, n, (1, 1), 0, False, _lanes(target),
                      x86=target.arch == "x86_64" and "avx2" in target.features)


def _padded(matrix: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """`matrix` with zero columns up to a multiple of the block's width (the int8 kernel's quads of K take
    any K: its activations are zero there)."""
    extra = -matrix.shape[1] % block[1]
    return np.pad(matrix, ((0, 0), (0, extra))) if extra and matrix.shape[0] % block[0] == 0 else matrix


class Packing(NamedTuple):
    spec: SparseSpec
    data: np.ndarray  # the packed weights
    one_row: bool  # for the M = 1 kernel (`kernels.sparse_gemv`), else `kernels.sparse`
    scratch_bytes: int  # per thread


def _packed(ctx: LowerContext, kind: str, spec: SparseSpec, matrix: np.ndarray, layout) -> Packing | None:
    """The packing for the sparse kernel the cost model (or the size goal) picks, or None for the dense
    kernel. int8 matrices are padded to whole blocks."""
    gemv = gemv_windows(ctx, kind, spec, matrix, layout)
    if gemv is not None:
        return Packing(gemv[0], gemv[1].data, True, max(prepared_bytes(gemv[0]), 1))
    block = choose_packing(ctx, kind, matrix, spec.m, layout)
    if block is None:
        return None
    spec = dataclasses.replace(spec, compact=ctx.optimize == "size")
    if block == PAIRED:
        packed = pack_paired(_padded(matrix, (1, 2)))
    else:
        packed = pack_sparse(_padded(matrix, block) if spec.integer else matrix, block, spec.weight)
    spec = dataclasses.replace(spec, block=packed.block, blocks_at=packed.blocks_at, aligned_at=packed.aligned_at)
    return Packing(spec, packed.data, False, spec.scratch_bytes)


def _has(node: Node, index: int) -> bool:
    return len(node.inputs) > index and node.inputs[index] is not None


# -- lowerings --------------------------------------------------------------------------------------------
def lower_sparse_qlinear(ctx: LowerContext, node: Node, centred: np.ndarray, bias: np.ndarray, requant,
                         residual, bound: int) -> bool:
    """qlinear through the sparse kernel when its weight has a layout, the kernel is exact for it (8-bit
    activations, centred weights in int8; the caller checked `bound`, the int32 bound of the centred product
    and bias) and the cost model prefers it. True when lowered.

    The kernel may shift the activations (`SparseSpec.shift`), so its offsets are the bias minus the
    shifted zero point times each row's weight sum: modulo 2^32, which the int32 lanes wrap in, the same
    sums as the centred product."""
    from lowbit.kernels.fast_requant import PairedEpilogue
    from lowbit.kernels.requantize import Corrections, ProductEpilogue

    x, layout = node.inputs[0].type, node.inputs[1].type.layout
    if layout is None or x.dtype not in (DType.u8, DType.i8) or not centred.size \
            or centred.min() < -128 or centred.max() > 127:
        return False
    n, k = centred.shape
    spec = integer_spec(ctx.target, math.prod(x.shape[:-1]), k, n, x.dtype.is_signed)
    chosen = _packed(ctx, "int8-pairs" if spec.route == "pairs" else "int8", spec, centred, layout)
    if chosen is None:
        return False
    spec, data, one_row_kernel, scratch = chosen
    lanes = spec.lanes
    # (optimising for size: one epilogue in place of the one in the rows' loop and the narrowing one)
    in_registers = not one_row_kernel and residual is None and spec.padded_m % lanes == 0 and ctx.optimize != "size"
    if in_registers and requant.dtype.bits == 8:
        spec = dataclasses.replace(spec, narrow=True)
        scratch = spec.scratch_bytes
    shift = x.quant.zero_point[0] + spec.shift
    offsets = tuple(np.asarray(bias - shift * centred.astype(np.int64).sum(axis=1), np.int64)
                    .astype(np.int32).tolist())
    extra = [ctx.operand(3)] if residual else []

    def build(module, name):
        if one_row_kernel:
            product = ProductEpilogue(module, name, lanes, n, "col", requant, Corrections(offsets), residual)
            return emit_sparse_gemv(module, name, spec, integer_epilogue(product), 4 + len(extra))
        if in_registers:
            stored = requant if spec.narrow else dataclasses.replace(requant, dtype=DType.i32)
            row_product = PairedEpilogue(module, f"{name}.rows", lanes, spec.padded_m, "row", stored,
                                         Corrections(offsets), None, bound)
            row_epilogue, store = integer_row_epilogue(spec, row_product, requant.dtype, n)
            return emit_sparse_linear(module, name, spec, store, 4, row_epilogue)
        product = ProductEpilogue(module, name, lanes, n, "col", requant, Corrections(offsets), residual)
        return emit_sparse_linear(module, name, spec, integer_epilogue(product), 4 + len(extra))

    key = ("qlinear.sparse", one_row_kernel, spec, offsets, requant, residual, bound, data.tobytes())
    ctx.call(ctx.kernel(key, build), [ctx.operand(0), ctx.constant(data, "qlinear sparse weights"), *extra,
                                      ctx.result(0), ctx.scratch(scratch, per_thread=True)], parallel=True)
    return True


def lower_sparse_linear(ctx: LowerContext, node: Node, epilogue: Epilogue) -> bool:
    """float32 linear through the sparse kernel when its constant weight has a layout and the cost model
    prefers it. True when lowered."""
    w = node.inputs[1]
    weights = constant_value(w)
    if w.type.layout is None or weights is None:
        return False
    x = node.inputs[0].type
    if _has(node, 3) and node.inputs[3].type.shape != node.outputs[0].type.shape:
        return False  # a broadcast residual: the dense kernel handles it
    matrix = np.asarray(weights, np.float32)
    n, k = matrix.shape
    chosen = _packed(ctx, "f32", float_spec(ctx.target, math.prod(x.shape[:-1]), k, n), matrix, w.type.layout)
    if chosen is None:
        return False
    spec, data, one_row_kernel, scratch = chosen
    extra = [ctx.operand(i) for i in (2, 3) if _has(node, i)]
    finish = float_epilogue(epilogue, n)
    emit = emit_sparse_gemv if one_row_kernel else emit_sparse_linear
    key = ("linear.sparse", one_row_kernel, spec, epilogue, data.tobytes())
    ctx.call(ctx.kernel(key, lambda module, name: emit(module, name, spec, finish, 4 + len(extra))),
             [ctx.operand(0), ctx.constant(data, "linear sparse weights"), *extra, ctx.result(0),
              ctx.scratch(scratch, per_thread=True)], parallel=True)
    return True


# -- tuning -----------------------------------------------------------------------------------------------
def layer_graph(kind: str, matrix: np.ndarray, rows: int, sparse: bool) -> tuple[Graph, dict]:
    """One linear (f32) or qlinear (int8: u8 activations, symmetric int8 weights, i32 bias, i8 result) layer
    of weight `matrix`, with the layout that lets it go sparse when `sparse`; and random feeds."""
    from lowbit.ir.ops.quantized import fixed_point_attrs
    from lowbit.ir.types import QuantParams, SparseLayout

    rng = np.random.default_rng(0)
    n, k = matrix.shape
    graph = Graph(f"{kind}_layer")
    layout = SparseLayout("csr") if sparse else None
    if kind == "f32":
        x = graph.add_input("x", TensorType((rows, k), DType.f32))
        w = graph.add_constant(matrix.astype(np.float32), "w", TensorType((n, k), DType.f32, None, layout))
        b = graph.add_constant(rng.standard_normal(n).astype(np.float32), "b")
        graph.set_outputs([("y", graph.add_node("linear", [x, w, b], {"activation": "relu"}).output)])
        return graph, {"x": rng.standard_normal((rows, k)).astype(np.float32)}
    x_quant = QuantParams((0.05,), (128,), None, None, 8, False)
    w_quant = QuantParams((0.01,), (0,), None, None, 8, True)
    x = graph.add_input("x", TensorType((rows, k), DType.u8, x_quant))
    data = np.clip(np.round(matrix), -127, 127).astype(np.int8)
    w = graph.add_constant(data, "w", TensorType((n, k), DType.i8, w_quant, layout))
    bias = rng.integers(-2000, 2000, n).astype(np.int32)
    b = graph.add_constant(bias, "b", TensorType((n,), DType.i32, QuantParams((0.0005,), (0,), None, None, 32, True)))
    result = dict(dtype=DType.i8, scale=0.5, zero_point=0)
    fixed = fixed_point_attrs("qlinear", [x.type, w.type, b.type], result, [None, data, bias])
    graph.set_outputs([("y", graph.add_node("qlinear", [x, w, b], {**result, **fixed}).output)])
    return graph, {"x": rng.integers(0, 256, (rows, k)).astype(np.uint8)}


def random_sparse(rng: np.random.Generator, n: int, k: int, sparsity: float, block: tuple[int, int] = (1, 1)
                  ) -> np.ndarray:
    """Values in ±[1, 100] with whole `block`s zero at `sparsity`."""
    r, c = block
    keep = np.repeat(np.repeat(rng.random((n // r, k // c)) >= sparsity, r, 0), c, 1)
    return np.where(keep, rng.integers(1, 100, (n, k)) * rng.choice([-1, 1], (n, k)), 0).astype(np.float32)


def _seconds(graph: Graph, feeds: dict, repeats: int, target: str) -> float:
    import time

    from lowbit.backends.native.compiler import compile_graph
    model = compile_graph(graph, target, cache=False)  # decisions differ inside and outside `forced_sparse`
    model.run(feeds)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model.run(feeds)
        best = min(best, time.perf_counter() - start)
    return best


@contextlib.contextmanager
def forced_sparse():
    """Within: every weight with a layout takes the sparse kernel (measurements, benchmarks)."""
    global prefer_sparse, prefer_gemv
    choosers = prefer_sparse, prefer_gemv
    prefer_sparse = prefer_gemv = lambda *args: True
    try:
        yield
    finally:
        prefer_sparse, prefer_gemv = choosers


def measured_target(kind: str) -> str:
    """The target `kind` is measured with here: the host, or for int8-pairs on an x86 host that has a
    4-byte dot product, the AVX2 target (whose sparse kernel takes pairs)."""
    from lowbit.backends.native.target import Target

    host = Target.host()
    dot_product = integer_spec(host, 16, 4, 4, False).route != "pairs"
    return "x86_64-avx2" if kind == "int8-pairs" and host.arch == "x86_64" and host.has("avx2") and dot_product \
        else "host"


def measure(kind: str, repeats: int = 30) -> Costs:
    """Fit the constants of `kind` to timings of generated sparse and dense layers on this machine."""
    from lowbit.backends.native.target import Target
    from lowbit.ir.types import SparseLayout

    rng = np.random.default_rng(0)
    target = measured_target(kind)
    seconds = lambda graph, feeds: _seconds(graph, feeds, repeats, target)  # noqa: E731
    base = seconds(*layer_graph(kind, np.ones((1, 1), np.float32), 1, False))  # call overhead
    sparse_rows, sparse_times, dense_rows, dense_times, gemv_rows, gemv_times = [], [], [], [], [], []
    parsed = Target.parse(target)
    lanes = _lanes(parsed)
    for n, k in ((128, 512), (512, 256)):
        for rows in (1, 16, 64):
            for sparsity, block in ((0.5, (1, 1)), (0.9, (1, 1)), (0.9, (1, 4)), (0.9, (4, 1))):
                matrix = random_sparse(rng, n, k, sparsity, block)
                with forced_sparse():  # (one row: the M = 1 kernel)
                    took = seconds(*layer_graph(kind, matrix, rows, True)) - base
                if rows == 1:
                    spec = float_spec(parsed, 1, k, n) if kind == "f32" else integer_spec(parsed, 1, k, n, False)
                    spec = one_row(spec)
                    gemv_rows.append([pack_windows(matrix, spec).vectors, n])
                    gemv_times.append(took)
                    continue
                values, blocks = structure(kind, matrix, best_block(kind, matrix, rows, SparseLayout("csr"), lanes))
                sparse_rows.append([values * math.ceil(rows / lanes), blocks, rows * (n + k)])
                sparse_times.append(took)
            dense_rows.append([n * k * rows, n * k])
            dense_times.append(seconds(*layer_graph(kind, matrix, rows, False)) - base)
    fit = lambda rows, times: np.maximum(np.linalg.lstsq(np.asarray(rows, float), 1e9 * np.asarray(times),  # noqa
                                                         rcond=None)[0], 1e-6)
    per_value, per_block, per_element = fit(sparse_rows, sparse_times)
    per_mac, streaming = fit(dense_rows, dense_times)
    per_window_vector, per_row = fit(gemv_rows, gemv_times)
    return Costs(float(per_value), float(per_block), float(per_element), float(per_element), float(per_mac),
                 float(streaming / per_mac), float(per_window_vector), float(per_row))


def tune(repeats: int = 30) -> dict[str, dict[str, float]]:
    """Measure the cost constants on this machine, write them to `tuning_path()` and return them."""
    result = {kind: asdict(measure(kind, repeats)) for kind in KINDS}
    path = tuning_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    costs.cache_clear()
    return result


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tune", action="store_true", help="measure the sparse/dense cost constants here")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per measurement")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowbit.backends.native.sparse_selection",
                                     description=__doc__.splitlines()[0])
    add_tune_arguments(parser)
    args = parser.parse_args(argv)
    if args.tune:
        print(json.dumps(tune(args.repeats), indent=2))
        print(f"written to {tuning_path()}")
    else:
        print(json.dumps({kind: asdict(costs(kind)) for kind in KINDS}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
