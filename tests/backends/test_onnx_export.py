"""`lowbit.backends.onnx.export_onnx`: float graphs round-trip through ONNX Runtime with the reference's
results; quantized graphs become QDQ models whose integer results ONNX Runtime reproduces within one step."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest

import lowbit
from lowbit.backends.onnx import export_onnx, to_onnx
from lowbit.backends.onnx.registry import EXPORTERS
from lowbit.errors import UnsupportedOpError
from lowbit.ir import DType, Graph, TensorType, parse, registered_ops, get_op, verify
from lowbit.ir.ops.quantized import fixed_point_attrs

ort = pytest.importorskip("onnxruntime")

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "e2e"))  # the e2e model builders
from model_builders import bert_encoder, mobilenet_v2, resnet18  # noqa: E402

DATA = TESTS / "data"
RTOL, ATOL = 1e-4, 1e-5


def run_onnxruntime(model: onnx.ModelProto, feeds: dict, *, optimize: bool = True) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def exported(graph: Graph, opset: int = 17) -> onnx.ModelProto:
    model = to_onnx(graph, opset=opset)
    onnx.checker.check_model(model, full_check=True)  # with shape inference: every node is well formed
    return model


def assert_matches_reference(graph: Graph, feeds: dict, opset: int = 17, *, optimize: bool = False) -> dict:
    """ONNX Runtime on the exported model gives the reference's outputs: equal integers, close floats."""
    want = lowbit.run_reference(graph, feeds)
    got = run_onnxruntime(exported(graph, opset), feeds, optimize=optimize)
    assert list(got) == graph.output_names
    for name, array in want.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        if array.dtype.kind == "f":
            scale = max(1.0, float(np.abs(array[np.isfinite(array)]).max(initial=0)))
            np.testing.assert_allclose(got[name], array, rtol=RTOL, atol=ATOL * scale,
                                       err_msg=f"{name} (opset {opset})")
        else:
            np.testing.assert_array_equal(got[name], array, err_msg=f"{name} (opset {opset})")
    return want


# -- whole float models -----------------------------------------------------------------------------------
def _bert_feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    mask = np.ones((1, 16), np.int64)
    mask[0, 13:] = 0
    return {"input_ids": rng.integers(0, 120, (1, 16)).astype(np.int64), "attention_mask": mask}


def _image(shape) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(6).standard_normal(shape, dtype=np.float32)}


def _digits(shape) -> dict[str, np.ndarray]:
    return {"input": np.load(DATA / "digits_test.npz")["x"][:16].reshape(shape)}


FLOAT_MODELS: dict[str, tuple[Callable, Callable[[], dict], str]] = {
    "digits_cnn": (lambda: DATA / "digits_cnn.onnx", lambda: _digits((16, 1, 28, 28)), "conv2d"),
    "mlp": (lambda: DATA / "mlp.onnx", lambda: _digits((16, 784)), "linear"),
    "resnet18": (lambda: resnet18(image=64), lambda: _image((1, 3, 64, 64)), "conv2d"),
    "mobilenet_v2": (lambda: mobilenet_v2(image=64), lambda: _image((1, 3, 64, 64)), "conv2d"),
    "bert": (lambda: bert_encoder(seq=16), _bert_feeds, "attention"),
    "bert_exporter_style": (lambda: bert_encoder(seq=16, exporter_style=True), _bert_feeds, "attention"),
}


@pytest.mark.parametrize("name", sorted(FLOAT_MODELS))
def test_optimized_float_models_round_trip(name):
    source, feeds, fused_op = FLOAT_MODELS[name]
    data = feeds()
    graph = lowbit.optimize(lowbit.import_onnx(source(), batch_size=next(iter(data.values())).shape[0]))
    assert fused_op in graph.op_histogram()
    assert any(node.attrs.get("activation", "none") != "none" for node in graph.nodes) or fused_op == "attention"
    assert_matches_reference(graph, data)


@pytest.mark.parametrize("name", ["mobilenet_v2", "bert"])
@pytest.mark.parametrize("opset", [13, 21])
def test_float_models_at_other_opsets(name, opset):
    """Opset 13: decomposed LayerNormalization and HardSwish; opset 21: Gelu and axes as inputs everywhere."""
    source, feeds, _ = FLOAT_MODELS[name]
    assert_matches_reference(lowbit.optimize(lowbit.import_onnx(source())), feeds(), opset)


# -- every float op ----------------------------------------------------------------------------------------
def _typed(shape, dtype=DType.f32) -> TensorType:
    return TensorType(tuple(shape), dtype)


