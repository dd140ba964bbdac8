"""ONNX export of elementwise ops, and of activations wherever they occur (fused epilogues too)."""
from __future__ import annotations

import math

from lowbit.backends.onnx.context import ELEMENT_TYPES, SUB_BYTE, ExportContext
from lowbit.backends.onnx.registry import exporter
from lowbit.errors import UnsupportedOpError
from lowbit.ir import DType, Node
from lowbit.ir.ops.epilogue import activation_attrs

# lowbit ops that are one ONNX op with the same operands and no attributes.
SIMPLE = {
    "add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow", "maximum": "Max", "minimum": "Min",
    "equal": "Equal", "less": "Less", "greater": "Greater", "less_equal": "LessOrEqual",
    "greater_equal": "GreaterOrEqual", "logical_and": "And", "logical_or": "Or", "logical_xor": "Xor",
    "logical_not": "Not", "neg": "Neg", "abs": "Abs", "relu": "Relu", "sign": "Sign", "sqrt": "Sqrt",
    "exp": "Exp", "log": "Log", "sigmoid": "Sigmoid", "tanh": "Tanh", "erf": "Erf", "reciprocal": "Reciprocal",
    "floor": "Floor", "ceil": "Ceil", "round": "Round", "softplus": "Softplus", "sin": "Sin", "cos": "Cos",
    "tan": "Tan", "asin": "Asin", "acos": "Acos", "atan": "Atan", "sinh": "Sinh", "cosh": "Cosh",
    "asinh": "Asinh", "acosh": "Acosh", "atanh": "Atanh", "where": "Where", "identity": "Identity",
}
BITWISE = {"bitwise_and": "BitwiseAnd", "bitwise_or": "BitwiseOr", "bitwise_xor": "BitwiseXor",
           "bitwise_not": "BitwiseNot"}


@exporter(*SIMPLE)
def simple(ctx: ExportContext, node: Node) -> None:
    ctx.emit(SIMPLE[node.op], [ctx.name(v) for v in node.inputs], ctx.outputs(node))


@exporter(*BITWISE)
def bitwise(ctx: ExportContext, node: Node) -> None:
    ctx.require_opset(18, "bitwise operators")
    ctx.emit(BITWISE[node.op], [ctx.name(v) for v in node.inputs], ctx.outputs(node))


@exporter("shift_left", "shift_right")
def shift(ctx: ExportContext, node: Node) -> None:
    if node.inputs[0].type.dtype.is_signed:
        raise UnsupportedOpError(f"{ctx.where()}: ONNX's BitShift takes unsigned integers, not "
                                 f"{node.inputs[0].type.dtype}")
    ctx.emit("BitShift", [ctx.name(v) for v in node.inputs], ctx.outputs(node),
             direction="LEFT" if node.op == "shift_left" else "RIGHT")


@exporter("mod")
def mod(ctx: ExportContext, node: Node) -> None:
    if node.inputs[0].type.dtype.is_float and not node.attrs["fmod"]:
        raise UnsupportedOpError(f"{ctx.where()}: ONNX's Mod needs fmod=1 for floats")
    ctx.emit("Mod", [ctx.name(v) for v in node.inputs], ctx.outputs(node), fmod=int(node.attrs["fmod"]))


@exporter("prelu")
def prelu(ctx: ExportContext, node: Node) -> None:
    """PRelu broadcasts the slope onto x only; an x that the slope widens is expanded first."""
    x, slope = node.inputs
    operand = ctx.name(x)
    shape = node.outputs[0].type.shape
    if x.type.shape != shape:
        operand = ctx.emit("Expand", [operand, ctx.ints(shape, "shape")])
    ctx.emit("PRelu", [operand, ctx.name(slope)], ctx.outputs(node))


@exporter("cast")
def cast(ctx: ExportContext, node: Node) -> None:
    target = node.attrs["to"]
    if target in SUB_BYTE:
        ctx.require_opset(21, f"{target} tensors")
    ctx.emit("Cast", [ctx.name(node.inputs[0])], ctx.outputs(node), to=ELEMENT_TYPES[target])


