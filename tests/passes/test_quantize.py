"""Post-training quantization end to end: trained models keep their accuracy, graphs become integer ops,
the options do what they say, and the attention-mask trap is avoided."""
from pathlib import Path

import numpy as np
import pytest

import lowbit
from lowbit.ir import DType, parse, verify
from lowbit.passes.quantize import QuantizationError, calibrate

DATA = Path(__file__).resolve().parents[1] / "data"
TEST = np.load(DATA / "digits_test.npz")
CALIB = np.load(DATA / "digits_calib.npz")["x"]
MODELS = {"digits_cnn": (1, 28, 28), "mlp": (784,)}


def model(name: str, batch: int = 100) -> lowbit.Graph:
    return lowbit.import_onnx(DATA / f"{name}.onnx", batch_size=batch)


def accuracy(graph, name: str) -> float:
    x = TEST["x"].reshape((-1,) + MODELS[name])
    batch = graph.inputs[0].type.shape[0]
    predictions = [lowbit.run_reference(graph, {"input": x[i:i + batch]})["logits"].argmax(1)
                   for i in range(0, len(x), batch)]
    return float((np.concatenate(predictions) == TEST["y"]).mean())


def calibration(name: str) -> dict:
    return {"input": CALIB.reshape((-1,) + MODELS[name])}


@pytest.mark.parametrize("name", list(MODELS))
def test_static_int8_keeps_accuracy_and_runs_integer_ops(name):
    graph = model(name)
    quantized = lowbit.quantize(graph, calibration(name), progress=False)
    counts = quantized.op_histogram()
    assert not {"conv2d", "linear", "relu"} & set(counts)
    assert counts.get("qlinear", 0) >= 1 and counts["quantize"] == 1 and counts["dequantize"] == 1
    assert accuracy(quantized, name) >= accuracy(graph, name) - 0.004
    assert str(parse(str(quantized))) == str(quantized)


def test_realized_integers_agree_with_the_simulation():
    graph = model("digits_cnn")
    simulated = lowbit.quantize(graph, calibration("digits_cnn"), simulate_only=True, progress=False)
    realized = lowbit.quantize(graph, calibration("digits_cnn"), progress=False)
    assert "qconv2d" not in simulated.op_histogram() and "conv2d" in simulated.op_histogram()
    feeds = {"input": TEST["x"][:100]}
    step = realized.outputs[0].producer.inputs[0].type.quant.scale[0]
    difference = np.abs(lowbit.run_reference(simulated, feeds)["logits"] - lowbit.run_reference(realized, feeds)["logits"])
    assert difference.max() <= 2 * step + 1e-6
    assert (difference <= step / 2 + 1e-6).mean() > 0.95


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_calibration_methods(method):
    graph = model("digits_cnn")
    quantized = lowbit.quantize(graph, calibration("digits_cnn"), method=method, progress=False)
    assert accuracy(quantized, "digits_cnn") >= accuracy(graph, "digits_cnn") - 0.01


def test_seven_bit_weights_stay_in_range():
    quantized = lowbit.quantize(model("mlp"), calibration("mlp"), weights="int7", progress=False)
    weights = [c for c in quantized.constants if c.type.dtype is DType.i8 and c.type.quant is not None]
    assert weights and all(c.type.quant.bits == 7 and c.data.min() >= -64 and c.data.max() <= 63 for c in weights)
    assert accuracy(quantized, "mlp") >= 0.975


@pytest.mark.parametrize("activations, dtype", [("uint8", DType.u8), ("int16", DType.i16)])
def test_activation_types(activations, dtype):
    quantized = lowbit.quantize(model("digits_cnn"), calibration("digits_cnn"), activations=activations,
                                progress=False)
    assert quantized.nodes[0].op == "quantize" and quantized.nodes[0].outputs[0].type.dtype is dtype
    assert accuracy(quantized, "digits_cnn") >= 0.98


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_weight_only(weights):
    graph = model("mlp")
    quantized = lowbit.quantize(graph, mode="weight_only", weights=weights, group_size=16, progress=False)
    counts = quantized.op_histogram()
    assert counts["linear"] == 3 and counts["dequantize"] == 3 and "quantize" not in counts
    weight = next(c.type for c in quantized.constants if c.type.quant is not None)
    assert weight.dtype is (DType.i8 if weights == "int8" else DType.i4)
    if weights == "int4":
        assert weight.quant.group_size == 16 and weight.quant.axis == 1
    assert accuracy(quantized, "mlp") >= accuracy(graph, "mlp") - (0.004 if weights == "int8" else 0.02)


