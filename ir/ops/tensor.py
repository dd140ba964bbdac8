"""Tensor ops: shape manipulation, indexing, padding, reductions and resizing.

Everything that determines a result's shape is a static attribute; the ONNX frontend resolves
ONNX's run-time shape operands (and its conventions such as -1 and 0 in Reshape, negative axes,
clamped slice bounds) into these normalised attributes.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lowbit.ir.dtypes import DType
from lowbit.ir.ops.common import require_float
from lowbit.ir.registry import Attr, InferContext, register_op
from lowbit.ir.types import TensorType

PURE = ("pure",)
PAD_MODES = ("constant", "reflect", "edge", "wrap")
RESIZE_MODES = ("nearest", "linear", "cubic")
COORDINATE_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
                    "tf_half_pixel_for_nn")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil", "simple")
INDEX_DTYPES = (DType.i32, DType.i64)


def _check_axes(ctx: InferContext, axes: Sequence[int], rank: int, what: str = "axes") -> None:
    """Normalised axes: non-negative, in range, strictly increasing."""
    if any(not 0 <= a < rank for a in axes) or list(axes) != sorted(set(axes)):
        ctx.fail(f"{what} {list(axes)} must be distinct, increasing and within [0, {rank})")


def _one_per_axis(ctx: InferContext, name: str, rank: int) -> Sequence:
    values = ctx.attrs[name]
    if len(values) != rank:
        ctx.fail(f"'{name}' needs one entry per axis ({rank}), got {list(values)}")
    return values


def _choice(ctx: InferContext, name: str, choices: Sequence[str]) -> str:
    value = ctx.attrs[name]
    if value not in choices:
        ctx.fail(f"{name}='{value}' is not one of {list(choices)}")
    return value


@register_op("reshape", ("x",), {"shape": Attr("ints", doc="the static result shape")}, traits=PURE)
def _reshape(ctx: InferContext) -> TensorType:
    """The operand's elements in row-major order, viewed with shape `shape`."""
    t = ctx.type(0)
    shape = ctx.attrs["shape"]
    if any(d < 0 for d in shape):
        ctx.fail(f"shape {list(shape)} must be fully static (no -1)")
    if int(np.prod(shape, dtype=np.int64)) != t.size:
        ctx.fail(f"cannot reshape {t} ({t.size} elements) to {list(shape)}")
    return TensorType(shape, t.dtype)


@register_op("transpose", ("x",), {"perm": Attr("ints")}, traits=PURE)
def _transpose(ctx: InferContext) -> TensorType:
    """Result axis i is operand axis perm[i]."""
    t = ctx.type(0)
    perm = ctx.attrs["perm"]
    if sorted(perm) != list(range(t.rank)):
        ctx.fail(f"perm {list(perm)} is not a permutation of the {t.rank} axes of {t}")
    return TensorType(tuple(t.shape[p] for p in perm), t.dtype)


@register_op("concat", ("inputs*",), {"axis": Attr("int")}, traits=PURE)
def _concat(ctx: InferContext) -> TensorType:
    """Operands joined along non-negative `axis`; other dimensions must agree."""
    types = [ctx.type(i) for i in range(len(ctx.types))]
    if not types:
        ctx.fail("needs at least one operand")
    first, axis = types[0], ctx.attrs["axis"]
    if not 0 <= axis < first.rank:
        ctx.fail(f"axis {axis} is out of range for rank {first.rank}")
    for t in types[1:]:
        if t.dtype != first.dtype or t.rank != first.rank or \
                any(a != b for i, (a, b) in enumerate(zip(t.shape, first.shape)) if i != axis):
            ctx.fail(f"operands {[str(u) for u in types]} cannot be joined along axis {axis}")
    shape = list(first.shape)
    shape[axis] = sum(t.shape[axis] for t in types)
    return TensorType(tuple(shape), first.dtype)


@register_op("split", ("x",), {"axis": Attr("int"), "sizes": Attr("ints")}, traits=PURE)
def _split(ctx: InferContext) -> list[TensorType]:
    """Consecutive pieces along non-negative `axis`, one result per entry of `sizes`."""
    t = ctx.type(0)
    axis, sizes = ctx.attrs["axis"], ctx.attrs["sizes"]
    if not 0 <= axis < t.rank:
        ctx.fail(f"axis {axis} is out of range for rank {t.rank}")
    if not sizes or any(s < 0 for s in sizes) or sum(sizes) != t.shape[axis]:
        ctx.fail(f"sizes {list(sizes)} do not split dimension {t.shape[axis]} of {t}")
    return [TensorType(t.shape[:axis] + (s,) + t.shape[axis + 1:], t.dtype) for s in sizes]


