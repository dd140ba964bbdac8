"""Elementwise ops: arithmetic with numpy broadcasting, activations, comparisons, logic, select, cast."""
from __future__ import annotations

from lowbit.ir.dtypes import DType
from lowbit.ir.ops.common import (binary_broadcast, broadcast_shapes, compare_broadcast, unary_float,
                                  unary_same)
from lowbit.ir.registry import Attr, InferContext, register_op
from lowbit.ir.types import TensorType

PURE = ("pure", "elementwise")

for _name in ("add", "mul", "maximum", "minimum"):
    register_op(_name, ("a", "b"), traits=PURE + ("commutative",),
                doc=f"`{_name}` of two tensors of one element type, with numpy broadcasting.")(binary_broadcast)
for _name in ("sub", "div", "pow"):
    register_op(_name, ("a", "b"), traits=PURE,
                doc=f"`{_name}` of two tensors of one element type, with numpy broadcasting.")(binary_broadcast)
for _name in ("equal",):
    register_op(_name, ("a", "b"), traits=PURE + ("commutative",), doc="a == b (bool result).")(compare_broadcast)
for _name in ("less", "greater", "less_equal", "greater_equal"):
    register_op(_name, ("a", "b"), traits=PURE, doc=f"`{_name}` comparison (bool result).")(compare_broadcast)


def _logical(ctx: InferContext) -> TensorType:
    for index in range(len(ctx.types)):
        if ctx.type(index).dtype is not DType.bool:
            ctx.fail(f"operand {index} must be bool, got {ctx.type(index).dtype}")
    return TensorType(broadcast_shapes(ctx, *(t.shape for t in ctx.types)), DType.bool)


for _name in ("logical_and", "logical_or", "logical_xor"):
    register_op(_name, ("a", "b"), traits=PURE + ("commutative",), doc=f"`{_name}` of bool tensors.")(_logical)
register_op("logical_not", ("x",), traits=PURE, doc="Logical negation of a bool tensor.")(_logical)

for _name in ("neg", "abs", "relu", "sign"):
    register_op(_name, ("x",), traits=PURE, doc=f"`{_name}` of a numeric tensor.")(unary_same)
for _name in ("sqrt", "exp", "log", "sigmoid", "tanh", "erf", "reciprocal", "floor", "ceil", "round", "softplus",
              "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh"):
    register_op(_name, ("x",), traits=PURE, doc=f"`{_name}` of a float tensor.")(unary_float)
register_op("prelu", ("x", "slope"), traits=PURE,
            doc="x if x >= 0 else slope * x, with numpy broadcasting of slope.")(binary_broadcast)
register_op("mod", ("a", "b"), {"fmod": Attr("bool", False)}, traits=PURE,
            doc="Remainder of a / b: fmod=true takes the dividend's sign (C fmod), else the divisor's.")(
    binary_broadcast)


def _integer(ctx: InferContext) -> TensorType:
    """Like `binary_broadcast` (or `unary_same` for one operand), for integer operands only."""
    result = binary_broadcast(ctx) if len(ctx.types) > 1 else unary_same(ctx)
    if not result.dtype.is_integer:
        ctx.fail(f"operands must be integers, got {result.dtype}")
    return result


for _name in ("bitwise_and", "bitwise_or", "bitwise_xor"):
    register_op(_name, ("a", "b"), traits=PURE + ("commutative",), doc=f"`{_name}` of integer tensors.")(_integer)
register_op("bitwise_not", ("x",), traits=PURE, doc="Bitwise complement of an integer tensor.")(_integer)
for _name in ("shift_left", "shift_right"):
    register_op(_name, ("a", "b"), traits=PURE,
                doc=f"`{_name}` of integer a by b bits (logical for unsigned types).")(_integer)
register_op("hard_swish", ("x",), traits=PURE, doc="x * min(max(x + 3, 0), 6) / 6.")(unary_float)
register_op("leaky_relu", ("x",), {"alpha": Attr("float", 0.01)}, traits=PURE,
            doc="x if x >= 0 else alpha * x.")(unary_float)
register_op("elu", ("x",), {"alpha": Attr("float", 1.0)}, traits=PURE,
            doc="x if x >= 0 else alpha * (exp(x) - 1).")(unary_float)
register_op("hard_sigmoid", ("x",), {"alpha": Attr("float", 0.2), "beta": Attr("float", 0.5)}, traits=PURE,
            doc="max(0, min(1, alpha * x + beta)).")(unary_float)
register_op("gelu", ("x",), {"approximate": Attr("str", "none")}, traits=PURE,
            doc="Gaussian error linear unit; approximate='tanh' uses the tanh form.")(unary_float)
register_op("clip", ("x",), {"min": Attr("float", float("-inf")), "max": Attr("float", float("inf"))},
            traits=PURE, doc="min(max(x, min), max); ReLU6 is clip{min=0, max=6}.")(unary_same)


@register_op("where", ("condition", "a", "b"), traits=PURE)
def _where(ctx: InferContext) -> TensorType:
    """a where condition else b, with numpy broadcasting of all three."""
    if ctx.type(0).dtype is not DType.bool:
        ctx.fail(f"condition must be bool, got {ctx.type(0).dtype}")
    if ctx.type(1).dtype != ctx.type(2).dtype:
        ctx.fail(f"both branches must share one element type, got {ctx.type(1).dtype} and {ctx.type(2).dtype}")
    return TensorType(broadcast_shapes(ctx, *(t.shape for t in ctx.types)), ctx.type(1).dtype)


@register_op("cast", ("x",), {"to": Attr("dtype")}, traits=PURE)
def _cast(ctx: InferContext) -> TensorType:
    """Convert to element type `to`: floats to integers truncate toward zero; to bool is x != 0."""
    return TensorType(ctx.type(0).shape, ctx.attrs["to"])


@register_op("identity", ("x",), traits=("pure",))
def _identity(ctx: InferContext) -> TensorType:
    """The operand unchanged (kept only where a graph output must be a distinct value)."""
    return unary_same(ctx)


