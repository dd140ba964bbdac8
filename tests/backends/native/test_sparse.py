"""Sparse × dense linear layers (`kernels.sparse`) against the reference interpreter: qlinear bit-exact and
linear within rtol 1e-4 over random shapes (M = 1, primes), block shapes and sparsities (dense, 90%, all-zero
rows, an all-zero matrix, gaps wider than the packing's one-byte steps); the packed size; the dense/sparse
choice of the cost model."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.backends.native import compiler, sparse_selection
from lowbit.ir import DType, Graph, TensorType
from lowbit.ir.ops.quantized import fixed_point_attrs
from lowbit.ir.types import QuantParams, SparseLayout
from lowbit.kernels.llvm import runs_here
from lowbit.kernels.sparse import CROSSED, MAX_PAIR_ROWS, pack_paired, pack_sparse

SIZES = st.one_of(st.integers(1, 24), st.sampled_from([1, 2, 3, 7, 13, 17, 31, 61, 67]))
BLOCKS = st.sampled_from([(1, 1), (1, 4), (4, 1), (2, 2)])
SPARSITIES = st.sampled_from([0.0, 0.5, 0.9, 0.97, 1.0])


@pytest.fixture(autouse=True)
def always_sparse(monkeypatch):
    """Every weight with a layout takes the sparse kernel (the cost model is tested on its own), compiled
    afresh (the compile cache does not know about the patch)."""
    monkeypatch.setattr(sparse_selection, "prefer_sparse", lambda *args: True)
    monkeypatch.setenv("LOWBIT_CACHE_DIR", "off")


def sparse_matrix(rng: np.random.Generator, n: int, k: int, block: tuple[int, int], sparsity: float,
                  values: np.ndarray) -> np.ndarray:
    """`values` [n, k] with whole blocks zeroed at `sparsity` (blocks that do not tile: single weights),
    and a few whole rows zero."""
    r, c = block if n % block[0] == 0 and k % block[1] == 0 else (1, 1)
    keep = rng.random((n // r, k // c)) >= sparsity
    mask = np.repeat(np.repeat(keep, r, 0), c, 1)
    mask[rng.random(n) < 0.2] = False
    return np.where(mask, values, 0).astype(values.dtype)


def layout(block: tuple[int, int]) -> SparseLayout:
    return SparseLayout("csr") if block == (1, 1) else SparseLayout("bsr", block)


def qparams(dtype: DType, scale, zero_point: int, axis: int | None = None) -> QuantParams:
    scales = tuple(float(np.float32(s)) for s in np.atleast_1d(scale))
    return QuantParams(scales, (zero_point,) * len(scales), axis, None, dtype.bits, dtype.is_signed)


def qlinear_graph(rng: np.random.Generator, rows: int, k: int, n: int, block, sparsity: float, x_dtype: DType,
                  bias: bool, residual: bool, out: DType) -> tuple[Graph, dict]:
    graph = Graph("qlinear")
    info = np.iinfo(x_dtype.numpy)
    zx = int(rng.integers(info.min, info.max + 1))
    x = graph.add_input("x", TensorType((rows, k), x_dtype, qparams(x_dtype, rng.uniform(0.01, 0.1), zx)))
    data = sparse_matrix(rng, n, k, block, sparsity, rng.integers(-127, 128, (n, k)).astype(np.int8))
    w_quant = qparams(DType.i8, rng.uniform(0.001, 0.02, n), 0, 0)
    w = graph.add_constant(data, "w", TensorType(data.shape, DType.i8, w_quant, layout(block)))
    inputs, constants = [x, w], [None, data]
    if bias:
        values = rng.integers(-20000, 20000, n).astype(np.int32)
        scales = np.float32(x.type.quant.scale[0]) * np.float32(w_quant.scale)
        inputs.append(graph.add_constant(values, "b", TensorType((n,), DType.i32, QuantParams(
            tuple(float(s) for s in scales), (0,) * n, 0, None, 32, True))))
        constants.append(values)
    feeds = {"x": rng.integers(info.min, info.max + 1, (rows, k)).astype(x_dtype.numpy)}
    if residual:
        inputs += [None] * (3 - len(inputs)) + [graph.add_input("r", TensorType((rows, n), DType.u8, qparams(
            DType.u8, 0.04, 100)))]
        constants += [None] * (4 - len(constants))
        feeds["r"] = rng.integers(0, 256, (rows, n)).astype(np.uint8)
    info_out = np.iinfo(out.numpy)
    result = dict(dtype=out, scale=float(np.float32(rng.uniform(0.01, 0.3))),
                  zero_point=int(rng.integers(max(info_out.min, -1000), min(info_out.max, 1000) + 1)))
    fixed = fixed_point_attrs("qlinear", [v.type if v is not None else None for v in inputs], result, constants)
    graph.set_outputs([("y", graph.add_node("qlinear", inputs, {**result, **fixed}).output)])
    return graph, feeds


@settings(max_examples=25, deadline=None)
@given(rows=SIZES, k=st.one_of(SIZES, st.sampled_from([64, 256, 601])), n=SIZES, block=BLOCKS,
       sparsity=SPARSITIES, x_dtype=st.sampled_from([DType.u8, DType.i8]), bias=st.booleans(),
       residual=st.booleans(), out=st.sampled_from([DType.i8, DType.u8, DType.i32]),
       seed=st.integers(0, 2**32 - 1))
def test_qlinear_is_bit_exact(rows, k, n, block, sparsity, x_dtype, bias, residual, out, seed) -> None:
    rng = np.random.default_rng(seed)
    graph, feeds = qlinear_graph(rng, rows, k, n, block, sparsity, x_dtype, bias, residual, out)
    got, want = lowbit.compile(graph).run(feeds)["y"], lowbit.run_reference(graph, feeds)["y"]
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def linear_graph(rng: np.random.Generator, rows: int, k: int, n: int, block, sparsity: float, bias: bool,
                 residual: bool, activation: str) -> tuple[Graph, dict]:
    graph = Graph("linear")
    x = graph.add_input("x", TensorType((rows, k), DType.f32))
    data = sparse_matrix(rng, n, k, block, sparsity, rng.standard_normal((n, k)).astype(np.float32))
    inputs = [x, graph.add_constant(data, "w", TensorType(data.shape, DType.f32, None, layout(block)))]
    feeds = {"x": rng.standard_normal((rows, k)).astype(np.float32)}
    inputs.append(graph.add_constant(rng.standard_normal(n).astype(np.float32), "b") if bias else None)
    if residual:
        inputs.append(graph.add_input("r", TensorType((rows, n), DType.f32)))
        feeds["r"] = rng.standard_normal((rows, n)).astype(np.float32)
    inputs = inputs if inputs[-1] is not None else inputs[:-1]
    graph.set_outputs([("y", graph.add_node("linear", inputs, {"activation": activation}).output)])
    return graph, feeds


@settings(max_examples=25, deadline=None)
@given(rows=SIZES, k=st.one_of(SIZES, st.sampled_from([64, 256, 601])), n=SIZES, block=BLOCKS,
       sparsity=SPARSITIES, bias=st.booleans(), residual=st.booleans(),
       activation=st.sampled_from(["none", "relu", "sigmoid"]), seed=st.integers(0, 2**32 - 1))
def test_linear_matches_the_reference(rows, k, n, block, sparsity, bias, residual, activation, seed) -> None:
    rng = np.random.default_rng(seed)
    graph, feeds = linear_graph(rng, rows, k, n, block, sparsity, bias, residual, activation)
    got, want = lowbit.compile(graph).run(feeds)["y"], lowbit.run_reference(graph, feeds)["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(want).max(initial=0))))


def test_wide_gaps_and_empty_matrices_pack_and_run() -> None:
    rng = np.random.default_rng(7)
    for data in (np.zeros((5, 2053), np.int8), np.eye(5, 2053, 2040, dtype=np.int8) * 3):
        data[0, 0] = data[0, -1] = 1  # a gap of 2052 columns: eight one-byte steps
        graph, feeds = qlinear_graph(rng, 3, 2053, 5, (1, 1), 0.0, DType.u8, True, False, DType.i32)
        weight = graph.nodes[0].inputs[1]
        weight.data = data  # same shape and dtype
        got, want = lowbit.compile(graph).run(feeds)["y"], lowbit.run_reference(graph, feeds)["y"]
        np.testing.assert_array_equal(got, want)


def test_packed_int8_is_about_two_bytes_per_nonzero() -> None:
    rng = np.random.default_rng(0)
    data = sparse_matrix(rng, 512, 512, (1, 1), 0.9, rng.integers(1, 127, (512, 512)).astype(np.int8))
    packed = pack_sparse(data, (1, 1), np.int8)
    assert packed.data.nbytes < 2.1 * np.count_nonzero(data) + 4 * 513 + 64
    blocks = pack_sparse(sparse_matrix(rng, 512, 512, (1, 4), 0.9, data | 1), (1, 4), np.int8)
    assert blocks.data.nbytes < 0.1 * 512 * 512 * 1.5


@pytest.mark.parametrize("kind, rows, sparse_enough", [("f32", 16, 0.9), ("f32", 64, 0.9), ("int8", 1, 0.99),
                                                         ("int8-pairs", 1, 0.99), ("int8-pairs", 64, 0.9),
                                                         ("int8", 64, 0.99)])
def test_selection_prefers_sparse_only_when_sparse_enough(kind, rows, sparse_enough, monkeypatch) -> None:
    monkeypatch.undo()  # the real cost model, with its built-in constants
    monkeypatch.setattr(sparse_selection, "costs", sparse_selection.DEFAULTS.__getitem__)
    rng = np.random.default_rng(1)
    values = rng.standard_normal((512, 512)).astype(np.float32) + 3
    sparse = np.where(rng.random((512, 512)) < sparse_enough, 0, values)
    dense = np.where(rng.random((512, 512)) < 0.1, 0, values)
    assert sparse_selection.prefer_sparse(kind, sparse, rows, (1, 1), 16)
    assert not sparse_selection.prefer_sparse(kind, dense, rows, (1, 1), 16)


@settings(max_examples=20, deadline=None)
@given(rows=SIZES, k=st.one_of(SIZES, st.sampled_from([64, 601])), n=SIZES,
       block=st.sampled_from([(1, 1), (1, 2), (1, 3), (1, 4), (2, 4), (1, 8)]),
       sparsity=SPARSITIES, x_dtype=st.sampled_from([DType.u8, DType.i8]), seed=st.integers(0, 2**32 - 1))
def test_every_int8_packing_is_bit_exact(rows, k, n, block, sparsity, x_dtype, seed) -> None:
    """Each packing the int8 kernel takes (weights placed in their quad of K, whole quads, quads padded
    past K) whatever the cost model would pick: 1×4 packing of an unstructured matrix stores its zeros."""
    rng = np.random.default_rng(seed)
    graph, feeds = qlinear_graph(rng, rows, k, n, (1, 1), sparsity, x_dtype, True, False, DType.i32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sparse_selection, "best_block", lambda kind, matrix, m, layout, lanes: block)
        got = lowbit.compile(graph).run(feeds)["y"]
    np.testing.assert_array_equal(got, lowbit.run_reference(graph, feeds)["y"])


AVX2 = runs_here(lowbit.Target.named("x86_64-avx2"))
PAIR_TARGETS = [target for target in ("x86_64-avx2", "x86_64-avx512") if runs_here(lowbit.Target.named(target))]


@pytest.mark.skipif(not PAIR_TARGETS, reason="runs AVX2 code on this machine")
@settings(max_examples=25, deadline=None)
@given(rows=SIZES, k=st.one_of(SIZES, st.sampled_from([64, 508, 601])), n=SIZES,
       block=st.sampled_from([(1, 1), (1, 2), (1, 3), (1, 4), (2, 4), (4, 1), sparse_selection.PAIRED]),
       sparsity=SPARSITIES, x_dtype=st.sampled_from([DType.u8, DType.i8]), residual=st.booleans(),
       optimize=st.sampled_from(["speed", "size"]), target=st.sampled_from(PAIR_TARGETS or ["x86_64-avx2"]),
       seed=st.integers(0, 2**32 - 1))
def test_int16_pairs_route_is_bit_exact(rows, k, n, block, sparsity, x_dtype, residual, optimize, target,
                                        seed) -> None:
    """x86_64-avx2 and x86_64-avx512 (AVX-512BW, no VNNI) have no 4-byte dot product: their int8 kernel
    takes int16 pairs of K through `vpmaddwd` (xT of extended activations, weights placed in their pair),
    for every packing (and the parity pairing, which blends two rows of xT); weights packed as int16, or
    as int8 widened at run time when optimising for size (which picks its packing)."""
    rng = np.random.default_rng(seed)
    graph, feeds = qlinear_graph(rng, rows, k, n, (1, 1), sparsity, x_dtype, True, residual, DType.i8)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sparse_selection, "best_block", lambda kind, matrix, m, layout, lanes: block)
        model = lowbit.compile(graph, target, optimize=optimize)
    np.testing.assert_array_equal(model.run(feeds)["y"], lowbit.run_reference(graph, feeds)["y"])


@pytest.mark.skipif(not AVX2, reason="runs AVX2 code on this machine")
@pytest.mark.parametrize("rows", [40, 64, 67])
def test_pairs_route_splits_m_into_passes_whose_xt_fits_l1(rows) -> None:
    """At K = 512 one pass of 8 accumulator vectors would read 64 KB of xT per row: the AVX2 kernel takes
    M in passes of 4 vectors (32 KB), over groups of rows larger than one unit (a last, narrower pass where
    M is not a multiple of 32), bit-exact with one thread and two, with either epilogue (in-row
    requantization, residual)."""
    avx2 = lowbit.Target.named("x86_64-avx2")
    spec = sparse_selection.integer_spec(avx2, rows, 512, 96, False)
    assert (spec.vectors, spec.passes) == (4, -(-rows // 32)) and spec.row_group > spec.row_unit
    assert sparse_selection.integer_spec(avx2, rows, 64, 96, False).vectors == (5 if rows == 40 else 8)
    assert sparse_selection.integer_spec(avx2, rows, 2048, 96, False).vectors == 4  # (passes past L1 too)
    rng = np.random.default_rng(rows)
    for residual in (False, True):
        graph, feeds = qlinear_graph(rng, rows, 512, 96, (1, 1), 0.9, DType.u8, True, residual, DType.i8)
        want = lowbit.run_reference(graph, feeds)["y"]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sparse_selection, "best_block", lambda *args: sparse_selection.PAIRED)
            patch.setattr(compiler, "PARALLEL_MIN_MACS", 0)
            for threads in (1, 2):
                model = lowbit.compile(graph, "x86_64-avx2", num_threads=threads)
                np.testing.assert_array_equal(model.run(feeds)["y"], want)


@pytest.mark.parametrize("out, narrow", [(DType.i8, True), (DType.u8, True), (DType.i32, False)])
def test_rows_are_requantized_in_registers_and_8_bit_results_transposed_as_bytes(out, narrow, monkeypatch) -> None:
    """Without a residual, each row's accumulators are requantized before they leave the registers; 8-bit
    results then go through a byte accT (16 × 16 tiles transposed back), int32 ones through int32."""
    specs = []
    chosen = sparse_selection.integer_row_epilogue
    monkeypatch.setattr(sparse_selection, "integer_row_epilogue",
                        lambda spec, *args: specs.append(spec) or chosen(spec, *args))
    rng = np.random.default_rng(5)
    for rows, n in ((48, 64), (40, 37)):  # (whole tiles; then m and n short of a tile)
        graph, feeds = qlinear_graph(rng, rows, 96, n, (1, 1), 0.9, DType.u8, True, False, out)
        model = lowbit.compile(graph, "host")
        np.testing.assert_array_equal(model.run(feeds)["y"], lowbit.run_reference(graph, feeds)["y"])
    assert [spec.narrow for spec in specs] == [narrow, narrow]
    assert all(spec.row_unit % spec.tile == 0 for spec in specs)


def test_avx2_kernel_multiplies_int16_pairs() -> None:
    from lowbit.backends.native.compiler import Program
    from lowbit.backends.native.target import Target
    from lowbit.kernels import llvm as ll

    graph, _ = qlinear_graph(np.random.default_rng(2), 64, 128, 16, (1, 2), 0.8, DType.i8, True, False, DType.i8)
    program = Program(graph, Target.named("x86_64-avx2"))
    assembly = ll.emit_assembly(program.module, program.target)
    assert "vpmaddwd" in assembly and "vpmaddubsw" not in assembly and "vpdpbusd" not in assembly


def test_pairs_cost_kind_counts_pairs() -> None:
    """int8-pairs counts a product per pair of K in a stored block (a 1×4 block: two), int8 one per quad;
    the parity pairing crosses a row's lone even-k weight with its lone odd-k one."""
    matrix = np.zeros((4, 16), np.float32)
    matrix[0, 4:8] = 1
    matrix[1, 1] = 1
    matrix[2, [0, 5, 9, 11]] = 1  # lone evens 0; lone odds 5, 9, 11: one crossed record, two aligned
    assert sparse_selection.structure("int8", matrix[:2], (1, 4)) == (2, 2)
    assert sparse_selection.structure("int8-pairs", matrix[:2], (1, 4)) == (4, 2)
    assert sparse_selection.structure("int8-pairs", matrix[:2], (1, 2)) == (3, 3)
    assert sparse_selection.structure("int8-pairs", matrix, sparse_selection.PAIRED) == (
        sparse_selection.CROSSED_PRODUCTS + 5, 6)
    packed = pack_paired(matrix.astype(np.int8))
    crossed = packed.data[packed.blocks_at:packed.aligned_at].view(CROSSED)
    assert (crossed["j_even"].tolist(), crossed["j_odd"].tolist(), crossed["weights"].tolist()) == (
        [0], [2], [[1, 1]])  # pair rows of k = 0 and k = 5


