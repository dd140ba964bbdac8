"""The integer op family: fixed-point arithmetic against Python big integers, ops against float models
(within one LSB) and exact models, the float borders against ONNX Runtime, and inference errors."""
from __future__ import annotations

import math
import re
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import lowbit
from lowbit.backends.reference import IMPLEMENTATIONS
from lowbit.errors import ShapeError, VerificationError
from lowbit.ir import DType, Graph, QuantParams, TensorType, get_op, parse, verify
from lowbit.ir import quant_math
from lowbit.ir.ops.quantized import fixed_point_attrs

ort = pytest.importorskip("onnxruntime")

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EDGE_SIZES = st.sampled_from([1, 2, 3, 5, 7, 13])
ACTIVATIONS = (DType.u8, DType.i8)
IDENTITY = (1 << 30, 30)


# -- helpers --------------------------------------------------------------------------------------------
def big_requantize(terms: list[int], multipliers: list[int], shift: int, zero_point: int, low: int, high: int) -> int:
    """The documented rule with Python integers: clamp(zp + floor(Σ t·m / 2^s + 1/2))."""
    total = sum(t * m for t, m in zip(terms, multipliers))
    return min(high, max(low, zero_point + math.floor(Fraction(total, 1 << shift) + Fraction(1, 2))))


def random_params(rng: np.random.Generator, dtype: DType, channels: int | None = None, axis: int = 0,
                  symmetric: bool = False, bits: int | None = None) -> QuantParams:
    bits = bits or dtype.bits
    count = channels or 1
    scales = np.exp(rng.uniform(np.log(1e-3), np.log(0.1), count))
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if dtype.is_signed else (0, (1 << bits) - 1)
    zps = np.zeros(count, int) if symmetric else rng.integers(low, high + 1, count)
    return QuantParams(scales, zps, None if channels is None else axis, None, bits, dtype.is_signed)


def random_data(rng: np.random.Generator, shape, dtype: DType, params: QuantParams | None = None) -> np.ndarray:
    low, high = (params.qmin, params.qmax) if params else (dtype.min, dtype.max)
    return rng.integers(low, high + 1, shape).astype(dtype.numpy)


def run(op: str, operands: list, **attrs):
    """Apply `op` to constant operands [(data, type) or None]; fixed-point attributes are computed when absent.
    Returns (result, result type, the attributes used)."""
    graph = Graph()
    values = [None if o is None else graph.add_constant(o[0], f"c{i}", o[1]) for i, o in enumerate(operands)]
    if "multiplier" in get_op(op).attrs and "multiplier" not in attrs:
        attrs.update(fixed_point_attrs(op, [v.type if v else None for v in values], attrs,
                                       [o[0] if o else None for o in operands]))
    y = graph.add(op, *values, **attrs)
    graph.set_outputs([("y", y)])
    verify(graph)
    assert str(parse(graph.to_text(full=True))) == str(graph)
    return lowbit.run_reference(graph, {})["y"], y.type, attrs


def real(data: np.ndarray, params: QuantParams) -> np.ndarray:
    return (data.astype(np.float64) - params.zero_point_array(data.shape)) * \
        params.scale_array(data.shape).astype(np.float64)


def quantize_exact(values: np.ndarray, y: TensorType, low: int | None = None, high: int | None = None) -> np.ndarray:
    q = y.quant
    return np.clip(np.rint(values / q.scale[0]) + q.zero_point[0], q.qmin if low is None else low,
                   q.qmax if high is None else high)


def assert_within_one_lsb(got: np.ndarray, want: np.ndarray) -> None:
    diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
    assert diff.max(initial=0) <= 1, f"{diff.max()} LSB off at {np.argmax(diff)}"


def float_op(op: str, *operands, **attrs) -> np.ndarray:
    return IMPLEMENTATIONS[op](get_op(op).normalize_attrs(attrs), *operands)


def output_params(rng: np.random.Generator, dtype: DType, typical: float) -> dict:
    """Attributes of a result whose range covers about ±typical (so results are rarely all saturated)."""
    scale = float(np.float32(typical * rng.uniform(0.5, 2.0) / 100))
    zero_point = 0 if dtype.is_signed else 128
    return {"dtype": dtype, "scale": scale, "zero_point": int(zero_point + rng.integers(-20, 21))}


