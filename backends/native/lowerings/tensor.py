"""Lowerings of data-movement ops."""
from __future__ import annotations

from lowbit.backends.native.lowering import LowerContext, lowering
from lowbit.ir import Node
from lowbit.kernels.copy import copy_kernel


@lowering("reshape", "identity")
def lower_view(ctx: LowerContext, node: Node) -> None:
    """Same bytes, new shape: the result shares its operand's memory; no code runs."""
    source = node.inputs[0]
    if source.producer is None or ctx.graph.is_output(node.outputs[0]):
        # Inputs and constants are not the arena's to share; outputs have their own slots.
        nbytes = ctx.operand(0).nbytes
        kernel = ctx.kernel(("copy", nbytes), lambda module, name: copy_kernel(module, name, nbytes))
        ctx.call(kernel, [ctx.operand(0), ctx.result(0)])
    else:
        ctx.alias(node.outputs[0], source)
