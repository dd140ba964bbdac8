"""Native reductions (reduce_*, argmax, argmin) against the reference interpreter.

Integer results and argmax / argmin are bit-exact; float sums and means agree within rtol 1e-4 and
an absolute 1e-5 of the sum of magnitudes (the kernels add in a different order than numpy's pairwise
sum); f16 within its own precision. Every example compiles one graph holding all the reductions of
one input, so a compile serves several kernels.
"""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.ir import DType, Graph, TensorType

SIZES = [1, 2, 3, 5, 7, 8, 13, 16, 17, 31, 33]
REDUCTIONS = ["reduce_sum", "reduce_mean", "reduce_max", "reduce_min", "reduce_prod"]
DTYPES = [DType.f32, DType.f16, DType.f64, DType.i32, DType.i8, DType.u8, DType.i64]


def compare(got: np.ndarray, want: np.ndarray, dtype: DType, magnitude: np.ndarray | float, name: str) -> None:
    """Exact for integers; floats within rtol 1e-4 (f16: 2e-3) and that times 0.1 of `magnitude`."""
    assert got.shape == want.shape and got.dtype == want.dtype, name
    if not dtype.is_float:
        np.testing.assert_array_equal(got, want, err_msg=name)
        return
    rtol = 2e-3 if dtype is DType.f16 else 1e-4
    atol = rtol * 0.1 * np.asarray(magnitude, np.float64)
    with np.errstate(invalid="ignore"):  # inf - inf where both overflowed alike
        error = np.abs(got.astype(np.float64) - want.astype(np.float64))
        close = (error <= atol + rtol * np.abs(want.astype(np.float64))) | (got == want)
    ok = np.where(np.isnan(want), np.isnan(got), close)
    assert ok.all(), f"{name}: {got[~ok][:5]} vs {want[~ok][:5]}"


def sample(rng: np.random.Generator, shape, dtype: DType, near_one: bool = False) -> np.ndarray:
    if dtype.is_float:
        values = rng.uniform(0.5, 1.5, shape) if near_one else rng.standard_normal(shape) * 4
        return values.astype(dtype.numpy)
    low, high = (-3, 4) if near_one else (int(dtype.min), int(dtype.max))  # small ranges make ties
    return rng.integers(max(low, int(dtype.min)), high, shape, endpoint=True).astype(dtype.numpy)


shapes = st.lists(st.sampled_from(SIZES), min_size=1, max_size=4).map(tuple)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, data=st.data(), dtype=st.sampled_from(DTYPES), keepdims=st.booleans(), seed=st.integers(0, 99))
def test_reductions_match_reference(shape, data, dtype, keepdims, seed):
    axes = data.draw(st.lists(st.integers(0, len(shape) - 1), unique=True).map(sorted), label="axes")
    graph = Graph("reduce")
    x = graph.add_input("x", TensorType(shape, dtype))
    ops = REDUCTIONS if dtype.is_float else REDUCTIONS[:-1]
    graph.set_outputs([(op, graph.add(op, x, axes=axes, keepdims=keepdims)) for op in ops] +
                      [("prod_near_one", graph.add("reduce_prod", x, axes=axes, keepdims=keepdims))])
    rng = np.random.default_rng(seed)
    feeds = {"x": sample(rng, shape, dtype, near_one=data.draw(st.booleans(), label="near_one"))}
    got, want = lowbit.compile(graph).run(feeds), lowbit.run_reference(graph, feeds)
    magnitude = np.abs(feeds["x"].astype(np.float64)).sum(axis=tuple(axes), keepdims=keepdims) if dtype.is_float else 0
    for name in want:
        scale = np.maximum(magnitude, 1) if name != "prod_near_one" else np.abs(want[name]).astype(np.float64) + 1e-30
        compare(got[name], want[name], dtype, scale, f"{name} {dtype}{list(shape)} axes={axes}")


def test_float_max_and_min_propagate_nan():
    graph = Graph("nan")
    x = graph.add_input("x", TensorType((3, 37), DType.f32))
    graph.set_outputs([(f"{op}_{axis}", graph.add(op, x, axes=[axis], keepdims=False))
                       for op in ("reduce_max", "reduce_min") for axis in (0, 1)])
    values = np.random.default_rng(1).standard_normal((3, 37)).astype(np.float32)
    values[1, 20] = np.nan
    got = lowbit.compile(graph).run({"x": values})
    want = lowbit.run_reference(graph, {"x": values})
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, data=st.data(), dtype=st.sampled_from(DTYPES), keepdims=st.booleans(), seed=st.integers(0, 99))
def test_argmax_argmin_are_exact(shape, data, dtype, keepdims, seed):
    """Ties (small integer ranges) go to the first index, or the last with select_last_index; NaN wins."""
    axis = data.draw(st.integers(0, len(shape) - 1), label="axis")
    graph = Graph("arg")
    x = graph.add_input("x", TensorType(shape, dtype))
    graph.set_outputs([(f"{op}_{last}", graph.add(op, x, axis=axis, keepdims=keepdims, select_last_index=last))
                       for op in ("argmax", "argmin") for last in (False, True)])
    rng = np.random.default_rng(seed)
    values = sample(rng, shape, dtype, near_one=data.draw(st.booleans(), label="ties"))
    if dtype.is_float and data.draw(st.booleans(), label="nan"):
        values.reshape(-1)[rng.integers(0, values.size, 2)] = np.nan
    got, want = lowbit.compile(graph).run({"x": values}), lowbit.run_reference(graph, {"x": values})
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name} {dtype}{list(shape)} axis={axis}")


def test_long_rows_and_columns():
    """Lengths beyond the unrolled vector blocks in both layouts (rows reduced, columns reduced)."""
    graph = Graph("long")
    x = graph.add_input("x", TensorType((3, 1031, 67), DType.f32))
    graph.set_outputs([("sum_last", graph.add("reduce_sum", x, axes=[2])),
                       ("mean_middle", graph.add("reduce_mean", x, axes=[1], keepdims=False)),
                       ("max_all", graph.add("reduce_max", x, axes=[0, 1, 2])),
                       ("argmax_middle", graph.add("argmax", x, axis=1)),
                       ("argmin_last", graph.add("argmin", x, axis=2, keepdims=False))])
    values = np.random.default_rng(2).standard_normal((3, 1031, 67)).astype(np.float32)
    got, want = lowbit.compile(graph).run({"x": values}), lowbit.run_reference(graph, {"x": values})
    for name in want:
        compare(got[name], want[name], DType.f32 if "arg" not in name else DType.i64, 70.0 * 1031, name)


def test_bool_max_min_and_argmax():
    graph = Graph("bool")
    x = graph.add_input("x", TensorType((4, 19), DType.bool))
    graph.set_outputs([("any", graph.add("reduce_max", x, axes=[1])), ("all", graph.add("reduce_min", x, axes=[0])),
                       ("first_true", graph.add("argmax", x, axis=1)),
                       ("last_false", graph.add("argmin", x, axis=0, select_last_index=True))])
    values = np.random.default_rng(5).integers(0, 2, (4, 19)).astype(bool)
    values[0] = False
    got, want = lowbit.compile(graph).run({"x": values}), lowbit.run_reference(graph, {"x": values})
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
