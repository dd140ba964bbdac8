"""`lowbit.optimize` (the default pipeline) on real models: same outputs, and the expected fusions."""
import numpy as np
import pytest
from harness import image_feed
from model_builders import bert_encoder, mobilenet_v2, resnet18

import lowbit
from lowbit.ir import parse, verify


def bert_feeds(seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    mask = np.ones((1, seq), np.int64)
    mask[0, seq - 3:] = 0
    return {"input_ids": rng.integers(0, 120, (1, seq)).astype(np.int64), "attention_mask": mask}


def optimized_and_checked(graph, feeds, rtol=1e-4, atol=1e-4):
    optimized = lowbit.optimize(graph)
    verify(optimized)
    assert str(parse(str(optimized))) == str(optimized)
    expected = lowbit.run_reference(graph, feeds)
    actual = lowbit.run_reference(optimized, feeds)
    for name in expected:
        scale = max(1.0, float(np.abs(expected[name]).max()))
        np.testing.assert_allclose(actual[name], expected[name], rtol=rtol, atol=atol * scale, err_msg=name)
    return optimized


def test_resnet18_has_no_batchnorm_and_fused_epilogues(rng):
    model = resnet18(image=64)
    graph = lowbit.import_onnx(model)
    optimized = optimized_and_checked(graph, image_feed(model, rng))
    counts = optimized.op_histogram()
    assert "batch_norm" not in counts and "relu" not in counts and "add" not in counts
    assert counts["conv2d"] == 20 and counts["linear"] == 1
    residual_convs = [n for n in optimized.nodes if n.op == "conv2d" and len(n.inputs) == 4]
    assert len(residual_convs) == 8
    assert all(n.attrs["activation"] == "relu" for n in residual_convs)


def test_mobilenet_v2_fuses_relu6_and_residuals(rng):
    model = mobilenet_v2(image=64)
    graph = lowbit.import_onnx(model)
    optimized = optimized_and_checked(graph, image_feed(model, rng))
    counts = optimized.op_histogram()
    assert "batch_norm" not in counts and "clip" not in counts and "add" not in counts
    clipped = [n for n in optimized.nodes if n.attrs.get("activation") == "clip"]
    assert clipped and all(n.attrs["activation_params"] == (0.0, 6.0) for n in clipped)


@pytest.mark.parametrize("exporter_style", [False, True])
def test_bert_has_one_attention_per_layer(exporter_style):
    graph = lowbit.import_onnx(bert_encoder(seq=16, layers=2, exporter_style=exporter_style))
    optimized = optimized_and_checked(graph, bert_feeds(16))
    counts = optimized.op_histogram()
    assert counts["attention"] == 2
    assert counts["gelu"] == 2
    assert "softmax" not in counts and "erf" not in counts and "matmul" not in counts


@pytest.mark.parametrize("path, shape", [("digits_cnn.onnx", (1, 1, 28, 28)), ("mlp.onnx", (1, 784))])
def test_trained_models_keep_their_outputs(data_dir, path, shape):
    graph = lowbit.import_onnx(data_dir / path)
    x = np.load(data_dir / "digits_test.npz")["x"][:1].reshape(shape)
    optimized = optimized_and_checked(graph, {"input": x})
    assert not {"relu", "add"} & set(optimized.op_histogram())
