"""SSA bookkeeping and the safe mutation primitives of the IR core."""
import numpy as np
import pytest

from lowbit.errors import ShapeError, VerificationError
from lowbit.ir import DType, Graph, TensorType, verify


def small_graph():
    graph = Graph("g")
    x = graph.add_input("x", TensorType((2, 3), DType.f32))
    bias = graph.add_constant(np.ones(3, np.float32), "bias")
    added = graph.add("add", x, bias)
    activated = graph.add("relu", added)
    graph.set_outputs([("y", activated)])
    return graph, x, bias, added, activated


def test_use_lists_track_operands():
    graph, x, bias, added, activated = small_graph()
    assert x.uses == [(added.producer, 0)]
    assert bias.uses == [(added.producer, 1)]
    assert added.users == [activated.producer]
    assert activated.uses == [] and graph.is_output(activated)
    verify(graph)


def test_replace_all_uses_with_updates_operands_and_outputs():
    graph, x, bias, added, activated = small_graph()
    doubled = graph.add_node("mul", [x, x], after=added.producer).output
    graph.replace_all_uses_with(added, doubled)
    assert activated.producer.inputs[0] is doubled
    assert added.uses == []
    graph.replace_all_uses_with(activated, doubled)
    assert graph.outputs == [doubled]
    verify(graph)


def test_erase_refuses_while_uses_remain():
    graph, x, bias, added, activated = small_graph()
    with pytest.raises(VerificationError, match="used by node relu"):
        graph.erase(added.producer)
    with pytest.raises(VerificationError, match="graph output"):
        graph.erase(activated.producer)


def test_erase_unused_node_clears_its_uses():
    graph, x, bias, added, activated = small_graph()
    graph.replace_all_uses_with(activated, added)
    graph.erase(activated.producer)
    assert added.uses == [] and graph.outputs == [added]
    assert [n.op for n in graph.nodes] == ["add"]
    verify(graph)


def test_iteration_survives_insertion_and_erasure():
    graph, x, bias, added, activated = small_graph()
    seen = []
    for node in graph.iter_nodes():
        seen.append(node.op)
        if node.op == "add":
            negated = graph.add_node("neg", [x], before=node).output
            graph.replace_all_uses_with(added, negated)
            graph.erase(node)
    assert seen == ["add", "relu"]
    assert [n.op for n in graph.nodes] == ["neg", "relu"]
    verify(graph)


def test_eliminate_dead_code_removes_unused_nodes_and_constants():
    graph, x, bias, added, activated = small_graph()
    unused = graph.add_constant(np.zeros(4, np.float32), "unused")
    graph.add("neg", unused)
    assert graph.eliminate_dead_code() == 2
    assert [c.name for c in graph.constants] == ["bias"]
    verify(graph)


def test_type_inference_rejects_mismatched_operands():
    graph = Graph()
    a = graph.add_input("a", TensorType((2, 3), DType.f32))
    b = graph.add_input("b", TensorType((4,), DType.f32))
    with pytest.raises(ShapeError, match="do not broadcast"):
        graph.add("add", a, b, name="bad_add")
    c = graph.add_input("c", TensorType((3,), DType.i64))
    with pytest.raises(ShapeError, match="bad_mul.*one element type"):
        graph.add("mul", a, c, name="bad_mul")


def test_verifier_names_the_node_with_a_wrong_type():
    graph, x, bias, added, activated = small_graph()
    activated.producer.name = "act"
    activated.type = TensorType((2, 4), DType.f32)
    with pytest.raises(VerificationError, match="node 'act' \\(relu\\) at position 1.*inference gives f32\\[2,3\\]"):
        verify(graph)


def test_verifier_catches_use_before_definition():
    graph, x, bias, added, activated = small_graph()
    graph.nodes.reverse()
    with pytest.raises(VerificationError, match="not defined before use"):
        verify(graph)


def test_copy_is_independent():
    graph, *_ = small_graph()
    clone = graph.copy()
    assert str(clone) == str(graph)
    clone.add("neg", clone.outputs[0])
    assert len(graph.nodes) == 2 and len(clone.nodes) == 3
    verify(clone)
