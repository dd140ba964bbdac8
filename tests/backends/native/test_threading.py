"""Intra-op threads (`lowbit.compile(..., num_threads=N)`): every thread count gives the same bits.

Integer models equal the reference exactly for 1, 2 and 3 threads; float models equal each other bit for
bit across thread counts (no reduction is ever split) and the reference within tolerance. The products'
parallel kernels are checked on random shapes of every route (int8 tiles, depthwise, wide int64; float
im2col / implicit / transposed / depthwise convolutions; linear and matmul), with the size threshold under
which a model stays single-threaded switched off so that small shapes run threaded too. Then: concurrent
runs from Python threads, a team confined to one CPU, the threshold itself, the cache key, and an artifact
built for two threads run from C.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.backends.native import aot, compiler
from lowbit.backends.native.cache import cache_key
from lowbit.errors import LowbitError
from lowbit.ir import DType, Graph, TensorType

sys.path.insert(0, str(Path(__file__).parent))  # helpers shared with the other native tests
from aot_cases import build_driver, digits_feeds, digits_graph, run_driver  # noqa: E402
from float_cases import TARGETS as FLOAT_TARGETS  # noqa: E402
from test_conv import convolutions  # noqa: E402
from test_quantized import (activation_type, conv_cases, conv_graph, dynamic_linear_graph, integers,  # noqa: E402
                            linear_cases, matmul_cases, params, product_graph, requantizing, zero_point)

THREADS = (1, 2, 3)


MIN_MACS = compiler.PARALLEL_MIN_MACS


@pytest.fixture(scope="module")
def always_parallel() -> None:
    """Small models run threaded too (normally they stay on one thread: `compiler.PARALLEL_MIN_MACS`)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compiler, "PARALLEL_MIN_MACS", 0)
        yield


def run_all(graph: Graph, feeds: dict, target: str = "host", threads=THREADS, parallel: bool = False
            ) -> list[dict]:
    """The results for each thread count; `parallel`: the graph's products have parallel kernels."""
    results = []
    for count in threads:
        model = lowbit.compile(graph, target, num_threads=count)
        assert model.num_threads == count and model.threads == count
        assert not parallel or any(call.parallel for call in model.program.calls)
        results.append(model.run(feeds))
    return results


def check_exact(graph: Graph, feeds: dict, target: str = "host", threads=THREADS, parallel: bool = False) -> None:
    """Every thread count equals the reference bit for bit."""
    want = lowbit.run_reference(graph, feeds)
    for count, got in zip(threads, run_all(graph, feeds, target, threads, parallel)):
        for name, value in want.items():
            np.testing.assert_array_equal(got[name], value, err_msg=f"{name}, {count} threads")


def check_float(graph: Graph, feeds: dict, target: str = "host", parallel: bool = True) -> None:
    """Every thread count gives the single-threaded bits, which are within tolerance of the reference."""
    want = lowbit.run_reference(graph, feeds)
    first, *others = run_all(graph, feeds, target, parallel=parallel)
    for name, value in want.items():
        scale = max(float(np.nanmax(np.abs(value), initial=0.0)), 1e-30)
        np.testing.assert_allclose(first[name], value, rtol=1e-4, atol=1e-5 * scale, err_msg=name)
        for count, got in zip(THREADS[1:], others):
            np.testing.assert_array_equal(got[name], first[name], err_msg=f"{name}, {count} threads")


# -- kernels on random shapes ------------------------------------------------------------------------------
@settings(max_examples=10, deadline=None)
@given(case=linear_cases())
def test_qlinear_threads(always_parallel, case: dict) -> None:
    rng = np.random.default_rng(case["seed"])
    x_type = activation_type(rng, case["rows"] + (case["k"],), case["dtype"], case["seven_bit"])
    graph, feeds = product_graph("qlinear", rng, x_type, (case["n"], case["k"]), case["weights"], case["bias"],
                                 case["rows"] + (case["n"],) if case["residual"] else None, case["out"], case["clamp"])
    check_exact(graph, feeds, case["target"], threads=(2, 3))