def slice_length(start: int, end: int, step: int) -> int:
    """Elements selected by a normalised (start, end, step) triple."""
    return max(0, -(-(end - start) // step))


@register_op("slice", ("x",), {"starts": Attr("ints"), "ends": Attr("ints"), "axes": Attr("ints"),
                               "steps": Attr("ints")}, traits=PURE)
def _slice(ctx: InferContext) -> TensorType:
    """Strided slices along increasing `axes`, with normalised bounds.

    For step > 0: 0 <= start, end <= dim. For step < 0: 0 <= start <= dim - 1 and -1 <= end <= dim - 1,
    where end = -1 means "through index 0" (not Python's "last element").
    """
    t = ctx.type(0)
    starts, ends, axes, steps = (ctx.attrs[k] for k in ("starts", "ends", "axes", "steps"))
    if not len(starts) == len(ends) == len(axes) == len(steps):
        ctx.fail("starts, ends, axes and steps need one entry each per sliced axis")
    _check_axes(ctx, axes, t.rank)
    shape = list(t.shape)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        dim = t.shape[axis]
        low, high = (0, dim) if step > 0 else (-1, dim - 1)
        if step == 0 or not (max(low, 0) <= start <= high and low <= end <= high):
            ctx.fail(f"slice {start}:{end}:{step} of axis {axis} (size {dim}) is not normalised")
        shape[axis] = slice_length(start, end, step)
    return TensorType(tuple(shape), t.dtype)


def _index_operand(ctx: InferContext, index: int = 1) -> TensorType:
    t = ctx.type(index)
    if t.dtype not in INDEX_DTYPES:
        ctx.fail(f"indices must be i32 or i64, got {t.dtype}")
    return t


@register_op("gather", ("data", "indices"), {"axis": Attr("int", 0)}, traits=PURE)
def _gather(ctx: InferContext) -> TensorType:
    """Entries of `data` along `axis` picked by `indices` (negative ones count from the end)."""
    data, indices = ctx.type(0), _index_operand(ctx)
    axis = ctx.attrs["axis"]
    if not 0 <= axis < data.rank:
        ctx.fail(f"axis {axis} is out of range for rank {data.rank}")
    return TensorType(data.shape[:axis] + indices.shape + data.shape[axis + 1:], data.dtype)


@register_op("gather_elements", ("data", "indices"), {"axis": Attr("int", 0)}, traits=PURE)
def _gather_elements(ctx: InferContext) -> TensorType:
    """out[i][j][k] = data[indices[i][j][k]][j][k] for axis 0, and so on (numpy take_along_axis)."""
    data, indices = ctx.type(0), _index_operand(ctx)
    axis = ctx.attrs["axis"]
    if not 0 <= axis < data.rank or indices.rank != data.rank:
        ctx.fail(f"indices {indices} and data {data} need one rank and an axis within it (axis {axis})")
    return TensorType(indices.shape, data.dtype)


@register_op("expand", ("x",), {"shape": Attr("ints", doc="the result shape")}, traits=PURE)
def _expand(ctx: InferContext) -> TensorType:
    """The operand broadcast (numpy rules, one direction) to exactly `shape`."""
    t, shape = ctx.type(0), tuple(ctx.attrs["shape"])
    padded = (1,) * (len(shape) - t.rank) + t.shape
    if len(shape) < t.rank or any(d != s and d != 1 for d, s in zip(padded, shape)):
        ctx.fail(f"{t} does not broadcast to {list(shape)}")
    return TensorType(shape, t.dtype)


@register_op("tile", ("x",), {"repeats": Attr("ints")}, traits=PURE)
def _tile(ctx: InferContext) -> TensorType:
    """The operand repeated `repeats[i]` times along axis i."""
    t = ctx.type(0)
    repeats = _one_per_axis(ctx, "repeats", t.rank)
    if any(r < 0 for r in repeats):
        ctx.fail(f"repeats {list(repeats)} must not be negative")
    return TensorType(tuple(d * r for d, r in zip(t.shape, repeats)), t.dtype)


@register_op("pad", ("x",), {"pads": Attr("ints", doc="begins of every axis, then ends; negative crops"),
                             "mode": Attr("str", "constant"), "value": Attr("float", 0.0)}, traits=PURE)
def _pad(ctx: InferContext) -> TensorType:
    """Pad every axis by pads[i] before and pads[rank + i] after with `value`, or by reflect/edge/wrap."""
    t = ctx.type(0)
    pads = _one_per_axis(ctx, "pads", 2 * t.rank)
    mode = _choice(ctx, "mode", PAD_MODES)
    shape = []
    for axis, dim in enumerate(t.shape):
        begin, end = pads[axis], pads[t.rank + axis]
        cropped = dim + min(begin, 0) + min(end, 0)
        if cropped < 0:
            ctx.fail(f"pads {list(pads)} crop more than axis {axis} of {t} holds")
        if mode == "reflect" and max(begin, end) > 0 and max(begin, end) >= cropped:
            ctx.fail(f"reflect padding of {max(begin, end)} needs axis {axis} longer than that, it is {cropped}")
        if mode != "constant" and max(begin, end) > 0 and cropped == 0:
            ctx.fail(f"{mode} padding of an empty axis {axis}")
        shape.append(dim + begin + end)
    return TensorType(tuple(shape), t.dtype)


def _reduce(ctx: InferContext) -> TensorType:
    """Reduce over increasing non-negative `axes`; `keepdims` keeps them with size 1."""
    t = ctx.type(0)
    axes = ctx.attrs["axes"]
    _check_axes(ctx, axes, t.rank)
    if t.dtype is DType.bool and ctx.op not in ("reduce_max", "reduce_min"):
        ctx.fail("cannot sum or multiply bool tensors")
    if ctx.attrs["keepdims"]:
        shape = tuple(1 if i in axes else d for i, d in enumerate(t.shape))
    else:
        shape = tuple(d for i, d in enumerate(t.shape) if i not in axes)
    return TensorType(shape, t.dtype)


REDUCE_ATTRS = {"axes": Attr("ints"), "keepdims": Attr("bool", True)}
for _name in ("reduce_sum", "reduce_mean", "reduce_max", "reduce_min", "reduce_prod"):
    register_op(_name, ("x",), REDUCE_ATTRS, traits=PURE,
                doc=f"`{_name}` over increasing non-negative `axes`; `keepdims` keeps them with size 1.")(_reduce)


def _arg_reduce(ctx: InferContext) -> TensorType:
    t = ctx.type(0)
    axis = ctx.attrs["axis"]
    if not 0 <= axis < t.rank:
        ctx.fail(f"axis {axis} is out of range for rank {t.rank}")
    shape = list(t.shape)
    if t.shape[axis] == 0:
        ctx.fail(f"cannot pick an index along empty axis {axis}")
    if ctx.attrs["keepdims"]:
        shape[axis] = 1
    else:
        del shape[axis]
    return TensorType(tuple(shape), DType.i64)


ARG_ATTRS = {"axis": Attr("int", 0), "keepdims": Attr("bool", True), "select_last_index": Attr("bool", False)}
for _name in ("argmax", "argmin"):
    register_op(_name, ("x",), ARG_ATTRS, traits=PURE,
                doc=f"i64 index of the {_name[3:]}imum along `axis`; ties pick the first unless "
                    f"`select_last_index`.")(_arg_reduce)


@register_op("resize", ("x",), {
    "sizes": Attr("ints", doc="the result shape"),
    "scales": Attr("floats", doc="per-axis scale used to map result coordinates back to the operand"),
    "mode": Attr("str", "nearest"),
    "coordinate_transformation_mode": Attr("str", "half_pixel"),
    "nearest_mode": Attr("str", "round_prefer_floor"),
    "cubic_coeff_a": Attr("float", -0.75),
    "exclude_outside": Attr("bool", False),
}, traits=PURE)
def _resize(ctx: InferContext) -> TensorType:
    """Interpolate every axis to `sizes` (ONNX Resize semantics with static sizes and scales)."""
    t = ctx.type(0)
    sizes = _one_per_axis(ctx, "sizes", t.rank)
    scales = _one_per_axis(ctx, "scales", t.rank)
    if any(s <= 0 for s in scales):
        ctx.fail(f"scales {list(scales)} must be positive")
    if any(d == 0 and s != 0 for d, s in zip(t.shape, sizes)):
        ctx.fail(f"cannot resize an empty axis of {t} to {list(sizes)}")
    mode = _choice(ctx, "mode", RESIZE_MODES)
    _choice(ctx, "coordinate_transformation_mode", COORDINATE_MODES)
    _choice(ctx, "nearest_mode", NEAREST_MODES)
    if mode != "nearest":
        require_float(ctx)
    return TensorType(tuple(sizes), t.dtype)