# -- the fixed-point multiplier -----------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.floats(-32.0, 30.999))
def test_quantize_multiplier_round_trips(log2: float):
    value = 2.0 ** log2
    m, s = quant_math.quantize_multiplier(value)
    assert 1 << 30 <= m < 1 << 31 and 0 <= s <= 62
    assert abs(Fraction(m, 1 << s) - Fraction(value)) <= Fraction(value) * Fraction(1, (1 << 31) - 1)


def test_quantize_multiplier_extremes():
    assert quant_math.quantize_multiplier(0.0) == (0, 0)
    assert quant_math.quantize_multiplier(1.0) == IDENTITY
    m, s = quant_math.quantize_multiplier(2.0 ** -40)  # below 2^-32: shift 62, fewer significant bits
    assert s == 62 and m == 1 << 22
    m, s = quant_math.quantize_multiplier(2.0 ** 31 - 1)
    assert s == 0 and m == (1 << 31) - 1
    for bad in (2.0 ** 31, -1.0, float("nan"), float("inf")):
        with pytest.raises(ShapeError):
            quant_math.quantize_multiplier(bad)


@SETTINGS
@given(st.lists(st.floats(1e-9, 1e3), min_size=1, max_size=3), st.lists(st.integers(1, 1 << 40), min_size=3,
                                                                         max_size=3))
def test_shared_shift_never_overflows(reals, bounds):
    bounds = bounds[:len(reals)]
    multipliers, shift = quant_math.quantize_multipliers(reals, bounds)
    assert quant_math.multiplier_problem(multipliers, shift, bounds) is None
    worst = sum(b * m for b, m in zip(bounds, multipliers)) + ((1 << shift) >> 1)
    assert worst <= quant_math.INT64_MAX
    for m, r in zip(multipliers, reals):
        assert abs(Fraction(m, 1 << shift) - Fraction(r)) <= Fraction(1, 1 << (shift + 1))


INT32 = st.integers(-(1 << 31), (1 << 31) - 1)


@settings(max_examples=300, deadline=None)
@given(st.lists(INT32, min_size=1, max_size=8), st.integers(0, (1 << 31) - 1), st.integers(0, 62),
       st.integers(-128, 127))
def test_requantize_sum_matches_big_integers(accs, multiplier, shift, zero_point):
    accs = accs + [-(1 << 31), (1 << 31) - 1, 0, -1, 1]
    got = quant_math.requantize_sum([np.array(accs, np.int64)], [multiplier], shift, zero_point, -128, 127)
    want = [big_requantize([a], [multiplier], shift, zero_point, -128, 127) for a in accs]
    assert got.tolist() == want


def test_rounding_is_half_toward_positive_infinity():
    halves = np.array([-5, -3, -1, 1, 3, 5], np.int64)  # x / 2 with m = 2^30, s = 31
    got = quant_math.requantize_sum([halves], [1 << 30], 31, 0, -100, 100)
    assert got.tolist() == [-2, -1, 0, 1, 2, 3]


