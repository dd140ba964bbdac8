"""Importing already-quantized ONNX models: QuantizeLinear / DequantizeLinear, the QOperator ops and
MatMulInteger / ConvInteger / DynamicQuantizeLinear, on models ONNX Runtime's own quantizer writes and on
small hand-made graphs, compared with ONNX Runtime."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.errors import ModelFormatError, UnsupportedOpError
from lowbit.ir import DType, parse

ort = pytest.importorskip("onnxruntime")
quantization = pytest.importorskip("onnxruntime.quantization")

DATA = Path(__file__).resolve().parents[1] / "data"
MODELS = {"digits_cnn": (-1, 1, 28, 28), "mlp": (-1, 784)}


def run_onnxruntime(model: onnx.ModelProto | str, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, feeds)


# -- models quantized by ONNX Runtime's quantizer -------------------------------------------------------
class _Calibration(quantization.CalibrationDataReader):
    """The 200 calibration images of digits_calib.npz in one batch (the models' batch axis is symbolic)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        images = np.load(DATA / "digits_calib.npz")["x"]
        self._feeds = iter([{"input": images.reshape(shape)}])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


@pytest.fixture(scope="module")
def quantized_models(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(model, form) → path: QDQ and QOperator static quantization (per channel, s8 weights) and dynamic."""
    folder = tmp_path_factory.mktemp("ort_quantized")
    paths = {}
    for name, shape in MODELS.items():
        source = DATA / f"{name}.onnx"
        for form, activations in (("QDQ", quantization.QuantType.QInt8), ("QOperator", quantization.QuantType.QUInt8)):
            path = folder / f"{name}_{form}.onnx"
            quantization.quantize_static(source, path, _Calibration(shape),
                                         quant_format=getattr(quantization.QuantFormat, form), per_channel=True,
                                         activation_type=activations, weight_type=quantization.QuantType.QInt8)
            paths[name, form] = path
        paths[name, "dynamic"] = folder / f"{name}_dynamic.onnx"
        quantization.quantize_dynamic(source, paths[name, "dynamic"], weight_type=quantization.QuantType.QInt8)
    return paths


@pytest.fixture(scope="module")
def digits_test() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(DATA / "digits_test.npz")
    return data["x"], data["y"]


def _output_step(graph) -> float:
    """The scale of the quantized logits (the graph ends in a dequantize), else 0 (float logits)."""
    producer = graph.outputs[0].producer
    return producer.inputs[0].type.quant.scale[0] if producer.op == "dequantize" else 0.0


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("form", ["QDQ", "QOperator", "dynamic"])
def test_onnxruntime_quantized_models_match_onnxruntime(quantized_models, digits_test, name, form):
    """Static models: within one step of the quantized logits (ONNX Runtime's integer kernels round the
    requantization differently from the float simulation). Dynamic ones: the same float arithmetic."""
    x, labels = digits_test
    path = quantized_models[name, form]
    graph = lowbit.import_onnx(path, batch_size=len(x), realize=False)
    feeds = {"input": x.reshape(MODELS[name])}
    got = lowbit.run_reference(graph, feeds)["logits"]
    want = run_onnxruntime(path, feeds)[0]
    accuracy, expected = (got.argmax(1) == labels).mean(), (want.argmax(1) == labels).mean()
    assert abs(accuracy - expected) <= 0.002 and expected > 0.95, (accuracy, expected)
    step = _output_step(graph)
    if form == "dynamic":
        assert step == 0.0
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert step > 0 and np.abs(got - want).max() <= step * 1.001
        assert np.mean(got != want) < 0.01
    counts = graph.op_histogram()
    if form != "dynamic":
        assert counts["quantize"] >= 3 and counts["dequantize"] >= 6
        assert "cast" not in counts  # nothing outside the QDQ form


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("form", ["QDQ", "QOperator", "dynamic"])
def test_reexported_models_match_the_originals(quantized_models, digits_test, name, form):
    """Import, then `export_onnx`: ONNX Runtime gives the original model's logits (measured: identical)."""
    from lowbit.backends.onnx import to_onnx

    x, _ = digits_test
    path = quantized_models[name, form]
    graph = lowbit.import_onnx(path, batch_size=len(x), realize=False)
    feeds = {"input": x.reshape(MODELS[name])}
    got = run_onnxruntime(to_onnx(graph), feeds)[0]
    want = run_onnxruntime(path, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=max(_output_step(graph), 1e-5))


def test_qdq_weights_stay_integer_constants(quantized_models):
    graph = lowbit.import_onnx(quantized_models["digits_cnn", "QDQ"], realize=False)
    conv = next(node for node in graph.nodes if node.op == "conv2d")
    weight = conv.inputs[1].producer.inputs[0]
    assert conv.inputs[1].producer.op == "dequantize" and weight.is_constant
    assert weight.type.dtype is DType.i8 and weight.type.quant.axis == 0 and len(weight.type.quant.scale) == 32
    bias = conv.inputs[2].producer.inputs[0]
    assert bias.type.dtype is DType.i32 and bias.type.quant.zero_point == (0,) * 32
    activation = conv.inputs[0].producer.inputs[0]
    assert activation.producer.op == "quantize" and activation.type.quant.axis is None
    text = graph.to_text(full=True)
    assert str(parse(text)) == str(graph)


def test_qoperator_conv_expands_to_qdq_form(quantized_models):
    graph = lowbit.import_onnx(quantized_models["digits_cnn", "QOperator"], realize=False)
    conv = next(node for node in graph.nodes if node.op == "conv2d")
    assert [v.producer.op for v in conv.inputs] == ["dequantize"] * 3
    user = conv.outputs[0].users[0]
    assert user.op == "quantize" and user.outputs[0].type.dtype is DType.u8
    assert graph.op_histogram()["linear"] == 1  # com.microsoft QGemm with a constant B


# -- hand-made graphs -----------------------------------------------------------------------------------
def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17, microsoft: bool = False) -> onnx.ModelProto:
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if microsoft else [])
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = helper.find_min_ir_version_for(imports[:1])
    return model


