"""The calibration driver and loader, on the trained digits CNN and on small hand-built graphs."""
import sys
from pathlib import Path

import numpy as np
import pytest

import lowbit
from lowbit.errors import InputError
from lowbit.ir import DType, Graph, TensorType
from lowbit.passes.quantize import (CalibrationError, CalibrationWarning, calibrate, choose_qparams,
                                    load_calibration_npz)

DATA = Path(__file__).parents[1] / "data"
MODEL, CALIB = DATA / "digits_cnn.onnx", DATA / "digits_calib.npz"
F32_MIN = float(np.finfo(np.float32).min)


@pytest.fixture(scope="module")
def cnn():
    return lowbit.import_onnx(MODEL, batch_size=50)


@pytest.fixture(scope="module")
def samples():
    with np.load(CALIB) as archive:
        return archive["x"]


def activations(graph, samples):
    """Every float activation of one run on all samples at once, in graph order (the brute force)."""
    whole = lowbit.import_onnx(MODEL, batch_size=len(samples))
    seen = [samples]
    lowbit.backends.reference.run_reference(whole, {"input": samples},
                                            observe=lambda node, results: seen.extend(results))
    assert len(seen) == 1 + len(graph.nodes)
    return seen


def activation_values(graph):
    return [graph.inputs[0]] + [node.output for node in graph.nodes]


def test_minmax_over_batches_equals_minmax_over_all_samples(cnn, samples):
    batches = load_calibration_npz(CALIB, cnn, names={"input": "x"})
    assert len(batches) == 4
    ranges = calibrate(cnn, batches, progress=False)
    assert list(ranges) == activation_values(cnn)
    for value, array in zip(activation_values(cnn), activations(cnn, samples)):
        low, high = ranges[value]
        assert isinstance(low, float)
        np.testing.assert_allclose([low, high], [array.min(), array.max()], rtol=1e-5, err_msg=str(value))


@pytest.mark.parametrize("method,options", [("percentile", {"percentile": 99.9}), ("entropy", {}),
                                            ("mse", {"dtype": DType.u8, "symmetric": False})])
def test_clipping_methods_stay_inside_minmax(cnn, samples, method, options):
    minmax = calibrate(cnn, {"input": samples}, progress=False)
    ranges = calibrate(cnn, {"input": samples}, method=method, progress=False, **options)
    for value, (low, high) in ranges.items():
        least, most = minmax[value]
        assert least <= low <= 0 < high <= most
        if value.producer is not None and value.producer.op == "relu":
            assert low == 0
    clipped = [value for value, (_, high) in ranges.items() if high < minmax[value][1] - 1e-6]
    assert clipped, f"{method} clipped nothing"