# -- quantize / dequantize against ONNX Runtime ---------------------------------------------------------------
def ort_run(op_type: str, x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int, opset: int):
    from onnx import TensorProto, helper, numpy_helper
    node = helper.make_node(op_type, ["x", "s", "z"], ["y"], axis=axis)
    graph = helper.make_graph(
        [node], "t", [helper.make_tensor_value_info("x", helper.np_dtype_to_tensor_dtype(x.dtype), x.shape)],
        [helper.make_empty_tensor_value_info("y")],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero_point, "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 21 else 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("dtype", [DType.u8, DType.i8, DType.u16, DType.i16])
@pytest.mark.parametrize("per_channel", [False, True])
def test_quantize_and_dequantize_are_bit_exact_with_onnxruntime(dtype, per_channel):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((3, 5, 7)) * 4).astype(np.float32)
    params = random_params(rng, dtype, 5 if per_channel else None, axis=1)
    scale = np.asarray(params.scale, np.float32)
    x[0, :, :] = ((np.arange(7) - 3 + 0.5) * scale.reshape(-1, 1)).astype(np.float32)  # exact ties
    x[1, 0, :5] = [np.inf, -np.inf, 1e30, -1e30, np.nan]
    zero_point = np.asarray(params.zero_point).astype(dtype.numpy)
    if not per_channel:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    attrs = {"dtype": dtype, "scale": params.scale, "zero_point": params.zero_point}
    if per_channel:
        attrs["axis"] = 1
    q, q_type, _ = run("quantize", [(x, TensorType.of(x))], **attrs)
    assert q_type.quant == params
    opset = 21 if dtype.bits == 16 else 13
    np.testing.assert_array_equal(q, ort_run("QuantizeLinear", x, scale, zero_point, 1, opset))
    back, _, _ = run("dequantize", [(q, q_type)])
    np.testing.assert_array_equal(back, ort_run("DequantizeLinear", q, scale, zero_point, 1, opset))


def test_quantize_to_narrow_bits_and_groups():
    x = np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 12)
    q, q_type, _ = run("quantize", [(x, TensorType.of(x))], dtype=DType.i8, scale=[0.01], bits=7)
    assert q.min() == -64 and q.max() == 63 and q_type.quant.bits == 7
    q, q_type, _ = run("quantize", [(x, TensorType.of(x))], dtype=DType.i4, scale=[0.5, 0.25, 1.0, 2.0, 0.1, 0.2],
                       axis=1, group_size=4)
    assert q.dtype == np.int8 and q.min() >= -8 and q.max() <= 7
    back, _, _ = run("dequantize", [(q, q_type)])
    group_scales = np.repeat(np.array([[0.5, 0.25, 1.0], [2.0, 0.1, 0.2]], np.float32), 4, axis=1)
    np.testing.assert_array_equal(back, np.clip(np.rint(x / group_scales), -8, 7) * group_scales)


# -- requantize --------------------------------------------------------------------------------------------
@SETTINGS
@given(st.integers(0, 2 ** 32 - 1), EDGE_SIZES, st.sampled_from([DType.i32, DType.i16, DType.u8]),
       st.sampled_from(ACTIVATIONS), st.booleans())
def test_requantize_matches_big_integers(seed, channels, in_dtype, out_dtype, per_channel):
    rng = np.random.default_rng(seed)
    params = random_params(rng, in_dtype, channels if per_channel else None, axis=1,
                           symmetric=in_dtype is DType.i32)
    q = random_data(rng, (2, channels, 3), in_dtype)
    q.reshape(-1)[:2] = [in_dtype.min, in_dtype.max]
    attrs = output_params(rng, out_dtype, 100 * float(np.median(params.scale)))
    y, _, attrs = run("requantize", [(q, TensorType(q.shape, in_dtype, params))], **attrs)
    for index in np.ndindex(q.shape):
        c = index[1] if per_channel else 0
        want = big_requantize([int(q[index]) - params.zero_point[c]], [attrs["multiplier"][c]], attrs["shift"][c],
                              attrs["zero_point"], out_dtype.min, out_dtype.max)
        assert int(y[index]) == want, index


# -- products ---------------------------------------------------------------------------------------------
def product_case(rng, x_dtype, w_dtype, out_dtype, x_shape, w_shape, per_channel, with_bias, w_bits=None):
    x_params = random_params(rng, x_dtype)
    w_params = random_params(rng, w_dtype, w_shape[0] if per_channel else None, symmetric=True, bits=w_bits)
    x = random_data(rng, x_shape, x_dtype)
    w = random_data(rng, w_shape, w_dtype, w_params)
    operands = [(x, TensorType(x.shape, x_dtype, x_params)), (w, TensorType(w.shape, w_dtype, w_params))]
    bias = None
    if with_bias:
        bias = rng.integers(-5000, 5000, w_shape[0]).astype(np.int32)
        operands.append((bias, TensorType.of(bias)))
    return x, w, bias, x_params, w_params, operands


