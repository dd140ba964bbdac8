"""Native integer ops against the reference interpreter: bit-exact on random shapes (1, primes, sizes that
are not multiples of the vector widths, deep K), dtypes, zero points, scales, per-tensor and per-channel
parameters; every int8 route this machine runs (host VNNI, AVX-VNNI, AVX2) and the wide route; the
assembly of the routes it cannot run; and the quantized digits models and BERT end to end."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.backends.native import Target
from lowbit.backends.native.compiler import Program
from lowbit.backends.reference import run_reference
from lowbit.errors import UnsupportedOpError
from lowbit.ir import DType, Graph, TensorType
from lowbit.ir.ops.quantized import fixed_point_attrs
from lowbit.ir.types import QuantParams
from lowbit.kernels.llvm import emit_assembly, runs_here

DATA = Path(__file__).resolve().parents[2] / "data"
SIZES = st.one_of(st.integers(1, 40), st.sampled_from([1, 2, 3, 7, 13, 17, 31, 61, 67, 97]))
ACTIVATIONS = [DType.u8, DType.i8, DType.u16, DType.i16]


# the targets whose routes this machine runs: the host's own, x86 feature subsets of it, and a target
# without vector features, whose only route is the widening one (as on AArch64 without dotprod)
PLAIN = Target("plain", Target.host().triple, "generic", frozenset(), 16, "")
TARGETS = [name for name in ("host", "x86_64-avxvnni", "x86_64-avx512", "x86_64-avx2")
           if runs_here(Target.parse(name))] + [PLAIN]


def check(graph: Graph, feeds: dict, target: str | Target = "host") -> dict:
    """Run `graph` natively and in the reference; every output bit-identical."""
    got = lowbit.compile(graph, target=target).run(feeds)
    want = lowbit.run_reference(graph, feeds)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    return got


# -- building blocks -------------------------------------------------------------------------------------
def params(dtype: DType, scale, zero_point, axis: int | None = None, bits: int | None = None) -> QuantParams:
    scales = tuple(float(np.float32(s)) for s in np.atleast_1d(scale))
    zero_points = tuple(int(z) for z in np.broadcast_to(np.atleast_1d(zero_point), (len(scales),)))
    return QuantParams(scales, zero_points, axis, None, bits or dtype.bits, dtype.is_signed)


def integers(rng: np.random.Generator, shape, dtype: DType, low: int | None = None,
             high: int | None = None) -> np.ndarray:
    low = int(dtype.min) if low is None else low
    high = int(dtype.max) if high is None else high
    values = rng.integers(low, high, size=shape, endpoint=True)
    flat = values.reshape(-1)
    flat[:2] = [low, high][:flat.size]  # the extremes, where wrapping or saturation would show
    return values.astype(dtype.numpy)


def zero_point(rng: np.random.Generator, dtype: DType, bits: int | None = None) -> int:
    bits = bits or dtype.bits
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if dtype.is_signed else (0, (1 << bits) - 1)
    return int(rng.choice([low, high, (low + high) // 2, rng.integers(low, high + 1)]))


def requantizing(graph: Graph, op: str, inputs: list, constants: list, rng: np.random.Generator,
                 dtype: DType = DType.i8, **attrs):
    """Add `op` with a random result scale and zero point and its fixed-point attributes."""
    result = dict(dtype=dtype, scale=float(np.float32(rng.uniform(0.01, 0.3))), zero_point=zero_point(rng, dtype),
                  **attrs)
    types = [v.type if v is not None else None for v in inputs]
    fixed = fixed_point_attrs(op, types, result, constants)
    return graph.add_node(op, inputs, {**result, **fixed}).output


# -- element-wise ops --------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(size=SIZES, dtype=st.sampled_from(ACTIVATIONS),
       scale=st.one_of(st.floats(1e-4, 10.0), st.sampled_from([1 / 3, 2.0 ** -130, 1e30, 0.1])),
       target=st.sampled_from(TARGETS), seed=st.integers(0, 2**32 - 1))
def test_per_tensor_quantize_by_inverse(size, dtype, scale, target, seed) -> None:
    """Float32 quantize with one scale multiplies by its inverse (dividing only near rounding boundaries)
    and clamps in float32: the reference's values at halves and their neighbours, NaN, ±inf, subnormals,
    huge values, every zero point extreme, tiny and huge scales."""
    rng = np.random.default_rng(seed)
    scale32 = np.float32(scale)
    zp = zero_point(rng, dtype)
    graph = Graph("quantize")
    x = graph.add_input("x", TensorType((size + 16,), DType.f32))
    node = graph.add_node("quantize", [x], dict(dtype=dtype, scale=(float(scale32),), zero_point=(zp,), axis=None,
                                                group_size=None, bits=None))
    graph.set_outputs([("y", node.output)])
    with np.errstate(over="ignore"):
        values = (rng.standard_normal(size) * scale32 * rng.choice([1, 100, 1e4, 1e8], size)).astype(np.float32)
        halves = ((rng.integers(-300, 300, size) + 0.5) * scale32).astype(np.float32)
    values = np.where(rng.random(size) < 0.5, values, np.nextafter(halves, rng.choice([-np.inf, np.inf], size)))
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 3e38, -3e38, 1e-45, -1e-45, scale32 * 2**24,
                        -scale32 * 2**24, scale32 * 0.5, -scale32 * 0.5, scale32 * 1.5, 1.0, -1.0], np.float32)
    check(graph, {"x": np.concatenate([special, values]).astype(np.float32)}, target)



@st.composite
def elementwise_cases(draw) -> dict:
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(SIZES, min_size=rank, max_size=rank)))
    return dict(shape=shape, dtype=draw(st.sampled_from(ACTIVATIONS)), axis=draw(st.integers(0, rank - 1)),
                seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=10, deadline=None)
@given(elementwise_cases())
def test_elementwise_ops(case: dict) -> None:
    """quantize / dequantize per tensor and per channel, requantize (also of int32 sums), qadd and qmul
    with broadcasting, qconcat."""
    rng = np.random.default_rng(case["seed"])
    shape, dtype, axis = case["shape"], case["dtype"], case["axis"]
    graph = Graph("elementwise")
    x = graph.add_input("x", TensorType(shape, DType.f32))
    channels = shape[axis]
    per_tensor = graph.add("quantize", x, dtype=dtype, scale=(float(rng.uniform(0.005, 0.1)),),
                           zero_point=(zero_point(rng, dtype),))
    per_channel = graph.add("quantize", x, dtype=DType.i8, axis=axis, scale=tuple(rng.uniform(0.005, 0.1, channels)),
                            zero_point=tuple(zero_point(rng, DType.i8) for _ in range(channels)))
    wide = graph.add_input("wide", TensorType(shape, DType.i32, params(DType.i32, 1e-4, int(rng.integers(-99, 99)))))
    row = graph.add_input("row", TensorType(shape[-1:], DType.u8, params(DType.u8, 0.03, 7)))
    outputs = {"per_tensor": per_tensor, "per_channel": per_channel,
               "dequantized": graph.add("dequantize", per_tensor),
               "dequantized_channels": graph.add("dequantize", per_channel),
               "requantized": requantizing(graph, "requantize", [per_channel], [None], rng, DType.u8),
               "relu": requantizing(graph, "requantize", [per_tensor], [None], rng, DType.i16, qmin=0),
               "narrowed": requantizing(graph, "requantize", [wide], [None], rng),
               "sum": requantizing(graph, "qadd", [per_tensor, row], [None, None], rng, DType.u8),
               "product": requantizing(graph, "qmul", [row, per_tensor], [None, None], rng)}
    outputs["joined"] = requantizing(graph, "qconcat", [per_tensor, outputs["sum"], per_tensor], [None] * 3, rng,
                                     DType.u8, axis=axis)
    graph.set_outputs(list(outputs.items()))
    x_values = (rng.standard_normal(shape) * 4).astype(np.float32)
    x_values.reshape(-1)[:4] = [np.nan, np.inf, -np.inf, 0.5][:x_values.size]
    check(graph, {"x": x_values, "wide": integers(rng, shape, DType.i32, -2**31, 2**31 - 1),
                  "row": integers(rng, shape[-1:], DType.u8)})


# -- pooling ------------------------------------------------------------------------------------------------
@st.composite
def pool_cases(draw) -> dict:
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    return dict(shape=(draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(SIZES), draw(SIZES)), kernel=kernel,
                strides=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                pads=tuple(draw(st.integers(0, k - 1)) for k in kernel * 2),
                dilations=(draw(st.integers(1, 2)), draw(st.integers(1, 2))), ceil_mode=draw(st.booleans()),
                include_pad=draw(st.booleans()), dtype=draw(st.sampled_from(ACTIVATIONS)),
                per_channel=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=10, deadline=None)
@given(pool_cases())
def test_pools(case: dict) -> None:
    rng = np.random.default_rng(case["seed"])
    shape, dtype = case["shape"], case["dtype"]
    kernel, dilations, pads = case["kernel"], case["dilations"], case["pads"]
    if any(shape[2 + a] + pads[a] + pads[a + 2] < dilations[a] * (kernel[a] - 1) + 1 for a in range(2)):
        shape = shape[:2] + tuple(max(s, d * (k - 1) + 1) for s, d, k in zip(shape[2:], dilations, kernel))
    channels = shape[1]
    quant = params(dtype, rng.uniform(0.01, 0.1, channels), [zero_point(rng, dtype) for _ in range(channels)], 1) \
        if case["per_channel"] else params(dtype, 0.05, zero_point(rng, dtype))
    graph = Graph("pools")
    x = graph.add_input("x", TensorType(shape, dtype, quant))
    window = dict(kernel=kernel, strides=case["strides"], pads=pads, dilations=dilations, ceil_mode=case["ceil_mode"])
    graph.set_outputs([("max", graph.add("qmax_pool2d", x, **window)),
                       ("average", graph.add("qavg_pool2d", x, count_include_pad=case["include_pad"], **window)),
                       ("global", graph.add("qglobal_avg_pool", x))])
    check(graph, {"x": integers(rng, shape, dtype)})


# -- products ---------------------------------------------------------------------------------------------
def weight_data(rng: np.random.Generator, shape, kind: str) -> tuple[np.ndarray, QuantParams]:
    """Constant weights of `kind`: symmetric int8 per channel, 7-bit, per-tensor, asymmetric per channel
    (zero points that leave centred values outside int8), or u8."""
    channels = shape[0]
    scales = rng.uniform(0.001, 0.02, channels)
    if kind == "7bit":
        return integers(rng, shape, DType.i8, -64, 63), params(DType.i8, scales, 0, 0, bits=7)
    if kind == "tensor":
        return integers(rng, shape, DType.i8, -127, 127), params(DType.i8, 0.01, 0)
    if kind == "asymmetric":
        zero_points = rng.integers(-20, 20, channels)
        return integers(rng, shape, DType.i8), params(DType.i8, scales, zero_points, 0)
    if kind == "u8":
        return integers(rng, shape, DType.u8), params(DType.u8, scales, 128, 0)
    return integers(rng, shape, DType.i8, -127, 127), params(DType.i8, scales, 0, 0)


def dynamic_linear_graph(rng: np.random.Generator, rows: tuple[int, ...], k: int, n: int, weights: str,
                         bias: bool) -> tuple[Graph, np.ndarray, QuantParams]:
    """dynamic_linear of x [*rows, k] (float32, quantized at run time) by constant weights of kind `weights`
    [n, k], with a float32 bias when `bias`; also the weights and their parameters."""
    graph = Graph("dynamic")
    x = graph.add_input("x", TensorType(rows + (k,), DType.f32))
    data, quant = weight_data(rng, (n, k), weights)
    inputs = [x, graph.add_constant(data, "w", TensorType(data.shape, DType.i8, quant))]
    if bias:
        inputs.append(graph.add_constant(rng.standard_normal(n).astype(np.float32), "b"))
    graph.set_outputs([("y", graph.add_node("dynamic_linear", inputs).output)])
    return graph, data, quant


WEIGHTS = st.sampled_from(["channel", "channel", "7bit", "tensor", "asymmetric", "u8"])


def product_graph(op: str, rng: np.random.Generator, x_type: TensorType, w_shape, w_kind: str, bias: bool,
                  residual_shape, out_dtype: DType, clamp: bool, **attrs) -> tuple[Graph, dict]:
    """A graph of one qlinear / qconv2d with random parameters, and random feeds."""
    graph = Graph(op)
    x = graph.add_input("x", x_type)
    data, quant = weight_data(rng, w_shape, w_kind)
    w = graph.add_constant(data, "w", TensorType(data.shape, DType.from_numpy(data.dtype), quant))
    inputs, constants = [x, w], [None, data]
    if bias:
        scales = np.float32(x_type.quant.scale[0]) * np.broadcast_to(np.float32(quant.scale), (w_shape[0],))
        values = rng.integers(-20000, 20000, w_shape[0]).astype(np.int32)
        inputs.append(graph.add_constant(values, "b", TensorType(values.shape, DType.i32, QuantParams(
            tuple(float(s) for s in scales), (0,) * w_shape[0], 0, None, 32, True))))
        constants.append(values)
    feeds = {"x": integers(rng, x_type.shape, x_type.dtype, x_type.quant.qmin, x_type.quant.qmax)}
    if residual_shape is not None:
        r_dtype = DType.u8 if rng.integers(2) else DType.i16
        inputs += [None] * (3 - len(inputs)) + [graph.add_input("r", TensorType(residual_shape, r_dtype, params(
            r_dtype, 0.04, zero_point(rng, r_dtype))))]
        constants += [None] * (4 - len(constants))
        feeds["r"] = integers(rng, residual_shape, r_dtype)
    if clamp:  # a fused relu: qmin at the result's zero point
        attrs["qmin"] = 0 if not out_dtype.is_signed else -10
    graph.set_outputs([("y", requantizing(graph, op, inputs, constants, rng, out_dtype, **attrs))])
    return graph, feeds


def activation_type(rng: np.random.Generator, shape, dtype: DType, seven_bit: bool) -> TensorType:
    bits = 7 if seven_bit and not dtype.is_signed and dtype.bits == 8 else None
    return TensorType(shape, dtype, params(dtype, float(rng.uniform(0.01, 0.1)), zero_point(rng, dtype, bits),
                                           bits=bits))


def conv_graph(case: dict) -> tuple[Graph, dict, tuple[int, int], tuple[int, int]]:
    """The qconv2d graph and feeds of a conv case (`conv_cases` or alike), the input's spatial size grown
    to fit the dilated kernel, and the output's size."""
    rng = np.random.default_rng(case["seed"])
    kernel, dilations, pads, strides = case["kernel"], case["dilations"], case["pads"], case["strides"]
    size = tuple(max(s, d * (k - 1) + 1 - p - q) for s, d, k, p, q in
                 zip(case["size"], dilations, kernel, pads[:2], pads[2:]))
    out = tuple((s + p + q - d * (k - 1) - 1) // st_ + 1 for s, p, q, d, k, st_ in
                zip(size, pads[:2], pads[2:], dilations, kernel, strides))
    x_type = activation_type(rng, (case["batch"], case["channels"]) + size, case["dtype"],
                             case.get("seven_bit", False))
    w_shape = (case["m"], case["channels"] // case["group"]) + kernel
    graph, feeds = product_graph("qconv2d", rng, x_type, w_shape, case["weights"], case["bias"],
                                 (case["batch"], case["m"]) + out if case["residual"] else None, case["out"],
                                 case["clamp"], strides=strides, pads=pads, dilations=dilations, group=case["group"])
    return graph, feeds, size, out


@st.composite
def linear_cases(draw) -> dict:
    rank = draw(st.integers(1, 3))
    return dict(rows=tuple(draw(st.lists(SIZES, min_size=rank - 1, max_size=rank - 1))),
                k=draw(st.one_of(SIZES, st.sampled_from([64, 256, 1031, 2053]))), n=draw(SIZES),
                dtype=draw(st.sampled_from([DType.u8, DType.u8, DType.i8, DType.i8, DType.i16, DType.u16])),
                seven_bit=draw(st.booleans()), weights=draw(WEIGHTS), bias=draw(st.booleans()),
                residual=draw(st.booleans()), out=draw(st.sampled_from([DType.i8, DType.u8, DType.i16, DType.i32])),
                clamp=draw(st.booleans()), target=draw(st.sampled_from(TARGETS)), seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=14, deadline=None)
@given(linear_cases())
def test_qlinear(case: dict) -> None:
    rng = np.random.default_rng(case["seed"])
    shape = case["rows"] + (case["k"],)
    out_shape = case["rows"] + (case["n"],)
    x_type = activation_type(rng, shape, case["dtype"], case["seven_bit"])
    graph, feeds = product_graph("qlinear", rng, x_type, (case["n"], case["k"]), case["weights"], case["bias"],
                                 out_shape if case["residual"] else None, case["out"], case["clamp"])
    check(graph, feeds, case["target"])


@st.composite
def conv_cases(draw) -> dict:
    group = draw(st.sampled_from([1, 1, 1, 2, 3, "depthwise"]))
    per_group = draw(st.integers(1, 5))
    channels = draw(st.integers(1, 8)) if group == "depthwise" else group * per_group
    group = channels if group == "depthwise" else group
    m = channels if group == channels and draw(st.booleans()) else group * draw(st.integers(1, 9))
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    size = (draw(st.one_of(st.integers(1, 20), st.sampled_from([28, 37, 70]))), draw(st.integers(1, 40)))
    return dict(batch=draw(st.integers(1, 2)), channels=channels, size=size, m=m, group=group, kernel=kernel,
                strides=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                pads=tuple(draw(st.integers(0, 3)) for _ in range(4)),
                dilations=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
                dtype=draw(st.sampled_from([DType.u8, DType.u8, DType.i8, DType.i8, DType.i16])),
                seven_bit=draw(st.booleans()), weights=draw(WEIGHTS), bias=draw(st.booleans()),
                residual=draw(st.booleans()), out=draw(st.sampled_from([DType.i8, DType.u8, DType.i16])),
                clamp=draw(st.booleans()), target=draw(st.sampled_from(TARGETS)), seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=16, deadline=None)
@given(conv_cases())
def test_qconv2d(case: dict) -> None:
    """Groups, depthwise, strides, pads (holding the input's zero point), dilations; every route."""
    graph, feeds, _, _ = conv_graph(case)
    check(graph, feeds, case["target"])


@st.composite
def matmul_cases(draw) -> dict:
    batch_a = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    batch_b = tuple(draw(st.sampled_from([1, d])) for d in batch_a[len(batch_a) - draw(
        st.integers(0, len(batch_a))):])
    return dict(batch_a=batch_a, batch_b=batch_b, m=draw(SIZES), k=draw(st.one_of(SIZES, st.sampled_from([300, 1031]))),
                n=draw(SIZES), a=draw(st.sampled_from([DType.u8, DType.i8, DType.i8, DType.i16])),
                b=draw(st.sampled_from([DType.u8, DType.i8, DType.i8, DType.u16])), per_channel=draw(st.booleans()),
                target=draw(st.sampled_from(TARGETS)), seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=12, deadline=None)
@given(matmul_cases())
def test_qmatmul(case: dict) -> None:
    """Both operands at run time (B packed per call), numpy batch broadcasting, b per channel."""
    rng = np.random.default_rng(case["seed"])
    a_shape = case["batch_a"] + (case["m"], case["k"])
    b_shape = case["batch_b"] + (case["k"], case["n"])
    n = case["n"]
    b_quant = params(case["b"], rng.uniform(0.01, 0.05, n), [zero_point(rng, case["b"]) for _ in range(n)],
                     len(b_shape) - 1) if case["per_channel"] else params(case["b"], 0.02, zero_point(rng, case["b"]))
    graph = Graph("qmatmul")
    a = graph.add_input("a", TensorType(a_shape, case["a"], params(case["a"], 0.03, zero_point(rng, case["a"]))))
    b = graph.add_input("b", TensorType(b_shape, case["b"], b_quant))
    graph.set_outputs([("y", requantizing(graph, "qmatmul", [a, b], [None, None], rng,
                                          DType.u8 if rng.integers(2) else DType.i8))])
    check(graph, {"a": integers(rng, a_shape, case["a"]), "b": integers(rng, b_shape, case["b"])}, case["target"])


@settings(max_examples=8, deadline=None)
@given(rows=st.lists(SIZES, max_size=2), k=st.one_of(SIZES, st.sampled_from([784, 1031])), n=SIZES,
       bias=st.booleans(), weights=st.sampled_from(["channel", "tensor", "asymmetric"]),
       target=st.sampled_from(TARGETS), seed=st.integers(0, 2**32 - 1))
def test_dynamic_linear_and_matmul(rows, k, n, bias, weights, target, seed) -> None:
    """Run-time DynamicQuantizeLinear (min/max, float32 scale math), the integer product, then float32(acc) ·
    float32(sx·sw) + bias: bit-exact too."""
    rng = np.random.default_rng(seed)
    shape = tuple(rows) + (k,)
    graph = Graph("dynamic")
    x = graph.add_input("x", TensorType(shape, DType.f32))
    data, quant = weight_data(rng, (n, k), weights)
    w = graph.add_constant(data, "w", TensorType(data.shape, DType.i8, quant))
    inputs = [x, w] + ([graph.add_constant(rng.standard_normal(n).astype(np.float32), "b")] if bias else [])
    other = graph.add_input("other", TensorType((k, n), DType.f32))
    graph.set_outputs([("linear", graph.add_node("dynamic_linear", inputs).output),
                       ("matmul", graph.add("dynamic_matmul", x if rows else graph.add("reshape", x, shape=(1, k)),
                                            other))])
    scale = float(rng.choice([0.0, 1.0, 30.0]))  # 0: an all-zero tensor (scale 1)
    check(graph, {"x": (rng.standard_normal(shape) * scale + scale / 3).astype(np.float32),
                  "other": rng.standard_normal((k, n)).astype(np.float32)}, target)


def test_deep_accumulators_take_int64() -> None:
    """Depths where int32 could overflow (u8 × i8 beyond 33 025 terms, 16 × 8 bits beyond ~128) are exact."""
    rng = np.random.default_rng(5)
    for dtype, k in ((DType.u8, 40000), (DType.i16, 600)):
        x_type = TensorType((2, k), dtype, params(dtype, 0.01, zero_point(rng, dtype)))
        graph, feeds = product_graph("qlinear", rng, x_type, (3, k), "channel", True, None, DType.i32, False)
        feeds["x"] = np.full((2, k), dtype.max if rng.integers(2) else dtype.min, dtype.numpy)
        check(graph, feeds)


def test_float_only_dynamic_ops_are_refused() -> None:
    graph = Graph("dynamic")
    x = graph.add_input("x", TensorType((2, 8), DType.f16))
    data, quant = weight_data(np.random.default_rng(0), (3, 8), "channel")
    w = graph.add_constant(data, "w", TensorType(data.shape, DType.i8, quant))
    graph.set_outputs([("y", graph.add("dynamic_linear", x, w))])
    with pytest.raises(UnsupportedOpError, match="dynamic_linear.*float32"):
        lowbit.compile(graph)


# -- models ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits() -> dict:
    with np.load(DATA / "digits_calib.npz") as calib, np.load(DATA / "digits_test.npz") as test:
        return {"calib": calib["x"].astype(np.float32), "test": test["x"].astype(np.float32)}


def _quantized(path: str, batch: int, calibration: np.ndarray, **options) -> Graph:
    graph = lowbit.import_onnx(DATA / path, batch_size=batch)
    return lowbit.quantize(graph, {graph.inputs[0].name: calibration}, progress=False, **options)


@pytest.mark.parametrize("path,flat,options", [("digits_cnn.onnx", False, {}), ("mlp.onnx", True, {}),
                                               ("digits_cnn.onnx", False, {"weights": "int7", "activations": "uint8"})],
                         ids=["cnn", "mlp", "cnn-int7-uint8"])
def test_quantized_digits_models_equal_the_reference(digits: dict, path: str, flat: bool, options: dict) -> None:
    shape = (-1, 784) if flat else (-1, 1, 28, 28)
    batch = 100
    graph = _quantized(path, batch, digits["calib"][:100].reshape(shape), **options)
    model = lowbit.compile(graph)
    test = digits["test"].reshape(shape)
    name = graph.inputs[0].name
    for start in range(0, len(test), batch):
        feeds = {name: test[start:start + batch]}
        got, want = model.run(feeds), lowbit.run_reference(graph, feeds)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key} at image {start}")


