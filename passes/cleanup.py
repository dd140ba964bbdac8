"""Generic clean-up passes: type inference, constant folding, dead code, common subexpressions, no-ops."""
from __future__ import annotations

import hashlib

import numpy as np

from lowbit.backends.reference import evaluate_node
from lowbit.ir import Graph, Node, TensorType, Value, constant_value, get_op
from lowbit.ir.registry import infer_types
from lowbit.passes.registry import register
from lowbit.passes.rewrite import RewritePattern, apply_patterns


@register("infer-shapes")
def infer_shapes(graph: Graph) -> bool:
    """Re-infer every result's shape and element type in order (after edits that changed operand types)."""
    changed = False
    for node in graph.nodes:
        types = infer_types(node.op, [v.type if v is not None else None for v in node.inputs], node.attrs,
                            [constant_value(v) for v in node.inputs], node.describe())
        for value, inferred in zip(node.outputs, types):
            if (value.type.shape, value.type.dtype) != (inferred.shape, inferred.dtype):
                value.type = TensorType(inferred.shape, inferred.dtype)
                changed = True
    return changed


@register("fold-constants")
def fold_constants(graph: Graph, *, max_elements: int = 1 << 24) -> bool:
    """Evaluate nodes whose operands are all constants with the reference interpreter; keep the results.

    Results larger than `max_elements` stay computed at run time (e.g. an Expand to a huge tensor).
    `dequantize` is never folded: a quantized weight stays an integer constant for integer ops.
    """
    changed = False
    for node in graph.iter_nodes():
        if "pure" not in get_op(node.op).traits or node.op == "dequantize":
            continue
        operands = [constant_value(v) if v is not None else None for v in node.inputs]
        if any(v is not None and data is None for v, data in zip(node.inputs, operands)):
            continue
        if sum(v.type.size for v in node.outputs) > max_elements:
            continue
        for value, array in zip(node.outputs, evaluate_node(node, operands)):
            graph.replace_all_uses_with(value, graph.add_constant(array, node.name or node.op, value.type))
        graph.erase(node)
        changed = True
    graph.remove_unused_constants()
    return changed


@register("dce")
def dead_code_elimination(graph: Graph) -> bool:
    """Remove nodes whose results are never used, and unused constants."""
    return graph.eliminate_dead_code() > 0


def _constant_key(value: Value) -> tuple:
    data = value.data
    return (value.type, hashlib.sha1(np.ascontiguousarray(data).tobytes()).hexdigest())


@register("cse")
def common_subexpression_elimination(graph: Graph) -> bool:
    """Merge identical constants, then nodes with the same op, attributes and operands."""
    changed = False
    seen_constants: dict[tuple, Value] = {}
    for value in list(graph.constants):
        if constant_value(value) is None:
            continue
        key = _constant_key(value)
        twin = seen_constants.setdefault(key, value)
        if twin is not value:
            graph.replace_all_uses_with(value, twin)
            changed = True
    graph.remove_unused_constants()
    seen_nodes: dict[tuple, Node] = {}
    for node in graph.iter_nodes():
        if "pure" not in get_op(node.op).traits:
            continue
        key = (node.op, tuple(id(v) for v in node.inputs), tuple(sorted(node.attrs.items())))
        twin = seen_nodes.setdefault(key, node)
        if twin is node:
            continue
        for old, new in zip(node.outputs, twin.outputs):
            graph.replace_all_uses_with(old, new)
        graph.erase(node)
        changed = True
    return changed


class _RemoveNoOp(RewritePattern):
    """Ops that return their operand unchanged: identity, casts to the same type, reshapes to the same
    shape, identity transposes, expands to the same shape, full slices, single-operand concats."""

    ops = ("identity", "cast", "reshape", "transpose", "expand", "slice", "concat", "tile")

    def match_and_rewrite(self, graph: Graph, node: Node) -> bool:
        if len(node.outputs) != 1 or len([v for v in node.inputs if v is not None]) != 1:
            return False
        source, result = node.inputs[0], node.outputs[0]
        if node.op == "transpose" and tuple(node.attrs["perm"]) != tuple(range(result.type.rank)):
            return False
        if (source.type.shape, source.type.dtype) != (result.type.shape, result.type.dtype):
            return False
        if node.op == "slice" and any(step < 0 for step in node.attrs.get("steps", ())):
            return False
        if graph.is_output(result) and (source.producer is None or graph.is_output(source)):
            return False  # an output must stay a distinct computed value
        graph.replace_all_uses_with(result, source)
        graph.erase(node)
        return True


class _MergeChains(RewritePattern):
    """reshape∘reshape → one reshape; transpose∘transpose → one transpose."""

    ops = ("reshape", "transpose")

    def match_and_rewrite(self, graph: Graph, node: Node) -> bool:
        inner = node.inputs[0].producer
        if inner is None or inner.op != node.op or len(inner.outputs[0].uses) != 1 \
                or graph.is_output(inner.outputs[0]):
            return False
        if node.op == "reshape":
            merged = graph.add_node("reshape", [inner.inputs[0]], {"shape": node.attrs["shape"]},
                                    name=node.name, before=node)
        else:
            outer, first = node.attrs["perm"], inner.attrs["perm"]
            merged = graph.add_node("transpose", [inner.inputs[0]],
                                    {"perm": tuple(first[axis] for axis in outer)}, name=node.name, before=node)
        graph.replace_all_uses_with(node.output, merged.output)
        graph.erase(node)
        graph.erase(inner)
        return True


@register("remove-noops")
def remove_noops(graph: Graph) -> bool:
    """Remove identities and no-op reshapes/transposes/casts/slices; merge reshape and transpose chains."""
    return apply_patterns(graph, [_RemoveNoOp(), _MergeChains()])
