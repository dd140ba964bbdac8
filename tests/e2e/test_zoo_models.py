"""Small versions of the model zoo's oldest CNNs at opsets 7, 8 and 9 against onnxruntime."""
import pytest

from harness import check_model, image_feed
from zoo_builders import OPSETS, ZOO_MODELS, alexnet, without_gemm_broadcast


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("name", sorted(ZOO_MODELS))
def test_zoo_model(rng, name, opset):
    model = ZOO_MODELS[name](opset)
    graph = check_model(model, image_feed(model, rng))
    assert [value.name for value in graph.inputs] == ["data_0"], "initializers listed in graph.input are weights"


def test_gemm_with_legacy_broadcast_attribute(rng):
    """Converters kept writing Gemm's `broadcast=1` at opset 7, where broadcasting is always on; lowbit
    accepts it (onnxruntime refuses the model, so it runs the same model without the attribute)."""
    model = alexnet(7, gemm_broadcast_attr=True)
    check_model(model, image_feed(model, rng), reference_model=without_gemm_broadcast(model))
