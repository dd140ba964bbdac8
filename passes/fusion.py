"""Fusions into conv2d and linear: BatchNorm folding, MatMul (+ Add) → linear, and epilogues
(bias, residual add, activation) — see `lowbit.ir.ops.epilogue` for what a fused epilogue means."""
from __future__ import annotations

import numpy as np

from lowbit.ir import Graph, Node, Value, constant_value
from lowbit.ir.ops.epilogue import ACTIVATIONS
from lowbit.passes.registry import register
from lowbit.passes.rewrite import RewritePattern, apply_patterns

PRODUCERS = ("conv2d", "linear")


def _channel_axis(node: Node) -> int:
    return 1 if node.op == "conv2d" else node.outputs[0].type.rank - 1


def _sole_user(graph: Graph, value: Value) -> tuple[Node, int] | None:
    if len(value.uses) != 1 or graph.is_output(value):
        return None
    return value.uses[0]


def _has_epilogue(node: Node) -> bool:
    return node.attrs.get("activation", "none") != "none" or len(node.inputs) > 3


def per_channel_vector(node: Node, value: Value) -> np.ndarray | None:
    """`value` as one number per output channel of `node`, if it is a constant that varies only along
    the channel axis and broadcasting it onto the result does not change the result's shape."""
    data = constant_value(value)
    result = node.outputs[0].type
    if data is None or data.ndim > result.rank or data.dtype != result.dtype.numpy:
        return None
    axis = _channel_axis(node)
    padded = (1,) * (result.rank - data.ndim) + data.shape
    channels = result.shape[axis]
    if any(d != 1 for i, d in enumerate(padded) if i != axis) or padded[axis] not in (1, channels):
        return None
    return np.broadcast_to(data.reshape(padded[axis:axis + 1] or (1,)).reshape(-1), (channels,))


def _replace(graph: Graph, node: Node, user: Node, operands: list, attrs: dict) -> None:
    """Put a copy of `node` with new operands/attributes where `user` was; both originals go."""
    while operands and operands[-1] is None:
        operands.pop()
    fused = graph.add_node(node.op, operands, attrs, name=node.name, before=user)
    graph.replace_all_uses_with(user.outputs[0], fused.outputs[0])
    graph.erase(user)
    graph.erase(node)


def _operands(node: Node) -> list:
    return list(node.inputs) + [None] * (4 - len(node.inputs))


class AbsorbBiasAdd(RewritePattern):
    """conv2d/linear followed by + a per-channel constant → the constant joins the bias."""

    ops = PRODUCERS

    def match_and_rewrite(self, graph: Graph, node: Node) -> bool:
        sole = _sole_user(graph, node.outputs[0])
        if sole is None or sole[0].op != "add" or node.attrs.get("activation", "none") != "none":
            return False
        user, index = sole
        vector = per_channel_vector(node, user.inputs[1 - index])
        if vector is None:
            return False
        operands = _operands(node)
        old = constant_value(operands[2])
        if operands[2] is not None and old is None:
            return False
        total = vector if old is None else old + vector
        operands[2] = graph.add_constant(total.astype(vector.dtype), f"{node.name or node.op}.bias")
        _replace(graph, node, user, operands, dict(node.attrs))
        return True


class FuseResidualAndActivation(RewritePattern):
    """conv2d/linear followed by + a same-shaped run-time value (residual), then an activation."""

    ops = PRODUCERS

    def match_and_rewrite(self, graph: Graph, node: Node) -> bool:
        sole = _sole_user(graph, node.outputs[0])
        if sole is None or node.attrs.get("activation", "none") != "none":
            return False
        user, index = sole
        operands, attrs = _operands(node), dict(node.attrs)
        if user.op == "add":
            other = user.inputs[1 - index]
            result = node.outputs[0].type
            if operands[3] is not None or other is node.outputs[0] or constant_value(other) is not None \
                    or (other.type.shape, other.type.dtype) != (result.shape, result.dtype):
                return False
            operands[3] = other
        elif user.op in ACTIVATIONS:
            attrs["activation"] = user.op
            attrs["activation_params"] = {"clip": lambda a: (a["min"], a["max"]),
                                          "leaky_relu": lambda a: (a["alpha"],)}.get(user.op, lambda a: ())(user.attrs)
        else:
            return False
        _replace(graph, node, user, operands, attrs)
        return True


class MatMulToLinear(RewritePattern):
    """matmul(x, W) with a constant 2-D W → linear(x, Wᵀ)."""

    ops = ("matmul",)

    def match_and_rewrite(self, graph: Graph, node: Node) -> bool:
        x, weight = node.inputs
        data = constant_value(weight)
        if data is None or data.ndim != 2 or x.type.rank < 2 or not x.type.dtype.is_float:
            return False
        transposed = graph.add_constant(np.ascontiguousarray(data.T), f"{node.name or 'linear'}.weight")
        linear = graph.add_node("linear", [x, transposed], name=node.name, before=node)
        graph.replace_all_uses_with(node.outputs[0], linear.outputs[0])
        graph.erase(node)
        return True


@register("fold-batchnorm")
def fold_batchnorm(graph: Graph) -> bool:
    """Fold inference BatchNorm with constant statistics into the conv2d or linear that feeds it."""
    changed = False
    for node in graph.iter_nodes():
        if node.op != "batch_norm":
            continue
        producer = node.inputs[0].producer
        params = [constant_value(v) for v in node.inputs[1:5]]
        if producer is None or producer.op not in PRODUCERS or _has_epilogue(producer) \
                or any(p is None for p in params) or _sole_user(graph, producer.outputs[0]) is None \
                or _channel_axis(producer) != 1:
            continue
        bias_value = producer.inputs[2] if len(producer.inputs) > 2 else None
        weight, bias = constant_value(producer.inputs[1]), constant_value(bias_value)
        if weight is None or (bias_value is not None and bias is None):
            continue
        scale, shift, mean, variance = (p.astype(np.float64) for p in params)
        factor = scale / np.sqrt(variance + node.attrs["epsilon"])
        channels = weight.shape[0]
        old_bias = bias.astype(np.float64) if bias is not None else np.zeros(channels)
        name = producer.name or producer.op
        new_weight = graph.add_constant(
            (weight * factor.reshape((channels,) + (1,) * (weight.ndim - 1))).astype(weight.dtype), f"{name}.weight")
        new_bias = graph.add_constant(((old_bias - mean) * factor + shift).astype(weight.dtype), f"{name}.bias")
        operands = [producer.inputs[0], new_weight, new_bias]
        _replace(graph, producer, node, operands, dict(producer.attrs))
        changed = True
    graph.remove_unused_constants()
    return changed


@register("fuse-linear")
def fuse_linear(graph: Graph) -> bool:
    """MatMul by a constant matrix → linear; a following Add of a per-feature constant → its bias."""
    return apply_patterns(graph, [MatMulToLinear(), AbsorbBiasAdd()])


@register("fuse-epilogue")
def fuse_epilogue(graph: Graph) -> bool:
    """Fuse bias adds, a residual add and one activation (Relu, Clip/ReLU6, LeakyRelu, Sigmoid,
    HardSwish) into the conv2d or linear that produces their operand."""
    return apply_patterns(graph, [AbsorbBiasAdd(), FuseResidualAndActivation()])
