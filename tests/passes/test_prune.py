"""Weight pruning patterns (exact counts, N:M groups, whole blocks), options, specs, the summary, and
`sparsify`'s layouts."""
import numpy as np
import pytest
from filecheck import filecheck

import lowbit
from lowbit.ir import DType, Graph, TensorType, constant_value, parse, verify
from lowbit.passes import PassError, parse_pipeline
from lowbit.passes.prune import (PruneError, format_summary, parse_prune_spec, prune, pruning_summary,
                                 satisfies_nm, zero_block_fraction)


def mlp(seed: int = 0, scale2: float = 1.0) -> Graph:
    """x [4, 32] → linear fc1 [24, 32] → relu → linear fc2 [8, 24]."""
    rng = np.random.default_rng(seed)
    g = Graph("mlp")
    x = g.add_input("x", TensorType((4, 32), DType.f32))
    w1 = g.add_constant(rng.standard_normal((24, 32)).astype(np.float32), "fc1.weight")
    w2 = g.add_constant((scale2 * rng.standard_normal((8, 24))).astype(np.float32), "fc2.weight")
    h = g.add("relu", g.add("linear", x, w1, name="fc1"))
    g.set_outputs([("y", g.add("linear", h, w2, name="fc2"))])
    return g


def convnet(seed: int = 0) -> Graph:
    """x [2, 3, 8, 8] → conv c1 (8 filters, 3x3, K=27) → relu → conv c2 (8 filters, 3x3, K=72)."""
    rng = np.random.default_rng(seed)
    g = Graph("conv")
    x = g.add_input("x", TensorType((2, 3, 8, 8), DType.f32))
    w1 = g.add_constant(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "c1.weight")
    w2 = g.add_constant(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), "c2.weight")
    h = g.add("relu", g.add("conv2d", x, w1, name="c1", pads=(1, 1, 1, 1)))
    g.set_outputs([("y", g.add("conv2d", h, w2, name="c2"))])
    return g


def weights(graph: Graph) -> dict[str, np.ndarray]:
    return {node.name: constant_value(node.inputs[1]) for node in graph.nodes if node.op in ("linear", "conv2d")}


def matrix(array: np.ndarray) -> np.ndarray:
    return array.reshape(array.shape[0], -1)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_magnitude_prunes_exactly_the_smallest_weights(sparsity):
    graph = mlp()
    pruned = prune(graph, "magnitude", sparsity=sparsity)
    for name, before in weights(graph).items():
        after = weights(pruned)[name]
        zero = after == 0
        assert zero.sum() == int(np.floor(before.size * sparsity + 0.5))
        assert np.abs(before[zero]).max() <= np.abs(before[~zero]).min()
        np.testing.assert_array_equal(after[~zero], before[~zero])
    assert pruned.metadata["pruning"]["fc1"]["pattern"] == "unstructured"
    assert "pruning" not in graph.metadata and not (weights(graph)["fc1"] == 0).any()


def test_global_scope_uses_one_threshold():
    graph = mlp(scale2=0.1)
    pruned = prune(graph, "magnitude:0.6:global")
    before, after = weights(graph), weights(pruned)
    pooled_before = np.concatenate([np.abs(w).ravel() for w in before.values()])
    pooled_after = np.concatenate([w.ravel() for w in after.values()])
    assert (pooled_after == 0).sum() == int(np.floor(pooled_before.size * 0.6 + 0.5))
    assert pooled_before[pooled_after == 0].max() <= pooled_before[pooled_after != 0].min()
    records = pruned.metadata["pruning"]
    assert records["fc2"]["sparsity"] > 0.9 > records["fc1"]["sparsity"]


def test_random_is_exact_and_seeded():
    graph = mlp()
    first, again, other = (prune(graph, "random", sparsity=0.5, seed=s) for s in (1, 1, 2))
    mask = weights(first)["fc1"] == 0
    assert mask.sum() == 24 * 32 // 2
    np.testing.assert_array_equal(mask, weights(again)["fc1"] == 0)
    assert (mask != (weights(other)["fc1"] == 0)).any()


