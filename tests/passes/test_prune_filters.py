"""Filter pruning (Li et al. 2017) really shrinks the graph: next layers, flatten → linear, BatchNorm,
depthwise convs, per-channel constants, concats and residual adds; it refuses what it cannot prune."""
from pathlib import Path

import numpy as np
import pytest

import lowbit
from lowbit.backends.reference import run_reference
from lowbit.ir import DType, Graph, TensorType, Value, constant_value
from lowbit.passes.prune import format_summary, prune

DATA = Path(__file__).resolve().parents[1] / "data"


class Builder:
    """A float NCHW graph with seeded random weights; `zero` lists, per conv, filters to make all-zero."""

    def __init__(self, shape=(2, 3, 8, 8), seed: int = 0, zero: dict | None = None) -> None:
        self.g = Graph("net")
        self.rng = np.random.default_rng(seed)
        self.zero = zero or {}
        self.x = self.g.add_input("x", TensorType(shape, DType.f32))

    def const(self, array: np.ndarray, name: str) -> Value:
        return self.g.add_constant(np.asarray(array, np.float32), name)

    def conv(self, x: Value, filters: int, name: str, kernel: int = 3, group: int = 1, **attrs) -> Value:
        w = self.rng.standard_normal((filters, x.type.shape[1] // group, kernel, kernel)) * 0.3
        b = self.rng.standard_normal(filters) * 0.1
        w[self.zero.get(name, [])] = 0
        b[self.zero.get(name, [])] = 0
        pads = (kernel // 2,) * 4
        return self.g.add("conv2d", x, self.const(w, f"{name}.weight"), self.const(b, f"{name}.bias"), name=name,
                          pads=pads, group=group, **attrs)

    def relu(self, x: Value) -> Value:
        return self.g.add("relu", x)

    def head(self, x: Value, classes: int = 5) -> Graph:
        pooled = self.g.add("global_avg_pool", x)
        flat = self.g.add("reshape", pooled, shape=(x.type.shape[0], x.type.shape[1]))
        w = self.const(self.rng.standard_normal((classes, x.type.shape[1])), "fc.weight")
        self.g.set_outputs([("y", self.g.add("linear", flat, w, name="fc"))])
        return self.g


def feeds(graph: Graph, seed: int = 0) -> dict:
    x = graph.inputs[0]
    return {x.name: np.random.default_rng(seed).standard_normal(x.type.shape).astype(np.float32)}


def assert_same_outputs(before: Graph, after: Graph) -> None:
    for seed in (0, 1):
        expected, actual = run_reference(before, feeds(before, seed)), run_reference(after, feeds(before, seed))
        for name in expected:
            np.testing.assert_allclose(actual[name], expected[name], rtol=1e-4, atol=1e-5)


def node(graph: Graph, name: str):
    return next(n for n in graph.nodes if n.name == name)


def residual_net(zero: dict | None = None) -> Graph:
    """stem (8) → relu → a (6) → relu → b (8) → + stem → relu → head: stem and b share channels."""
    n = Builder(zero=zero)
    stem = n.relu(n.conv(n.x, 8, "stem"))
    body = n.conv(n.relu(n.conv(stem, 6, "a")), 8, "b")
    return n.head(n.relu(n.g.add("add", body, stem)))


@pytest.mark.parametrize("fused", [False, True])
def test_residual_add_prunes_the_same_channels_on_both_branches(fused):
    # Filters that are exactly zero are the smallest by L1 and contribute nothing: pruning them (on
    # both sides of the add at once) must leave the outputs as they were.
    graph = residual_net(zero={"stem": [1, 5], "b": [1, 5], "a": [2, 3]})
    if fused:  # the add and relus become conv epilogues: b's residual operand is stem's output
        graph = lowbit.optimize(graph, "fuse-epilogue")
        assert len(node(graph, "b").inputs) == 4
    pruned = prune(graph, "filters", ratio=0.3)
    assert node(pruned, "stem").inputs[1].type.shape == (6, 3, 3, 3)
    assert node(pruned, "a").inputs[1].type.shape == (4, 6, 3, 3)
    assert node(pruned, "b").inputs[1].type.shape == (6, 4, 3, 3)
    assert node(pruned, "fc").inputs[1].type.shape == (5, 6)
    assert pruned.metadata["pruning"]["stem"]["channels"] == [6, 8]
    assert pruned.metadata["pruning"]["fc"]["inputs"] == [6, 8]
    assert_same_outputs(graph, pruned)
    assert pruned.parameter_count() < graph.parameter_count()


def test_channels_tied_to_a_graph_input_are_refused_with_a_reason():
    n = Builder(shape=(2, 8, 6, 6))
    mixed = n.g.add("add", n.conv(n.x, 8, "tied"), n.x)
    free = n.relu(n.conv(mixed, 4, "free"))
    graph = n.head(free)
    pruned = prune(graph, "filters:0.5")
    assert node(pruned, "tied").inputs[1].type.shape == (8, 8, 3, 3)
    assert node(pruned, "free").inputs[1].type.shape == (2, 8, 3, 3)
    reason = pruned.metadata["pruning"]["tied"]["skipped"]
    assert reason.startswith("filters-l1: ") and "cannot be pruned" in reason
    assert "left as is: filters-l1" in format_summary(pruned)


@pytest.mark.parametrize("op, why", [("output", "reach the graph output 'h'"),
                                     ("softmax", "works along the channel axis"),
                                     ("split", "has no channel rule")])
def test_refusals_name_the_op(op, why):
    n = Builder()
    h = n.relu(n.conv(n.x, 8, "c"))
    if op == "output":
        graph = n.head(h)
        graph.set_outputs(list(zip(graph.output_names, graph.outputs)) + [("h", h)])
    elif op == "softmax":
        graph = n.head(n.g.add("softmax", h, axis=1))
    else:
        first, _ = n.g.add_node("split", [h], {"axis": 1, "sizes": (4, 4)}).outputs
        graph = n.head(first)
    pruned = prune(graph, "filters:0.5")
    assert why in pruned.metadata["pruning"]["c"]["skipped"]
    assert_same_outputs(graph, pruned)


def test_batchnorm_depthwise_per_channel_constants_and_concat():
    zero = {"c1": [0, 3, 6], "c2": [1, 2], "dw": [0, 1, 6, 7, 12, 13]}
    n = Builder(zero=zero)
    h = n.conv(n.x, 8, "c1")
    params = [n.rng.uniform(0.5, 1.5, 8), n.rng.standard_normal(8) * 0.1, n.rng.standard_normal(8) * 0.1,
              n.rng.uniform(0.5, 2.0, 8)]
    for index in (1, 2):  # BN of an all-zero channel gives (0 - mean)·s + beta: make it 0 too.
        params[index][zero["c1"]] = 0
    h = n.relu(n.g.add("batch_norm", h, *[n.const(p, f"bn.{i}") for i, p in enumerate(params)]))
    h = n.conv(h, 16, "dw", group=8)  # depthwise, two outputs per channel
    h = n.g.add("mul", h, n.const(n.rng.uniform(0.5, 2.0, (1, 16, 1, 1)), "scale"))
    h = n.g.add("concat", h, n.relu(n.conv(n.x, 4, "c2")), axis=1)
    graph = n.head(n.conv(h, 6, "c3", kernel=1))
    # ratio 0.4: three of c1's 8 filters (the zero ones; 'dw' follows them), two of c2's 4.
    pruned = prune(graph, "filters:0.4", exclude=["c3"])
    dw = node(pruned, "dw")
    assert dw.attrs["group"] == 5 and dw.inputs[1].type.shape == (10, 1, 3, 3)
    assert node(pruned, "c1").inputs[1].type.shape == (5, 3, 3, 3)
    assert [v.type.shape for v in next(m for m in pruned.nodes if m.op == "batch_norm").inputs[1:]] == [(5,)] * 4
    assert next(m for m in pruned.nodes if m.op == "mul").inputs[1].type.shape == (1, 10, 1, 1)
    assert node(pruned, "c2").inputs[1].type.shape == (2, 3, 3, 3)
    assert node(pruned, "c3").inputs[1].type.shape == (6, 12, 1, 1)
    assert_same_outputs(graph, pruned)


def test_a_reshape_that_splits_channels_is_refused():
    n = Builder()
    h = n.relu(n.conv(n.x, 8, "c"))
    split = n.g.add("reshape", h, shape=(2, 4, 128))  # two channels per row: not channel-major
    w = n.const(n.rng.standard_normal((3, 128)), "fc.weight")
    n.g.set_outputs([("y", n.g.add("linear", split, w, name="fc"))])
    pruned = prune(n.g, "filters:0.5")
    assert "splits channels across axes" in pruned.metadata["pruning"]["c"]["skipped"]


def test_overrides_and_exclude():
    graph = residual_net()
    pruned = prune(graph, "filters", ratio=0.25, overrides={"a": 0.5}, exclude=["stem"])
    assert node(pruned, "a").inputs[1].type.shape[0] == 3
    # b is tied to stem, which is excluded: both keep their channels.
    assert node(pruned, "b").inputs[1].type.shape[0] == 8
    assert "excluded" in pruned.metadata["pruning"]["b"]["skipped"]


def digits_cnn() -> Graph:
    return lowbit.import_onnx(DATA / "digits_cnn.onnx", batch_size=50)


def test_digits_cnn_conv2_filters_shrink_the_gemm():
    graph = digits_cnn()
    pruned = prune(graph, "filters:0.25", exclude=["/conv1/Conv"])
    w2 = constant_value(node(graph, "/conv2/Conv").inputs[1])
    kept = np.sort(np.argsort(np.abs(w2).reshape(64, -1).sum(axis=1), kind="stable")[16:])
    assert node(pruned, "/conv2/Conv").inputs[1].type.shape == (48, 32, 3, 3)
    assert node(pruned, "/fc/Gemm").inputs[1].type.shape == (10, 48 * 25)
    assert node(pruned, "/Flatten").attrs["shape"] == (50, 1200)
    # The Gemm keeps exactly the columns of the surviving channels (channel-major flatten).
    columns = (kept[:, None] * 25 + np.arange(25)).ravel()
    np.testing.assert_array_equal(constant_value(node(pruned, "/fc/Gemm").inputs[1]),
                                  constant_value(node(graph, "/fc/Gemm").inputs[1])[:, columns])
    # Surviving channels compute exactly what they did.
    x = {"input": np.load(DATA / "digits_calib.npz")["x"][:50]}
    seen = {}
    for g in (graph, pruned):
        run_reference(g, x, observe=lambda n, r, g=g: seen.__setitem__((id(g), n.name), r[0]))
    for name in ("/conv2/Conv", "/MaxPool_1"):
        np.testing.assert_array_equal(seen[id(pruned), name], seen[id(graph), name][:, kept])
    assert pruned.metadata["pruning"]["/conv1/Conv"]["skipped"] == "filters-l1: excluded"


def test_digits_cnn_zero_filters_prune_away_exactly():
    graph = digits_cnn()
    conv2 = node(graph, "/conv2/Conv")
    channels = [3, 17, 40, 41, 63]
    for index in (1, 2):
        data = constant_value(conv2.inputs[index]).copy()
        data[channels] = 0
        conv2.set_input(index, graph.add_constant(data, conv2.inputs[index].name))
    graph.remove_unused_constants()
    pruned = prune(graph, "filters", overrides={"/conv2/Conv": 5 / 64}, exclude=["/conv1/Conv"])
    assert node(pruned, "/fc/Gemm").inputs[1].type.shape == (10, 59 * 25)
    x = {"input": np.load(DATA / "digits_test.npz")["x"][:50]}
    np.testing.assert_allclose(run_reference(pruned, x)["logits"], run_reference(graph, x)["logits"],
                               rtol=1e-5, atol=1e-5)


def test_digits_cnn_accuracy_after_filter_pruning():
    test = np.load(DATA / "digits_test.npz")
    graph = digits_cnn()
    pruned = prune(graph, "filters:0.25")
    predictions = np.concatenate([run_reference(pruned, {"input": test["x"][i:i + 50]})["logits"].argmax(1)
                                  for i in range(0, 500, 50)])
    assert pruned.parameter_count() < 0.7 * graph.parameter_count()
    assert (predictions == test["y"]).mean() >= 0.96