def elementwise_graph() -> tuple[Graph, dict]:
    g = Graph("elementwise")
    x, y = g.add_input("x", _typed((3, 8))), g.add_input("y", _typed((8,)))
    half = g.add_constant(np.float32(0.5), "half")
    positive = g.add("add", g.add("abs", x), half)
    unit = g.add("tanh", x)
    outs = {op: g.add(op, x, y) for op in ("add", "sub", "mul", "div", "maximum", "minimum", "prelu")}
    outs.update({op: g.add(op, x) for op in (
        "neg", "abs", "relu", "sign", "exp", "sigmoid", "tanh", "erf", "floor", "ceil", "round", "softplus", "sin",
        "cos", "tan", "atan", "sinh", "cosh", "asinh", "hard_swish", "identity")})
    outs.update({op: g.add(op, positive) for op in ("sqrt", "log", "reciprocal")})
    outs.update({op: g.add(op, unit) for op in ("asin", "acos", "atanh")})
    outs["acosh"] = g.add("acosh", g.add("add", positive, g.add_constant(np.float32(1), "one")))
    outs["pow"] = g.add("pow", positive, y)
    outs["mod"] = g.add("mod", x, positive, fmod=True)
    outs["leaky_relu"] = g.add("leaky_relu", x, alpha=0.2)
    outs["elu"] = g.add("elu", x, alpha=0.7)
    outs["hard_sigmoid"] = g.add("hard_sigmoid", x, alpha=0.3, beta=0.4)
    outs["clip"] = g.add("clip", x, min=-0.5, max=0.75)
    outs["clip_low"] = g.add("clip", x, min=-0.25)
    outs["gelu"] = g.add("gelu", x)
    outs["gelu_tanh"] = g.add("gelu", x, approximate="tanh")
    less, greater = g.add("less", x, y), g.add("greater_equal", x, y)
    outs.update({"less": less, "equal": g.add("equal", x, x), "greater": g.add("greater", x, y),
                 "less_equal": g.add("less_equal", x, y), "greater_equal": greater,
                 "and": g.add("logical_and", less, greater), "or": g.add("logical_or", less, greater),
                 "xor": g.add("logical_xor", less, greater), "not": g.add("logical_not", less),
                 "where": g.add("where", less, x, y), "to_int": g.add("cast", x, to=DType.i32),
                 "to_half": g.add("cast", x, to=DType.f16)})
    g.set_outputs(list(outs.items()))
    rng = np.random.default_rng(0)
    return g, {"x": (rng.standard_normal((3, 8)) * 2).astype(np.float32),
               "y": rng.standard_normal(8).astype(np.float32)}


def integer_graph() -> tuple[Graph, dict]:
    g = Graph("integers")
    a, b = g.add_input("a", _typed((3, 8), DType.i32)), g.add_input("b", _typed((8,), DType.i32))
    outs = {op: g.add(op, a, b) for op in ("add", "sub", "mul", "div", "maximum", "minimum")}
    outs["mod"] = g.add("mod", a, b)
    outs["fmod"] = g.add("mod", a, b, fmod=True)
    outs["clip"] = g.add("clip", a, min=-3.5, max=10.2)
    outs["sum"] = g.add("reduce_sum", a, axes=(1,), keepdims=False)
    outs["float"] = g.add("cast", a, to=DType.f32)
    g.set_outputs(list(outs.items()))
    rng = np.random.default_rng(1)
    b_data = rng.integers(-9, 10, 8).astype(np.int32)
    b_data[b_data == 0] = 3
    return g, {"a": rng.integers(-50, 50, (3, 8)).astype(np.int32), "b": b_data}


def bitwise_graph() -> tuple[Graph, dict]:
    g = Graph("bits")
    a, b = g.add_input("a", _typed((2, 5), DType.u8)), g.add_input("b", _typed((2, 5), DType.u8))
    outs = {op: g.add(op, a, b) for op in ("bitwise_and", "bitwise_or", "bitwise_xor", "shift_left", "shift_right")}
    outs["not"] = g.add("bitwise_not", a)
    g.set_outputs(list(outs.items()))
    rng = np.random.default_rng(2)
    return g, {"a": rng.integers(0, 256, (2, 5)).astype(np.uint8), "b": rng.integers(0, 8, (2, 5)).astype(np.uint8)}