def test_nm_keeps_the_n_largest_of_every_m_along_k():
    graph = convnet()
    pruned = lowbit.optimize(graph, "prune-nm{n=2,m=4}")
    before, after = matrix(weights(graph)["c2"]), matrix(weights(pruned)["c2"])
    assert satisfies_nm(after, 2, 4) and (after == 0).mean() == 0.5
    groups_before, groups_after = before.reshape(8, -1, 4), after.reshape(8, -1, 4)
    kept_min = np.where(groups_after != 0, np.abs(groups_before), np.inf).min(axis=-1)
    pruned_max = np.where(groups_after == 0, np.abs(groups_before), -np.inf).max(axis=-1)
    assert (pruned_max <= kept_min).all()
    # c1's K = 3·3·3 = 27 is not a multiple of 4: it stays dense and the summary says why.
    np.testing.assert_array_equal(weights(pruned)["c1"], weights(graph)["c1"])
    assert "K=27 is not a multiple of m=4" in pruned.metadata["pruning"]["c1"]["skipped"]
    assert "K=27" in format_summary(pruned)


def test_nm_1_of_4_and_4_of_8():
    graph = mlp()
    for n, m in ((1, 4), (4, 8)):
        after = weights(prune(graph, "nm", n=n, m=m))["fc1"]
        assert satisfies_nm(after, n, m) and (after == 0).mean() == 1 - n / m