@exporter("leaky_relu", "elu", "hard_sigmoid", "hard_swish", "gelu", "clip")
def activation(ctx: ExportContext, node: Node) -> None:
    apply_unary(ctx, node.op, node.attrs, ctx.name(node.inputs[0]), node.inputs[0].type.dtype,
                ctx.outputs(node)[0])


def apply_epilogue(ctx: ExportContext, node: Node, y: str, out: str) -> None:
    """conv2d's / linear's fused epilogue on `y`: + residual, then the activation, ending in `out`."""
    activation_kind = node.attrs["activation"]
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        y = ctx.emit("Add", [y, ctx.name(node.inputs[3])], out if activation_kind == "none" else None)
    if activation_kind != "none":
        y = apply_unary(ctx, activation_kind, activation_attrs(activation_kind, node.attrs["activation_params"]), y,
                        node.outputs[0].type.dtype, out)
    if y != out:
        ctx.emit("Identity", [y], out)


def apply_unary(ctx: ExportContext, op: str, attrs: dict, x: str, dtype: DType, out: str | None = None) -> str:
    """The ONNX form of the lowbit unary op `op` with `attrs` on `x` (element type `dtype`)."""
    def number(value: float, what: str) -> str:
        return ctx.scalar(value, dtype, what)

    if op in SIMPLE:
        return ctx.emit(SIMPLE[op], [x], out)
    if op in ("leaky_relu", "elu"):
        return ctx.emit({"leaky_relu": "LeakyRelu", "elu": "Elu"}[op], [x], out, alpha=float(attrs["alpha"]))
    if op == "hard_sigmoid":
        return ctx.emit("HardSigmoid", [x], out, alpha=float(attrs["alpha"]), beta=float(attrs["beta"]))
    if op == "hard_swish":
        if ctx.opset >= 14:
            return ctx.emit("HardSwish", [x], out)
        return ctx.emit("Mul", [x, ctx.emit("HardSigmoid", [x], alpha=1 / 6, beta=0.5)], out)
    if op == "clip":
        low, high = _clip_bounds(attrs["min"], attrs["max"], dtype)
        return ctx.emit("Clip", [x, None if low is None else number(low, "min"),
                                 None if high is None else number(high, "max")], out)
    if op == "gelu":
        return _gelu(ctx, attrs["approximate"], x, number, out)
    raise UnsupportedOpError(f"{ctx.where()}: no ONNX form of activation '{op}'")


def _clip_bounds(low: float, high: float, dtype: DType) -> tuple[float | int | None, float | int | None]:
    """Clip's bounds as ONNX needs them (None for an open end); integers round inward as the reference does."""
    if dtype.is_integer:
        low = None if low == -math.inf or math.ceil(low) <= dtype.min else math.ceil(low)
        high = None if high == math.inf or math.floor(high) >= dtype.max else math.floor(high)
        return low, high
    return (None if low == -math.inf else low), (None if high == math.inf else high)


def _gelu(ctx: ExportContext, approximate: str, x: str, number, out: str | None) -> str:
    """Gelu from opset 20; before, 0.5 · x · (1 + erf(x / √2)) or the tanh form."""
    if ctx.opset >= 20:
        return ctx.emit("Gelu", [x], out, approximate=approximate)
    if approximate == "tanh":
        cube = ctx.emit("Mul", [ctx.emit("Mul", [x, x]), x])
        inner = ctx.emit("Add", [x, ctx.emit("Mul", [cube, number(0.044715, "gelu_coefficient")])])
        core = ctx.emit("Tanh", [ctx.emit("Mul", [inner, number(math.sqrt(2 / math.pi), "gelu_scale")])])
    else:
        core = ctx.emit("Erf", [ctx.emit("Div", [x, number(math.sqrt(2.0), "sqrt2")])])
    gate = ctx.emit("Add", [core, number(1.0, "one")])
    return ctx.emit("Mul", [ctx.emit("Mul", [x, gate]), number(0.5, "half")], out)