@settings(max_examples=12, deadline=None)
@given(case=conv_cases())
def test_qconv2d_threads(always_parallel, case: dict) -> None:
    """Every qconv2d route (int8 tiles, depthwise, wide) split over threads."""
    graph, feeds, _, _ = conv_graph(case)
    check_exact(graph, feeds, case["target"], threads=(2, 3))


@settings(max_examples=10, deadline=None)
@given(case=matmul_cases())
def test_qmatmul_threads(always_parallel, case: dict) -> None:
    """Both operands at run time: each thread packs A, the sums and its panels of B."""
    rng = np.random.default_rng(case["seed"])
    a_shape, b_shape = case["batch_a"] + (case["m"], case["k"]), case["batch_b"] + (case["k"], case["n"])
    graph = Graph("qmatmul")
    a = graph.add_input("a", TensorType(a_shape, case["a"], params(case["a"], 0.03, zero_point(rng, case["a"]))))
    b = graph.add_input("b", TensorType(b_shape, case["b"], params(case["b"], 0.02, zero_point(rng, case["b"]))))
    graph.set_outputs([("y", requantizing(graph, "qmatmul", [a, b], [None, None], rng, DType.i8))])
    check_exact(graph, {"a": integers(rng, a_shape, case["a"]), "b": integers(rng, b_shape, case["b"])},
                case["target"], threads=(2, 3))


@settings(max_examples=6, deadline=None)
@given(rows=st.sampled_from([(), (1,), (7,), (3, 5)]), k=st.sampled_from([1, 9, 64, 301]),
       n=st.sampled_from([1, 17, 70]), weights=st.sampled_from(["channel", "asymmetric"]), bias=st.booleans())
def test_dynamic_linear_threads(always_parallel, rows, k, n, weights, bias) -> None:
    """Each thread quantizes x at run time into its own scratch; int8 tiles and the wide route."""
    rng = np.random.default_rng(6)
    graph, _, _ = dynamic_linear_graph(rng, rows, k, n, weights, bias)
    check_exact(graph, {"x": rng.standard_normal(rows + (k,)).astype(np.float32)})


@settings(max_examples=12, deadline=None)
@given(shape=convolutions(), bias=st.booleans(), residual=st.booleans(), target=FLOAT_TARGETS)
def test_conv2d_threads(always_parallel, shape: dict, bias: bool, residual: bool, target: str) -> None:
    """Float convolutions of every route (im2col, implicit, in place, transposed, depthwise)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((shape["batch"], shape["c"], *shape["size"])).astype(np.float32)
    graph = Graph("conv")
    x_value = graph.add_input("x", TensorType(x.shape, DType.f32))
    w = graph.add_constant(rng.standard_normal((shape["m"], shape["c"] // shape["group"], shape["kernel"],
                                                shape["kernel"])).astype(np.float32))
    b = graph.add_constant(rng.standard_normal(shape["m"]).astype(np.float32)) if bias else None
    attrs = dict(strides=shape["stride"], dilations=shape["dilation"], pads=shape["pads"], group=shape["group"])
    feeds, r = {"x": x}, None
    if residual:
        out_shape = graph.add("conv2d", x_value, w, **attrs).type.shape
        feeds["r"] = rng.standard_normal(out_shape).astype(np.float32)
        r = graph.add_input("r", TensorType(out_shape, DType.f32))
    graph.set_outputs([("y", graph.add("conv2d", x_value, w, b, r, activation="relu", **attrs))])
    graph.eliminate_dead_code()
    check_float(graph, feeds, target)


@settings(max_examples=10, deadline=None)
@given(rows=st.sampled_from([1, 2, 7, 33]), k=st.integers(1, 70), n=st.sampled_from([1, 5, 16, 37, 100]),
       batch=st.sampled_from([(), (3,), (2, 2)]), constant=st.booleans(), target=FLOAT_TARGETS)
def test_linear_and_matmul_threads(always_parallel, rows, k, n, batch, constant, target) -> None:
    """linear (constant weights packed at compile time) and batched matmul (run-time B packed by each
    thread) split by column panels and row chunks."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal(batch + (rows, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(batch + (k, n)).astype(np.float32)
    graph = Graph("products")
    a_value = graph.add_input("a", TensorType(a.shape, DType.f32))
    b_value = graph.add_constant(b) if constant else graph.add_input("b", TensorType(b.shape, DType.f32))
    graph.set_outputs([("y", graph.add("linear", a_value, graph.add_constant(w), graph.add_constant(w[:, 0]))),
                       ("z", graph.add("matmul", a_value, b_value))])
    check_float(graph, {"a": a} if constant else {"a": a, "b": b}, target)