def bias_real(bias, x_params, w_params, channels):
    if bias is None:
        return 0.0
    return bias * x_params.scale[0] * np.broadcast_to(np.asarray(w_params.scale, np.float64), (channels,))


@SETTINGS
@given(st.integers(0, 2 ** 32 - 1), EDGE_SIZES, EDGE_SIZES, EDGE_SIZES, st.sampled_from(ACTIVATIONS),
       st.sampled_from(ACTIVATIONS), st.booleans(), st.booleans(), st.booleans())
def test_qlinear_within_one_lsb_and_exact(seed, rows, depth, features, x_dtype, out_dtype, per_channel, with_bias,
                                          relu):
    rng = np.random.default_rng(seed)
    x, w, bias, xp, wp, operands = product_case(rng, x_dtype, DType.i8, out_dtype, (rows, depth), (features, depth),
                                                per_channel, with_bias)
    expected = real(x, xp) @ real(w, wp).T
    expected = expected + bias_real(bias, xp, wp, features)
    attrs = output_params(rng, out_dtype, float(np.abs(expected).max()) + 1e-3)
    if relu:
        attrs["qmin"] = attrs["zero_point"]
    y, y_type, attrs = run("qlinear", operands, **attrs)
    assert y.dtype == out_dtype.numpy and y_type.quant.scale[0] == np.float32(attrs["scale"])
    assert_within_one_lsb(y, quantize_exact(expected, y_type, attrs.get("qmin")))
    # Exactly the documented integer formula (int64 accumulation, Python big-integer requantization).
    acc = (x.astype(np.int64) - xp.zero_point[0]) @ (w.astype(np.int64) - np.asarray(wp.zero_point).reshape(-1, 1)).T
    if bias is not None:
        acc += bias
    for (i, j), value in np.ndenumerate(acc):
        c = j if per_channel else 0
        want = big_requantize([int(value)], [attrs["multiplier"][c]], attrs["shift"][c], attrs["zero_point"],
                              attrs.get("qmin", out_dtype.min), out_dtype.max)
        assert int(y[i, j]) == want


@SETTINGS
@given(st.integers(0, 2 ** 32 - 1), st.sampled_from([1, 2, 3, 6]), st.sampled_from([1, 2, 4]), EDGE_SIZES,
       st.sampled_from([(1, 1), (2, 1), (2, 2)]), st.sampled_from([(0, 0, 0, 0), (1, 1, 1, 1), (0, 2, 1, 0)]),
       st.sampled_from([1, 2]), st.booleans(), st.booleans(), st.booleans())