@pytest.mark.parametrize("shape", [(1, 4), (4, 1), (2, 2)])
def test_block_pruning_zeros_whole_blocks_by_l1(shape):
    graph = mlp()
    after = weights(prune(graph, "block", block=shape, sparsity=0.5))["fc1"]
    before = weights(graph)["fc1"]
    r, c = shape
    blocks_after = np.abs(after).reshape(24 // r, r, 32 // c, c).sum(axis=(1, 3))
    norms = np.abs(before).reshape(24 // r, r, 32 // c, c).sum(axis=(1, 3))
    zero = blocks_after == 0
    assert zero.sum() == norms.size // 2 and zero_block_fraction(after, shape) == 0.5
    assert norms[zero].max() <= norms[~zero].min()
    assert (after == 0).mean() == 0.5


def test_block_pruning_skips_layers_the_blocks_do_not_tile():
    pruned = prune(mlp(), "block:12x1:0.5")
    assert "not tiled by 12x1" in pruned.metadata["pruning"]["fc2"]["skipped"]
    assert pruned.metadata["pruning"]["fc1"]["block"] == [12, 1]


def test_matmul_by_a_constant_prunes_along_k():
    rng = np.random.default_rng(0)
    g = Graph("mm")
    x = g.add_input("x", TensorType((3, 16), DType.f32))
    w = g.add_constant(rng.standard_normal((16, 6)).astype(np.float32), "w")
    g.set_outputs([("y", g.add("matmul", x, w, name="mm"))])
    after = constant_value(prune(g, "nm:2:4").nodes[0].inputs[1])
    assert after.shape == (16, 6) and satisfies_nm(after.T, 2, 4)


def test_exclude_and_overrides():
    graph = convnet()
    pruned = prune(graph, "magnitude", sparsity=0.5, exclude=["c1"], overrides={"c2": 0.75})
    assert not (weights(pruned)["c1"] == 0).any()
    assert (weights(pruned)["c2"] == 0).mean() == 0.75
    assert pruned.metadata["pruning"]["c1"]["skipped"] == "magnitude: excluded"
    by_op = prune(graph, "magnitude", sparsity=0.5, exclude="conv2d")
    assert all(not (w == 0).any() for w in weights(by_op).values())
    by_weight_name = lowbit.optimize(graph, "prune-magnitude{sparsity=0.5,overrides=c2.weight:0.25;c1:0}")
    assert (weights(by_weight_name)["c2"] == 0).mean() == 0.25
    assert "override 0" in by_weight_name.metadata["pruning"]["c1"]["skipped"]


@pytest.mark.parametrize("pipeline, message", [
    ("prune-magnitude{sparsity=1.5}", "expected a number in [0, 1)"),
    ("prune-magnitude{sparsity=90}", "0.9 means 90%"),
    ("prune-magnitude{scope=everything}", "scope must be 'layer' or 'global'"),
    ("prune-nm{n=4,m=4}", "needs 0 < n < m"),
    ("prune-nm{n=two}", "cannot read 'two' as int"),
    ("prune-block{shape=1x0}", "two positive sizes"),
    ("prune-random{update=maybe}", "update must be one of"),
    ("prune-magnitude{update=sparsegpt}", "needs calibration data"),
    ("prune-magnitude{overrides=fc9:0.5}", "unknown layer(s) ['fc9']"),
    ("prune-magnitude{overrides=fc1}", "needs the form NAME:VALUE"),
    ("prune-nm{overrides=fc1:0.5}", "can only be 0"),
    ("prune-filters-l1{ratio=-0.1}", "expected a number in [0, 1)"),
    ("sparsify{format=coo}", "format must be one of"),
    ("prune-magnitude{calibration=/nonexistent.npz}", "does not exist"),
])
def test_bad_options_say_what_is_wrong(pipeline, message):
    with pytest.raises(PassError) if "cannot read" in message else pytest.raises(lowbit.LowbitError) as error:
        lowbit.optimize(mlp(), pipeline)
    assert message in str(error.value)


def test_pipeline_text_round_trips_through_spec():
    for text in ("prune-nm{n=1,m=8}", "prune-block{shape=4x1,sparsity=0.7}",
                 "prune-magnitude{sparsity=0.8,scope=global,exclude=fc1;conv2d}", "prune-random{seed=3}",
                 "prune-filters-l1{ratio=0.4}", "sparsify{min_sparsity=0.6,format=bsr}"):
        (item,) = parse_pipeline(text)
        assert parse_pipeline(item.spec())[0] == item
    (block,) = parse_pipeline("prune-block{shape=4x1}")
    assert block.shape == (4, 1)


@pytest.mark.parametrize("spec, expected", [
    ("magnitude:0.9", ("magnitude", {"sparsity": 0.9})),
    ("magnitude:0.5:global", ("magnitude", {"sparsity": 0.5, "scope": "global"})),
    ("random:0.5", ("random", {"sparsity": 0.5})),
    ("random:0.25:7", ("random", {"sparsity": 0.25, "seed": 7})),
    ("nm:2:4", ("nm", {"n": 2, "m": 4})),
    ("block:1x4:0.8", ("block", {"block": (1, 4), "sparsity": 0.8})),
    ("filters:0.3", ("filters", {"ratio": 0.3})),
    ("nm", ("nm", {})),
])
def test_parse_prune_spec(spec, expected):
    assert parse_prune_spec(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("prune:0.5", "unknown pruning method 'prune'"),
    ("magnitude:90", "0.9 means 90%"),
    ("magnitude:abc", "expected a number in [0, 1)"),
    ("magnitude:0.5:sideways", "the scope is 'layer' or 'global'"),
    ("nm:2", "expected nm:N:M (1 argument(s) given)"),
    ("nm:4:2", "0 < N < M"),
    ("nm:2:four", "not a number"),
    ("block:14:0.5", "like 1x4"),
    ("filters:0.3:0.4", "expected filters:RATIO"),
    ("random:0.5:seven", "not a number"),
])
def test_parse_prune_spec_errors(spec, message):
    with pytest.raises(PruneError) as error:
        parse_prune_spec(spec)
    assert message in str(error.value)


def test_prune_rejects_options_of_another_method():
    with pytest.raises(PruneError, match="sparsity do not apply to nm pruning"):
        prune(mlp(), "nm", sparsity=0.5)
    with pytest.raises(PruneError, match="update do not apply to filters pruning"):
        prune(mlp(), "filters", update=True)


def test_summary_and_metadata_survive_the_text_form():
    pruned = prune(convnet(), "nm:2:4")
    rows = {row.name: row for row in pruning_summary(pruned)}
    assert rows["c2"].sparsity == 0.5 and rows["c2"].params == 576 and rows["c2"].pattern == "nm"
    assert rows["c2"].output_error is None and 0 < rows["c2"].weight_error < 1
    table = format_summary(pruned)
    assert table.splitlines()[0].split()[:4] == ["layer", "op", "method", "pattern"]
    assert "total: 288 of 792 weights are zero (36.4%)" in table
    again = parse(pruned.to_text(full=True))
    assert again.metadata["pruning"] == pruned.metadata["pruning"]
    verify(again)


def test_quantization_keeps_pruned_weights_zero():
    graph = convnet()
    pruned = prune(graph, "magnitude:0.6")
    rng = np.random.default_rng(1)
    calibration = [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(2)]
    quantized = lowbit.quantize(pruned, calibration, progress=False)
    integer = {n.name: constant_value(n.inputs[1]) for n in quantized.nodes if n.op == "qconv2d"}
    for name, before in weights(pruned).items():
        assert (integer[name][before == 0] == 0).all()


def test_sparsify_chooses_nm_bsr_and_csr():
    graph = mlp()
    layout = lambda g, name: next(n for n in g.nodes if n.name == name).inputs[1].type.layout  # noqa: E731
    nm = lowbit.optimize(prune(graph, "nm:2:4"), "sparsify")
    assert str(layout(nm, "fc1")) == "sparse<nm, n=2, m=4>"
    block = lowbit.optimize(prune(graph, "block:2x4:0.6"), "sparsify")
    assert str(layout(block, "fc1")) == "sparse<bsr, block=[2, 4]>"
    unstructured = lowbit.optimize(prune(graph, "magnitude:0.8"), "sparsify")
    assert str(layout(unstructured, "fc1")) == "sparse<csr>"
    assert unstructured.metadata["pruning"]["fc1"]["layout"] == "sparse<csr>"
    assert layout(lowbit.optimize(graph, "sparsify"), "fc1") is None
    assert layout(lowbit.optimize(prune(graph, "magnitude:0.4"), "sparsify"), "fc1") is None
    assert str(layout(lowbit.optimize(prune(graph, "nm:2:4"), "sparsify{format=csr}"), "fc1")) == "sparse<csr>"
    assert layout(lowbit.optimize(prune(graph, "nm:2:4"), "sparsify{min_sparsity=0.6}"), "fc1") is None
    forced = lowbit.optimize(prune(graph, "magnitude:0.95"), "sparsify{format=bsr}")
    assert layout(forced, "fc1").format == "bsr"
    # The dense data stays; the layout prints and parses back.
    np.testing.assert_array_equal(constant_value(nm.nodes[0].inputs[1]), weights(prune(graph, "nm:2:4"))["fc1"])
    filecheck(str(nm), "CHECK: @fc1.weight = const f32[24,32] sparse<nm, n=2, m=4>")
    assert str(parse(str(nm))) == str(nm)


def test_sparsify_sees_quantized_weights():
    graph = prune(convnet(), "nm:2:4")
    rng = np.random.default_rng(1)
    quantized = lowbit.quantize(graph, [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}],
                                progress=False)
    sparse = lowbit.optimize(quantized, "sparsify")
    (c2,) = [n for n in sparse.nodes if n.name == "c2"]
    assert c2.op == "qconv2d" and str(c2.inputs[1].type.layout) == "sparse<nm, n=2, m=4>"
    assert c2.inputs[1].type.quant is not None