def nn_graph() -> tuple[Graph, dict]:
    rng = np.random.default_rng(3)

    def weight(*shape):
        return g.add_constant((rng.standard_normal(shape) * 0.3).astype(np.float32), "w")

    g = Graph("nn")
    x = g.add_input("x", _typed((2, 4, 9, 9)))
    conv = g.add("conv2d", x, weight(6, 2, 3, 3), weight(6), group=2, pads=(1, 2, 1, 0), strides=(2, 1),
                 dilations=(1, 2))
    fused = g.add("conv2d", x, weight(4, 4, 3, 3), weight(4), x, pads=(1, 1, 1, 1), activation="leaky_relu",
                  activation_params=(0.1,))
    tokens = g.add("reshape", x, shape=(2, 36, 9))
    outs = {
        "conv": conv, "fused": fused,
        "relu6": g.add("conv2d", x, weight(3, 4, 1, 1), activation="clip", activation_params=(0.0, 6.0)),
        "transposed": g.add("conv_transpose2d", x, weight(4, 3, 3, 3), weight(3), strides=(2, 2), pads=(1, 0, 1, 1),
                            output_padding=(1, 0)),
        "linear": g.add("linear", tokens, weight(5, 9), weight(5), activation="hard_swish"),
        "linear2d": g.add("linear", g.add("reshape", x, shape=(2, 324)), weight(7, 324), weight(7),
                          activation="sigmoid"),
        "matmul": g.add("matmul", tokens, g.add("transpose", tokens, perm=(0, 2, 1))),
        "max_pool": g.add("max_pool2d", x, kernel=(3, 3), strides=(2, 2), pads=(1, 1, 0, 0), ceil_mode=True),
        "avg_pool": g.add("avg_pool2d", x, kernel=(3, 2), strides=(2, 2), pads=(1, 1, 1, 1), count_include_pad=True),
        "avg_ceil": g.add("avg_pool2d", x, kernel=(2, 2), strides=(2, 2), ceil_mode=True),
        "global_avg": g.add("global_avg_pool", x), "global_max": g.add("global_max_pool", x),
        "batch_norm": g.add("batch_norm", x, weight(4), weight(4), weight(4),
                            g.add_constant(np.float32([0.5, 1, 2, 0.1]), "var")),
        "instance_norm": g.add("instance_norm", x, weight(4), weight(4), epsilon=1e-3),
        "layer_norm": g.add("layer_norm", x, g.add_constant(np.float32([1.5]), "gamma"), axis=2),
        "lrn": g.add("lrn", x, size=3, alpha=0.01),
        "softmax": g.add("softmax", x, axis=1), "log_softmax": g.add("log_softmax", x),
    }
    mask = np.where(rng.random((1, 1, 9, 9)) < 0.3, -np.inf, 0).astype(np.float32)
    mask[..., 0, :] = -np.inf  # a fully masked row: NaN probabilities, which zero_nan_probs makes 0
    outs["attention"] = g.add("attention", x, g.add("transpose", x, perm=(0, 1, 3, 2)), g.add("relu", x),
                              g.add_constant(mask, "mask"), scale=0.25, zero_nan_probs=True)
    g.set_outputs(list(outs.items()))
    return g, {"x": rng.standard_normal((2, 4, 9, 9)).astype(np.float32)}


