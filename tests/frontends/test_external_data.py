"""Models whose weights live in external data files import from their path."""
from pathlib import Path

import numpy as np
import onnx
import pytest

import lowbit

DATA = Path(__file__).resolve().parents[1] / "data"


def test_external_data_loads_from_the_model_folder(tmp_path):
    model = onnx.load(DATA / "mlp.onnx")
    path = tmp_path / "mlp_external.onnx"
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.data",
                    size_threshold=0)
    assert (tmp_path / "weights.data").stat().st_size > 2_000_000 and path.stat().st_size < 50_000
    x = np.load(DATA / "digits_test.npz")["x"][:4].reshape(4, 784)
    expected = lowbit.run_reference(lowbit.import_onnx(DATA / "mlp.onnx", batch_size=4), {"input": x})["logits"]
    actual = lowbit.run_reference(lowbit.import_onnx(path, batch_size=4), {"input": x})["logits"]
    np.testing.assert_array_equal(actual, expected)


def test_missing_external_data_is_a_model_format_error(tmp_path):
    model = onnx.load(DATA / "mlp.onnx")
    path = tmp_path / "mlp_external.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="weights.data", size_threshold=0)
    (tmp_path / "weights.data").unlink()
    with pytest.raises(lowbit.ModelFormatError, match="mlp_external.onnx"):
        lowbit.import_onnx(path)
