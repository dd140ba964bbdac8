"""Post-training quantization, stage two: `realize` rewrites dequantize → float op → quantize into the
integer ops of docs/quantization.md, then folds the quantize(dequantize(x)) pairs left between them
(dropped when the parameters agree, `requantize` otherwise)."""
from __future__ import annotations

import math
from typing import Callable

from lowbit.ir import Graph, Node, TensorType, Value, constant_value
from lowbit.ir.ops.quantized import fixed_point_attrs
from lowbit.ir.tables import OpTable
from lowbit.passes.registry import register

Realizer = Callable[[Graph, Node, list, Node], "Value | None"]
REALIZERS: OpTable[Realizer] = OpTable("realizer")
realizer = REALIZERS.register
SHARING = ("reshape", "transpose", "slice", "gather", "expand", "tile", "identity")


def result_attrs(quantize: Node) -> dict:
    """The result parameters a `quantize` node fixes, as a requantizing op's attributes."""
    attrs = quantize.attrs
    return {"dtype": attrs["dtype"], "scale": attrs["scale"][0],
            "zero_point": attrs["zero_point"][0] if attrs["zero_point"] else 0, "bits": attrs["bits"]}


def _integer(value: Value | None) -> Value | None:
    """The integer value behind a dequantize (or an integer constant), else None."""
    if value is None:
        return None
    if value.producer is not None and value.producer.op == "dequantize":
        return value.producer.inputs[0]
    return value if value.type.quant is not None else None


def _clamp(attrs: dict, activation: str, params: tuple, result: dict) -> dict:
    """A fused relu / clip as the integer clamp in the result's domain."""
    if activation == "none":
        return attrs
    zero, scale = result["zero_point"], result["scale"]
    bits = result["bits"] or result["dtype"].bits
    full_min, full_max = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if result["dtype"].is_signed else (0, (1 << bits) - 1)
    low, high = (0.0, math.inf) if activation == "relu" else params
    # A bound the calibrated range never reaches (ReLU6 on values below 6) clamps nothing beyond saturation.
    if low > -math.inf:
        attrs["qmin"] = min(max(zero + int(round(low / scale)), full_min), full_max)  # half to even, like quantize
    if high < math.inf:
        attrs["qmax"] = max(min(zero + int(round(high / scale)), full_max), full_min)
    return attrs


def _add_requantizing(graph: Graph, node: Node, op: str, operands: list, attrs: dict) -> Value:
    types = [v.type if v is not None else None for v in operands]
    constants = [constant_value(v) if v is not None else None for v in operands]
    attrs.update(fixed_point_attrs(op, types, attrs, constants))
    return graph.add_node(op, operands, attrs, name=node.name, before=node).output


@realizer("conv2d", "linear")
def _product(graph: Graph, node: Node, operands: list, quantize: Node) -> Value | None:
    x, w = operands[0], operands[1]
    bias = operands[2] if len(operands) > 2 else None
    residual = operands[3] if len(operands) > 3 else None
    if x is None or w is None or (len(node.inputs) > 2 and node.inputs[2] is not None and bias is None) \
            or (len(node.inputs) > 3 and node.inputs[3] is not None and residual is None):
        return None
    result = result_attrs(quantize)
    attrs = dict(result)
    if node.op == "conv2d":
        attrs.update({k: node.attrs[k] for k in ("strides", "pads", "dilations", "group")})
    _clamp(attrs, node.attrs["activation"], node.attrs["activation_params"], result)
    op = "qconv2d" if node.op == "conv2d" else "qlinear"
    return _add_requantizing(graph, node, op, [x, w, bias, residual], attrs)


@realizer("matmul")
def _matmul(graph: Graph, node: Node, operands: list, quantize: Node) -> Value | None:
    if any(v is None for v in operands):
        return None
    return _add_requantizing(graph, node, "qmatmul", operands, result_attrs(quantize))


@realizer("add", "mul")
def _binary(graph: Graph, node: Node, operands: list, quantize: Node) -> Value | None:
    if any(v is None for v in operands):
        return None
    return _add_requantizing(graph, node, "q" + node.op, operands, result_attrs(quantize))


@realizer("concat")
def _concat(graph: Graph, node: Node, operands: list, quantize: Node) -> Value | None:
    if any(v is None for v in operands):
        return None
    return _add_requantizing(graph, node, "qconcat", operands, {"axis": node.attrs["axis"],
                                                                 **result_attrs(quantize)})


@realizer("max_pool2d", "avg_pool2d", "global_avg_pool")
def _pool(graph: Graph, node: Node, operands: list, quantize: Node) -> Value | None:
    if operands[0] is None:
        return None
    return graph.add_node("q" + node.op, operands[:1], node.attrs, name=node.name, before=node).output


@realizer(*SHARING)
def _move(graph: Graph, node: Node, operands: list, quantize: Node) -> Value | None:
    data = operands[0]
    if data is None or (data.type.quant is not None and data.type.quant.axis is not None):
        return None
    inputs = [data] + list(node.inputs[1:])
    out = node.outputs[0].type
    return graph.add_node(node.op, inputs, node.attrs, name=node.name, before=node,
                          output_types=[TensorType(out.shape, data.type.dtype, data.type.quant)]).output


def _sole_quantize(graph: Graph, node: Node) -> Node | None:
    if len(node.outputs) != 1 or graph.is_output(node.outputs[0]) or len(node.outputs[0].uses) != 1:
        return None
    user = node.outputs[0].uses[0][0]
    return user if user.op == "quantize" and user.attrs["axis"] is None else None


@register("realize-quantization")
def realize(graph: Graph) -> bool:
    """Rewrite dequantize → op → quantize into integer ops (qconv2d, qlinear, qmatmul, qadd, qmul,
    qconcat, integer pools, data movement on integers) and fold the quantize/dequantize pairs left."""
    changed = False
    for node in graph.iter_nodes():
        fn = REALIZERS.get(node.op)
        quantize = _sole_quantize(graph, node) if fn else None
        if quantize is None:
            continue
        operands = [_integer(v) for v in node.inputs]
        result = fn(graph, node, operands, quantize)
        if result is None:
            continue
        graph.replace_all_uses_with(quantize.outputs[0], _matching(graph, result, quantize))
        changed = True
    graph.eliminate_dead_code()
    changed |= fold_quantize_dequantize(graph)
    return changed


def _matching(graph: Graph, value: Value, quantize: Node) -> Value:
    """`value` as the quantize node's result type: itself when the parameters agree, else requantized."""
    want = quantize.outputs[0].type
    if value.type == want:
        return value
    attrs = result_attrs(quantize)
    return _add_requantizing(graph, quantize, "requantize", [value], attrs)


def fold_quantize_dequantize(graph: Graph) -> bool:
    """quantize(dequantize(x)) → x when the parameters agree, requantize(x) otherwise."""
    changed = False
    for node in graph.iter_nodes():
        if node.op != "quantize" or node.attrs["axis"] is not None:
            continue
        source = node.inputs[0].producer
        if source is None or source.op != "dequantize" or source.inputs[0].type.quant.axis is not None:
            continue
        graph.replace_all_uses_with(node.outputs[0], _matching(graph, source.inputs[0], node))
        changed = True
    graph.eliminate_dead_code()
    return changed
