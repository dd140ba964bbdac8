"""Native elementwise kernels against the reference interpreter.

Integer, bool and exactly rounded float ops (arithmetic, comparisons, sqrt, floor, clip, ...) must be
bit-identical. The polynomial f32 math (exp, log, tanh, erf and what is built from them) and libm calls
are checked within rtol 1e-5 / atol 1e-6 (f16: 1e-3, since the reference rounds intermediate
results to f16 and the kernels compute in f32), and their accuracy against float64 separately.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.errors import UnsupportedOpError
from lowbit.ir import DType, Graph, TensorType
from lowbit.kernels.elementwise import elementwise_kernel
from lowbit.kernels.llvm import emit_assembly, new_module, runs_here
from lowbit.backends.native import Target

RNG = np.random.default_rng(7)
SIGNED = [DType.i8, DType.i16, DType.i32, DType.i64, DType.i4]
UNSIGNED = [DType.u8, DType.u16, DType.u32, DType.u64, DType.u4]
FLOATS = [DType.f32, DType.f64, DType.f16]
ALL = FLOATS + SIGNED + UNSIGNED + [DType.bool]
SPECIALS = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 1.5, 2.5, -2.5, math.inf, -math.inf, math.nan, 1e-40, -1e-40,
            88.5, -88.5, 100.0, -100.0, 1e30, -1e30, 3.0, -3.0, 6.0]

# (op, attrs) of every float unary op; the exact ones are also bit-exact in f32 and f64
EXACT_UNARY = [("neg", {}), ("abs", {}), ("relu", {}), ("sign", {}), ("sqrt", {}), ("floor", {}), ("ceil", {}),
               ("round", {}), ("reciprocal", {}), ("hard_swish", {}), ("leaky_relu", {"alpha": 0.2}),
               ("hard_sigmoid", {"alpha": 1 / 6, "beta": 0.5}), ("clip", {"min": -1.5, "max": 2.5}),
               ("clip", {"max": 6.0})]
MATH_UNARY = [("exp", {}), ("log", {}), ("tanh", {}), ("erf", {}), ("sigmoid", {}), ("softplus", {}),
              ("elu", {"alpha": 0.7}), ("gelu", {}), ("gelu", {"approximate": "tanh"}), ("sin", {}), ("cos", {}),
              ("tan", {}), ("asin", {}), ("acos", {}), ("atan", {}), ("sinh", {}), ("cosh", {}), ("asinh", {}),
              ("acosh", {}), ("atanh", {})]


def run_both(graph: Graph, feeds: dict) -> tuple[dict, dict]:
    return lowbit.compile(graph).run(feeds), lowbit.run_reference(graph, feeds)


def single_input_graph(dtype: DType, shape, ops) -> Graph:
    """One input `x` and one output per (op, attrs) applied to it, named by position."""
    graph = Graph("ops")
    x = graph.add_input("x", TensorType(shape, dtype))
    graph.set_outputs([(f"{i}_{op}", graph.add(op, x, **attrs)) for i, (op, attrs) in enumerate(ops)])
    return graph


def float_values(count: int, dtype: DType) -> np.ndarray:
    values = np.concatenate([SPECIALS, RNG.standard_normal(count // 2) * 3,
                             RNG.uniform(-12, 12, count - count // 2 - len(SPECIALS))])
    with np.errstate(over="ignore"):  # 1e30 is inf in f16
        return values.astype(dtype.numpy)


def int_values(shape, dtype: DType) -> np.ndarray:
    if dtype is DType.bool:
        return RNG.integers(0, 2, shape).astype(bool)
    low, high = int(dtype.min), int(dtype.max)
    values = RNG.integers(low, high, shape, endpoint=True, dtype=np.int64 if dtype.is_signed else np.uint64)
    flat = values.reshape(-1)
    extremes = [low, high, 0, 1] + ([-1] if dtype.is_signed else [])
    flat[:len(extremes)] = extremes[:flat.size]
    return values.astype(dtype.numpy)


def assert_close(got: np.ndarray, want: np.ndarray, dtype: DType, exact: bool, name: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, name
    if exact:
        np.testing.assert_array_equal(got, want, err_msg=name)
    elif dtype is DType.f16:
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=1e-3,
                                   err_msg=name)
    elif dtype is DType.f64:
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=name)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_float_unary_ops(dtype):
    ops = EXACT_UNARY + MATH_UNARY
    x = float_values(203, dtype)  # not a multiple of any vector width: the scalar tail runs too
    got, want = run_both(single_input_graph(dtype, x.shape, ops), {"x": x})
    for i, (op, _) in enumerate(ops):
        name = f"{i}_{op}"
        assert_close(got[name], want[name], dtype, dtype is not DType.f16 and i < len(EXACT_UNARY), name)


# The f32 polynomials against float64 (not the reference, which is f32 numpy): max relative error
# where |f| > 1e-6, and a bound on the absolute error below that.
TRUTH = {
    "exp": (np.exp, (-103.0, 88.7), 2e-7),
    "log": (np.log, (1e-3, 1e4), 2e-7),
    "tanh": (np.tanh, (-10.0, 10.0), 4e-7),
    "erf": (np.vectorize(math.erf), (-5.0, 5.0), 3e-7),
    "sigmoid": (lambda x: 1 / (1 + np.exp(-x)), (-80.0, 80.0), 3e-7),
    "softplus": (lambda x: np.logaddexp(0, x), (-80.0, 80.0), 3e-7),
    "elu": (lambda x: np.where(x >= 0, x, np.expm1(x)), (-20.0, 5.0), 3e-7),
    "gelu": (lambda x: 0.5 * x * np.vectorize(math.erfc)(-x / math.sqrt(2)), (-8.0, 8.0), 4e-6),
}


def test_f32_math_accuracy():
    ops = [(op, {}) for op in TRUTH]
    x = np.concatenate([np.linspace(-1, 1, 4099), RNG.uniform(-110, 110, 1 << 14)]).astype(np.float32)
    got = lowbit.compile(single_input_graph(DType.f32, x.shape, ops)).run({"x": x})
    for i, (op, (truth, (low, high), bound)) in enumerate(TRUTH.items()):
        inside = (x >= low) & (x <= high)
        want = truth(x[inside].astype(np.float64))
        error = np.abs(got[f"{i}_{op}"][inside].astype(np.float64) - want)
        large = np.abs(want) > 1e-6
        assert np.max(error[large] / np.abs(want[large])) <= bound, op
        assert np.max(error[~large], initial=0) <= 1e-9, op
    # exp's edges: overflow to inf, underflow through the subnormals to 0, NaN kept
    edges = np.array([88.72, 88.73, 89.0, 1000.0, -87.0, -100.0, -103.9, -104.0, -200.0, -math.inf, math.inf,
                      math.nan], np.float32)
    got = lowbit.compile(single_input_graph(DType.f32, edges.shape, [("exp", {})])).run({"x": edges})["0_exp"]
    with np.errstate(over="ignore"):
        np.testing.assert_allclose(got, np.exp(edges.astype(np.float64)).astype(np.float32), rtol=1e-6,
                                   atol=2e-45)


BINARY = ["add", "sub", "mul", "div", "maximum", "minimum", "equal", "less", "greater", "less_equal",
          "greater_equal", "prelu"]
INT_BINARY = BINARY + ["bitwise_and", "bitwise_or", "bitwise_xor", "shift_left", "shift_right"]


def binary_graph(dtype: DType, ops, a_shape=(3, 1, 37), b_shape=(5, 1)) -> Graph:
    graph = Graph("binary")
    a = graph.add_input("a", TensorType(a_shape, dtype))
    b = graph.add_input("b", TensorType(b_shape, dtype))
    graph.set_outputs([(f"{i}_{op}", graph.add(op, a, b, **attrs)) for i, (op, attrs) in enumerate(ops)])
    return graph


@pytest.mark.parametrize("dtype", [DType.f32, DType.f64, DType.f16], ids=str)
def test_float_binary_ops(dtype):
    ops = [(op, {}) for op in BINARY] + [("mod", {"fmod": True}), ("mod", {"fmod": False}), ("pow", {})]
    a = float_values(3 * 37, dtype).reshape(3, 1, 37)
    b = np.concatenate([[0.0, -0.0, math.nan, 2.0, -3.0], RNG.standard_normal(0)]).astype(dtype.numpy).reshape(5, 1)
    got, want = run_both(binary_graph(dtype, ops), {"a": a, "b": b})
    for i, (op, _) in enumerate(ops):
        name = f"{i}_{op}"
        assert_close(got[name], want[name], dtype, dtype is not DType.f16 and op != "pow", name)


@pytest.mark.parametrize("dtype", SIGNED + UNSIGNED, ids=str)
def test_integer_ops_are_bit_exact(dtype):
    """Wrapping arithmetic, truncating division (x/0 = 0, MIN/−1 = MIN), both remainders, numpy's
    shifts by out-of-range amounts, and the unary integer ops."""
    ops = [(op, {}) for op in INT_BINARY] + [("mod", {"fmod": True}), ("mod", {"fmod": False})]
    a = int_values((3, 1, 37), dtype)
    small = [0, 1, 2, 3, 7, 8, 9, 70] + ([-1, -2, -7, -9] if dtype.is_signed else [250, 255])
    b = np.array(small[:6] + small[-4:], np.int64).astype(dtype.numpy)[:5].reshape(5, 1)
    b[4] = -1 if dtype.is_signed else np.iinfo(dtype.numpy).max
    got, want = run_both(binary_graph(dtype, ops), {"a": a, "b": b})
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    unary = [("neg", {}), ("abs", {}), ("relu", {}), ("sign", {}), ("bitwise_not", {}),
             ("clip", {"min": -2.5, "max": 100.7}), ("clip", {"min": 3.0})]
    x = int_values((67,), dtype)
    got, want = run_both(single_input_graph(dtype, x.shape, unary), {"x": x})
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_integer_pow_goes_through_f64():
    graph = binary_graph(DType.i32, [("pow", {})], (4, 6), (6,))
    a = np.arange(-11, 13, dtype=np.int32).reshape(4, 6)
    b = np.array([0, 1, 2, 3, 5, 7], np.int32)
    got, want = run_both(graph, {"a": a, "b": b})
    np.testing.assert_array_equal(got["0_pow"], want["0_pow"])


def test_bool_ops():
    ops = [(op, {}) for op in ("add", "mul", "maximum", "minimum", "equal", "less", "greater_equal",
                               "logical_and", "logical_or", "logical_xor")]
    a, b = int_values((3, 1, 37), DType.bool), int_values((5, 1), DType.bool)
    got, want = run_both(binary_graph(DType.bool, ops), {"a": a, "b": b})
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    graph = single_input_graph(DType.bool, (70,), [("logical_not", {})])
    x = int_values((70,), DType.bool)
    got, want = run_both(graph, {"x": x})
    np.testing.assert_array_equal(got["0_logical_not"], want["0_logical_not"])


def test_bool_arithmetic_without_meaning_is_rejected():
    graph = binary_graph(DType.bool, [("sub", {})])
    with pytest.raises(UnsupportedOpError, match="sub"):
        lowbit.compile(graph)


def cast_inputs(source: DType) -> tuple[np.ndarray, np.ndarray]:
    """(values for signed, float and bool targets; values for unsigned targets), in range of all targets."""
    if source.is_float:
        signed = np.concatenate([[0.0, -0.0, math.nan, 7.9, -7.9, 0.5, -0.5],
                                 RNG.uniform(-8, 8, 60)]).astype(source.numpy)
        return signed, np.abs(signed)
    values = int_values((67,), source)
    return values, values


@pytest.mark.parametrize("source", ALL, ids=str)
def test_cast(source):
    graph = Graph("cast")
    x = graph.add_input("x", TensorType((67,), source))
    u = graph.add_input("u", TensorType((67,), source))
    graph.set_outputs([(str(to), graph.add("cast", u if to in UNSIGNED else x, to=to)) for to in ALL])
    signed, unsigned = cast_inputs(source)
    got, want = run_both(graph, {"x": signed, "u": unsigned})
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{source} -> {name}")


@pytest.mark.parametrize("target", [name for name in ("host", "x86_64-avx2", "x86_64-avx512")
                                    if runs_here(Target.parse(name))])
def test_float64_to_float16_rounds_once(target):
    """float64 → float16 is correctly rounded (as numpy's) on every target, including those without a
    one-instruction conversion: every float16 value, every midpoint between neighbours and the doubles
    either side of it, the overflow threshold, NaN and infinities."""
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = np.sort(halves[np.isfinite(halves)].astype(np.float64))
    midpoints = (finite[1:] + finite[:-1]) / 2
    values = np.concatenate([finite, midpoints, np.nextafter(midpoints, np.inf), np.nextafter(midpoints, -np.inf),
                             [65520.0, np.nextafter(65520.0, 0), 1e300, -1e300, 1e-300, np.inf, -np.inf, np.nan]])
    graph = Graph("cast")
    graph.set_outputs([("y", graph.add("cast", graph.add_input("x", TensorType(values.shape, DType.f64)),
                                       to=DType.f16))])
    got = lowbit.compile(graph, target).run({"x": values})["y"]
    with np.errstate(over="ignore"):
        want = values.astype(np.float16)
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


SIZES = st.sampled_from([1, 2, 3, 5, 7, 8, 16, 17, 31, 33])


@st.composite
def broadcast_cases(draw):
    """An output shape (rank 0–5, ≤ 4096 elements) and three operand shapes that broadcast to it."""
    shape = []
    for _ in range(draw(st.integers(0, 5))):
        size = draw(SIZES)
        if int(np.prod(shape + [size])) <= 4096:
            shape.append(size)
    operands = []
    for _ in range(3):
        dropped = draw(st.integers(0, len(shape)))
        kept = [d if draw(st.booleans()) else 1 for d in shape[dropped:]]
        operands.append(tuple(kept))
    dtype = draw(st.sampled_from([DType.f32, DType.i32, DType.u8, DType.f64, DType.i64, DType.f16]))
    return tuple(shape), operands, dtype


@settings(max_examples=40, deadline=None)
@given(broadcast_cases())
def test_broadcasting(case):
    shape, (a_shape, b_shape, c_shape), dtype = case
    graph = Graph("broadcast")
    a = graph.add_input("a", TensorType(a_shape, dtype))
    b = graph.add_input("b", TensorType(b_shape, dtype))
    c = graph.add_input("c", TensorType(c_shape, DType.bool))
    graph.set_outputs([("sum", graph.add("add", a, b)), ("pick", graph.add("where", c, a, b)),
                       ("less", graph.add("less", a, b))])
    feeds = {name: RNG.standard_normal(shape).astype(dtype.numpy) if dtype.is_float else int_values(shape, dtype)
             for name, shape in (("a", a_shape), ("b", b_shape))}
    feeds["c"] = int_values(c_shape, DType.bool)
    got, want = run_both(graph, feeds)
    for name in want:
        assert got[name].shape == want[name].shape
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_empty_and_scalar_tensors():
    graph = Graph("edges")
    empty = graph.add_input("empty", TensorType((0, 5), DType.f32))
    row = graph.add_input("row", TensorType((5,), DType.f32))
    scalar = graph.add_input("scalar", TensorType((), DType.f32))
    graph.set_outputs([("e", graph.add("add", empty, row)), ("s", graph.add("mul", scalar, scalar)),
                       ("r", graph.add("sub", row, scalar))])
    feeds = {"empty": np.zeros((0, 5), np.float32), "row": RNG.standard_normal(5).astype(np.float32),
             "scalar": np.array(1.5, np.float32)}
    got, want = run_both(graph, feeds)
    for name in want:
        assert got[name].shape == want[name].shape
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_kernels_are_shared_and_math_is_vectorised():
    """Equal nodes share one kernel; the f32 exp loop is vector code without calls."""
    graph = Graph("shared")
    x = graph.add_input("x", TensorType((8, 100), DType.f32))
    graph.set_outputs([("a", graph.add("exp", x)), ("b", graph.add("exp", graph.add("neg", x)))])
    model = lowbit.compile(graph)
    assert len({call.function for call in model.program.calls}) == 2
    target = Target.host()
    module = new_module("exp", target)
    kernel = elementwise_kernel(module, "k", "gelu", {"approximate": "none"}, (1000,), [((1000,), DType.f32)],
                                DType.f32, target)
    kernel.linkage = ""  # keep it: nothing in this module calls it
    assembly = emit_assembly(module, target)
    assert "call" not in assembly
    assert ("zmm" if target.vector_bytes == 64 else "ymm" if target.vector_bytes == 32 else "v") in assembly