def test_parity_pairing_only_where_pair_rows_fit_uint16() -> None:
    """Records name pair rows of K in uint16: up to K = 131072 the pairing is a candidate, past it not."""
    for k, offered in ((2 * MAX_PAIR_ROWS, True), (2 * MAX_PAIR_ROWS + 2, False)):
        matrix = np.zeros((1, k), np.float32)
        matrix[0, [0, k - 1]] = 1  # a lone even k and a lone odd k: one crossed record beats two blocks
        chosen = sparse_selection.best_block("int8-pairs", matrix, 64, SparseLayout("csr"), 8)
        assert (chosen == sparse_selection.PAIRED) == offered


def test_paired_kernel_blends_rows_of_pairs() -> None:
    from lowbit.backends.native.compiler import Program
    from lowbit.backends.native.target import Target
    from lowbit.kernels import llvm as ll

    graph, _ = qlinear_graph(np.random.default_rng(2), 64, 128, 16, (1, 1), 0.9, DType.u8, True, False, DType.i8)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sparse_selection, "prefer_sparse", lambda *args: True)
        program = Program(graph, Target.named("x86_64-avx2"))
    assembly = ll.emit_assembly(program.module, program.target)
    assert "vpblendw" in assembly and "vpmaddwd" in assembly
    with pytest.MonkeyPatch.context() as patch:  # AVX-512BW: the blend is a load under a mask of odd int16s
        patch.setattr(sparse_selection, "prefer_sparse", lambda *args: True)
        program = Program(graph, Target.named("x86_64-avx512"))
    assembly = ll.emit_assembly(program.module, program.target)
    assert re.search(r"vmovdqu16\s.*zmm\d+ \{%k\d\}", assembly) and re.search(r"vpmaddwd\s.*zmm", assembly)