def tensor(name: str, elem_type: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(shape))


def init(name: str, array, elem_type: int | None = None) -> onnx.TensorProto:
    array = np.asarray(array)
    if elem_type is not None:
        return helper.make_tensor(name, elem_type, array.shape, array.reshape(-1).tolist())
    return numpy_helper.from_array(array, name)


def check_against_onnxruntime(model: onnx.ModelProto, feeds: dict, exact: bool = True):
    graph = lowbit.import_onnx(model, realize=False)
    got = lowbit.run_reference(graph, feeds)
    for (name, array), want in zip(got.items(), run_onnxruntime(model, feeds)):
        assert array.dtype == want.dtype, name
        if exact:
            np.testing.assert_array_equal(array, want, err_msg=name)
        else:
            np.testing.assert_allclose(array, want, rtol=1e-5, atol=1e-6, err_msg=name)
    return graph


@pytest.mark.parametrize("elem_type, opset", [(TensorProto.UINT8, 13), (TensorProto.INT8, 13),
                                              (TensorProto.UINT16, 21), (TensorProto.INT16, 21)])
def test_quantize_dequantize_per_axis_bit_exact(elem_type, opset):
    rng = np.random.default_rng(0)
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    info = np.iinfo(dtype)
    scales = np.array([0.02, 0.5, 0.003], np.float32) * (1 if info.bits == 8 else 0.01)
    zero_points = rng.integers(info.min // 2, info.max // 2, 3).astype(dtype)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=1),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1)]
    model = make_model(nodes, [tensor("x", TensorProto.FLOAT, (2, 3, 4))],
                       [tensor("q", elem_type, (2, 3, 4)), tensor("y", TensorProto.FLOAT, (2, 3, 4))],
                       [init("s", scales), init("z", zero_points)], opset)
    x = (rng.standard_normal((2, 3, 4)) * 3).astype(np.float32)
    x[0, 0, :2] = [0.01, -0.03]  # exact halves of the first scale: ties to even
    check_against_onnxruntime(model, {"x": x})


def test_blocked_int4_weights_become_per_group_parameters():
    """DequantizeLinear-21 with block_size of an int4 weight: weight-only quantization (linear on DQ(w))."""
    rng = np.random.default_rng(1)
    weight = rng.integers(-8, 8, (4, 8)).astype(np.int8)
    scales = rng.uniform(0.01, 0.1, (4, 2)).astype(np.float32)
    nodes = [helper.make_node("DequantizeLinear", ["w", "s"], ["wf"], axis=1, block_size=4),
             helper.make_node("MatMul", ["x", "wf"], ["y"])]
    model = make_model(nodes, [tensor("x", TensorProto.FLOAT, (3, 4))], [tensor("y", TensorProto.FLOAT, (3, 8))],
                       [init("w", weight, TensorProto.INT4), init("s", scales)], opset=21)
    graph = check_against_onnxruntime(model, {"x": rng.standard_normal((3, 4)).astype(np.float32)}, exact=False)
    params = graph.nodes[0].inputs[0].type.quant
    assert graph.nodes[0].op == "dequantize" and params.granularity == "group" and params.group_size == 4
    assert graph.nodes[0].inputs[0].type.dtype is DType.i4


def test_folded_quantize_keeps_its_parameters():
    """QuantizeLinear of a constant folds to an integer constant that still carries its parameters."""
    nodes = [helper.make_node("QuantizeLinear", ["w", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["wf"]),
             helper.make_node("Mul", ["x", "wf"], ["y"])]
    model = make_model(nodes, [tensor("x", TensorProto.FLOAT, (4,))], [tensor("y", TensorProto.FLOAT, (4,))],
                       [init("w", np.array([0.5, -1.25, 2.0, 7.0], np.float32)), init("s", np.float32(0.25)),
                        init("z", np.int8(3))])
    graph = check_against_onnxruntime(model, {"x": np.arange(4, dtype=np.float32)})
    dequantize = graph.nodes[0]
    assert dequantize.op == "dequantize" and dequantize.inputs[0].is_constant
    assert dequantize.inputs[0].type.quant.zero_point == (3,)
    np.testing.assert_array_equal(dequantize.inputs[0].data, [5, -2, 11, 31])


def _qlinear_inputs(rng, a_shape, b_shape):
    a = rng.integers(0, 256, a_shape).astype(np.uint8)
    b = rng.integers(-128, 128, b_shape).astype(np.int8)
    return a, b


def test_qlinear_matmul_and_qlinear_add_within_one_step():
    rng = np.random.default_rng(2)
    a, b = _qlinear_inputs(rng, (2, 3, 8), (8, 5))
    column_scales = rng.uniform(0.001, 0.01, 5).astype(np.float32)
    nodes = [helper.make_node("QLinearMatMul", ["a", "sa", "za", "b", "sb", "zb", "sy", "zy"], ["y"]),
             helper.make_node("QLinearAdd", ["y", "sy", "zy", "r", "sr", "zr", "so", "zo"], ["out"],
                              domain="com.microsoft")]
    inits = [init("b", b), init("sa", np.float32(0.02)), init("za", np.uint8(120)), init("sb", column_scales),
             init("zb", np.zeros(5, np.int8)), init("sy", np.float32(0.05)), init("zy", np.uint8(100)),
             init("sr", np.float32(0.03)), init("zr", np.uint8(128)), init("so", np.float32(0.07)),
             init("zo", np.uint8(90))]
    model = make_model(nodes, [tensor("a", TensorProto.UINT8, a.shape), tensor("r", TensorProto.UINT8, (2, 3, 5))],
                       [tensor("out", TensorProto.UINT8, (2, 3, 5))], inits, microsoft=True)
    feeds = {"a": a, "r": rng.integers(0, 256, (2, 3, 5)).astype(np.uint8)}
    graph = lowbit.import_onnx(model, realize=False)
    assert graph.op_histogram() == {"dequantize": 4, "quantize": 2, "add": 1, "matmul": 1}
    got = lowbit.run_reference(graph, feeds)["out"].astype(int)
    want = run_onnxruntime(model, feeds)[0].astype(int)
    assert np.abs(got - want).max() <= 1


def test_matmul_integer_and_conv_integer_are_exact():
    rng = np.random.default_rng(3)
    a, b = _qlinear_inputs(rng, (4, 16), (16, 6))
    x = rng.integers(0, 256, (1, 3, 6, 6)).astype(np.uint8)
    w = rng.integers(-128, 128, (4, 3, 3, 3)).astype(np.int8)
    nodes = [helper.make_node("MatMulInteger", ["a", "b", "za", "zb"], ["y"]),
             helper.make_node("ConvInteger", ["x", "w", "zx", "zw"], ["c"], pads=[1, 1, 1, 1])]
    inits = [init("b", b), init("za", np.uint8(7)), init("zb", np.int8(-3)), init("w", w), init("zx", np.uint8(130)),
             init("zw", np.int8(5))]
    model = make_model(nodes, [tensor("a", TensorProto.UINT8, a.shape), tensor("x", TensorProto.UINT8, x.shape)],
                       [tensor("y", TensorProto.INT32, (4, 6)), tensor("c", TensorProto.INT32, (1, 4, 6, 6))], inits)
    graph = check_against_onnxruntime(model, {"a": a, "x": x})
    assert graph.op_histogram()["quantize"] == 2  # Q(i32, scale 1) of the float product: the QDQ form


def test_integer_sums_beyond_float32_are_refused():
    b = np.full((600, 2), -128, np.int8)  # 600 · 255 · 128 > 2^24
    nodes = [helper.make_node("MatMulInteger", ["a", "b"], ["y"])]
    model = make_model(nodes, [tensor("a", TensorProto.UINT8, (1, 600))], [tensor("y", TensorProto.INT32, (1, 2))],
                       [init("b", b)])
    with pytest.raises(UnsupportedOpError, match="MatMulInteger.*2\\^24"):
        lowbit.import_onnx(model, realize=False)


def test_dynamic_quantize_linear_matches_onnxruntime():
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "scale", "zero_point"])]
    model = make_model(nodes, [tensor("x", TensorProto.FLOAT, (3, 50))],
                       [tensor("y", TensorProto.UINT8, (3, 50)), tensor("scale", TensorProto.FLOAT, ()),
                        tensor("zero_point", TensorProto.UINT8, ())])
    for x in (rng.standard_normal((3, 50)) * 4 + 1, np.abs(rng.standard_normal((3, 50))), np.zeros((3, 50))):
        check_against_onnxruntime(model, {"x": x.astype(np.float32)})