def tensor_graph() -> tuple[Graph, dict]:
    g = Graph("tensor")
    x = g.add_input("x", _typed((2, 3, 4, 5)))
    indices = g.add_constant(np.array([[2, -1], [0, 1]], np.int64), "indices")
    pieces = g.add_node("split", [x], {"axis": 3, "sizes": (1, 3, 1)}).outputs
    outs = {
        "reshape": g.add("reshape", x, shape=(6, 20)), "transpose": g.add("transpose", x, perm=(3, 1, 0, 2)),
        "concat": g.add("concat", x, x, axis=2), "split0": pieces[0], "split1": pieces[1], "split2": pieces[2],
        "slice": g.add("slice", x, starts=(3, 1), ends=(-1, 5), axes=(2, 3), steps=(-2, 2)),
        "gather": g.add("gather", x, indices, axis=2),
        "gather_elements": g.add("gather_elements", x, g.add_constant(np.zeros((2, 3, 4, 2), np.int64), "i"), axis=3),
        "expand": g.add("expand", g.add("reduce_max", x, axes=(0,)), shape=(3, 3, 4, 5)),
        "tile": g.add("tile", x, repeats=(1, 2, 1, 2)),
        "pad": g.add("pad", x, pads=(0, 1, 2, -1, 0, 0, 1, 2), value=1.5),
        "reflect": g.add("pad", x, pads=(0, 0, 1, 2, 0, 0, 2, 1), mode="reflect"),
        "edge": g.add("pad", x, pads=(0, 0, 1, 0, 0, 0, 0, 3), mode="edge"),
        "sum": g.add("reduce_sum", x, axes=(1, 3)), "mean": g.add("reduce_mean", x, axes=(2,), keepdims=False),
        "min": g.add("reduce_min", x, axes=(0, 1, 2, 3), keepdims=False), "prod": g.add("reduce_prod", x, axes=(3,)),
        "none": g.add("reduce_sum", x, axes=()),
        "argmax": g.add("argmax", x, axis=3, keepdims=False, select_last_index=True),
        "argmin": g.add("argmin", x, axis=1),
        "nearest": g.add("resize", x, sizes=(2, 3, 8, 15), scales=(1, 1, 2, 3), mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        "bilinear": g.add("resize", x, sizes=(2, 3, 6, 7), scales=(1, 1, 1.5, 1.4), mode="linear"),
        "cubic": g.add("resize", x, sizes=(2, 3, 3, 9), scales=(1, 1, 0.75, 1.8), mode="cubic",
                       coordinate_transformation_mode="align_corners"),
        "simple": g.add("resize", x, sizes=(2, 3, 8, 10), scales=(1, 1, 2, 2), mode="nearest", nearest_mode="simple",
                        coordinate_transformation_mode="asymmetric"),
    }
    g.set_outputs(list(outs.items()))
    return g, {"x": np.random.default_rng(4).standard_normal((2, 3, 4, 5)).astype(np.float32)}


GRAPHS = {"elementwise": elementwise_graph, "integers": integer_graph, "nn": nn_graph, "tensor": tensor_graph}


@pytest.mark.parametrize("opset", [13, 17, 21])
@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_every_float_op_matches_onnxruntime(name, opset):
    graph, feeds = GRAPHS[name]()
    verify(graph)
    assert_matches_reference(graph, feeds, opset)


def test_bitwise_ops_need_opset_18():
    graph, feeds = bitwise_graph()
    assert_matches_reference(graph, feeds, 18)
    with pytest.raises(UnsupportedOpError, match="bitwise_and.*from opset 18"):
        to_onnx(graph, opset=17)


def test_every_op_of_the_core_families_has_an_exporter():
    families = {f"lowbit.ir.ops.{name}" for name in ("elementwise", "nn", "tensor", "attention", "quantized",
                                                     "common")}  # shared inference rules live in common
    ops = {op for op in registered_ops() if get_op(op).infer.__module__ in families}
    assert len(ops) > 100
    assert sorted(ops - set(EXPORTERS)) == []


# -- quantized graphs --------------------------------------------------------------------------------------
def quantized_graph(text: str) -> Graph:
    """Parse `text`, whose integer ops carry placeholder `multiplier = [0], shift = [0]`, and fill in the
    fixed-point attributes their operand and result types call for."""
    graph = parse(text)
    for node in graph.nodes:
        if "multiplier" in node.attrs:
            types = [v.type if v is not None else None for v in node.inputs]
            constants = [v.data if v is not None and v.is_constant else None for v in node.inputs]
            node.attrs = {**node.attrs, **fixed_point_attrs(node.op, types, node.attrs, constants)}
    verify(graph)
    return graph


def dense(rng: np.random.Generator, low: int, high: int, shape: tuple[int, ...]) -> str:
    return "dense<" + json.dumps(rng.integers(low, high, shape).tolist()) + ">"


FP = "multiplier = [0], shift = [0]"
U8 = "quant<unsigned, scale=0.02, zp=128>"


def integer_op_cases() -> dict[str, str]:
    rng = np.random.default_rng(7)
    w4 = f"i8[4,3,3,3] quant<axis=0, scale=[0.004, 0.007, 0.003, 0.01], zp=[0, 0, 0, 0]> {dense(rng, -127, 128, (4, 3, 3, 3))}"
    return {
        "qconv2d_relu": f"""graph "g" {{
  input %x: u8[1,3,9,9] {U8}
  @w = const {w4}
  @b = const i32[4] {dense(rng, -3000, 3000, (4,))}
  %y = qconv2d(%x, @w, @b) {{strides = [2, 2], pads = [1, 1, 1, 1], dtype = u8, scale = 0.05, zero_point = 10, qmin = 10, {FP}}} : u8[1,4,5,5] quant<unsigned, scale=0.05, zp=10>
  output "y" = %y
}}""",
        "qconv2d_depthwise_residual_relu6": f"""graph "g" {{
  input %x: i8[1,3,8,8] quant<scale=0.03, zp=-5>
  input %r: i8[1,3,8,8] quant<scale=0.05, zp=3>
  @w = const i8[3,1,3,3] quant<scale=0.02, zp=0> {dense(rng, -127, 128, (3, 1, 3, 3))}
  %y = qconv2d(%x, @w, none, %r) {{pads = [1, 1, 1, 1], group = 3, dtype = i8, scale = 0.04, zero_point = -20, qmin = -20, qmax = 100, {FP}}} : i8[1,3,8,8] quant<scale=0.04, zp=-20>
  output "y" = %y
}}""",
        "qlinear_gemm": f"""graph "g" {{
  input %x: u8[3,16] {U8}
  @w = const i8[5,16] quant<axis=0, scale=[0.01, 0.02, 0.005, 0.008, 0.012], zp=[0, 0, 0, 0, 0]> {dense(rng, -127, 128, (5, 16))}
  @b = const i32[5] {dense(rng, -500, 500, (5,))}
  %y = qlinear(%x, @w, @b) {{dtype = u8, scale = 0.06, zero_point = 100, {FP}}} : u8[3,5] quant<unsigned, scale=0.06, zp=100>
  output "y" = %y
}}""",
        "qlinear_matmul_residual_7bit": f"""graph "g" {{
  input %x: i8[2,3,16] quant<scale=0.03, zp=2>
  input %r: u8[2,3,4] quant<unsigned, scale=0.1, zp=120>
  @w = const i8[4,16] quant<scale=0.015, zp=-1> {dense(rng, -127, 128, (4, 16))}
  %y = qlinear(%x, @w, none, %r) {{dtype = i8, scale = 0.2, zero_point = 1, bits = 7, {FP}}} : i8[2,3,4] quant<bits=7, scale=0.2, zp=1>
  output "y" = %y
}}""",
        "qmatmul": f"""graph "g" {{
  input %a: i8[2,4,6] quant<scale=0.05, zp=0>
  input %b: i8[2,6,3] quant<axis=2, scale=[0.04, 0.02, 0.03], zp=[0, 0, 0]>
  %y = qmatmul(%a, %b) {{dtype = i8, scale = 0.1, zero_point = -4, {FP}}} : i8[2,4,3] quant<scale=0.1, zp=-4>
  output "y" = %y
}}""",
        "qadd_qmul": f"""graph "g" {{
  input %a: u8[2,3,4] {U8}
  input %b: u8[4] quant<unsigned, scale=0.05, zp=7>
  %s = qadd(%a, %b) {{dtype = u8, scale = 0.07, zero_point = 60, {FP}}} : u8[2,3,4] quant<unsigned, scale=0.07, zp=60>
  %p = qmul(%a, %b) {{dtype = i8, scale = 0.09, zero_point = 0, qmin = 0, {FP}}} : i8[2,3,4] quant<scale=0.09, zp=0>
  output "s" = %s
  output "p" = %p
}}""",
        "qconcat": f"""graph "g" {{
  input %a: u8[1,2,3,3] {U8}
  input %b: u8[1,3,3,3] quant<unsigned, scale=0.05, zp=20>
  %y = qconcat(%a, %b) {{axis = 1, dtype = u8, scale = 0.06, zero_point = 50, {FP}}} : u8[1,5,3,3] quant<unsigned, scale=0.06, zp=50>
  output "y" = %y
}}""",
        "integer_pools": f"""graph "g" {{
  input %x: u8[1,3,7,7] {U8}
  input %c: i8[1,3,6,6] quant<axis=1, scale=[0.1, 0.2, 0.3], zp=[1, -2, 0]>
  %m = qmax_pool2d(%x) {{kernel = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]}} : u8[1,3,4,4] {U8}
  %a = qavg_pool2d(%x) {{kernel = [2, 2], strides = [2, 2], ceil_mode = true}} : u8[1,3,4,4] {U8}
  %p = qavg_pool2d(%c) {{kernel = [3, 3], pads = [1, 1, 1, 1], count_include_pad = true}} : i8[1,3,6,6] quant<axis=1, scale=[0.1, 0.2, 0.3], zp=[1, -2, 0]>
  %g = qglobal_avg_pool(%x) : u8[1,3,1,1] {U8}
  output "m" = %m
  output "a" = %a
  output "p" = %p
  output "g" = %g
}}""",
        "requantize_and_borders": f"""graph "g" {{
  input %x: f32[2,3,5]
  input %c: i8[2,3,5] quant<axis=1, scale=[0.1, 0.02, 0.3], zp=[1, -2, 0]>
  %q = quantize(%x) {{dtype = i8, scale = [0.05], zero_point = [3], bits = 7}} : i8[2,3,5] quant<bits=7, scale=0.05, zp=3>
  %u = quantize(%x) {{dtype = u8, scale = [0.01, 0.02, 0.05], zero_point = [128, 100, 0], axis = 1}} : u8[2,3,5] quant<axis=1, unsigned, scale=[0.01, 0.02, 0.05], zp=[128, 100, 0]>
  %r = requantize(%c) {{dtype = u8, scale = 0.08, zero_point = 30, qmin = 30, {FP}}} : u8[2,3,5] quant<unsigned, scale=0.08, zp=30>
  %d = dequantize(%u) : f32[2,3,5]
  output "q" = %q
  output "u" = %u
  output "r" = %r
  output "d" = %d
}}""",
    }


def _random_feeds(graph: Graph, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for value in graph.inputs:
        t = value.type
        if t.dtype.is_float:
            feeds[value.name] = (rng.standard_normal(t.shape) * 3).astype(np.float32)
        else:
            feeds[value.name] = rng.integers(t.quant.qmin, t.quant.qmax + 1, t.shape).astype(t.dtype.numpy)
    return feeds


def assert_within_one_step(graph: Graph, feeds: dict, opset: int = 17) -> None:
    """Integer outputs of ONNX Runtime (optimised, i.e. with its QDQ fusions, and not) within one step of
    the reference; float outputs (dequantized) within one step of their scale."""
    want = lowbit.run_reference(graph, feeds)
    model = exported(graph, opset)
    for optimize in (False, True):
        got = run_onnxruntime(model, feeds, optimize=optimize)
        for name, value in zip(graph.output_names, graph.outputs):
            array = want[name]
            assert got[name].dtype == array.dtype, name
            difference = np.abs(got[name].astype(np.float64) - array.astype(np.float64))
            step = 1.0 if array.dtype.kind in "iu" else max(value.producer.inputs[0].type.quant.scale)
            assert difference.max() <= step * 1.0001, f"{name}: {difference.max()} (optimize={optimize})"
            assert np.mean(difference > 0) < 0.2, f"{name}: {np.mean(difference > 0):.0%} differ"


@pytest.mark.parametrize("name", sorted(integer_op_cases()))
def test_integer_ops_export_to_qdq_within_one_step(name):
    graph = quantized_graph(integer_op_cases()[name])
    assert_within_one_step(graph, _random_feeds(graph, np.random.default_rng(8)))


def test_qdq_form_and_onnxruntime_fusion(tmp_path):
    """Operands become DequantizeLinear (weights stay int8 initializers, the bias int32 with scale
    x_scale · w_scale), results QuantizeLinear; ONNX Runtime fuses the pattern into QLinearConv."""
    rng = np.random.default_rng(9)
    graph = quantized_graph(f"""graph "g" {{
  input %x: u8[1,3,9,9] {U8}
  @w = const i8[4,3,3,3] quant<axis=0, scale=[0.004, 0.007, 0.003, 0.01], zp=[0, 0, 0, 0]> {dense(rng, -127, 128, (4, 3, 3, 3))}
  @b = const i32[4] {dense(rng, -3000, 3000, (4,))}
  %y = qconv2d(%x, @w, @b) {{pads = [1, 1, 1, 1], dtype = u8, scale = 0.05, zero_point = 0, {FP}}} : u8[1,4,9,9] quant<unsigned, scale=0.05, zp=0>
  output "y" = %y
}}""")
    model = exported(graph)
    assert [node.op_type for node in model.graph.node] == ["DequantizeLinear"] * 3 + ["Conv", "QuantizeLinear"]
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert initializers["w"].dtype == np.int8 and initializers["b"].dtype == np.int32
    bias_dq = model.graph.node[2]
    np.testing.assert_array_equal(initializers[bias_dq.input[1]],
                                  np.float32(0.02) * np.float32([0.004, 0.007, 0.003, 0.01]))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert "QLinearConv" in {node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node}


def sixteen_bit_graph() -> Graph:
    rng = np.random.default_rng(10)
    return quantized_graph(f"""graph "g" {{
  input %x: f32[1,2,6,6]
  @w = const i8[3,2,3,3] quant<axis=0, scale=[0.01, 0.02, 0.015], zp=[0, 0, 0]> {dense(rng, -127, 128, (3, 2, 3, 3))}
  %q = quantize(%x) {{dtype = i16, scale = [0.0002], zero_point = [-7]}} : i16[1,2,6,6] quant<bits=16, scale=0.0002, zp=-7>
  %c = qconv2d(%q, @w) {{pads = [1, 1, 1, 1], dtype = u16, scale = 0.001, zero_point = 30000, {FP}}} : u16[1,3,6,6] quant<bits=16, unsigned, scale=0.001, zp=30000>
  %y = dequantize(%c) : f32[1,3,6,6]
  output "q" = %q
  output "c" = %c
  output "y" = %y
}}""")


@pytest.mark.parametrize("opset", [17, 21])
def test_sixteen_bit_borders(opset):
    """QuantizeLinear / DequantizeLinear take 16 bits from opset 21; before, exact float ops stand in."""
    graph = sixteen_bit_graph()
    model = exported(graph, opset)
    assert ("QuantizeLinear" in {node.op_type for node in model.graph.node}) == (opset >= 21)
    assert_within_one_step(graph, _random_feeds(graph, np.random.default_rng(11)), opset)


def test_int4_weights_per_group_and_per_channel():
    rng = np.random.default_rng(12)
    scales = ", ".join(f"{s:.4f}" for s in rng.uniform(0.01, 0.05, 8))
    graph = quantized_graph(f"""graph "g" {{
  input %x: f32[3,8]
  input %c: u8[1,2,5,5] {U8}
  @w = const i4[4,8] quant<axis=1, group=4, bits=4, scale=[{scales}], zp=[0, 0, 0, 0, 0, 0, 0, 0]> {dense(rng, -8, 8, (4, 8))}
  @k = const i4[3,2,3,3] quant<axis=0, bits=4, scale=[0.1, 0.2, 0.15], zp=[0, 1, -1]> {dense(rng, -8, 8, (3, 2, 3, 3))}
  %wf = dequantize(@w) : f32[4,8]
  %y = linear(%x, %wf) : f32[3,4]
  %z = qconv2d(%c, @k) {{dtype = u8, scale = 0.3, zero_point = 128, {FP}}} : u8[1,3,3,3] quant<unsigned, scale=0.3, zp=128>
  output "y" = %y
  output "z" = %z
}}""")
    with pytest.raises(UnsupportedOpError, match="opset 21"):
        to_onnx(graph, opset=17)
    model = exported(graph, 21)
    assert {t.data_type for t in model.graph.initializer} >= {onnx.TensorProto.INT4}
    feeds = _random_feeds(graph, np.random.default_rng(13))
    want = lowbit.run_reference(graph, feeds)
    got = run_onnxruntime(model, feeds)
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-5, atol=1e-5)
    assert np.abs(got["z"].astype(int) - want["z"].astype(int)).max() <= 1


def test_chain_of_integer_ops_stays_close():
    """A small quantized CNN: per-op differences of one step may add up, but barely."""
    rng = np.random.default_rng(14)
    graph = quantized_graph(f"""graph "g" {{
  input %x: f32[2,3,9,9]
  @w = const i8[8,3,3,3] quant<scale=0.01, zp=0> {dense(rng, -127, 128, (8, 3, 3, 3))}
  @fc = const i8[10,72] quant<scale=0.01, zp=0> {dense(rng, -127, 128, (10, 72))}
  %q = quantize(%x) {{dtype = u8, scale = [0.03], zero_point = [128]}} : u8[2,3,9,9] quant<unsigned, scale=0.03, zp=128>
  %c = qconv2d(%q, @w) {{pads = [1, 1, 1, 1], dtype = u8, scale = 0.05, zero_point = 0, {FP}}} : u8[2,8,9,9] quant<unsigned, scale=0.05, zp=0>
  %m = qmax_pool2d(%c) {{kernel = [3, 3], strides = [3, 3]}} : u8[2,8,3,3] quant<unsigned, scale=0.05, zp=0>
  %f = reshape(%m) {{shape = [2, 72]}} : u8[2,72] quant<unsigned, scale=0.05, zp=0>
  %l = qlinear(%f, @fc) {{dtype = i8, scale = 0.1, zero_point = 0, {FP}}} : i8[2,10] quant<scale=0.1, zp=0>
  %y = dequantize(%l) : f32[2,10]
  output "y" = %y
}}""")
    feeds = _random_feeds(graph, rng)
    want = lowbit.run_reference(graph, feeds)["y"]
    got = run_onnxruntime(exported(graph), feeds)["y"]
    assert np.abs(got - want).max() <= 0.1 * 3 + 1e-6


def test_dynamic_ops_export_to_onnxruntimes_dynamic_form():
    rng = np.random.default_rng(15)
    graph = parse(f"""graph "g" {{
  input %x: f32[2,5,16]
  input %k: f32[2,16,5]
  @w = const i8[6,16] quant<axis=0, scale=[0.01, 0.02, 0.015, 0.011, 0.017, 0.013], zp=[0, 1, -2, 0, 3, 0]> {dense(rng, -127, 128, (6, 16))}
  @b = const f32[6] dense<[0.5, -1.0, 0.25, 0.0, 2.0, -0.75]>
  %y = dynamic_linear(%x, @w, @b) : f32[2,5,6]
  %s = dynamic_matmul(%x, %k) : f32[2,5,5]
  output "y" = %y
  output "s" = %s
}}""")
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {node.op_type for node in exported(graph).graph.node}
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in (("x", (2, 5, 16)), ("k", (2, 16, 5)))}
    for optimize in (False, True):
        assert_matches_reference(graph, feeds, optimize=optimize)