def test_exclude_keeps_named_nodes_and_op_types_in_float():
    graph = model("digits_cnn")
    by_type = lowbit.quantize(graph, calibration("digits_cnn"), exclude=["linear"], progress=False)
    assert "linear" in by_type.op_histogram() and "qconv2d" in by_type.op_histogram()
    by_name = lowbit.quantize(graph, calibration("digits_cnn"), exclude=["/conv1/Conv"], progress=False)
    assert [n.op for n in by_name.nodes if n.name == "/conv1/Conv"] == ["conv2d"]
    verify(by_name)


def test_bert_attention_matmuls_are_integer_and_the_mask_stays_float():
    graph = lowbit.import_onnx(DATA / "torch_bert_tiny_classic.onnx", batch_size=2, dims={"sequence": 16})

    def feeds(seed):
        rng = np.random.default_rng(seed)
        mask = np.ones((2, 16), np.int64)
        mask[1, 9:] = 0
        return {"input_ids": rng.integers(0, 200, (2, 16)).astype(np.int64), "attention_mask": mask}

    quantized = lowbit.quantize(graph, [feeds(s) for s in range(6)], progress=False)
    counts = quantized.op_histogram()
    assert counts["qmatmul"] == 4 and "matmul" not in counts and "linear" not in counts
    scales = [s for v in (out for n in quantized.nodes for out in n.outputs) if v.type.quant for s in v.type.quant.scale]
    assert max(scales) < 1.0, "a scale this large means a float32-min mask constant was observed"
    similarities = []
    for seed in range(100, 105):
        f = feeds(seed)
        a, b = (lowbit.run_reference(g, f)["last_hidden_state"] for g in (graph, quantized))
        m = f["attention_mask"][..., None]
        a, b = (a * m).sum(1) / m.sum(1), (b * m).sum(1) / m.sum(1)
        similarities += list((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    assert np.mean(similarities) >= 0.995


def test_option_errors():
    with pytest.raises(QuantizationError, match="needs calibration data"):
        lowbit.quantize(model("mlp"), None, progress=False)
    with pytest.raises(QuantizationError, match="weight-only"):
        lowbit.quantize(model("mlp"), calibration("mlp"), weights="int4", progress=False)
    with pytest.raises(QuantizationError, match="activations must be one of"):
        lowbit.quantize(model("mlp"), calibration("mlp"), activations="int3", progress=False)


def test_dynamic_mode_needs_no_calibration():
    graph = model("mlp")
    quantized = lowbit.quantize(graph, mode="dynamic", progress=False)
    assert quantized.op_histogram() == {"dynamic_linear": 3, "relu": 2}
    assert accuracy(quantized, "mlp") >= accuracy(graph, "mlp") - 0.004


def test_dynamic_quantization_matches_onnx_dynamic_quantize_linear():
    """The run-time parameters are ONNX DynamicQuantizeLinear's, checked against onnxruntime."""
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    from lowbit.backends.reference.quantized import dynamic_quantize

    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "scale", "zero_point"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 7])],
                              [helper.make_tensor_value_info(n, t, None) for n, t in
                               (("y", TensorProto.UINT8), ("scale", TensorProto.FLOAT),
                                ("zero_point", TensorProto.UINT8))])
    session = onnxruntime.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                           .SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    for x in (rng.standard_normal((3, 7)).astype(np.float32) * 4, np.abs(rng.standard_normal((3, 7))).astype(np.float32)):
        y, scale, zero_point = session.run(None, {"x": x})
        q, our_scale, our_zero_point = dynamic_quantize(x)
        assert our_scale == scale and our_zero_point == zero_point
        np.testing.assert_array_equal(q, y)


def layer_norm_block(outlier: float = 40.0) -> lowbit.Graph:
    """x → layer_norm (one outlier channel in its scale) → two linears reading it (like Q and K), one of
    them with the LayerNorm output as its residual too."""
    from lowbit.ir import Graph, TensorType

    rng = np.random.default_rng(0)
    graph = Graph("block")
    x = graph.add_input("x", TensorType((4, 6, 16), DType.f32))
    scale = rng.uniform(0.5, 1.5, 16).astype(np.float32)
    scale[3] = outlier
    norm = graph.add("layer_norm", x, graph.add_constant(scale), graph.add_constant(rng.standard_normal(16)
                                                                                      .astype(np.float32)))
    weights = [graph.add_constant(rng.standard_normal((16, 16)).astype(np.float32) * 0.2) for _ in range(2)]
    q = graph.add("linear", norm, weights[0], graph.add_constant(np.zeros(16, np.float32)), norm)
    k = graph.add("linear", norm, weights[1])
    graph.set_outputs([("y", graph.add("softmax", graph.add("add", q, k)))])
    return graph


