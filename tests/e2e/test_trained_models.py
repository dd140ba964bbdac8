"""The trained digit classifiers of tests/data (see MODELS.md) on the 500-image test set."""
import numpy as np
import pytest

import lowbit
from harness import DATA, assert_close_to_onnxruntime, assert_text_round_trips, run_onnxruntime

TEST_IMAGES = 500


@pytest.mark.parametrize("file, flatten, accuracy", [("digits_cnn.onnx", False, 0.984), ("mlp.onnx", True, 0.986)])
def test_accuracy_matches_onnxruntime(file, flatten, accuracy):
    data = np.load(DATA / "digits_test.npz")
    images, labels = data["x"], data["y"]
    if flatten:
        images = images.reshape(TEST_IMAGES, -1)
    feeds = {"input": images}
    graph = lowbit.import_onnx(DATA / file, batch_size=TEST_IMAGES)
    got = lowbit.run_reference(graph, feeds)
    expected = run_onnxruntime(DATA / file, feeds)
    assert_close_to_onnxruntime(got, expected)
    predicted, predicted_by_ort = got["logits"].argmax(axis=1), expected["logits"].argmax(axis=1)
    np.testing.assert_array_equal(predicted, predicted_by_ort)
    assert np.mean(predicted == labels) == pytest.approx(accuracy)
    assert_text_round_trips(graph, feeds, got)
