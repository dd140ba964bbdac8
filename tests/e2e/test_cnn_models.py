"""ResNet-18 and MobileNetV2 at 224×224 (opset 17, seeded random weights) against onnxruntime.

Both run in a few seconds (reference run, onnxruntime, text round trip), so neither is marked slow.
"""
from harness import check_model, image_feed
from model_builders import mobilenet_v2, resnet18


def test_resnet18(rng):
    model = resnet18()
    graph = check_model(model, image_feed(model, rng))
    # 17 3×3/7×7 convs and 3 1×1 downsampling shortcuts, each with its batch norm.
    assert graph.op_histogram()["conv2d"] == 20
    assert graph.parameter_count() > 11_000_000


def test_mobilenet_v2(rng):
    model = mobilenet_v2(image=224)
    graph = check_model(model, image_feed(model, rng))
    depthwise = [node for node in graph.nodes if node.op == "conv2d" and node.attrs.get("group", 1) > 1]
    assert len(depthwise) == 17
