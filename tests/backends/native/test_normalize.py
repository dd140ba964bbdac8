"""Native softmax, log-softmax, layer / instance / batch norm and LRN against the reference interpreter
(float: rtol 1e-4 and 1e-5 of the result's magnitude; f16 within its own precision; bit for bit in
test_float_islands.py), the vectorised exp against numpy's and log against float64."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llvmlite import ir

import lowbit
from lowbit.backends.native import Target
from lowbit.errors import UnsupportedOpError
from lowbit.ir import DType, Graph, TensorType
from lowbit.kernels import llvm as ll
from lowbit.kernels.normalize import softmax_kernel, vector_exp, vector_log
from lowbit.kernels.reduce import kernel_function

SIZES = [1, 2, 3, 5, 7, 8, 13, 16, 17, 31, 33]
FLOATS = [DType.f32, DType.f16, DType.f64]


def assert_close(got: np.ndarray, want: np.ndarray, dtype: DType, name: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, name
    rtol = 2e-3 if dtype is DType.f16 else 1e-4
    magnitudes = np.abs(want.astype(np.float64))
    scale = max(float(magnitudes[np.isfinite(magnitudes)].max(initial=0.0)), 1.0)
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=rtol, atol=rtol * 0.1 * scale,
                               err_msg=name)


def check(graph: Graph, feeds: dict, dtype: DType) -> None:
    got, want = lowbit.compile(graph).run(feeds), lowbit.run_reference(graph, feeds)
    for name in want:
        assert_close(got[name], want[name], dtype, name)


shapes = st.lists(st.sampled_from(SIZES), min_size=1, max_size=4).map(tuple)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, data=st.data(), dtype=st.sampled_from(FLOATS), spread=st.sampled_from([1.0, 30.0]),
       seed=st.integers(0, 99))
def test_softmax_and_log_softmax(shape, data, dtype, spread, seed):
    """Wide spreads check the max subtraction (exp would overflow without it); -inf entries vanish."""
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    graph = Graph("softmax")
    x = graph.add_input("x", TensorType(shape, dtype))
    graph.set_outputs([(op, graph.add(op, x, axis=axis)) for op in ("softmax", "log_softmax")])
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal(shape) * spread).astype(dtype.numpy)
    if values.size > 1 and data.draw(st.booleans(), label="masked"):
        values.reshape(-1)[rng.integers(0, values.size)] = -np.inf
    check(graph, {"x": values}, dtype)


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.sampled_from(SIZES), min_size=2, max_size=4).map(tuple), data=st.data(),
       dtype=st.sampled_from(FLOATS), constant=st.booleans(), bias=st.booleans(), seed=st.integers(0, 99))
def test_layer_norm(shape, data, dtype, constant, bias, seed):
    """Parameters of the normalised shape or of its trailing dims (broadcast), run-time or constant."""
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    normalized = shape[axis % len(shape):]
    trailing = data.draw(st.integers(1, len(normalized)), label="param rank")
    param_shape = normalized[len(normalized) - trailing:]
    rng = np.random.default_rng(seed)
    graph = Graph("layer_norm")
    feeds = {"x": (rng.standard_normal(shape) * 3 + 2).astype(dtype.numpy)}
    operands = [graph.add_input("x", TensorType(shape, dtype))]
    for name in ("scale", "bias")[:1 + bias]:
        value = rng.standard_normal(param_shape).astype(dtype.numpy)
        if constant:
            operands.append(graph.add_constant(value, name))
        else:
            operands.append(graph.add_input(name, TensorType(param_shape, dtype)))
            feeds[name] = value
    graph.set_outputs([("y", graph.add("layer_norm", *operands, axis=axis, epsilon=1e-3))])
    check(graph, feeds, dtype)


channel_shapes = st.tuples(st.sampled_from([1, 2, 3]), st.sampled_from(SIZES),
                           st.lists(st.sampled_from(SIZES), min_size=0, max_size=2)).map(lambda t: (t[0], t[1], *t[2]))


@settings(max_examples=30, deadline=None)
@given(shape=channel_shapes, dtype=st.sampled_from(FLOATS), constant=st.booleans(), seed=st.integers(0, 99),
       window=st.integers(1, 6), beta=st.sampled_from([0.75, 0.5, 1.3]))
def test_batch_norm_instance_norm_lrn(shape, dtype, constant, seed, window, beta):
    """batch_norm on [N, C, ...] including [N, C]; instance_norm and lrn need a spatial axis."""
    rng = np.random.default_rng(seed)
    channels = shape[1]
    graph = Graph("norms")
    feeds = {"x": (rng.standard_normal(shape) * 2 + 1).astype(dtype.numpy)}
    x = graph.add_input("x", TensorType(shape, dtype))

    def param(name: str, positive: bool = False):
        value = rng.standard_normal(channels).astype(dtype.numpy)
        value = np.abs(value) + np.asarray(0.1, dtype.numpy) if positive else value
        if constant:
            return graph.add_constant(value, name)
        feeds[name] = value
        return graph.add_input(name, TensorType((channels,), dtype))

    scale, bias, mean, var = param("scale"), param("bias"), param("mean"), param("var", positive=True)
    outputs = [("batch", graph.add("batch_norm", x, scale, bias, mean, var, epsilon=1e-3))]
    if len(shape) >= 3:
        outputs += [("instance", graph.add("instance_norm", x, scale, bias)),
                    ("lrn", graph.add("lrn", x, size=window, alpha=0.05, beta=beta, bias=1.5))]
    graph.set_outputs(outputs)
    check(graph, feeds, dtype)


def test_layer_norm_parameters_broadcast_inside_the_row():
    """A [5, 1] scale over a [5, 7] row: broadcast at compile time when constant; at run time unsupported."""
    graph = Graph("inner_broadcast")
    x = graph.add_input("x", TensorType((3, 5, 7), DType.f32))
    scale = np.random.default_rng(4).standard_normal((5, 1)).astype(np.float32)
    graph.set_outputs([("y", graph.add("layer_norm", x, graph.add_constant(scale, "scale"), axis=1))])
    check(graph, {"x": np.random.default_rng(5).standard_normal((3, 5, 7)).astype(np.float32)}, DType.f32)

    runtime = Graph("runtime_broadcast")
    x = runtime.add_input("x", TensorType((3, 5, 7), DType.f32))
    scale_input = runtime.add_input("scale", TensorType((5, 1), DType.f32))
    runtime.set_outputs([("y", runtime.add("layer_norm", x, scale_input, axis=1))])
    with pytest.raises(UnsupportedOpError, match="repeat along the normalised shape"):
        lowbit.compile(runtime)


def test_row_longer_than_the_unrolled_blocks():
    graph = Graph("long")
    x = graph.add_input("x", TensorType((3, 2053), DType.f32))
    scale = graph.add_constant(np.linspace(0.5, 1.5, 2053, dtype=np.float32), "scale")
    graph.set_outputs([("softmax", graph.add("softmax", x)), ("log_softmax", graph.add("log_softmax", x)),
                       ("layer_norm", graph.add("layer_norm", x, scale))])
    check(graph, {"x": np.random.default_rng(3).standard_normal((3, 2053)).astype(np.float32) * 10}, DType.f32)


def _vector_function(function, count: int):
    """A jitted kernel applying `function` to `count` f32 values (16 at a time)."""
    target = Target.host()
    module = ll.new_module("math", target)
    kernel, builder, (x, y) = kernel_function(module, "apply", [ll.F32, ll.F32])
    kernel.linkage = "external"

    def step(b: ir.IRBuilder, index: ir.Value, carried: list) -> list:
        start = b.mul(index, ir.Constant(ll.I64, 16))
        ll.store_vector(b, function(b, ll.load_vector(b, x, start, 16)), y, start)
        return carried

    ll.static_loop(builder, count // 16, "i", step)
    builder.ret_void()
    jit = ll.JitModule(module, target, target)
    call = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)(jit.address("apply"))

    def apply(values: np.ndarray) -> np.ndarray:
        values = np.ascontiguousarray(values, np.float32)
        result = np.empty_like(values)
        call(values.ctypes.data, result.ctypes.data)
        return result

    apply.jit = jit  # keeps the code mapped
    return apply


# numpy runs its own SIMD float32 exp where the CPU has AVX2 + FMA or AVX-512F, else libm's expf
NUMPY_SIMD_EXP = Target.host().has("avx2") and Target.host().has("fma")


def test_vector_exp_is_numpy_exp():
    """Bit-identical to np.exp on float32 (what the reference's softmax runs) over the whole range where exp
    is neither 0 nor inf — subnormal results included — and beyond; within 3 ulp where numpy calls libm."""
    rng = np.random.default_rng(0)
    values = np.concatenate([np.linspace(-104, 89, 1 << 18), rng.uniform(-110, 110, 1 << 16),
                             np.linspace(-1e-6, 1e-6, 1 << 10)]).astype(np.float32)
    values = values[:values.size // 16 * 16]
    with np.errstate(over="ignore"):
        got, want = _vector_function(vector_exp, values.size)(values), np.exp(values)
    if NUMPY_SIMD_EXP:
        np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
    else:
        finite = np.isfinite(want) & (want > 1e-37)
        ulps = np.abs(got - want)[finite] / np.spacing(want[finite])
        assert ulps.max() <= 3


@pytest.mark.parametrize("name, function, reference, values", [
    ("log", vector_log, np.log, np.geomspace(1e-37, 1e37, 1 << 16)),
])
def test_vector_math_accuracy(name, function, reference, values):
    apply = _vector_function(function, values.size)
    values = values.astype(np.float32)
    got, want = apply(values), reference(values.astype(np.float64))
    ulps = np.abs(got - want) / np.spacing(np.abs(want).astype(np.float32))
    assert ulps.max() <= 2, f"{name}: {ulps.max()} ulp"


def test_vector_math_special_values():
    specials = np.array([0, -0.0, np.inf, -np.inf, np.nan, 1, -1, 2, -100, 100, -87.5, 0.5, 3, 1e-3, 7, 8],
                        np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        np.testing.assert_allclose(_vector_function(vector_log, 16)(specials), np.log(specials), rtol=1e-6)
        exp = _vector_function(vector_exp, 16)(specials)
        assert np.isnan(exp[4]) and exp[2] == np.inf and exp[9] == np.inf
        assert exp[3] == 0 and 0 < exp[8] < 1.2e-38  # exp(-100) is subnormal, as in numpy
        np.testing.assert_allclose(exp[[0, 1, 5, 6, 7, 11, 12]], np.exp(specials[[0, 1, 5, 6, 7, 11, 12]]),
                                   rtol=3e-7)


@pytest.mark.skipif(not Target.host().has("avx2"), reason="reads x86 vector assembly")
def test_softmax_exp_is_vectorised_without_calls():
    target = Target.host()
    module = ll.new_module("softmax", target)
    softmax_kernel(module, "softmax", target, DType.f32, 4, 1000, 1, False).linkage = "external"
    assembly = ll.emit_assembly(module, target)
    assert "call" not in assembly
    assert "vfmadd" in assembly and ("zmm" in assembly or "ymm" in assembly)
