"""Native spatial ops against the reference interpreter: max / average / global pooling and resize;
and the trained digits CNN end to end.

Max pooling and nearest resize are bit-exact for every dtype (int8 / uint8 included, as quantized
models need); averages and interpolation agree within rtol 1e-4 and 1e-5 of the result's magnitude
(f16 within its own precision).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.backends.native import Target
from lowbit.errors import ShapeError
from lowbit.ir import DType, Graph, TensorType
from lowbit.ir.ops.tensor import COORDINATE_MODES, NEAREST_MODES
from lowbit.kernels import llvm as ll
from lowbit.kernels.pool import PoolAxis, pool_kernel

DATA = Path(__file__).resolve().parents[2] / "data"
SIZES = [1, 2, 3, 5, 7, 8, 11, 16, 17, 23, 37]
MAX_DTYPES = [DType.f32, DType.i8, DType.u8, DType.f16, DType.i32, DType.f64]
FLOATS = [DType.f32, DType.f16, DType.f64]


def check(graph: Graph, feeds: dict, dtype: DType) -> None:
    got, want = lowbit.compile(graph).run(feeds), lowbit.run_reference(graph, feeds)
    for name in want:
        assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype, name
        if not dtype.is_float or name.startswith(("max", "nearest")):
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
            continue
        rtol = 2e-3 if dtype is DType.f16 else 1e-4
        magnitudes = np.abs(want[name].astype(np.float64))
        scale = max(float(magnitudes[np.isfinite(magnitudes)].max(initial=0.0)), 1.0)
        np.testing.assert_allclose(got[name].astype(np.float64), want[name].astype(np.float64), rtol=rtol,
                                   atol=rtol * 0.1 * scale, err_msg=name)


def sample(rng: np.random.Generator, shape, dtype: DType) -> np.ndarray:
    if dtype.is_float:
        return (rng.standard_normal(shape) * 3).astype(dtype.numpy)
    return rng.integers(int(dtype.min), int(dtype.max), shape, endpoint=True).astype(dtype.numpy)


pair = st.tuples(st.integers(1, 4), st.integers(1, 4)).map(list)


@settings(max_examples=100, deadline=None)
@given(n=st.sampled_from([1, 2]), c=st.sampled_from([1, 3]), h=st.sampled_from(SIZES), w=st.sampled_from(SIZES),
       kernel=pair, strides=st.tuples(st.integers(1, 3), st.integers(1, 3)).map(list),
       dilations=st.tuples(st.integers(1, 2), st.integers(1, 2)).map(list),
       pads=st.lists(st.integers(0, 2), min_size=4, max_size=4), ceil_mode=st.booleans(),
       dtype=st.sampled_from(MAX_DTYPES), seed=st.integers(0, 99))
def test_pooling(n, c, h, w, kernel, strides, dilations, pads, ceil_mode, dtype, seed):
    """Every attribute combination; float types also run both average divisors on the same input."""
    graph = Graph("pool")
    x = graph.add_input("x", TensorType((n, c, h, w), dtype))
    attrs = dict(kernel=kernel, strides=strides, dilations=dilations, pads=pads, ceil_mode=ceil_mode)
    try:
        outputs = [("max", graph.add("max_pool2d", x, **attrs))]
        if dtype.is_float:
            outputs += [(f"avg_{include}", graph.add("avg_pool2d", x, count_include_pad=include, **attrs))
                        for include in (False, True)]
    except ShapeError:
        assume(False)  # the window does not fit the padded input
    graph.set_outputs(outputs)
    feeds = {"x": sample(np.random.default_rng(seed), (n, c, h, w), dtype)}
    with np.errstate(invalid="ignore"):  # an average of a window wholly in the padding is 0 / 0
        check(graph, feeds, dtype)


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.sampled_from(SIZES), min_size=3, max_size=4).map(tuple), dtype=st.sampled_from(MAX_DTYPES),
       seed=st.integers(0, 99))
def test_global_pools(shape, dtype, seed):
    graph = Graph("global")
    x = graph.add_input("x", TensorType(shape, dtype))
    outputs = [("max", graph.add("global_max_pool", x))]
    if dtype.is_float:
        outputs.append(("avg", graph.add("global_avg_pool", x)))
    graph.set_outputs(outputs)
    check(graph, {"x": sample(np.random.default_rng(seed), shape, dtype)}, dtype)


def test_max_pool_keeps_nan_and_infinities():
    graph = Graph("nan")
    x = graph.add_input("x", TensorType((1, 1, 4, 40), DType.f32))
    graph.set_outputs([("max", graph.add("max_pool2d", x, kernel=[2, 2], strides=[2, 2]))])
    values = np.random.default_rng(0).standard_normal((1, 1, 4, 40)).astype(np.float32)
    values[0, 0, 1, 7] = values[0, 0, 2, 30] = np.nan
    values[0, 0, 0, 20], values[0, 0, 3, 3] = np.inf, -np.inf
    check(graph, {"x": values}, DType.f32)


@pytest.mark.skipif(not Target.host().has("avx2"), reason="reads x86 vector assembly")
def test_max_pool_interior_is_vectorised():
    target = Target.host()
    module = ll.new_module("pool", target)
    axes = (PoolAxis(56, 28, 3, 2, 1, 1, 1), PoolAxis(56, 28, 3, 2, 1, 1, 1))
    pool_kernel(module, "pool", target, DType.f32, 64, axes, "max").linkage = "external"
    assembly = ll.emit_assembly(module, target)
    assert "ymm" in assembly or "zmm" in assembly
    assert "call" not in assembly


@st.composite
def resize_cases(draw):
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 5, 8, 13]), min_size=rank, max_size=rank)))
    mode = draw(st.sampled_from(["nearest", "linear", "cubic"]))
    dtype = draw(st.sampled_from(FLOATS + ([DType.i8, DType.u8, DType.i32] if mode == "nearest" else [])))
    sizes, scales = [], []
    for length in shape:
        size = draw(st.sampled_from([length, 1, 2 * length, length + 3, max(length // 2, 1), 2 * length + 1]))
        # The scale usually is size / length; sometimes (Resize-11 scales input) it is not exactly that.
        scale = size / length if draw(st.booleans()) else draw(st.sampled_from([size / length, 2.0, 0.5, 1.5]))
        sizes.append(size)
        scales.append(float(np.float32(scale)))
    attrs = dict(sizes=sizes, scales=scales, mode=mode,
                 coordinate_transformation_mode=draw(st.sampled_from(COORDINATE_MODES)),
                 nearest_mode=draw(st.sampled_from(NEAREST_MODES)),
                 cubic_coeff_a=draw(st.sampled_from([-0.75, -0.5])), exclude_outside=draw(st.booleans()))
    return shape, dtype, attrs


@settings(max_examples=80, deadline=None)
@given(case=resize_cases(), seed=st.integers(0, 99))
def test_resize(case, seed):
    shape, dtype, attrs = case
    graph = Graph("resize")
    x = graph.add_input("x", TensorType(shape, dtype))
    graph.set_outputs([(attrs["mode"], graph.add("resize", x, **attrs))])
    check(graph, {"x": sample(np.random.default_rng(seed), shape, dtype)}, dtype)


def test_resize_upsamples_images():
    """The common image cases: 2x nearest (rows built once, then copied) and bilinear, on NCHW."""
    graph = Graph("upsample")
    x = graph.add_input("x", TensorType((1, 3, 19, 21), DType.f32))
    common = dict(sizes=[1, 3, 38, 42], scales=[1.0, 1.0, 2.0, 2.0])
    graph.set_outputs([("nearest", graph.add("resize", x, mode="nearest", nearest_mode="floor",
                                             coordinate_transformation_mode="asymmetric", **common)),
                       ("linear", graph.add("resize", x, mode="linear", **common)),
                       ("cubic", graph.add("resize", x, mode="cubic", **common))])
    check(graph, {"x": sample(np.random.default_rng(4), (1, 3, 19, 21), DType.f32)}, DType.f32)


def test_digits_cnn_end_to_end():
    """conv2d, relu, max_pool2d, reshape and linear of the trained digits CNN, on its test set."""
    data = np.load(DATA / "digits_test.npz")
    images, labels = data["x"][:200], data["y"][:200]
    graph = lowbit.import_onnx(DATA / "digits_cnn.onnx", batch_size=len(images))
    assert "max_pool2d" in graph.op_histogram()
    got = lowbit.compile(graph).run({"input": images})["logits"]
    want = lowbit.run_reference(graph, {"input": images})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert (got.argmax(axis=1) == want.argmax(axis=1)).all()
    assert (got.argmax(axis=1) == labels).mean() > 0.95
