"""Float16 and float64 products (linear, matmul, conv2d, conv_transpose2d, attention), which the native
backend computes with its float32 kernels (backends/native/lowerings/float_width.py), against the
reference interpreter.

float16: the reference also computes in float32 and rounds once, so results differ only where the two
float32 sums (in different orders) round to neighbouring float16 values: rtol 2·eps(float16).
float64: the native result has float32 precision: rtol 1e-4, atol 1e-5 of the largest magnitude.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.errors import UnsupportedOpError
from lowbit.ir import DType, Graph, TensorType

RNG = np.random.default_rng(23)
SIZES = st.sampled_from([1, 2, 3, 7, 13, 16, 17, 33])
WIDTHS = st.sampled_from([DType.f16, DType.f64])


def data(dtype: DType, *shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype.numpy)


def check(graph: Graph, feeds: dict[str, np.ndarray]) -> None:
    got, want = lowbit.compile(graph).run(feeds), lowbit.run_reference(graph, feeds)
    for name, expected in want.items():
        assert got[name].dtype == expected.dtype and got[name].shape == expected.shape, name
        finite = ~np.isnan(expected)
        np.testing.assert_array_equal(np.isnan(got[name]), ~finite, err_msg=name)
        scale = float(np.abs(expected[finite]).max(initial=1e-30))
        if expected.dtype == np.float16:
            rtol, atol = 2 * float(np.finfo(np.float16).eps), 2 * float(np.finfo(np.float16).eps) * scale
        else:
            rtol, atol = 1e-4, 1e-5 * scale
        np.testing.assert_allclose(got[name][finite], expected[finite], rtol=rtol, atol=atol, err_msg=name)


def operand(graph: Graph, feeds: dict, name: str, array: np.ndarray, constant: bool):
    if constant:
        return graph.add_constant(array, name)
    feeds[name] = array
    return graph.add_input(name, TensorType(array.shape, DType.from_numpy(array.dtype)))


@settings(max_examples=12, deadline=None)
@given(dtype=WIDTHS, rows=SIZES, n=SIZES, k=SIZES, constant=st.booleans(), bias=st.booleans(),
       activation=st.sampled_from([("none", ()), ("relu", ()), ("sigmoid", ())]))
def test_linear(dtype, rows, n, k, constant, bias, activation):
    graph, feeds = Graph("linear"), {}
    x = operand(graph, feeds, "x", data(dtype, 2, rows, k), False)
    w = operand(graph, feeds, "w", data(dtype, n, k), constant)
    b = operand(graph, feeds, "b", data(dtype, n), True) if bias else None
    r = operand(graph, feeds, "r", data(dtype, 2, rows, n), False)
    name, params = activation
    graph.set_outputs([("y", graph.add("linear", x, w, b, r, activation=name, activation_params=params))])
    check(graph, feeds)


@settings(max_examples=12, deadline=None)
@given(dtype=WIDTHS, m=SIZES, n=SIZES, k=SIZES, constant=st.booleans())
def test_matmul(dtype, m, n, k, constant):
    graph, feeds = Graph("matmul"), {}
    a = operand(graph, feeds, "a", data(dtype, 3, m, k), False)
    b = operand(graph, feeds, "b", data(dtype, k, n), constant)
    graph.set_outputs([("y", graph.add("matmul", a, b))])
    check(graph, feeds)


@settings(max_examples=10, deadline=None)
@given(dtype=WIDTHS, channels=st.sampled_from([1, 3, 8]), m=st.sampled_from([1, 5, 16]),
       size=st.sampled_from([1, 5, 9]), kernel=st.sampled_from([1, 3]), constant=st.booleans(),
       transpose=st.booleans())
def test_convolutions(dtype, channels, m, size, kernel, constant, transpose):
    graph, feeds = Graph("conv"), {}
    x = operand(graph, feeds, "x", data(dtype, 2, channels, size, size + 2), False)
    shape = (channels, m, kernel, kernel) if transpose else (m, channels, kernel, kernel)
    w = operand(graph, feeds, "w", data(dtype, *shape), constant)
    b = operand(graph, feeds, "b", data(dtype, m), True)
    attrs = dict(pads=(1, 0, 1, 1)) if kernel > 1 else {}
    graph.set_outputs([("y", graph.add("conv_transpose2d" if transpose else "conv2d", x, w, b, **attrs))])
    check(graph, feeds)


@pytest.mark.parametrize("dtype", [DType.f16, DType.f64], ids=str)
def test_attention_and_shared_constants(dtype):
    """A masked attention (-inf: fully masked rows give NaN); one constant feeding three products."""
    graph, feeds = Graph("attention"), {}
    q = operand(graph, feeds, "q", data(dtype, 2, 5, 8), False)
    k_t = operand(graph, feeds, "k", data(dtype, 2, 8, 7), True)
    v = operand(graph, feeds, "v", data(dtype, 2, 7, 8), False)
    mask = np.where(RNG.random((5, 7)) < 0.3, -np.inf, RNG.standard_normal((5, 7))).astype(dtype.numpy)
    mask[1] = -np.inf
    attended = graph.add("attention", q, k_t, v, operand(graph, feeds, "m", mask, False), scale=0.35)
    graph.set_outputs([("scores", graph.add("matmul", q, k_t)), ("o", attended),
                       ("o2", graph.add("matmul", attended, k_t))])
    check(graph, feeds)


def test_integer_products_are_refused():
    graph = Graph("integers")
    a = graph.add_input("a", TensorType((2, 3), DType.i32))
    graph.set_outputs([("y", graph.add("matmul", a, graph.add_constant(np.ones((3, 4), np.int32))))])
    with pytest.raises(UnsupportedOpError, match="matmul.*i32"):
        lowbit.compile(graph)