def block_feeds(seed: int) -> dict:
    return {"x": np.random.default_rng(seed).standard_normal((4, 6, 16)).astype(np.float32)}


def block_output(graph, feeds: dict) -> np.ndarray:
    return next(iter(lowbit.run_reference(graph, feeds).values()))


def test_smoothing_is_exact_in_float_and_evens_out_the_layer_norm_output():
    from lowbit.passes.quantize.smooth import smooth_layer_norms

    graph = layer_norm_block()
    smoothed = graph.copy()
    assert smooth_layer_norms(smoothed, [block_feeds(s) for s in range(3)], 0.5,
                              lambda node: node.op == "linear", progress=False) == 1
    verify(smoothed)
    # The residual keeps the original LayerNorm; the linears read a smoothed copy.
    norms = [n for n in smoothed.nodes if n.op == "layer_norm"]
    assert len(norms) == 2
    feeds = block_feeds(7)
    np.testing.assert_allclose(block_output(smoothed, feeds), block_output(graph, feeds), rtol=1e-5, atol=1e-6)
    ranges = calibrate(smoothed, [feeds], [], per_channel_axes={n.outputs[0]: -1 for n in norms}, progress=False)
    absmax = [np.maximum(-ranges[n.outputs[0]][0], ranges[n.outputs[0]][1]) for n in norms]
    ratios = [m.max() / m.mean() for m in absmax]
    assert ratios[1] < ratios[0] / 2  # the outlier channel is far tamer in the smoothed copy


def test_smoothing_factors():
    from lowbit.passes.quantize.smooth import smoothing_factors

    w = np.array([[1.0, -4.0, 0.0], [0.5, 2.0, 0.0]])
    factors = smoothing_factors(np.array([16.0, 1.0, 3.0]), [w, w * 0.5], 0.5)
    np.testing.assert_allclose(factors, [4.0, 0.5, 1.0])  # sqrt(16 / 1), sqrt(1 / 4); a zero column stays


def test_results_read_only_by_float_ops_are_16_bit_while_products_stay_8_bit():
    graph = layer_norm_block()
    calib = [block_feeds(s) for s in range(3)]
    wide = lowbit.quantize(graph, calib, progress=False)
    narrow = lowbit.quantize(graph, calib, wide_outputs=False, smooth=None, progress=False)
    for quantized in (wide, narrow):
        verify(quantized)
        products = [n for n in quantized.nodes if n.op == "qlinear"]
        assert len(products) == 2 and all(n.inputs[0].type.dtype is DType.i8 for n in products)
        assert all(n.inputs[1].type.dtype is DType.i8 for n in products)
    # The add is fused into the second linear as its residual: both results, read only by softmax or as a
    # residual, widen, as do the residual operands (the first linear's is the LayerNorm output).
    products = [n for n in wide.nodes if n.op == "qlinear"]
    assert all(n.outputs[0].type.dtype is DType.i16 and n.inputs[3].type.dtype is DType.i16 for n in products)
    assert all(v.type.dtype in (DType.i8, DType.f32, DType.i32) for n in narrow.nodes for v in n.outputs)
    feeds = block_feeds(9)
    errors = [np.abs(block_output(g, feeds) - block_output(graph, feeds)).mean()
              for g in (wide, narrow)]
    assert errors[0] < errors[1]


def test_mlp_logits_are_16_bit_by_default():
    graph = model("mlp")
    wide = lowbit.quantize(graph, calibration("mlp"), progress=False)
    last = wide.outputs[0].producer.inputs[0].producer
    assert last.op == "qlinear" and last.outputs[0].type.dtype is DType.i16 and last.inputs[0].type.dtype is DType.i8
    narrow = lowbit.quantize(graph, calibration("mlp"), wide_outputs=False, progress=False)
    assert narrow.outputs[0].producer.inputs[0].type.dtype is DType.i8
    assert accuracy(wide, "mlp") >= accuracy(graph, "mlp") - 0.004


def test_smooth_option_is_checked():
    with pytest.raises(QuantizationError, match="smooth must be"):
        lowbit.quantize(model("mlp"), calibration("mlp"), smooth=1.5, progress=False)
