"""Products of two run-time operands on the int32 routes: qmatmul and dynamic_matmul on AMX tiles
(`kernels.qmatmul_amx`, B packed per call), dynamic_linear on AMX, and dynamic quantization's
division-free rounding; bit-exact against the reference for 1, 2 and 3 threads, the route checked in
the generated IR."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.backends.native import Target, compiler
from lowbit.backends.native.compiler import Program
from lowbit.backends.reference.quantized import dynamic_quantize
from lowbit.errors import TargetError
from lowbit.ir import DType, Graph, TensorType
from lowbit.kernels import gemm_amx
from lowbit.kernels.llvm import check_runs_here

sys.path.insert(0, str(Path(__file__).parent))  # the graph builders of the quantized tests
from test_quantized import (SIZES, TARGETS, dynamic_linear_graph, integers, params, requantizing,  # noqa: E402
                            zero_point)

THREADS = (1, 2, 3)
# the AMX route needs 16 rows and 16 columns; K across whole 64-byte steps, partial steps and groups of 4
SIDES = st.one_of(st.integers(16, 40), st.sampled_from([17, 31, 61, 67, 97, 128]))
DEPTHS = st.one_of(st.integers(1, 9), st.sampled_from([31, 32, 63, 64, 65, 97, 128, 130, 300]))


def _host_has_amx() -> bool:
    target = Target.host()
    if not gemm_amx.available(target):
        return False
    try:
        check_runs_here(target)
    except TargetError:
        return False
    return True


HOST_AMX = _host_has_amx()


@pytest.fixture(autouse=True)
def always_parallel(monkeypatch) -> None:
    """Small models run threaded too (normally they stay on one thread: `compiler.PARALLEL_MIN_MACS`)."""
    monkeypatch.setattr(compiler, "PARALLEL_MIN_MACS", 0)


def check_exact(graph: Graph, feeds: dict, amx: bool, target: str | Target = "host") -> None:
    """Every thread count equals the reference bit for bit; on a host with AMX, the route is (not) AMX's."""
    if HOST_AMX and target == "host":
        assert ("llvm.x86.tdpb" in str(Program(graph, Target.host()).module)) == amx
    want = lowbit.run_reference(graph, feeds)
    for count in THREADS:
        model = lowbit.compile(graph, target, num_threads=count)
        assert model.threads == count
        got = model.run(feeds)
        for name, value in want.items():
            assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
            np.testing.assert_array_equal(got[name], value, err_msg=f"{name}, {count} threads")