LOWBIT_QUANTIZED = [("digits_cnn", {}, 17), ("mlp", {}, 17), ("digits_cnn", {"weights": "int7"}, 17),
                    ("digits_cnn", {"activations": "int16"}, 21), ("mlp", {"mode": "dynamic"}, 17),
                    ("mlp", {"mode": "weight_only", "weights": "int4"}, 21)]


@pytest.mark.parametrize("name, options, opset", LOWBIT_QUANTIZED)
def test_models_quantized_by_lowbit_keep_their_accuracy_in_onnxruntime(name, options, opset):
    """lowbit.quantize (calibrated on digits_calib) → export → ONNX Runtime: the reference's accuracy on
    digits_test within 0.2 points, and its logits within one step of their scale."""
    shape = {"digits_cnn": (-1, 1, 28, 28), "mlp": (-1, 784)}[name]
    batch = 100
    graph = lowbit.import_onnx(DATA / f"{name}.onnx", batch_size=batch)
    calibration = {"input": np.load(DATA / "digits_calib.npz")["x"].reshape(shape)}
    quantized = lowbit.quantize(graph, calibration, progress=False, **options)
    options_ = ort.SessionOptions()
    options_.log_severity_level = 3
    session = ort.InferenceSession(exported(quantized, opset).SerializeToString(), options_,
                                   providers=["CPUExecutionProvider"])
    test = np.load(DATA / "digits_test.npz")
    images, labels = test["x"].reshape(shape), test["y"]
    want = np.concatenate([lowbit.run_reference(quantized, {"input": images[i:i + batch]})["logits"]
                           for i in range(0, len(images), batch)])
    got = np.concatenate([session.run(None, {"input": images[i:i + batch]})[0] for i in range(0, len(images), batch)])
    accuracy, expected = (got.argmax(1) == labels).mean(), (want.argmax(1) == labels).mean()
    assert abs(accuracy - expected) <= 0.002 and expected > 0.95, (accuracy, expected)
    output = quantized.outputs[0].producer
    step = output.inputs[0].type.quant.scale[0] if output.op == "dequantize" else 1e-4 * np.abs(want).max()
    # ONNX Runtime requantizes in float, lowbit in fixed point: the int8 layers may differ by one step,
    # which a 16-bit result (the quantizer's default for logits) resolves as several of its finer steps.
    bound = max(step, 1e-3 * np.abs(want).max()) if output.inputs[0].type.dtype.bits == 16 else step
    assert np.abs(got - want).max() <= bound + 1e-6 * np.abs(want).max()  # float32 rounding of two products


