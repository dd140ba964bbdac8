"""Converters of ONNX's elementwise operators."""
from __future__ import annotations

import numpy as np

from lowbit.frontends.onnx.context import ConvertContext, OnnxNode
from lowbit.frontends.onnx.dtypes import element_type
from lowbit.frontends.onnx.registry import converter
from lowbit.ir import Value

_BINARY = {
    "Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Equal": "equal", "Less": "less",
    "Greater": "greater", "LessOrEqual": "less_equal", "GreaterOrEqual": "greater_equal",
    "And": "logical_and", "Or": "logical_or", "Xor": "logical_xor", "BitwiseAnd": "bitwise_and",
    "BitwiseOr": "bitwise_or", "BitwiseXor": "bitwise_xor", "PRelu": "prelu",
}
_UNARY = {
    "Neg": "neg", "Abs": "abs", "Relu": "relu", "Sign": "sign", "Sqrt": "sqrt", "Exp": "exp", "Log": "log",
    "Sigmoid": "sigmoid", "Tanh": "tanh", "Erf": "erf", "Reciprocal": "reciprocal", "Floor": "floor",
    "Ceil": "ceil", "Round": "round", "Softplus": "softplus", "Not": "logical_not", "HardSwish": "hard_swish",
    "Sin": "sin", "Cos": "cos", "Tan": "tan", "Asin": "asin", "Acos": "acos", "Atan": "atan", "Sinh": "sinh",
    "Cosh": "cosh", "Asinh": "asinh", "Acosh": "acosh", "Atanh": "atanh", "BitwiseNot": "bitwise_not",
}


@converter(*_BINARY)
def binary(ctx: ConvertContext, node: OnnxNode) -> Value:
    if node.op_type in ("Add", "Sub", "Mul", "Div") and node.opset < 7 and node.attr("broadcast"):
        raise ctx.unsupported("legacy 'broadcast' attribute of opset < 7")
    return ctx.emit(_BINARY[node.op_type], node.inputs[:2])


@converter(*_UNARY)
def unary(ctx: ConvertContext, node: OnnxNode) -> Value:
    return ctx.emit(_UNARY[node.op_type], node.inputs[:1])


@converter("Mod")
def mod(ctx: ConvertContext, node: OnnxNode) -> Value:
    return ctx.emit("mod", node.inputs[:2], {"fmod": bool(node.attr("fmod", 0))})


@converter("BitShift")
def bit_shift(ctx: ConvertContext, node: OnnxNode) -> Value:
    direction = node.attr("direction")
    if direction not in ("LEFT", "RIGHT"):
        raise ctx.unsupported(f"direction must be 'LEFT' or 'RIGHT', got {direction!r}")
    return ctx.emit("shift_left" if direction == "LEFT" else "shift_right", node.inputs[:2])


@converter("Pow")
def pow_(ctx: ConvertContext, node: OnnxNode) -> Value:
    base, exponent = node.inputs[:2]
    if exponent.type.dtype != base.type.dtype:
        exponent = ctx.emit("cast", [exponent], {"to": base.type.dtype}, ".exponent")
    return ctx.emit("pow", [base, exponent])


@converter("LeakyRelu")
def leaky_relu(ctx: ConvertContext, node: OnnxNode) -> Value:
    return ctx.emit("leaky_relu", node.inputs[:1], {"alpha": node.attr("alpha", 0.01)})


@converter("Elu")
def elu(ctx: ConvertContext, node: OnnxNode) -> Value:
    return ctx.emit("elu", node.inputs[:1], {"alpha": node.attr("alpha", 1.0)})


@converter("HardSigmoid")
def hard_sigmoid(ctx: ConvertContext, node: OnnxNode) -> Value:
    return ctx.emit("hard_sigmoid", node.inputs[:1],
                    {"alpha": node.attr("alpha", 0.2), "beta": node.attr("beta", 0.5)})


