"""BERT graphs as torch's TorchScript exporter writes them (tests/data/torch_bert_tiny*.onnx, made by
tools/export_torch_fixtures.py): imported with their dynamic batch and sequence bound, compared with
onnxruntime, stripped of every shape computation, and fused by the default pipeline.

torch is not needed here: the fixtures are checked in.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from harness import DATA, assert_close_to_onnxruntime, run_onnxruntime

import lowbit
from lowbit.ir import Graph
from lowbit.ir.graph import is_float_type

LAYERS = 2
VOCAB = 200


@dataclass(frozen=True)
class Fixture:
    file: str
    head_size: int
    # What stays of the attention-mask computation after import, op → count: it reads the run-time
    # mask, so it cannot fold; the shape arithmetic around it (Shape, Range, ConstantOfShape, Equal,
    # Where and Expand on shapes, Unsqueeze/Concat of dims) has folded into constants.
    mask_ops: dict[str, int]
    layernorm_decomposed: bool = False


# transformers 5 builds the mask as mask.flatten()[b * S + s] (a gather with folded indices),
# ANDed with an all-true [1, 1, S, 1] (the folded "key index >= 0" of its mask functions), then
# Where(mask, 0, float32 min).
TRANSFORMERS_MASK = {"cast": 1, "reshape": 3, "gather": 1, "logical_and": 1, "where": 1}
FIXTURES = {
    "eager": Fixture("torch_bert_tiny.onnx", 16, TRANSFORMERS_MASK),
    "opset14": Fixture("torch_bert_tiny_opset14.onnx", 16, TRANSFORMERS_MASK, layernorm_decomposed=True),
    "nofold": Fixture("torch_bert_tiny_nofold.onnx", 16, TRANSFORMERS_MASK),
    # The boolean mask goes to scaled_dot_product_attention, whose export turns it into
    # Where(mask, 0, -inf) in each layer (merged by CSE) instead of Where(mask, 0, float32 min) once,
    # and guards the product with v by Where(IsNaN(p), 0, p) (fused as zero_nan_probs).
    "sdpa": Fixture("torch_bert_tiny_sdpa.onnx", 16, TRANSFORMERS_MASK | {"where": LAYERS}),
    # transformers 4.x: (1 - mask[:, None, None, :]) * float32 min.
    "classic": Fixture("torch_bert_tiny_classic.onnx", 12, {"reshape": 2, "cast": 1, "sub": 1, "mul": 1}),
    # transformers 4.41+ sdpa: the mask expanded to [B, 1, S, S], inverted, masked_fill with float32 min.
    "classic_sdpa": Fixture("torch_bert_tiny_classic_sdpa.onnx", 12,
                            {"reshape": 2, "expand": 1, "cast": 2, "sub": 1, "where": 1}),
}
SHAPES = [(2, 16), (3, 24)]


@functools.cache
def imported(name: str, batch: int, sequence: int) -> Graph:
    return lowbit.import_onnx(DATA / FIXTURES[name].file, batch_size=batch, dims={"sequence": sequence})


@functools.cache
def optimized(name: str) -> Graph:
    return lowbit.optimize(imported(name, *SHAPES[0]))


def feeds(name: str, batch: int, sequence: int) -> dict[str, np.ndarray]:
    """Random ids; the first row attends everywhere, the others have padding of growing length."""
    rng = np.random.default_rng(7)
    mask = np.ones((batch, sequence), np.int64)
    for row in range(1, batch):
        mask[row, sequence - 3 * row - 2:] = 0
    by_name = {"input_ids": rng.integers(0, VOCAB, (batch, sequence)), "attention_mask": mask,
               "token_type_ids": rng.integers(0, 2, (batch, sequence))}
    inputs = onnx.load(DATA / FIXTURES[name].file, load_external_data=False).graph.input
    return {i.name: by_name[i.name] for i in inputs}


@functools.cache
def expected(name: str, batch: int, sequence: int) -> dict[str, np.ndarray]:
    outputs = run_onnxruntime(DATA / FIXTURES[name].file, feeds(name, batch, sequence))
    for output, array in outputs.items():
        assert np.isfinite(array).all() and np.ptp(array) > 0, f"degenerate output '{output}'"
    return outputs


def input_dependencies(graph: Graph) -> dict[int, frozenset[str]]:
    """For each node (by id), the names of the graph inputs it reads, directly or through others."""
    reads = {id(value): frozenset([value.name]) for value in graph.inputs}
    by_node = {}
    for node in graph.nodes:
        names = frozenset().union(*(reads.get(id(v), frozenset()) for v in node.inputs if v is not None))
        by_node[id(node)] = names
        for value in node.outputs:
            reads[id(value)] = names
    return by_node


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", FIXTURES)
def test_matches_onnxruntime(name, shape):
    graph = imported(name, *shape)
    assert graph.input("input_ids").type.shape == shape
    assert_close_to_onnxruntime(lowbit.run_reference(graph, feeds(name, *shape)), expected(name, *shape))


@pytest.mark.parametrize("name", FIXTURES)
def test_shape_computations_fold_away(name):
    """Every node left reads a graph input (anything else would have folded), and besides the
    attention-mask path every node computes floats: no shape, index or boolean arithmetic remains."""
    graph = imported(name, *SHAPES[0])
    reads = input_dependencies(graph)
    constant_only = [n.describe() for n in graph.nodes if not reads[id(n)]]
    assert not constant_only, f"nodes computed from constants alone: {constant_only}"
    mask_path = [n for n in graph.nodes if reads[id(n)] == {"attention_mask"}]
    histogram = {op: sum(n.op == op for n in mask_path) for op in {n.op for n in mask_path}}
    assert histogram == FIXTURES[name].mask_ops
    # The sdpa export's IsNaN guard (Equal(p, p), Not) is boolean arithmetic on float data.
    not_float = [n.describe() for n in graph.nodes if n not in mask_path
                 and not all(is_float_type(v) for v in n.outputs) and n.op not in ("equal", "logical_not")]
    assert not not_float, f"integer or boolean computations outside the mask: {not_float}"
    for shape_op in ("shape", "range", "constant_of_shape", "concat", "unsqueeze", "squeeze", "slice"):
        assert shape_op not in graph.op_histogram()


@pytest.mark.parametrize("name", FIXTURES)
def test_optimize_keeps_outputs(name):
    got = lowbit.run_reference(optimized(name), feeds(name, *SHAPES[0]))
    assert_close_to_onnxruntime(got, expected(name, *SHAPES[0]))


@pytest.mark.parametrize("name", FIXTURES)
def test_layernorm_and_gelu_fuse(name):
    before, after = imported(name, *SHAPES[0]).op_histogram(), optimized(name).op_histogram()
    # Embeddings, then after attention and after the feed-forward part of every layer.
    layer_norms = 2 * LAYERS + 1
    if FIXTURES[name].layernorm_decomposed:
        assert "layer_norm" not in before and before["reduce_mean"] == 2 * layer_norms
    assert after.get("layer_norm") == layer_norms
    assert after.get("gelu") == LAYERS
    for leftover in ("reduce_mean", "sqrt", "pow", "erf"):
        assert leftover not in after


@pytest.mark.parametrize("name", list(FIXTURES))
def test_attention_fuses_one_per_layer(name):
    after = optimized(name)
    attentions = [n for n in after.nodes if n.op == "attention"]
    assert len(attentions) == LAYERS
    for node in attentions:
        assert math.isclose(node.attrs["scale"], FIXTURES[name].head_size ** -0.5, rel_tol=1e-6)
        assert node.inputs[3] is not None, "the mask was left out of the fused attention"
    histogram = after.op_histogram()
    # Every matmul became a linear (weights) or went into an attention; the scale went with it.
    for leftover in ("softmax", "matmul", "div"):
        assert leftover not in histogram
    reads = input_dependencies(after)
    scalings = [n.describe() for n in after.nodes if n.op == "mul" and reads[id(n)] != {"attention_mask"}]
    assert not scalings, f"multiplications left outside the mask: {scalings}"