def batches(draw) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A's batch shape and B's, which broadcasts against it (fewer axes, or 1 where A has more)."""
    batch_a = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    kept = draw(st.integers(0, len(batch_a)))
    return batch_a, tuple(draw(st.sampled_from([1, d])) for d in batch_a[len(batch_a) - kept:])


@st.composite
def qmatmul_cases(draw) -> dict:
    batch_a, batch_b = batches(draw)
    return dict(batch_a=batch_a, batch_b=batch_b, m=draw(SIDES), k=draw(DEPTHS), n=draw(SIDES),
                a=draw(st.sampled_from([DType.u8, DType.i8])), b=draw(st.sampled_from([DType.u8, DType.i8])),
                per_channel=draw(st.booleans()), out=draw(st.sampled_from([DType.i8, DType.u8, DType.i16])),
                seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=15, deadline=None)
@given(case=qmatmul_cases())
def test_qmatmul_amx(case: dict) -> None:
    """Both operands 8-bit at run time, zero points of either sign (per column of B too), batch broadcasting."""
    rng = np.random.default_rng(case["seed"])
    a_shape, b_shape, n = case["batch_a"] + (case["m"], case["k"]), case["batch_b"] + (case["k"], case["n"]), case["n"]
    b_quant = params(case["b"], rng.uniform(0.01, 0.05, n), [zero_point(rng, case["b"]) for _ in range(n)],
                     len(b_shape) - 1) if case["per_channel"] else params(case["b"], 0.02, zero_point(rng, case["b"]))
    graph = Graph("qmatmul")
    a = graph.add_input("a", TensorType(a_shape, case["a"], params(case["a"], 0.03, zero_point(rng, case["a"]))))
    b = graph.add_input("b", TensorType(b_shape, case["b"], b_quant))
    graph.set_outputs([("y", requantizing(graph, "qmatmul", [a, b], [None, None], rng, case["out"]))])
    check_exact(graph, {"a": integers(rng, a_shape, case["a"]), "b": integers(rng, b_shape, case["b"])}, True)


def test_qmatmul_below_a_tile_stays_off_amx() -> None:
    """15 rows: the VNNI tiles, which waste nothing on small M."""
    rng = np.random.default_rng(3)
    graph = Graph("qmatmul")
    a = graph.add_input("a", TensorType((2, 15, 40), DType.u8, params(DType.u8, 0.03, 7)))
    b = graph.add_input("b", TensorType((2, 40, 33), DType.i8, params(DType.i8, 0.02, -3)))
    graph.set_outputs([("y", requantizing(graph, "qmatmul", [a, b], [None, None], rng))])
    check_exact(graph, {"a": integers(rng, (2, 15, 40), DType.u8), "b": integers(rng, (2, 40, 33), DType.i8)}, False)


def dynamic_matmul_graph(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> Graph:
    graph = Graph("dynamic")
    a = graph.add_input("a", TensorType(a_shape, DType.f32))
    b = graph.add_input("b", TensorType(b_shape, DType.f32))
    graph.set_outputs([("y", graph.add("dynamic_matmul", a, b))])
    return graph


@st.composite
def dynamic_cases(draw) -> dict:
    batch_a, batch_b = batches(draw)
    return dict(batch_a=batch_a, batch_b=batch_b, m=draw(SIDES), k=draw(DEPTHS), n=draw(SIDES),
                offsets=draw(st.tuples(st.sampled_from([0.0, 0.5, -3.0]), st.sampled_from([0.0, 2.0, -0.25]))),
                scales=draw(st.tuples(st.sampled_from([0.0, 1.0, 40.0]), st.sampled_from([1.0, 1e-3]))),
                seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=12, deadline=None)
@given(case=dynamic_cases())
def test_dynamic_matmul_amx(case: dict) -> None:
    """Run-time u8 operands with run-time zero points (0, 255 and between: all-positive, all-negative and
    mixed data, an all-zero operand), float32(acc) · float32(sa·sb)."""
    rng = np.random.default_rng(case["seed"])
    a_shape, b_shape = case["batch_a"] + (case["m"], case["k"]), case["batch_b"] + (case["k"], case["n"])
    (oa, ob), (sa, sb) = case["offsets"], case["scales"]
    feeds = {"a": (rng.standard_normal(a_shape) * sa + oa).astype(np.float32),
             "b": (rng.standard_normal(b_shape) * sb + ob).astype(np.float32)}
    check_exact(dynamic_matmul_graph(a_shape, b_shape), feeds, True)


@settings(max_examples=10, deadline=None)
@given(case=dynamic_cases(), m=SIZES, n=SIZES, target=st.sampled_from(TARGETS))
def test_dynamic_matmul_register_tiles(case: dict, m: int, n: int, target) -> None:
    """Small products and targets without AMX: the int8 routes' register tiles (u8 copies flipped where the
    route wants signed bytes, widened on 16-bit routes), run-time corrections of the flips too."""
    rng = np.random.default_rng(case["seed"])
    a_shape, b_shape = case["batch_a"] + (min(m, 15), case["k"]), case["batch_b"] + (case["k"], n)
    (oa, ob), (sa, sb) = case["offsets"], case["scales"]
    feeds = {"a": (rng.standard_normal(a_shape) * sa + oa).astype(np.float32),
             "b": (rng.standard_normal(b_shape) * sb + ob).astype(np.float32)}
    graph = dynamic_matmul_graph(a_shape, b_shape)
    check_exact(graph, feeds, False, target)
    assert ".pack_b" in str(Program(graph, target if isinstance(target, Target) else Target.parse(target)).module)


def test_dynamic_matmul_deeper_than_int32_takes_the_wide_route() -> None:
    """K·255² reaches 2^31 past 33 025 terms: int64 lanes, exact where int32 would wrap."""
    k = 33030
    rng = np.random.default_rng(4)
    feeds = {"a": (rng.random((16, k)) < 0.9).astype(np.float32), "b": (rng.random((k, 16)) < 0.9).astype(np.float32)}
    feeds["a"][0], feeds["b"][:, 0] = 1.0, 1.0  # u8 255 (zero points 0): acc[0, 0] = K·255² > 2^31
    graph = dynamic_matmul_graph((16, k), (k, 16))
    check_exact(graph, feeds, False)
    assert ".pack_b" not in str(Program(graph, Target.host()).module)


def halfway_values(rng: np.random.Generator, count: int) -> np.ndarray:
    """Floats whose quotients by the dynamic scale of the whole tensor fall on, or next to, half-integers
    (where rint decides ties and a multiplication by the inverse scale may round the other way), with the
    tensor's extremes included so that the scale is the one the values were built for."""
    low, high = np.float32(-rng.uniform(0.1, 3.0)), np.float32(rng.uniform(0.1, 3.0))
    values = np.concatenate([[low, high], rng.uniform(low, high, count).astype(np.float32)]).astype(np.float32)
    _, scale, _ = dynamic_quantize(values)
    halves = (rng.integers(-255, 255, count) + np.float32(0.5)).astype(np.float32)
    on = (halves * scale).astype(np.float32)
    near = [np.nextafter(on, np.float32(np.inf)), np.nextafter(on, np.float32(-np.inf))]
    mixed = np.concatenate([values, on, *near, (values[2:] / scale * scale).astype(np.float32)])
    return np.clip(mixed, low, high).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dynamic_quantization_rounds_as_the_division(seed: int) -> None:
    """Products with the identity (quantized exactly: 0 and 255) show every quantized value of A: they
    equal the reference's, which divides, near and on half-integer quotients too."""
    rng = np.random.default_rng(seed)
    values = halfway_values(rng, 3000)
    k = 64
    rows = len(values) // k
    a = values[:rows * k].reshape(rows, k)
    a[0, :2] = values[:2]  # the extremes stay in
    check_exact(dynamic_matmul_graph((rows, k), (k, k)), {"a": a, "b": np.eye(k, dtype=np.float32)}, True)


@settings(max_examples=8, deadline=None)
@given(rows=st.sampled_from([(16,), (2, 9), (61,), (128,)]), k=st.sampled_from([1, 9, 64, 100, 301]),
       n=st.sampled_from([16, 17, 70, 128]), weights=st.sampled_from(["channel", "tensor", "asymmetric"]),
       bias=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_dynamic_linear_amx(rows, k, n, weights, bias, seed) -> None:
    """x quantized at run time (values on half-integer quotients too) against int8 weights on AMX tiles."""
    rng = np.random.default_rng(seed)
    graph, data, quant = dynamic_linear_graph(rng, rows, k, n, weights, bias)
    count = int(np.prod(rows)) * k
    values = np.resize(halfway_values(rng, count), count).reshape(rows + (k,))
    values.reshape(-1)[:2] = values.reshape(-1).min(), values.reshape(-1).max()
    check_exact(graph, {"x": values}, _centred_fit(data, quant))


def _centred_fit(data: np.ndarray, quant) -> bool:
    """Whether weights minus their zero points stay int8 (else the wide route)."""
    centred = data.astype(np.int64) - np.asarray(quant.zero_point, np.int64).reshape(-1, 1)
    return bool(centred.min() >= -128 and centred.max() <= 127)