# -- names, files, errors ----------------------------------------------------------------------------------
def test_outputs_that_are_inputs_constants_or_repeated(tmp_path):
    graph = parse("""graph "g" {
  input %x: f32[2]
  @c = const f32[2] dense<[1.0, 2.0]>
  %s = add(%x, @c) : f32[2]
  output "x_again" = %x
  output "constant" = @c
  output "sum" = %s
  output "sum_again" = %s
}""")
    path = tmp_path / "model.onnx"
    export_onnx(graph, path)
    model = onnx.load(path)
    assert [o.name for o in model.graph.output] == ["x_again", "constant", "sum", "sum_again"]
    got = run_onnxruntime(model, {"x": np.float32([3, 4])})
    assert {k: v.tolist() for k, v in got.items()} == {"x_again": [3, 4], "constant": [1, 2], "sum": [4, 6],
                                                       "sum_again": [4, 6]}


def test_unsupported_opsets_and_forms_are_named():
    graph, _ = tensor_graph()
    with pytest.raises(UnsupportedOpError, match="opsets 13 to"):
        to_onnx(graph, opset=12)
    graph = parse("""graph "g" {
  input %x: f32[1,1,4,4]
  %y = avg_pool2d(%x) {kernel = [2, 2], dilations = [2, 2]} : f32[1,1,2,2] loc("pool")
  output "y" = %y
}""")
    with pytest.raises(UnsupportedOpError, match="node 'pool' \\(avg_pool2d\\).*opset 19"):
        to_onnx(graph, opset=18)
    assert_matches_reference(graph, {"x": np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)}, 19)
