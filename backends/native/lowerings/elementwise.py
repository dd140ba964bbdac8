"""Lowerings of elementwise ops: one broadcasting kernel per distinct (op, attributes, shapes, types)."""
from __future__ import annotations

from lowbit.backends.native.lowering import LowerContext, lowering
from lowbit.backends.native.lowerings.lookup import lower_in_chain
from lowbit.errors import UnsupportedOpError
from lowbit.ir import Node
from lowbit.kernels.elementwise import RULES, elementwise_kernel, unsupported_reason


@lowering(*RULES)
def lower_elementwise(ctx: LowerContext, node: Node) -> None:
    if lower_in_chain(ctx, node):  # part of a table lookup (lowerings.lookup)
        return
    operands = tuple((value.type.shape, value.type.dtype) for value in node.inputs)
    reason = unsupported_reason(node.op, [dtype for _, dtype in operands])
    if reason:
        raise UnsupportedOpError(f"{node.describe()}: {reason}")
    result = node.outputs[0].type
    attrs = dict(node.attrs)
    key = ("elementwise", node.op, tuple(sorted(attrs.items())), result.shape, operands, result.dtype)
    kernel = ctx.kernel(key, lambda module, name: elementwise_kernel(
        module, name, node.op, attrs, result.shape, operands, result.dtype, ctx.target))
    ctx.call(kernel, [ctx.operand(i) for i in range(len(node.inputs))] + [ctx.result(0)])
