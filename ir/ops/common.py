"""Type-inference helpers shared by op declarations."""
from __future__ import annotations

from typing import Sequence

from lowbit.ir.dtypes import DType
from lowbit.ir.registry import InferContext
from lowbit.ir.types import TensorType


def broadcast_shapes(ctx: InferContext, *shapes: Sequence[int]) -> tuple[int, ...]:
    """numpy broadcasting of shapes; a mismatch fails naming both shapes."""
    rank = max((len(s) for s in shapes), default=0)
    result = [1] * rank
    for shape in shapes:
        padded = [1] * (rank - len(shape)) + list(shape)
        for axis, dim in enumerate(padded):
            if dim == result[axis] or dim == 1:
                continue
            if result[axis] == 1:
                result[axis] = dim
            else:
                ctx.fail(f"shapes {[list(s) for s in shapes]} do not broadcast")
    return tuple(result)


def same_dtype(ctx: InferContext, indices: Sequence[int] | None = None) -> DType:
    """The common element type of the given operands (all of them by default); they must agree."""
    indices = range(len(ctx.types)) if indices is None else indices
    dtypes = {ctx.type(i).dtype for i in indices if ctx.has(i)}
    if len(dtypes) != 1:
        ctx.fail(f"operands must share one element type, got {sorted(str(d) for d in dtypes)}")
    return dtypes.pop()


def require_float(ctx: InferContext, index: int = 0) -> DType:
    dtype = ctx.type(index).dtype
    if not dtype.is_float:
        ctx.fail(f"operand {index} must be a float tensor, got {dtype}")
    return dtype


def normalize_axis(ctx: InferContext, axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        ctx.fail(f"axis {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


def unary_same(ctx: InferContext) -> TensorType:
    """Result has the operand's shape and element type."""
    t = ctx.type(0)
    return TensorType(t.shape, t.dtype)


def unary_float(ctx: InferContext) -> TensorType:
    """Result has the operand's shape and (float) element type."""
    return TensorType(ctx.type(0).shape, require_float(ctx))


def binary_broadcast(ctx: InferContext) -> TensorType:
    """Both operands share an element type; the result has their broadcast shape."""
    dtype = same_dtype(ctx)
    return TensorType(broadcast_shapes(ctx, *(t.shape for t in ctx.types if t is not None)), dtype)


def compare_broadcast(ctx: InferContext) -> TensorType:
    """Like `binary_broadcast`, with a bool result."""
    same_dtype(ctx)
    return TensorType(broadcast_shapes(ctx, *(t.shape for t in ctx.types if t is not None)), DType.bool)
