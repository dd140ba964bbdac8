"""The SparseGPT weight update: the algorithm on synthetic data, the im2col Hessian of conv2d, layer order,
and real calibration data (digits CNN and MLP) where it must beat plain magnitude pruning."""
from pathlib import Path

import numpy as np
import pytest

import lowbit
from lowbit.backends.reference import run_reference
from lowbit.ir import DType, Graph, TensorType, constant_value
from lowbit.passes.prune import Pattern, prune, satisfies_nm, sparsegpt
from lowbit.passes.prune.hessian import collect_hessians, im2col, waves
from lowbit.passes.prune.layers import weight_layer
from lowbit.passes.prune.patterns import prune_count

DATA = Path(__file__).resolve().parents[1] / "data"
CALIB = np.load(DATA / "digits_calib.npz")["x"]
TEST = np.load(DATA / "digits_test.npz")
SHAPES = {"digits_cnn": (1, 28, 28), "mlp": (784,)}


def correlated_inputs(rows: int = 2000, cols: int = 64, seed: int = 0) -> np.ndarray:
    """Features that mostly lie in a 16-dimensional subspace: what layer inputs look like."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, 16)) @ rng.standard_normal((16, cols)) + 0.3 * rng.standard_normal((rows, cols))


def magnitude_then_sparsegpt(pattern: Pattern, fraction: float, weight: np.ndarray, hessian: np.ndarray):
    def select(block, inverse_diagonal, start):
        end = start + block.shape[1]
        count = prune_count(pattern.units(len(block), end), fraction) - prune_count(pattern.units(len(block), start),
                                                                                   fraction)
        return pattern.select(block ** 2 / inverse_diagonal ** 2, count)

    step = pattern.m if pattern.kind == "nm" else 32
    return sparsegpt(weight, hessian, select, step, block_size=32)


@pytest.mark.parametrize("pattern, fraction", [(Pattern(), 0.5), (Pattern(), 0.8), (Pattern("nm", 2, 4), 0.5),
                                               (Pattern("block", block=(1, 4)), 0.5)])
def test_sparsegpt_beats_magnitude_on_the_layer_output(pattern, fraction):
    x = correlated_inputs()
    hessian = x.T @ x / len(x)
    weight = np.random.default_rng(1).standard_normal((16, 64))
    updated = magnitude_then_sparsegpt(pattern, fraction, weight, hessian)
    plain = np.where(pattern.select(np.abs(weight), prune_count(pattern.units(16, 64), fraction)), 0, weight)
    assert (updated == 0).sum() == (plain == 0).sum() == prune_count(weight.size, fraction)
    if pattern.kind == "nm":
        assert satisfies_nm(updated, 2, 4)
    error = lambda w: np.linalg.norm(x @ (w - weight).T)  # noqa: E731
    assert error(updated) < 0.9 * error(plain)


def test_sparsegpt_is_sequential_optimal_brain_surgeon():
    # Row by row, column by column: pruning w_j moves the weights not yet visited by
    # -w_j / [H_F⁻¹]_00 · [H_F⁻¹]_0,: with F the columns from j on (the update SparseGPT makes exact).
    rng = np.random.default_rng(0)
    x = correlated_inputs(cols=12)
    hessian = x.T @ x / len(x)
    weight, mask = rng.standard_normal((3, 12)), rng.random((3, 12)) < 0.5
    updated = sparsegpt(weight, hessian, lambda block, _, start: mask[:, start:start + block.shape[1]], 4,
                        damping=1e-12, block_size=4)
    expected = weight.copy()
    for row in range(3):
        for j in np.flatnonzero(mask[row]):
            inverse = np.linalg.inv(hessian[j:, j:])
            expected[row, j:] -= expected[row, j] / inverse[0, 0] * inverse[0]
    np.testing.assert_allclose(updated, expected, atol=1e-8)


def test_inputs_that_are_always_zero_free_their_weights():
    x = correlated_inputs(cols=16)
    x[:, 3] = 0
    weight = np.random.default_rng(1).standard_normal((4, 16))
    updated = magnitude_then_sparsegpt(Pattern(), 0.25, weight, x.T @ x / len(x))
    assert (updated[:, 3] == 0).all()


def test_im2col_rows_times_the_weight_matrix_is_the_convolution():
    rng = np.random.default_rng(0)
    g = Graph("c")
    x = g.add_input("x", TensorType((2, 4, 7, 6), DType.f32))
    w = g.add_constant(rng.standard_normal((6, 2, 3, 2)).astype(np.float32), "w")
    attrs = {"pads": (1, 0, 2, 1), "strides": (2, 1), "dilations": (1, 2), "group": 2}
    y = g.add("conv2d", x, w, **attrs)
    g.set_outputs([("y", y)])
    data = rng.standard_normal((2, 4, 7, 6)).astype(np.float32)
    expected = run_reference(g, {"x": data})["y"]
    layer = weight_layer(g.nodes[0])
    rows = im2col(data, (3, 2), g.nodes[0].attrs)
    weights = layer.matrix()
    for group, matrix in enumerate(rows):
        product = matrix @ weights[3 * group:3 * group + 3].T  # [N·OH·OW, 3]
        got = product.reshape(2, y.type.shape[2], y.type.shape[3], 3).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(got, expected[:, 3 * group:3 * group + 3], rtol=1e-4, atol=1e-4)


def test_layers_are_pruned_after_the_layers_that_feed_them():
    rng = np.random.default_rng(0)
    g = Graph("g")
    x = g.add_input("x", TensorType((4, 8), DType.f32))
    const = lambda shape, name: g.add_constant(rng.standard_normal(shape).astype(np.float32), name)  # noqa: E731
    q = g.add("linear", x, const((8, 8), "q"), name="q")
    k = g.add("linear", x, const((8, 8), "k"), name="k")
    out = g.add("linear", g.add("add", q, k), const((4, 8), "o"), name="o")
    g.set_outputs([("y", out)])
    layers = [weight_layer(n) for n in g.nodes if n.op == "linear"]
    assert [[layer.name for layer in wave] for wave in waves(g, layers)] == [["q", "k"], ["o"]]
    feeds = [{"x": rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(3)]
    hessians = collect_hessians(g, layers, feeds)
    stacked = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    np.testing.assert_allclose(hessians[id(g.nodes[0])][0], stacked.T @ stacked / 12, rtol=1e-6)


def test_grouped_conv_counts_are_exact_per_layer():
    rng = np.random.default_rng(0)
    g = Graph("dw")
    x = g.add_input("x", TensorType((2, 6, 8, 8), DType.f32))
    w = g.add_constant(rng.standard_normal((6, 1, 3, 3)).astype(np.float32), "dw.weight")
    g.set_outputs([("y", g.add("conv2d", x, w, name="dw", group=6, pads=(1, 1, 1, 1)))])
    calibration = [{"x": rng.standard_normal((2, 6, 8, 8)).astype(np.float32)} for _ in range(2)]
    pruned = prune(g, "magnitude:0.5", calibration=calibration)
    assert (constant_value(pruned.nodes[0].inputs[1]) == 0).sum() == 27  # round(0.5 · 54), not 6 · 5
    assert pruned.metadata["pruning"]["dw"]["update"] == "sparsegpt"


def model(name: str) -> lowbit.Graph:
    return lowbit.import_onnx(DATA / f"{name}.onnx", batch_size=100)


def inputs(name: str, x: np.ndarray) -> np.ndarray:
    return x.reshape((-1,) + SHAPES[name])


def logits(graph: lowbit.Graph, x: np.ndarray) -> np.ndarray:
    return np.concatenate([run_reference(graph, {"input": x[i:i + 100]})["logits"] for i in range(0, len(x), 100)])


def accuracy(graph: lowbit.Graph, name: str) -> float:
    return float((logits(graph, inputs(name, TEST["x"])).argmax(1) == TEST["y"]).mean())


@pytest.mark.parametrize("name, spec", [("mlp", "magnitude:0.8"), ("digits_cnn", "magnitude:0.7"),
                                        ("digits_cnn", "nm:2:4")])
def test_update_reduces_the_output_error_on_real_data(name, spec):
    graph = model(name)
    calibration = {"input": inputs(name, CALIB)}
    plain = prune(graph, spec)
    updated = prune(graph, spec, calibration=calibration)
    x = inputs(name, TEST["x"][:200])
    reference = logits(graph, x)
    error = lambda g: np.linalg.norm(logits(g, x) - reference)  # noqa: E731
    assert error(updated) < 0.8 * error(plain)
    records = updated.metadata["pruning"]
    assert all(r["update"] == "sparsegpt" and r["output_error"] < 0.5 for r in records.values() if "update" in r)
    measured = prune(graph, spec, calibration=calibration, update=False)
    assert all(r["update"] == "none" and "output_error" in r for r in measured.metadata["pruning"].values()
               if "update" in r)
    for node in updated.nodes:
        weight = constant_value(node.inputs[1]) if node.op in ("conv2d", "linear") else None
        if weight is not None and spec.startswith("nm") and node.name in records and "n" in records[node.name]:
            assert satisfies_nm(weight.reshape(weight.shape[0], -1), 2, 4)


@pytest.mark.parametrize("name", ["digits_cnn", "mlp"])
def test_half_sparse_plus_int8_keeps_accuracy(name):
    graph = model(name)
    calibration = {"input": inputs(name, CALIB)}
    baseline = accuracy(graph, name)
    for spec in ("magnitude:0.5", "nm:2:4"):
        quantized = lowbit.quantize(prune(graph, spec, calibration=calibration), calibration, progress=False)
        assert accuracy(quantized, name) >= baseline - 0.01, spec


def test_calibration_from_an_npz_path_in_a_pipeline(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, input=inputs("mlp", CALIB[:100]))
    pruned = lowbit.optimize(model("mlp"), f"prune-nm{{n=2,m=4,calibration={path}}}")
    assert pruned.metadata["pruning"]["/fc1/Gemm"]["update"] == "sparsegpt"