@converter("Gelu")
def gelu(ctx: ConvertContext, node: OnnxNode) -> Value:
    approximate = node.attr("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise ctx.unsupported(f"approximate='{approximate}'")
    return ctx.emit("gelu", node.inputs[:1], {"approximate": approximate})


@converter("Clip")
def clip(ctx: ConvertContext, node: OnnxNode) -> Value:
    if node.opset < 11:
        low, high = node.attr("min", float("-inf")), node.attr("max", float("inf"))
    else:
        low_value, high_value = node.input(1), node.input(2)
        low = float(ctx.const_data(low_value, "Clip's min")) if low_value is not None else float("-inf")
        high = float(ctx.const_data(high_value, "Clip's max")) if high_value is not None else float("inf")
    return ctx.emit("clip", node.inputs[:1], {"min": low, "max": high})


@converter("Where")
def where(ctx: ConvertContext, node: OnnxNode) -> Value:
    return ctx.emit("where", node.inputs[:3])


@converter("Cast")
def cast(ctx: ConvertContext, node: OnnxNode) -> Value:
    target = element_type(node.attr("to"), node.describe())
    if node.inputs[0].type.dtype is target:
        return node.inputs[0]
    return ctx.emit("cast", node.inputs[:1], {"to": target})


@converter("CastLike")
def cast_like(ctx: ConvertContext, node: OnnxNode) -> Value:
    target = node.inputs[1].type.dtype
    if node.inputs[0].type.dtype is target:
        return node.inputs[0]
    return ctx.emit("cast", node.inputs[:1], {"to": target})


@converter("Identity")
def identity(ctx: ConvertContext, node: OnnxNode) -> Value:
    return node.inputs[0]


@converter("Dropout")
def dropout(ctx: ConvertContext, node: OnnxNode) -> list[Value]:
    """Inference semantics: the input passes through; the optional mask is all true."""
    if node.opset >= 12 and node.input(2) is not None and bool(ctx.const_data(node.input(2), "training_mode")):
        raise ctx.unsupported("training_mode=True (lowbit compiles inference graphs)")
    x = node.inputs[0]
    results = [x]
    if node.num_outputs > 1:
        results.append(ctx.constant(np.ones(x.type.shape, dtype=bool), name=f"{node.name}.mask"))
    return results


@converter("Sum", "Max", "Min", "Mean")
def variadic(ctx: ConvertContext, node: OnnxNode) -> Value:
    op = {"Sum": "add", "Mean": "add", "Max": "maximum", "Min": "minimum"}[node.op_type]
    operands = [v for v in node.inputs if v is not None]
    result = operands[0]
    for index, operand in enumerate(operands[1:]):
        result = ctx.emit(op, [result, operand], name_suffix=f".{index}" if len(operands) > 2 else "")
    if node.op_type == "Mean" and len(operands) > 1:
        count = ctx.constant(np.asarray(len(operands), dtype=result.type.dtype.numpy), name=f"{node.name}.count")
        result = ctx.emit("div", [result, count], name_suffix=".mean")
    return result


# Activations ONNX defines as functions of simpler ops are expanded into lowbit's canonical ops.

def _scalar(ctx: ConvertContext, node: OnnxNode, value: float, what: str) -> Value:
    """A scalar constant of the node's input element type (integers truncate toward zero)."""
    dtype = node.inputs[0].type.dtype.numpy
    return ctx.constant(np.asarray(value).astype(dtype), name=f"{node.name}.{what}")


@converter("Selu")
def selu(ctx: ConvertContext, node: OnnxNode) -> Value:
    """gamma * elu(x, alpha)."""
    elu_ = ctx.emit("elu", node.inputs[:1], {"alpha": node.attr("alpha", 1.67326319217681884765625)}, ".elu")
    return ctx.emit("mul", [elu_, _scalar(ctx, node, node.attr("gamma", 1.05070102214813232421875), "gamma")])


@converter("Celu")
def celu(ctx: ConvertContext, node: OnnxNode) -> Value:
    """alpha * elu(x / alpha, 1)."""
    alpha = node.attr("alpha", 1.0)
    x = node.inputs[0]
    if alpha == 1.0:
        return ctx.emit("elu", [x], {"alpha": 1.0})
    scale = _scalar(ctx, node, alpha, "alpha")
    elu_ = ctx.emit("elu", [ctx.emit("div", [x, scale], name_suffix=".scaled")], {"alpha": 1.0}, ".elu")
    return ctx.emit("mul", [elu_, scale])


@converter("Softsign")
def softsign(ctx: ConvertContext, node: OnnxNode) -> Value:
    """x / (1 + |x|)."""
    x = node.inputs[0]
    magnitude = ctx.emit("abs", [x], name_suffix=".abs")
    return ctx.emit("div", [x, ctx.emit("add", [magnitude, _scalar(ctx, node, 1, "one")], name_suffix=".denom")])


@converter("ThresholdedRelu")
def thresholded_relu(ctx: ConvertContext, node: OnnxNode) -> Value:
    """x where x > alpha, else 0."""
    x = node.inputs[0]
    above = ctx.emit("greater", [x, _scalar(ctx, node, node.attr("alpha", 1.0), "alpha")], name_suffix=".above")
    return ctx.emit("where", [above, x, _scalar(ctx, node, 0, "zero")])


@converter("Mish")
def mish(ctx: ConvertContext, node: OnnxNode) -> Value:
    """x * tanh(softplus(x))."""
    x = node.inputs[0]
    soft = ctx.emit("softplus", [x], name_suffix=".softplus")
    return ctx.emit("mul", [x, ctx.emit("tanh", [soft], name_suffix=".tanh")])


@converter("Swish")
def swish(ctx: ConvertContext, node: OnnxNode) -> Value:
    """x * sigmoid(alpha * x)."""
    x = node.inputs[0]
    alpha = node.attr("alpha", 1.0)
    scaled = x if alpha == 1.0 else ctx.emit("mul", [x, _scalar(ctx, node, alpha, "alpha")], name_suffix=".scaled")
    return ctx.emit("mul", [x, ctx.emit("sigmoid", [scaled], name_suffix=".sigmoid")])


@converter("Shrink")
def shrink(ctx: ConvertContext, node: OnnxNode) -> Value:
    """x + bias where x < -lambd, x - bias where x > lambd, else 0."""
    x = node.inputs[0]
    lambd, bias = node.attr("lambd", 0.5), _scalar(ctx, node, node.attr("bias", 0.0), "bias")
    below = ctx.emit("less", [x, _scalar(ctx, node, -lambd, "low")], name_suffix=".below")
    above = ctx.emit("greater", [x, _scalar(ctx, node, lambd, "high")], name_suffix=".above")
    upper = ctx.emit("where", [above, ctx.emit("sub", [x, bias], name_suffix=".sub"), _scalar(ctx, node, 0, "zero")],
                     name_suffix=".upper")
    return ctx.emit("where", [below, ctx.emit("add", [x, bias], name_suffix=".add"), upper])


@converter("IsNaN")
def is_nan(ctx: ConvertContext, node: OnnxNode) -> Value:
    """NaN is the one value not equal to itself."""
    x = node.inputs[0]
    return ctx.emit("logical_not", [ctx.emit("equal", [x, x], name_suffix=".equal")])


@converter("IsInf")
def is_inf(ctx: ConvertContext, node: OnnxNode) -> Value:
    x = node.inputs[0]
    negative, positive = node.attr("detect_negative", 1), node.attr("detect_positive", 1)
    if negative and positive:
        x = ctx.emit("abs", [x], name_suffix=".abs")
    elif not positive and not negative:
        return ctx.constant(np.zeros(x.type.shape, dtype=bool))
    return ctx.emit("equal", [x, _scalar(ctx, node, -np.inf if negative and not positive else np.inf, "inf")])