@settings(max_examples=6, deadline=None)
@given(heads=st.sampled_from([(1,), (3,), (2, 2)]), sq=st.sampled_from([1, 5, 40, 300]), sk=st.integers(1, 40),
       d=st.integers(1, 20), masked=st.booleans())
def test_attention_threads(always_parallel, heads, sq, sk, d, masked) -> None:
    """Units of (head, block of score rows), each thread packing its heads' keys and values."""
    rng = np.random.default_rng(4)
    arrays = {"q": heads + (sq, d), "k": heads + (d, sk), "v": heads + (sk, d)}
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in arrays.items()}
    graph = Graph("attention")
    values = [graph.add_input(name, TensorType(shape, DType.f32)) for name, shape in arrays.items()]
    if masked:
        feeds["m"] = rng.standard_normal((sq, sk)).astype(np.float32)
        values.append(graph.add_input("m", TensorType((sq, sk), DType.f32)))
    graph.set_outputs([("o", graph.add("attention", *values, scale=0.3))])
    check_float(graph, feeds)


# -- models ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_digits_models_int8(always_parallel, name: str) -> None:
    graph = digits_graph(name, True, batch=5)
    check_exact(graph, digits_feeds(name, batch=5), parallel=True)


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_digits_models_float(always_parallel, name: str) -> None:
    graph = digits_graph(name, False, batch=5)
    check_float(graph, digits_feeds(name, batch=5))