def test_qconv2d_within_one_lsb(seed, channels, out_per_group, size, strides, pads, dilation, depthwise,
                                per_channel, residual):
    rng = np.random.default_rng(seed)
    group = channels if depthwise else 1
    out = out_per_group * group
    kernel = (3, 1) if dilation == 2 else (3, 3)
    assume(size + pads[0] + pads[2] >= dilation * (kernel[0] - 1) + 1)
    x, w, bias, xp, wp, operands = product_case(rng, DType.u8, DType.i8, DType.u8, (2, channels, size, size + 2),
                                                (out, channels // group, *kernel), per_channel, True)
    conv = {"strides": strides, "pads": pads, "dilations": (dilation, dilation), "group": group}
    expected = float_op("conv2d", real(x, xp), real(w, wp), bias_real(bias, xp, wp, out), **conv)
    if residual:
        rp = random_params(rng, DType.i8)
        r = random_data(rng, expected.shape, DType.i8)
        operands.append((r, TensorType(r.shape, DType.i8, rp)))
        expected = expected + real(r, rp)
    attrs = output_params(rng, DType.u8, float(np.abs(expected).max()) + 1e-3)
    attrs["qmin"] = attrs["zero_point"]  # fused relu, after the residual add
    y, y_type, attrs = run("qconv2d", operands, **conv, **attrs)
    assert y.shape == expected.shape
    assert_within_one_lsb(y, quantize_exact(np.maximum(expected, 0), y_type))


def test_int64_carrier_matches_float64_carrier(monkeypatch):
    """Products run as float64 BLAS below 2^53 and as int64 above; forcing int64 must not change a bit."""
    from lowbit.backends.reference import quantized
    rng = np.random.default_rng(5)
    x_params, w_params = random_params(rng, DType.i16), random_params(rng, DType.i16, 3, symmetric=True)
    x = random_data(rng, (2, 64, 5, 5), DType.i16)
    w = random_data(rng, (3, 64, 3, 3), DType.i16, w_params)
    x[0], w[0] = DType.i16.min, DType.i16.min  # worst case: every product is 2^30 or more
    operands = [(x, TensorType(x.shape, DType.i16, x_params)), (w, TensorType(w.shape, DType.i16, w_params))]
    attrs = {"dtype": DType.i32, "scale": float(np.float32(x_params.scale[0] * 1e-3))}
    fast, _, _ = run("qconv2d", operands, **attrs)
    monkeypatch.setattr(quantized, "EXACT_FLOAT64", 0)
    exact, _, _ = run("qconv2d", operands, **attrs)
    np.testing.assert_array_equal(fast, exact)
    assert np.abs(fast).max() > 1 << 20


@SETTINGS
@given(st.integers(0, 2 ** 32 - 1), EDGE_SIZES, EDGE_SIZES, st.sampled_from([(1,), (3,), (2, 1)]), st.booleans())
def test_qmatmul_within_one_lsb(seed, inner, cols, batch, per_column):
    rng = np.random.default_rng(seed)
    a_params = random_params(rng, DType.u8)
    b_params = random_params(rng, DType.i8, cols if per_column else None, axis=-1)
    a = random_data(rng, batch + (5, inner), DType.u8)
    b = random_data(rng, (1, inner, cols) if len(batch) == 2 else (inner, cols), DType.i8, b_params)
    expected = real(a, a_params) @ real(b, b_params)
    attrs = output_params(rng, DType.i8, float(np.abs(expected).max()) + 1e-3)
    y, y_type, _ = run("qmatmul", [(a, TensorType(a.shape, DType.u8, a_params)),
                                   (b, TensorType(b.shape, DType.i8, b_params))], **attrs)
    assert y.shape == expected.shape
    assert_within_one_lsb(y, quantize_exact(expected, y_type))


@pytest.mark.parametrize("w_dtype,w_bits", [(DType.i4, None), (DType.u4, None), (DType.i8, 7)])
def test_narrow_weights(w_dtype, w_bits):
    rng = np.random.default_rng(11)
    x, w, bias, xp, wp, operands = product_case(rng, DType.u8, w_dtype, DType.u8, (4, 33), (6, 33), True, True,
                                                w_bits=w_bits)
    expected = real(x, xp) @ real(w, wp).T + bias_real(bias, xp, wp, 6)
    y, y_type, _ = run("qlinear", operands, **output_params(rng, DType.u8, float(np.abs(expected).max())))
    assert_within_one_lsb(y, quantize_exact(expected, y_type))


def test_int16_activations_with_int8_weights_use_a_wider_accumulator():
    rng = np.random.default_rng(12)
    x, w, bias, xp, wp, operands = product_case(rng, DType.i16, DType.i8, DType.i16, (3, 4096), (5, 4096), True, False)
    x[0], w[0] = DType.i16.min, DType.i8.min  # |acc| reaches 2^34
    bound = quant_math.accumulator_bound(DType.i16, xp.zero_point, DType.i8, wp.zero_point, 4096)
    assert bound >= 1 << 31  # int32 could overflow: kernels accumulate in int64
    expected = real(x, xp) @ real(w, wp).T
    y, y_type, attrs = run("qlinear", operands, **output_params(rng, DType.i16, float(np.abs(expected).max())))
    assert quant_math.multiplier_problem([attrs["multiplier"][0]], attrs["shift"][0], [bound]) is None
    assert_within_one_lsb(y, quantize_exact(expected, y_type))


# -- elementwise and concat ---------------------------------------------------------------------------------
@SETTINGS
@given(st.integers(0, 2 ** 32 - 1), st.sampled_from([DType.u8, DType.i8, DType.i16]), st.sampled_from(ACTIVATIONS),
       st.sampled_from(["qadd", "qmul"]), st.sampled_from([((3, 5), (3, 5)), ((7, 1), (1, 13)), ((1,), (2, 3))]))
def test_qadd_qmul_exact_and_within_one_lsb(seed, in_dtype, out_dtype, op, shapes):
    rng = np.random.default_rng(seed)
    params = [random_params(rng, in_dtype) for _ in shapes]
    data = [random_data(rng, shape, in_dtype) for shape in shapes]
    reals = [real(d, p) for d, p in zip(data, params)]
    expected = reals[0] + reals[1] if op == "qadd" else reals[0] * reals[1]
    attrs = output_params(rng, out_dtype, float(np.abs(expected).max()) + 1e-3)
    y, y_type, attrs = run(op, [(d, TensorType(d.shape, in_dtype, p)) for d, p in zip(data, params)], **attrs)
    assert_within_one_lsb(y, quantize_exact(expected, y_type))
    a, b = np.broadcast_arrays(*(d.astype(np.int64) - p.zero_point[0] for d, p in zip(data, params)))
    for index in np.ndindex(y.shape):
        terms = [int(a[index]), int(b[index])] if op == "qadd" else [int(a[index]) * int(b[index])]
        want = big_requantize(terms, list(attrs["multiplier"]), attrs["shift"][0], attrs["zero_point"],
                              out_dtype.min, out_dtype.max)
        assert int(y[index]) == want


def test_qconcat_requantizes_each_input_and_keeps_shared_params_exactly():
    rng = np.random.default_rng(4)
    shared = random_params(rng, DType.u8)
    other = random_params(rng, DType.i8)
    a, b = random_data(rng, (2, 3, 4), DType.u8), random_data(rng, (2, 5, 4), DType.i8)
    attrs = {"axis": 1, "dtype": DType.u8, "scale": shared.scale[0], "zero_point": shared.zero_point[0]}
    y, y_type, attrs = run("qconcat", [(a, TensorType(a.shape, DType.u8, shared)),
                                       (b, TensorType(b.shape, DType.i8, other))], **attrs)
    assert (attrs["multiplier"][0], attrs["shift"][0]) == IDENTITY
    np.testing.assert_array_equal(y[:, :3], a)
    assert_within_one_lsb(y[:, 3:], quantize_exact(real(b, other), y_type))


# -- pooling -----------------------------------------------------------------------------------------------
POOLS = [{"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1)},
         {"kernel": (2, 3), "strides": (1, 2), "pads": (0, 1, 1, 0), "ceil_mode": True},
         {"kernel": (3, 3), "strides": (1, 1), "pads": (1, 1, 1, 1), "dilations": (2, 1)}]


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("include_pad", [False, True])
def test_integer_pooling(pool, include_pad):
    rng = np.random.default_rng(7)
    params = random_params(rng, DType.i8)
    x = random_data(rng, (2, 3, 7, 11), DType.i8)
    x_type = TensorType(x.shape, DType.i8, params)
    y, y_type, _ = run("qmax_pool2d", [(x, x_type)], **pool)
    assert y_type.quant == params
    np.testing.assert_array_equal(y, float_op("max_pool2d", x, **pool))
    y, y_type, _ = run("qavg_pool2d", [(x, x_type)], count_include_pad=include_pad, **pool)
    centred = x.astype(np.float64) - params.zero_point[0]
    mean = float_op("avg_pool2d", centred, count_include_pad=include_pad, **pool)
    # Exact ties (means ending in .5) round up, as float64 floor(mean + 1/2) does for these small rationals.
    np.testing.assert_array_equal(y, np.floor(mean + 0.5) + params.zero_point[0])
    y, _, _ = run("qglobal_avg_pool", [(x, x_type)])
    np.testing.assert_array_equal(y, np.floor(centred.mean(axis=(2, 3), keepdims=True) + 0.5) + params.zero_point[0])


# -- inference and verifier errors -------------------------------------------------------------------------------
def typed(shape, dtype, params):
    return TensorType(shape, dtype, params)


U8 = QuantParams([0.02], [128], bits=8, signed=False)
I8 = QuantParams([0.01], [0])


def linear_graph(x_type: TensorType, w_type: TensorType, w_data=None, **attrs):
    graph = Graph()
    x = graph.add_input("x", x_type)
    data = np.zeros(w_type.shape, w_type.dtype.numpy) if w_data is None else w_data
    w = graph.add_constant(data, "w", w_type)
    attrs = {"dtype": DType.u8, "scale": 0.1, "zero_point": 128, **attrs}
    if "multiplier" not in attrs:
        attrs.update(fixed_point_attrs("qlinear", [x_type, w_type], attrs, [None, data]))
    return graph, graph.add("qlinear", x, w, **attrs)


@pytest.mark.parametrize("x_type,w_type,message", [
    (typed((2, 4), DType.u8, QuantParams([0.1], [300], signed=False)), typed((3, 4), DType.i8, I8),
     "zero point(s) [300] are outside [0, 255]"),
    (typed((2, 4), DType.u8, None), typed((3, 4), DType.i8, I8), "carries no quantization parameters"),
    (typed((2, 4), DType.u8, QuantParams([0.1], [0], signed=True)), typed((3, 4), DType.i8, I8),
     "parameters say signed but the type is u8"),
    (typed((2, 4), DType.u8, U8), typed((3, 4), DType.i8, QuantParams([0.1] * 4, [0] * 4, axis=1)),
     "per channel along axis 1"),
    (typed((2, 4), DType.u8, U8), typed((3, 4), DType.i8, QuantParams([0.1] * 6, [0] * 6, axis=1, group_size=2)),
     "quantized per group"),
    (typed((2, 4), DType.u8, U8), typed((3, 4), DType.i8, QuantParams([0.1], [0], bits=9)), "9 bits do not fit i8"),
    (typed((2, 4), DType.f32, None), typed((3, 4), DType.i8, I8), "integer type of at most 16 bits"),
    (typed((2, 5), DType.u8, U8), typed((3, 4), DType.i8, I8), "does not fit a weight"),
])
def test_bad_operands_fail_clearly(x_type, w_type, message):
    with pytest.raises(ShapeError, match=re.escape(message)):
        linear_graph(x_type, w_type, multiplier=[1 << 30], shift=[30])


def test_seven_bit_weights_are_checked():
    seven = QuantParams([0.01], [0], bits=7)
    linear_graph(typed((2, 4), DType.u8, U8), typed((3, 4), DType.i8, seven), np.full((3, 4), 63, np.int8))
    with pytest.raises(ShapeError, match=r"outside \[-64, 63\] of its 7-bit parameters"):
        linear_graph(typed((2, 4), DType.u8, U8), typed((3, 4), DType.i8, seven), np.full((3, 4), 64, np.int8))


@pytest.mark.parametrize("attrs,message", [
    ({"multiplier": [1 << 30], "shift": [1]}, "does not match the real multiplier"),
    ({"multiplier": [1 << 31], "shift": [40]}, r"outside \[0, 2\^31\)"),
    ({"multiplier": [1 << 30], "shift": [63]}, r"shift 63 is outside"),
    ({"multiplier": [1 << 30, 1 << 30], "shift": [30]}, "expects 1 term"),
    ({"residual_multiplier": [5]}, "expects 1 term"),
    ({"qmin": 100, "qmax": 50}, r"clamp \[100, 50\]"),
    ({"zero_point": 256}, r"zero point\(s\) \[256\] are outside"),
    ({"dtype": DType.f32}, "result dtype must be an integer type"),
])
def test_bad_requantization_attributes_fail_clearly(attrs, message):
    good = linear_graph(typed((2, 4), DType.u8, U8), typed((3, 4), DType.i8, I8))[1].producer.attrs
    with pytest.raises(ShapeError, match=message):
        linear_graph(typed((2, 4), DType.u8, U8), typed((3, 4), DType.i8, I8),
                     **{**{k: good[k] for k in ("multiplier", "shift")}, **attrs})


def test_multiplier_overflow_is_caught():
    """16-bit operands with a long depth: a full-precision multiplier could overflow the int64 sum."""
    x_params, w_params = QuantParams([1.0], [0]), QuantParams([1.0], [0])
    m, s = quant_math.quantize_multiplier(0.5)
    with pytest.raises(ShapeError, match="can overflow int64"):
        linear_graph(typed((1, 8192), DType.i16, x_params), typed((2, 8192), DType.i16, w_params),
                     dtype=DType.i16, scale=2.0, zero_point=0, multiplier=[m], shift=[s])


def test_bias_params_are_checked():
    graph = Graph()
    x = graph.add_input("x", typed((2, 4), DType.u8, U8))
    w = graph.add_constant(np.ones((3, 4), np.int8), "w", typed((3, 4), DType.i8, I8))
    good = QuantParams([float(np.float32(0.02) * np.float32(0.01))], [0])
    attrs = {"dtype": DType.u8, "scale": 0.1, "zero_point": 128}
    for params, message in ((QuantParams([0.5], [0]), "must equal input scale"),
                            (QuantParams([good.scale[0]], [3]), "bias zero points must be 0")):
        b = graph.add_constant(np.zeros(3, np.int32), None, typed((3,), DType.i32, params))
        with pytest.raises(ShapeError, match=message):
            graph.add("qlinear", x, w, b, multiplier=[1], shift=[0], **attrs)
    b = graph.add_constant(np.zeros(3, np.int32), None, typed((3,), DType.i32, good))
    attrs.update(fixed_point_attrs("qlinear", [x.type, w.type, b.type], attrs))
    graph.add("qlinear", x, w, b, **attrs)
    with pytest.raises(ShapeError, match=r"bias must be i32\[3\]"):
        graph.add("qlinear", x, w, graph.add_constant(np.zeros(4, np.int32)), **attrs)


def test_verifier_compares_quantization_parameters():
    graph, y = linear_graph(typed((2, 4), DType.u8, U8), typed((3, 4), DType.i8, I8))
    graph.set_outputs([("y", y)])
    verify(graph)
    node = y.producer
    wrong = TensorType(y.type.shape, DType.u8, QuantParams([0.2], [128], signed=False))
    graph.add_node("qlinear", list(node.inputs), node.attrs, output_types=[wrong])
    with pytest.raises(VerificationError, match="inference gives u8\\[2,3\\] quant<unsigned, scale=0.1, zp=128>"):
        verify(graph)


def test_result_types_carry_params_and_print():
    graph, y = linear_graph(typed((2, 4), DType.u8, U8), typed((3, 4), DType.i8, I8), qmin=128)
    assert y.type.quant == QuantParams([0.1], [128], bits=8, signed=False)
    z = graph.add("dequantize", y)
    graph.set_outputs([("z", z)])
    text = str(graph)
    assert "qmin = 128" in text and "quant<unsigned, scale=0.1, zp=128>" in text
    assert str(parse(graph.to_text(full=True))) == text


def test_within_one_lsb_of_onnxruntime_qlinearconv():
    """ONNX Runtime requantizes in float32, lowbit in fixed point: results differ by at most one step."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(9)
    x, w, bias, xp, wp, operands = product_case(rng, DType.u8, DType.i8, DType.u8, (1, 5, 9, 9), (7, 5, 3, 3), True,
                                                True)
    attrs = {"dtype": DType.u8, "scale": 0.05, "zero_point": 120, "pads": (1, 1, 1, 1), "strides": (2, 2)}
    y, _, _ = run("qconv2d", operands, **attrs)
    constants = {"xs": np.float32(xp.scale[0]), "xz": np.uint8(xp.zero_point[0]), "w": w,
                 "ws": np.asarray(wp.scale, np.float32), "wz": np.zeros(7, np.int8), "ys": np.float32(0.05),
                 "yz": np.uint8(120), "b": bias}
    node = helper.make_node("QLinearConv", ["x", *constants], ["y"], pads=[1, 1, 1, 1], strides=[2, 2])
    graph = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", TensorProto.UINT8, x.shape)],
                              [helper.make_empty_tensor_value_info("y")],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert_within_one_lsb(y, want)
    assert (y == want).mean() > 0.9
