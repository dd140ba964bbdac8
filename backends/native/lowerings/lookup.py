"""Float islands of one small integer as table lookups: f(dequantize(x)) for x of at most 16 bits.

Quantization leaves some float ops alone after an integer value: GELU (or sigmoid, tanh, a product with a
constant, ...) after a linear layer, with a `dequantize` before and often a `quantize` after. When x is
per-tensor and at most 16 bits wide, such a chain is a function of the 2^bits values x can hold: at
compile time its nodes' reference implementations (the very functions `run_reference` runs) are evaluated
on all of them, and the chain becomes one lookup per element (`kernels.movement.lookup_kernel`) in place
of two or three passes of float code. Bit-identical to the reference interpreter on the compiling
machine by construction.

A chain is a `dequantize`, then one or more elementwise float ops of `lower_elementwise` whose other
operands are one-element constants, optionally ended by a per-tensor `quantize`; every value but the last
has one use and is no graph output. A 16-bit chain of only cheap arithmetic (`CHEAP`) and no quantize
stays float code: reading a 256 KiB float table is no faster than computing it. The last node's
lowering emits the lookup (`lower_in_chain`); the others emit nothing.
"""
from __future__ import annotations

import math

import numpy as np

from lowbit.backends.native.lowering import LowerContext
from lowbit.backends.reference.registry import IMPLEMENTATIONS, TYPED
from lowbit.ir import DType, Graph, Node, Value, constant_value
from lowbit.kernels.elementwise import RULES
from lowbit.kernels.llvm import element_type
from lowbit.kernels.movement import LOOKUP_PADDING, lookup_kernel

MAX_BITS = 16
# Ops a streaming float pass computes about as fast as a lookup reads a 16-bit table: a chain of only these
# on a 16-bit value, not ended by a quantize, stays float code.
CHEAP = frozenset({"add", "sub", "mul", "div", "neg", "abs", "relu", "clip", "maximum", "minimum"})


def _sole_user(graph: Graph, value: Value) -> Node | None:
    if len(value.uses) != 1 or any(value is output for output in graph.outputs):
        return None
    return value.uses[0][0]


def _pointwise_operand(node: Node) -> Value | None:
    """The one run-time operand of an elementwise float op whose other operands are one-element constants."""
    if node.op not in RULES or len(node.outputs) != 1 or not node.outputs[0].type.dtype.is_float:
        return None
    variable = [v for v in node.inputs if v is not None and constant_value(v) is None]
    constants = [v for v in node.inputs if v is not None and constant_value(v) is not None]
    if len(variable) != 1 or variable[0].type.shape != node.outputs[0].type.shape \
            or any(v.type.size != 1 for v in constants):
        return None
    return variable[0]


def _chain_from(graph: Graph, dequantize: Node) -> list[Node] | None:
    source = dequantize.inputs[0].type
    if source.dtype.is_float or source.dtype.bits > MAX_BITS or source.quant is None \
            or len(source.quant.scale) != 1:
        return None
    chain = [dequantize]
    user = _sole_user(graph, dequantize.outputs[0])
    while user is not None and _pointwise_operand(user) is not None:
        chain.append(user)
        user = _sole_user(graph, user.outputs[0])
    if len(chain) == 1:
        return None
    if user is not None and user.op == "quantize" and len(user.attrs["scale"]) == 1:
        chain.append(user)
    elif source.dtype.bits > 8 and all(n.op in CHEAP for n in chain[1:]):
        return None
    result = chain[-1].outputs[0].type.dtype
    # the lookup kernel moves entries of 1, 2 or 4 bytes; float results are float32
    return chain if result is DType.f32 or (not result.is_float and result.bits <= 32) else None


def lookup_chain(graph: Graph, node: Node) -> list[Node] | None:
    """The lookup chain `node` belongs to, or None."""
    first = node
    while first.op != "dequantize":
        value = first.inputs[0] if first.op == "quantize" else _pointwise_operand(first)
        if value is None or value.producer is None or _sole_user(graph, value) is not first:
            return None
        first = value.producer
    chain = _chain_from(graph, first)
    return chain if chain is not None and any(n is node for n in chain) else None


def lower_in_chain(ctx: LowerContext, node: Node) -> bool:
    """For a node of a lookup chain: the lookup when it is the chain's last node, nothing otherwise; True.
    False (and nothing emitted) for any other node."""
    chain = lookup_chain(ctx.graph, node)
    if chain is None:
        return False
    if node is not chain[-1]:
        return True
    values, offset = table(chain)
    source, result = chain[0].inputs[0].type, node.outputs[0].type
    count = math.prod(result.shape)
    index, element = element_type(source.dtype), element_type(result.dtype)
    key = ("lookup", count, source.dtype, result.dtype)
    kernel = ctx.kernel(key, lambda module, name: lookup_kernel(module, name, count, index, source.dtype.is_signed,
                                                                offset, element))
    padded = np.concatenate([values.view(np.uint8).reshape(-1), np.zeros(LOOKUP_PADDING, np.uint8)])
    ctx.call(kernel, [ctx.buffer(chain[0].inputs[0]), ctx.constant(padded, "lookup"), ctx.result(0)], parallel=True)
    return True


def table(chain: list[Node]) -> tuple[np.ndarray, int]:
    """The chain's result for every value x's type holds, in order from its minimum, and −minimum."""
    source = chain[0].inputs[0].type
    info = np.iinfo(source.dtype.numpy)
    values = np.arange(info.min, info.max + 1, dtype=np.int64).astype(source.dtype.numpy)
    current: np.ndarray = values
    with np.errstate(all="ignore"):
        for node in chain:
            operands = [None if v is None else current if constant_value(v) is None
                        else np.asarray(constant_value(v)).reshape(()) for v in node.inputs]
            implementation = IMPLEMENTATIONS[node.op]
            if node.op in TYPED:  # (per-tensor parameters: the types' shapes do not matter)
                current = implementation(node.attrs, *operands, types=[v.type for v in node.inputs])
            else:
                current = implementation(node.attrs, *operands)
            current = np.asarray(current, node.outputs[0].type.dtype.numpy).reshape(-1)
    return np.ascontiguousarray(current), -int(info.min)