def test_per_channel_activations_and_constant_weights(cnn, samples):
    conv = cnn.nodes[0].output
    weight = cnn.nodes[0].inputs[1]
    ranges = calibrate(cnn, {"input": samples}, [conv], per_channel_axes={weight: 0}, progress=False)
    assert list(ranges) == [conv, weight]
    low, high = ranges[weight]
    np.testing.assert_array_equal(low, weight.data.min(axis=(1, 2, 3)))
    np.testing.assert_array_equal(high, weight.data.max(axis=(1, 2, 3)))
    ranges = calibrate(cnn, {"input": samples}, per_channel_axes={conv: 1}, progress=False)
    low, high = ranges[conv]
    assert low.shape == high.shape == (32,)
    conv_all = activations(cnn, samples)[1]
    np.testing.assert_allclose(low, conv_all.min(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(high, conv_all.max(axis=(0, 2, 3)), rtol=1e-5)


def test_any_iterable_of_feeds_works_and_the_fallback_progress_counter(cnn, samples, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
    batches = (({"input": samples[i:i + 50]}) for i in range(0, 100, 50))
    ranges = calibrate(cnn, batches, [cnn.inputs[0]])
    assert ranges[cnn.inputs[0]] == (float(samples[:100].min()), float(samples[:100].max()))
    assert capsys.readouterr().err.strip().endswith("calibrating: batch 2")
    calibrate(cnn, {"input": samples}, [cnn.inputs[0]])
    assert capsys.readouterr().err.strip().endswith("calibrating: batch 4/4")
    calibrate(cnn, {"input": samples}, [cnn.inputs[0]], progress=False)
    assert capsys.readouterr().err == ""


def test_an_incomplete_last_batch_is_dropped_with_a_warning(samples):
    graph = lowbit.import_onnx(MODEL, batch_size=64)
    with pytest.warns(CalibrationWarning, match="last 8 sample"):
        batches = load_calibration_npz(CALIB, graph, names={"input": "x"}, batch_size=64)
    assert len(batches) == 3 and batches[-1]["input"].shape == (64, 1, 28, 28)
    np.testing.assert_array_equal(batches[2]["input"], samples[128:192])


def test_mask_constants_are_ignored_with_a_warning():
    graph = Graph()
    x = graph.add_input("x", TensorType((2, 4), DType.f32))
    mask = graph.add_constant(np.array([[0, 0, F32_MIN, F32_MIN], [0, F32_MIN, 0, 0]], np.float32), "mask")
    scores = graph.add("add", x, mask)
    graph.set_outputs([("p", graph.add("softmax", scores))])
    feeds = np.random.default_rng(0).standard_normal((3, 2, 4)).astype(np.float32)
    batches = [{"x": batch} for batch in feeds]
    with pytest.warns(CalibrationWarning, match="ignored 9 value"):
        low, high = calibrate(graph, batches, [scores], progress=False)[scores]
    kept = feeds[:, np.array(mask.data) == 0]
    assert (low, high) == (float(kept.min()), float(kept.max()))
    scale, _ = choose_qparams(low, high, dtype=DType.i8, symmetric=True)
    assert scale < 0.1
    low, _ = calibrate(graph, batches, [scores], progress=False, ignore_below=None)[scores]
    with pytest.raises(CalibrationError, match="attention mask"):
        choose_qparams(low, high, symmetric=True)


def test_calibration_errors(cnn, samples):
    with pytest.raises(CalibrationError, match="unknown calibration method"):
        calibrate(cnn, {"input": samples}, method="kl", progress=False)
    with pytest.raises(CalibrationError, match="no batches"):
        calibrate(cnn, [], progress=False)
    other = lowbit.import_onnx(MODEL, batch_size=50)
    with pytest.raises(CalibrationError, match="is not a value of graph"):
        calibrate(cnn, {"input": samples}, [other.nodes[0].output], progress=False)
    with pytest.raises(InputError, match="input 'input' expects shape"):
        calibrate(cnn, [{"input": samples}], progress=False)


def save(tmp_path, **arrays):
    path = tmp_path / "calib.npz"
    np.savez(path, **arrays)
    return path


def test_loader_errors(cnn, samples, tmp_path):
    with pytest.raises(InputError, match=r"no array 'input' for input 'input' \(it has \['x', 'y'\]\); map"):
        load_calibration_npz(CALIB, cnn)
    with pytest.raises(InputError, match="names maps unknown input"):
        load_calibration_npz(CALIB, cnn, names={"image": "x"})
    with pytest.raises(InputError, match=r"shape \[200, 28, 28\]; the input takes batches of shape \[50, 1, 28, "
                                         r"28\], so it needs \[N, 1, 28, 28\]"):
        load_calibration_npz(save(tmp_path, input=samples[:, 0]), cnn)
    with pytest.raises(InputError, match="dtype uint8; the input is f32"):
        load_calibration_npz(save(tmp_path, input=(samples * 50).astype(np.uint8)), cnn)
    with pytest.raises(InputError, match="fewer samples than one batch"):
        load_calibration_npz(save(tmp_path, input=samples[:10]), cnn)
    with pytest.raises(InputError, match="batch dimension 50, not batch_size=64"):
        load_calibration_npz(CALIB, cnn, batch_size=64, names={"input": "x"})
    with pytest.raises(InputError, match="does not exist"):
        load_calibration_npz(tmp_path / "missing.npz", cnn)
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(InputError, match="not a readable .npz file"):
        load_calibration_npz(tmp_path / "text.npz", cnn)
    np.save(tmp_path / "single.npy", samples)
    with pytest.raises(InputError, match="holds a single array"):
        load_calibration_npz(tmp_path / "single.npy", cnn)
    wide = load_calibration_npz(save(tmp_path, input=samples.astype(np.float64)), cnn)
    assert wide[0]["input"].dtype == np.float32