@pytest.fixture(scope="module")
def resnet_int8() -> tuple[Graph, dict]:
    """A small ResNet (residual blocks, strided and 1×1 convolutions, a linear head), int8."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "e2e"))
    from model_builders import resnet18

    graph = lowbit.optimize(lowbit.import_onnx(resnet18(image=32)))
    rng = np.random.default_rng(3)
    calibration = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    quantized = lowbit.quantize(graph, {graph.inputs[0].name: calibration}, progress=False)
    return quantized, {graph.inputs[0].name: rng.standard_normal((1, 3, 32, 32)).astype(np.float32)}


def test_resnet_int8(resnet_int8) -> None:
    """Big enough to run threaded without lowering the threshold."""
    graph, feeds = resnet_int8
    assert compiler.product_macs(graph) >= MIN_MACS
    check_exact(graph, feeds, parallel=True)


def test_resnet_int8_on_the_vnni_route(resnet_int8) -> None:
    """The same on the AVX-512 VNNI tiles, where the host runs them (the host's own route may be AMX)."""
    from lowbit.backends.native import Target
    from lowbit.errors import TargetError
    from lowbit.kernels.llvm import check_runs_here

    try:
        check_runs_here(Target.parse("x86_64-avx512vnni"))
    except TargetError:
        pytest.skip("this machine does not run AVX-512 VNNI")
    check_exact(*resnet_int8, target="x86_64-avx512vnni", threads=(1, 3), parallel=True)


# -- running -----------------------------------------------------------------------------------------------
def test_concurrent_runs_from_python_threads(always_parallel) -> None:
    """Runs of one threaded model from several Python threads at once, each with its own team."""
    graph = digits_graph("cnn", True, batch=4)
    model = lowbit.compile(graph, num_threads=2)
    feeds = [digits_feeds("cnn", batch=4, start=4 * i) for i in range(4)]
    want = [lowbit.run_reference(graph, f) for f in feeds]
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for _ in range(10):
                got = model.run(feeds[index])
                for name, value in want[index].items():
                    np.testing.assert_array_equal(got[name], value)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert model.threads == 2 and not errors, errors


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
def test_runs_with_the_team_on_one_cpu(always_parallel) -> None:
    """A caller pinned to one CPU (its started threads inherit that): a worker only runs when another thread
    yields or is preempted, so shares go to whichever thread claims them first, and a worker may start
    after the run's work is done. The results stay the reference's."""
    graph = digits_graph("cnn", True, batch=4)
    model = lowbit.compile(graph, num_threads=3)
    feeds = digits_feeds("cnn", batch=4)
    want = lowbit.run_reference(graph, feeds)
    results: list[dict] = []
    errors: list[BaseException] = []

    def pinned() -> None:  # on its own Python thread: the affinity is this thread's only
        try:
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
            results.extend(model.run(feeds) for _ in range(20))
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    worker = threading.Thread(target=pinned)
    worker.start()
    worker.join()
    assert model.threads == 3 and not errors and len(results) == 20, errors
    for got in results:
        for name, value in want.items():
            np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_small_models_stay_single_threaded(monkeypatch) -> None:
    monkeypatch.setattr(compiler, "PARALLEL_MIN_MACS", MIN_MACS)
    graph = digits_graph("mlp", True, batch=1)
    assert compiler.product_macs(graph) < compiler.PARALLEL_MIN_MACS
    model = lowbit.compile(graph, num_threads=4)
    assert model.num_threads == 4 and model.threads == 1


def test_thread_count_is_part_of_the_cache_key() -> None:
    graph = digits_graph("mlp", True, batch=1)
    keys = {cache_key(graph, compiler.Target.host(), threads) for threads in THREADS}
    assert len(keys) == len(THREADS)


def test_bad_thread_counts() -> None:
    with pytest.raises(LowbitError, match="num_threads"):
        lowbit.compile(digits_graph("mlp", True, batch=1), num_threads=0)


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc)")
def test_artifact_for_two_threads_runs_from_c(always_parallel, tmp_path) -> None:
    """An artifact compiled for two threads: the manifest and header say so, and the C driver (several
    calls at once from its own threads too) gets the reference's bits."""
    graph = digits_graph("cnn", True, batch=3)
    folder = lowbit.compile(graph, num_threads=2).export(tmp_path / "artifact")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["num_threads"] == 2 and manifest["threads"] == 2
    assert "#define LOWBIT_MODEL_THREADS 2" in (folder / "model.h").read_text()
    driver = build_driver(shutil.which("cc"), folder, tmp_path / "driver")
    feeds = digits_feeds("cnn", batch=3)
    want = lowbit.run_reference(graph, feeds)
    for calls in (1, 3):
        got = run_driver([str(driver)], graph, feeds, tmp_path, folder / "weights.bin", threads=calls)
        for name, value in want.items():
            np.testing.assert_array_equal(got[name], value, err_msg=f"{name}, {calls} calling threads")


@pytest.mark.skipif(not (shutil.which("qemu-aarch64") and shutil.which("aarch64-linux-gnu-gcc")),
                    reason="needs qemu-aarch64 and aarch64-linux-gnu-gcc")
def test_aarch64_artifact_for_three_threads_under_qemu(always_parallel, tmp_path) -> None:
    """The team on AArch64 (its spin-wait hint, pthreads of a static program) gives the reference's bits."""
    graph = digits_graph("cnn", True, batch=3)
    folder = aot.export(graph, tmp_path / "artifact", target="aarch64-dotprod", emit="obj", num_threads=3)
    assert json.loads((folder / "manifest.json").read_text())["threads"] == 3
    driver = build_driver(shutil.which("aarch64-linux-gnu-gcc"), folder, tmp_path / "driver", static=True)
    feeds = digits_feeds("cnn", batch=3)
    got = run_driver([shutil.which("qemu-aarch64"), "-L", "/usr/aarch64-linux-gnu", str(driver)], graph, feeds,
                     tmp_path, folder / "weights.bin")
    for name, value in lowbit.run_reference(graph, feeds).items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