GEMV_TARGETS = ["host"] + (["x86_64-avx2"] if AVX2 else [])


@settings(max_examples=25, deadline=None)
@given(k=st.one_of(SIZES, st.sampled_from([64, 601])), n=SIZES, block=BLOCKS, sparsity=SPARSITIES,
       x_dtype=st.sampled_from([DType.u8, DType.i8]), bias=st.booleans(), residual=st.booleans(),
       out=st.sampled_from([DType.i8, DType.u8, DType.i32]), target=st.sampled_from(GEMV_TARGETS),
       seed=st.integers(0, 2**32 - 1))
def test_one_row_kernel_is_bit_exact(k, n, block, sparsity, x_dtype, bias, residual, out, target, seed) -> None:
    """M = 1 goes to `kernels.sparse_gemv` (windows of nonzeros gathered along the vectors): quads through
    `vpdpbusd` on this machine, int16 pairs through `vpmaddwd` on x86_64-avx2; float32 within rtol 1e-4."""
    rng = np.random.default_rng(seed)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sparse_selection, "prefer_gemv", lambda *args: True)
        graph, feeds = qlinear_graph(rng, 1, k, n, block, sparsity, x_dtype, bias, residual, out)
        model = lowbit.compile(graph, target)
        assert "sparse weights" in str(model.program.calls)
        np.testing.assert_array_equal(model.run(feeds)["y"], lowbit.run_reference(graph, feeds)["y"])
        graph, feeds = linear_graph(rng, 1, k, n, block, sparsity, bias, residual, "relu")
        got, want = lowbit.compile(graph, target).run(feeds)["y"], lowbit.run_reference(graph, feeds)["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(want).max(initial=0))))


@pytest.mark.parametrize("kind, sparse_enough", [("int8", 0.9995), ("int8-pairs", 0.99), ("f32", 0.99)])
def test_one_row_kernel_is_chosen_only_when_sparse_enough(kind, sparse_enough, monkeypatch) -> None:
    """(int8 on an AVX-512 VNNI machine: its dense kernel streams one row's weights so fast that only
    nearly empty matrices go sparse.)"""
    from lowbit.backends.native.target import Target
    from lowbit.kernels.sparse_gemv import pack_windows

    monkeypatch.undo()
    monkeypatch.setattr(sparse_selection, "costs", sparse_selection.DEFAULTS.__getitem__)
    rng = np.random.default_rng(4)
    target = Target.named("x86_64-avx2" if kind == "int8-pairs" else "x86_64-avx512vnni")
    spec = (sparse_selection.float_spec(target, 1, 512, 512) if kind == "f32"
            else sparse_selection.integer_spec(target, 1, 512, 512, False))
    spec = dataclasses.replace(spec, lanes=min(spec.lanes, sparse_selection.GEMV_LANES))
    for sparsity, chosen in ((sparse_enough, True), (0.1, False)):
        matrix = np.where(rng.random((512, 512)) < sparsity, 0, rng.integers(1, 100, (512, 512))).astype(np.int8)
        vectors = pack_windows(matrix, spec).vectors
        assert sparse_selection.prefer_gemv(kind, vectors, 512, 512) == chosen


def test_one_row_windows_cover_every_nonzero() -> None:
    from lowbit.kernels.sparse_gemv import windows

    matrix = np.zeros((3, 20), np.int8)
    matrix[0, [0, 1, 3, 4, 9, 19]] = 1
    matrix[2, [2, 5]] = 1
    for group, expected in ((4, [0, 4, 9, 19]), (2, [0, 3, 9, 19]), (1, [0, 1, 3, 4, 9, 19])):
        rows, starts = windows(matrix, group)  # row 0: 0–3, 4–7, 9–12, 19–22 for quads; row 1 has none
        assert starts[rows == 0].tolist() == expected and not (rows == 1).any()
        assert starts[rows == 2].tolist() == ([2] if group == 4 else [2, 5])


@pytest.mark.parametrize("kind, target", [("int8", "host"), ("f32", "host")]
                         + ([("int8", "x86_64-avx2")] if AVX2 else []))  # (x86_64-avx2: the parity pairing)
def test_results_do_not_depend_on_the_thread_count(kind, target) -> None:
    rng = np.random.default_rng(3)
    rows, k, n = 37, 508, 251  # ≥ the compiler's threshold for a team; groups of rows split unevenly
    block = (1, 4) if target == "host" else (1, 1)
    for rows in (rows, 1):  # (one row: the gathering kernel, its rows shared out the same way)
        if kind == "int8":
            graph, feeds = qlinear_graph(rng, rows, k, n, block, 0.8, DType.i8, True, True, DType.u8)
        else:
            graph, feeds = linear_graph(rng, rows, k, n, (1, 1), 0.8, True, False, "relu")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sparse_selection, "prefer_sparse", lambda *args: True)
            patch.setattr(sparse_selection, "prefer_gemv", lambda *args: True)
            patch.setattr(compiler, "PARALLEL_MIN_MACS", 0)
            single = lowbit.compile(graph, target, num_threads=1)
            team = lowbit.compile(graph, target, num_threads=2)
        assert team.threads == 2
        np.testing.assert_array_equal(single.run(feeds)["y"], team.run(feeds)["y"])
        want = lowbit.run_reference(graph, feeds)["y"]
        if kind == "int8":
            np.testing.assert_array_equal(team.run(feeds)["y"], want)
        else:
            np.testing.assert_allclose(team.run(feeds)["y"], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target", ["aarch64", "aarch64-dotprod", "x86_64-avx2", "x86_64-avx512", "x86_64-avxvnni"])
def test_sparse_kernels_compile_for_other_targets(target) -> None:
    """The portable dot product (no vpdpbusd) and narrower vectors generate code for every target."""
    from lowbit.backends.native.compiler import Program
    from lowbit.backends.native.target import Target
    from lowbit.kernels import llvm as ll

    rng = np.random.default_rng(5)
    for graph, _ in (qlinear_graph(rng, 9, 67, 13, (1, 4), 0.7, DType.u8, True, False, DType.i8),
                     linear_graph(rng, 9, 67, 13, (1, 1), 0.7, True, False, "none")):
        program = Program(graph, Target.named(target))
        assert any(call.parallel for call in program.calls)  # the sparse kernel (the dense ones are serial)
        assert ll.emit_assembly(program.module, program.target)


@pytest.mark.parametrize("rows", [1, 64])
def test_optimize_for_size_stores_sparse_weights_compactly(rows, monkeypatch) -> None:
    """optimize="size": a 90%-sparse int8 weight takes its smallest packing even where the cost model would
    keep it dense; a weight whose packing is no smaller than dense stays dense. Results stay bit-exact."""
    monkeypatch.undo()
    monkeypatch.setenv("LOWBIT_CACHE_DIR", "off")
    monkeypatch.setattr(sparse_selection, "prefer_sparse", lambda *args: False)  # speed would pick dense
    rng = np.random.default_rng(7)
    for sparsity, expect_sparse in ((0.9, True), (0.0, False)):
        graph, feeds = qlinear_graph(rng, rows, 256, 96, (1, 1), sparsity, DType.i8, True, False, DType.i8)
        weight = next(c.data for c in graph.constants if c.name == "w")
        small, fast = (lowbit.compile(graph, optimize=goal) for goal in ("size", "speed"))
        assert (small.weights.nbytes < 0.5 * weight.nbytes) == expect_sparse
        assert fast.weights.nbytes >= weight.nbytes
        want = lowbit.run_reference(graph, feeds)
        for model in (small, fast):
            for name, got in model.run(feeds).items():
                np.testing.assert_array_equal(got, want[name])


def test_optimize_goal_is_checked() -> None:
    rng = np.random.default_rng(3)
    graph, _ = qlinear_graph(rng, 2, 8, 8, (1, 1), 0.5, DType.i8, False, False, DType.i8)
    with pytest.raises(lowbit.LowbitError, match="optimize must be one of speed, size"):
        lowbit.compile(graph, optimize="smallest")