def test_int8_routes_in_the_assembly(digits: dict) -> None:
    """The quantized CNN's kernels compile for the targets this machine cannot run, on their route."""
    graph = _quantized("digits_cnn.onnx", 1, digits["calib"][:32])
    seven_bit = _quantized("digits_cnn.onnx", 1, digits["calib"][:32], weights="int7")
    for name, model, present, absent in (("aarch64-dotprod", graph, r"\ssdot\s", None),
                                         ("aarch64", graph, r"\ssmlal2?\s", r"\ssdot\s"),
                                         ("x86_64-avx2", graph, r"vpmaddwd\s.*ymm", r"zmm|vpdpbusd|vpmaddubsw"),
                                         ("x86_64-avx2", seven_bit, r"vpmaddubsw\s.*ymm", r"zmm|vpdpbusd"),
                                         ("x86_64-avx512vnni", graph, r"vpdpbusd\s.*zmm", r"vpmaddubsw")):
        target = Target.parse(name)
        assembly = emit_assembly(Program(model, target).module, target)
        assert re.search(present, assembly), (name, present)
        assert absent is None or not re.search(absent, assembly), (name, absent)


def test_quantized_bert_integer_values_are_exact() -> None:
    """Every integer op of the quantized BERT is bit-exact given the same inputs (the design's rule for
    mixed graphs: float islands may differ in the last bit, which a 16-bit quantize can turn into one
    step), and the whole model's float outputs agree within tolerance."""
    graph = lowbit.import_onnx(DATA / "torch_bert_tiny_classic.onnx", batch_size=2, dims={"sequence": 16})
    rng = np.random.default_rng(0)

    def feeds() -> dict:
        mask = np.ones((2, 16), np.int64)
        mask[1, rng.integers(4, 16):] = 0
        return {"input_ids": rng.integers(0, 100, (2, 16)).astype(np.int64), "attention_mask": mask}

    quantized = lowbit.quantize(graph, [feeds() for _ in range(4)], progress=False)
    integer_nodes = [node for node in quantized.nodes
                     if node.outputs[0].type.dtype.is_integer and node.op != "cast"]
    assert any(node.op == "qmatmul" for node in integer_nodes) and len(integer_nodes) > 20
    values = feeds()
    seen: dict[int, np.ndarray] = {id(v): values[v.name] for v in quantized.inputs}
    seen.update({id(c): c.data for c in quantized.constants})

    def observe(node, results):
        seen.update({id(v): r for v, r in zip(node.outputs, results)})

    want = run_reference(quantized, values, observe=observe)
    for node in integer_nodes:
        single = Graph(node.op)
        operands = []
        for index, value in enumerate(node.inputs):
            if value is None or value.is_constant:
                operands.append(value if value is None else single.add_constant(value.data, value.name, value.type))
            else:
                operands.append(single.add_input(f"in{index}", value.type))
        result = single.add_node(node.op, operands, node.attrs, output_types=[v.type for v in node.outputs])
        single.set_outputs([("y", result.outputs[0])])
        inputs = {f"in{i}": seen[id(v)] for i, v in enumerate(node.inputs) if v is not None and not v.is_constant}
        np.testing.assert_array_equal(lowbit.compile(single).run(inputs)["y"], seen[id(node.outputs[0])],
                                      err_msg=node.describe())
    got = lowbit.compile(quantized).run(values)
    for name in quantized.output_names:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)