def test_dequantize_of_one_tensor_with_two_parameter_sets_is_refused():
    nodes = [helper.make_node("DequantizeLinear", ["q", "s1"], ["a"]),
             helper.make_node("DequantizeLinear", ["q", "s2"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    model = make_model(nodes, [tensor("q", TensorProto.UINT8, (2,))], [tensor("y", TensorProto.FLOAT, (2,))],
                       [init("s1", np.float32(0.5)), init("s2", np.float32(0.25))])
    with pytest.raises(UnsupportedOpError, match="one set of parameters"):
        lowbit.import_onnx(model, realize=False)


def test_run_time_scales_and_bad_parameters_are_named():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["q"])]
    model = make_model(nodes, [tensor("x", TensorProto.FLOAT, (2,)), tensor("s", TensorProto.FLOAT, ())],
                       [tensor("q", TensorProto.UINT8, (2,))])
    with pytest.raises(UnsupportedOpError, match="QuantizeLinear.*scale.*must be a constant"):
        lowbit.import_onnx(model, realize=False)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["q"], axis=0)]
    model = make_model(nodes, [tensor("x", TensorProto.FLOAT, (2,))], [tensor("q", TensorProto.UINT8, (2,))],
                       [init("s", np.float32([0.1, 0.2, 0.3]))])
    with pytest.raises(ModelFormatError, match="one scale or one per index of axis 0"):
        lowbit.import_onnx(model, realize=False)


@pytest.mark.parametrize("form", ["QDQ", "QOperator"])
def test_default_import_realizes_integer_ops_with_the_same_accuracy(quantized_models, digits_test, form):
    x, y = digits_test
    path = quantized_models["digits_cnn", form]
    integer = lowbit.import_onnx(path, batch_size=len(x))
    counts = integer.op_histogram()
    assert counts["qconv2d"] == 2 and counts["qlinear"] == 1 and "conv2d" not in counts and "linear" not in counts
    simulated = lowbit.import_onnx(path, batch_size=len(x), realize=False)
    feeds = {"input": x}
    integer_accuracy = (lowbit.run_reference(integer, feeds)["logits"].argmax(1) == y).mean()
    simulated_accuracy = (lowbit.run_reference(simulated, feeds)["logits"].argmax(1) == y).mean()
    assert abs(integer_accuracy - simulated_accuracy) <= 0.002
