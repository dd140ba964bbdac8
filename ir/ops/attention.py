"""Scaled dot-product attention as one op (what the attention fusion produces)."""
from __future__ import annotations

from lowbit.ir.ops.common import broadcast_shapes, require_float, same_dtype
from lowbit.ir.registry import Attr, InferContext, register_op
from lowbit.ir.types import TensorType


@register_op("attention", ("q", "k_t", "v", "mask?"),
             {"scale": Attr("float", 1.0),
              "zero_nan_probs": Attr("bool", False, "NaN probabilities (fully masked rows) become 0")},
             traits=("pure",))
def _attention(ctx: InferContext) -> TensorType:
    """softmax(q @ k_t * scale + mask, last axis) @ v; with `zero_nan_probs`, NaN probabilities become 0.

    q [..., Sq, D], k_t [..., D, Sk] (keys already transposed, as exporters produce them),
    v [..., Sk, Dv], mask broadcastable to [..., Sq, Sk]; batch axes broadcast as in matmul.
    """
    dtype = require_float(ctx)
    same_dtype(ctx)
    q, k_t, v = (ctx.type(i).shape for i in range(3))
    if min(len(q), len(k_t), len(v)) < 2:
        ctx.fail("q, k_t and v need rank >= 2")
    if q[-1] != k_t[-2] or k_t[-1] != v[-2]:
        ctx.fail(f"q {list(q)}, k_t {list(k_t)} and v {list(v)} do not chain as q @ k_t @ v")
    batch = broadcast_shapes(ctx, q[:-2], k_t[:-2], v[:-2])
    if ctx.has(3):
        scores = batch + (q[-2], k_t[-1])
        if broadcast_shapes(ctx, scores, ctx.type(3).shape) != scores:
            ctx.fail(f"mask {list(ctx.type(3).shape)} does not broadcast to the scores {list(scores)}")
    return TensorType(batch + (q[-2], v[-1]), dtype)
