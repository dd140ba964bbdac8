"""Converters of ONNX's tensor operators: shapes, indexing, padding, reductions, resizing, constants.

Shape operands (Reshape's shape, Slice's starts, Pad's pads, Resize's sizes, ...) must be constant;
they usually are after the context folds exporters' Shape→Gather→Concat chains. Converters turn ONNX's
conventions (0 and -1 in shapes, negative axes, clamped slice bounds, axes given as attributes or as
inputs depending on the opset) into the normalised static attributes of lowbit's ops, and return their
operand unchanged when the op would do nothing.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from lowbit.errors import ShapeError
from lowbit.frontends.onnx.context import ConvertContext, OnnxNode
from lowbit.frontends.onnx.dtypes import element_type
from lowbit.frontends.onnx.registry import converter
from lowbit.ir import Value
from lowbit.ir.ops.tensor import PAD_MODES


def _bad(ctx: ConvertContext, message: str) -> ShapeError:
    return ShapeError(f"{ctx.where()}: {message}")


def _ints(ctx: ConvertContext, value: Value | None, what: str) -> list[int]:
    return [int(v) for v in ctx.const_data(value, what).reshape(-1)]


def _floats(ctx: ConvertContext, value: Value | None, what: str) -> list[float]:
    return [float(v) for v in ctx.const_data(value, what).reshape(-1)]


def _given(value: Value | None) -> bool:
    """Whether an optional operand is present and not an empty tensor (ONNX's other way of omitting)."""
    return value is not None and value.type.size > 0


def _axis(ctx: ConvertContext, axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise _bad(ctx, f"axis {axis} is out of range for rank {rank}")
    return axis % rank


def _axes(ctx: ConvertContext, axes: Sequence[int], rank: int) -> list[int]:
    """Axes normalised, in the given order; repeating one is an error."""
    normalised = [_axis(ctx, a, rank) for a in axes]
    if len(set(normalised)) != len(normalised):
        raise _bad(ctx, f"axes {list(axes)} repeat an axis")
    return normalised


def _axes_operand(ctx: ConvertContext, node: OnnxNode, index: int, since: int) -> list[int] | None:
    """Axes from the `axes` attribute before opset `since`, from operand `index` after; None if absent."""
    if node.opset < since:
        axes = node.attr("axes")
        return None if axes is None else list(axes)
    value = node.input(index)
    return None if value is None else _ints(ctx, value, f"{node.op_type}'s axes")


def _reshape(ctx: ConvertContext, x: Value, shape: Sequence[int], suffix: str = "") -> Value:
    if tuple(shape) == x.type.shape:
        return x
    return ctx.emit("reshape", [x], {"shape": tuple(shape)}, suffix)


def _transpose(ctx: ConvertContext, x: Value, perm: Sequence[int], suffix: str = "") -> Value:
    if list(perm) == list(range(x.type.rank)):
        return x
    return ctx.emit("transpose", [x], {"perm": tuple(perm)}, suffix)


# -- shapes --------------------------------------------------------------------------------------------
@converter("Reshape")
def reshape(ctx: ConvertContext, node: OnnxNode) -> Value:
    x = node.inputs[0]
    requested = _ints(ctx, node.input(1), "Reshape's shape")
    shape = list(requested)
    if not node.attr("allowzero", 0):
        for axis, dim in enumerate(requested):
            if dim == 0:
                if axis >= x.type.rank:
                    raise _bad(ctx, f"shape {requested} copies dimension {axis} (0), which {x.type} lacks")
                shape[axis] = x.type.shape[axis]
    if shape.count(-1) > 1 or any(d < -1 for d in shape):
        raise _bad(ctx, f"shape {requested} is invalid (at most one -1, no other negative sizes)")
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        if known == 0 or x.type.size % known:
            raise _bad(ctx, f"cannot reshape {x.type} to {requested}")
        shape[shape.index(-1)] = x.type.size // known
    return _reshape(ctx, x, shape)


@converter("Flatten")
def flatten(ctx: ConvertContext, node: OnnxNode) -> Value:
    x = node.inputs[0]
    rank, axis = x.type.rank, node.attr("axis", 1)
    if not -rank <= axis <= rank:
        raise _bad(ctx, f"axis {axis} is out of range for rank {rank}")
    axis += rank if axis < 0 else 0
    return _reshape(ctx, x, [math.prod(x.type.shape[:axis]), math.prod(x.type.shape[axis:])])


@converter("Squeeze")
def squeeze(ctx: ConvertContext, node: OnnxNode) -> Value:
    x = node.inputs[0]
    axes = _axes_operand(ctx, node, 1, since=13)
    if not axes:
        axes = [i for i, d in enumerate(x.type.shape) if d == 1]
    axes = _axes(ctx, axes, x.type.rank)
    if any(x.type.shape[a] != 1 for a in axes):
        raise _bad(ctx, f"cannot squeeze axes {axes} of {x.type}: not all have size 1")
    return _reshape(ctx, x, [d for i, d in enumerate(x.type.shape) if i not in axes])


@converter("Unsqueeze")
def unsqueeze(ctx: ConvertContext, node: OnnxNode) -> Value:
    x = node.inputs[0]
    axes = _axes_operand(ctx, node, 1, since=13)
    if axes is None:
        raise _bad(ctx, "Unsqueeze needs axes")
    axes = _axes(ctx, axes, x.type.rank + len(axes))
    dims = iter(x.type.shape)
    return _reshape(ctx, x, [1 if i in axes else next(dims) for i in range(x.type.rank + len(axes))])


@converter("Transpose")
def transpose(ctx: ConvertContext, node: OnnxNode) -> Value:
    x = node.inputs[0]
    perm = node.attr("perm") or list(reversed(range(x.type.rank)))
    return _transpose(ctx, x, perm)


@converter("DepthToSpace", "SpaceToDepth")
def depth_space(ctx: ConvertContext, node: OnnxNode) -> Value:
    """A reshape to six axes, a transpose and a reshape back (the definition in the ONNX spec).

    Mode DCR orders the new channels block-row, block-column, channel; CRD channel first.
    """
    x = node.inputs[0]
    if x.type.rank != 4:
        raise _bad(ctx, f"needs a 4-d NCHW tensor, got {x.type}")
    n, c, h, w = x.type.shape
    b, mode = node.attr("blocksize"), node.attr("mode", "DCR")
    if not b or b < 1:
        raise _bad(ctx, f"blocksize must be a positive integer, got {b}")
    if mode not in ("DCR", "CRD"):
        raise ctx.unsupported(f"mode '{mode}'")
    if node.op_type == "SpaceToDepth":
        if h % b or w % b:
            raise _bad(ctx, f"blocksize {b} does not divide the height and width of {x.type}")
        split, out = [n, c, h // b, b, w // b, b], [n, c * b * b, h // b, w // b]
        perm = [0, 3, 5, 1, 2, 4] if mode == "DCR" else [0, 1, 3, 5, 2, 4]
    else:
        if c % (b * b):
            raise _bad(ctx, f"blocksize {b} squared does not divide the channels of {x.type}")
        if mode == "DCR":
            split, perm = [n, b, b, c // (b * b), h, w], [0, 3, 4, 1, 5, 2]
        else:
            split, perm = [n, c // (b * b), b, b, h, w], [0, 1, 4, 2, 5, 3]
        out = [n, c // (b * b), h * b, w * b]
    blocks = _transpose(ctx, _reshape(ctx, x, split, ".blocks"), perm, ".transpose")
    return _reshape(ctx, blocks, out)


# -- joining, splitting, slicing -----------------------------------------------------------------------
@converter("Concat")
def concat(ctx: ConvertContext, node: OnnxNode) -> Value:
    operands = [v for v in node.inputs if v is not None]
    if node.attr("axis") is None:
        raise _bad(ctx, "Concat needs an axis")
    axis = _axis(ctx, node.attr("axis"), operands[0].type.rank)
    if len(operands) == 1:
        return operands[0]
    return ctx.emit("concat", operands, {"axis": axis})


@converter("Split")
def split(ctx: ConvertContext, node: OnnxNode) -> list[Value]:
    x = node.inputs[0]
    axis = _axis(ctx, node.attr("axis", 0), x.type.rank)
    dim = x.type.shape[axis]
    if node.opset >= 13 and node.input(1) is not None:
        sizes = _ints(ctx, node.input(1), "Split's split")
    elif node.opset < 13 and node.attr("split"):
        sizes = list(node.attr("split"))
    else:
        # Equal pieces; since opset 18 the last one may be smaller when they do not divide evenly.
        count = node.attr("num_outputs") or node.num_outputs
        chunk = -(-dim // count)
        sizes = [chunk] * (count - 1) + [dim - chunk * (count - 1)]
    if len(sizes) != node.num_outputs or sum(sizes) != dim or min(sizes) < 0:
        raise _bad(ctx, f"cannot split dimension {dim} of {x.type} into {sizes} for {node.num_outputs} outputs")
    if len(sizes) == 1:
        return [x]
    return ctx.emit_multi("split", [x], {"axis": axis, "sizes": tuple(sizes)})


def _normalise_slice(start: int, end: int, step: int, dim: int) -> tuple[int, int, int]:
    """ONNX Slice bounds (negative counts from the end, out of range clamps) in lowbit's form."""
    if dim == 0:
        return 0, 0, 1
    start += dim if start < 0 else 0
    end += dim if end < 0 else 0
    if step > 0:
        return min(max(start, 0), dim), min(max(end, 0), dim), step
    return min(max(start, 0), dim - 1), min(max(end, -1), dim - 1), step


@converter("Slice")
def slice_(ctx: ConvertContext, node: OnnxNode) -> Value:
    x = node.inputs[0]
    if node.opset < 10:
        starts, ends = list(node.attr("starts", [])), list(node.attr("ends", []))
        axes, steps = node.attr("axes"), None
    else:
        starts = _ints(ctx, node.input(1), "Slice's starts")
        ends = _ints(ctx, node.input(2), "Slice's ends")
        axes = _ints(ctx, node.input(3), "Slice's axes") if node.input(3) is not None else None
        steps = _ints(ctx, node.input(4), "Slice's steps") if node.input(4) is not None else None
    axes = list(range(len(starts))) if axes is None else list(axes)
    steps = [1] * len(starts) if steps is None else steps
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise _bad(ctx, f"starts {starts}, ends {ends}, axes {axes} and steps {steps} differ in length")
    if 0 in steps:
        raise _bad(ctx, f"steps {steps} contain 0")
    kept = []
    for axis, start, end, step in sorted(zip(_axes(ctx, axes, x.type.rank), starts, ends, steps)):
        dim = x.type.shape[axis]
        bounds = _normalise_slice(start, end, step, dim)
        if bounds != (0, dim, 1):
            kept.append((axis,) + bounds)
    if not kept:
        return x
    axes, starts, ends, steps = zip(*kept)
    return ctx.emit("slice", [x], {"starts": starts, "ends": ends, "axes": axes, "steps": steps})


# -- indexing, broadcasting, padding -------------------------------------------------------------------
@converter("Gather")
def gather(ctx: ConvertContext, node: OnnxNode) -> Value:
    data, indices = node.inputs[:2]
    return ctx.emit("gather", [data, indices], {"axis": _axis(ctx, node.attr("axis", 0), data.type.rank)})


@converter("GatherElements")
def gather_elements(ctx: ConvertContext, node: OnnxNode) -> Value:
    data, indices = node.inputs[:2]
    return ctx.emit("gather_elements", [data, indices],
                    {"axis": _axis(ctx, node.attr("axis", 0), data.type.rank)})


@converter("Expand")
def expand(ctx: ConvertContext, node: OnnxNode) -> Value:
    """ONNX broadcasts both ways: the result has the broadcast of the operand's shape and `shape`."""
    x = node.inputs[0]
    requested = _ints(ctx, node.input(1), "Expand's shape")
    try:
        shape = np.broadcast_shapes(x.type.shape, tuple(requested))
    except ValueError:
        raise _bad(ctx, f"{x.type} and shape {requested} do not broadcast") from None
    if shape == x.type.shape:
        return x
    return ctx.emit("expand", [x], {"shape": shape})


@converter("Tile")
def tile(ctx: ConvertContext, node: OnnxNode) -> Value:
    x = node.inputs[0]
    repeats = _ints(ctx, node.input(1), "Tile's repeats")
    if all(r == 1 for r in repeats) and len(repeats) == x.type.rank:
        return x
    return ctx.emit("tile", [x], {"repeats": tuple(repeats)})


@converter("Pad")
def pad(ctx: ConvertContext, node: OnnxNode) -> Value:
    x = node.inputs[0]
    rank = x.type.rank
    mode = node.attr("mode", "constant")
    if mode not in PAD_MODES:
        raise ctx.unsupported(f"mode '{mode}'")
    if node.opset < 11:
        pads, value = list(node.attr("pads", [])), float(node.attr("value", 0.0))
    else:
        pads = _ints(ctx, node.input(1), "Pad's pads")
        value = _floats(ctx, node.input(2), "Pad's constant_value")[0] if _given(node.input(2)) else 0.0
    axes = list(range(rank))
    if node.opset >= 18 and node.input(3) is not None:
        axes = _axes(ctx, _ints(ctx, node.input(3), "Pad's axes"), rank)
    if len(pads) != 2 * len(axes):
        raise _bad(ctx, f"pads {pads} need a begin and an end for each of {len(axes)} axes")
    full = [0] * (2 * rank)
    for i, axis in enumerate(axes):
        full[axis], full[rank + axis] = pads[i], pads[len(axes) + i]
    if not any(full):
        return x
    return ctx.emit("pad", [x], {"pads": tuple(full), "mode": mode, "value": value})


# -- reductions ----------------------------------------------------------------------------------------
_REDUCE = {"ReduceSum": "reduce_sum", "ReduceMean": "reduce_mean", "ReduceMax": "reduce_max",
           "ReduceMin": "reduce_min", "ReduceProd": "reduce_prod"}
# Reductions ONNX defines on top of a sum: (elementwise op before, elementwise op after).
_COMPOSITE = {"ReduceL1": ("abs", None), "ReduceL2": ("square", "sqrt"), "ReduceSumSquare": ("square", None),
              "ReduceLogSum": (None, "log")}


def _reduce_axes(ctx: ConvertContext, node: OnnxNode) -> list[int] | None:
    """The reduced axes, sorted; None when the node reduces nothing (noop_with_empty_axes)."""
    x = node.inputs[0]
    axes = _axes_operand(ctx, node, 1, since=13 if node.op_type == "ReduceSum" else 18)
    if not axes:
        return None if node.attr("noop_with_empty_axes", 0) else list(range(x.type.rank))
    return sorted(_axes(ctx, axes, x.type.rank))


def _emit_reduce(ctx: ConvertContext, op: str, x: Value, axes: list[int] | None, keepdims: bool,
                 suffix: str = "") -> Value:
    if axes is None:
        return x
    return ctx.emit(op, [x], {"axes": tuple(axes), "keepdims": keepdims}, suffix)


def _elementwise(ctx: ConvertContext, op: str | None, x: Value, suffix: str) -> Value:
    if op is None:
        return x
    if op == "square":
        return ctx.emit("mul", [x, x], name_suffix=suffix)
    return ctx.emit(op, [x], name_suffix=suffix)


@converter(*_REDUCE, *_COMPOSITE)
def reduce(ctx: ConvertContext, node: OnnxNode) -> Value:
    x, keepdims = node.inputs[0], bool(node.attr("keepdims", 1))
    axes = _reduce_axes(ctx, node)
    if node.op_type in _REDUCE:
        return _emit_reduce(ctx, _REDUCE[node.op_type], x, axes, keepdims)
    before, after = _COMPOSITE[node.op_type]
    total = _emit_reduce(ctx, "reduce_sum", _elementwise(ctx, before, x, ".before"), axes, keepdims, ".sum")
    return _elementwise(ctx, after, total, "")


@converter("ReduceLogSumExp")
def reduce_log_sum_exp(ctx: ConvertContext, node: OnnxNode) -> Value:
    """log(sum(exp(x - max))) + max, which cannot overflow."""
    x, keepdims = node.inputs[0], bool(node.attr("keepdims", 1))
    axes = _reduce_axes(ctx, node)
    if axes is None:
        return x
    peak = _emit_reduce(ctx, "reduce_max", x, axes, True, ".max")
    shifted = ctx.emit("exp", [ctx.emit("sub", [x, peak], name_suffix=".shift")], name_suffix=".exp")
    total = ctx.emit("log", [_emit_reduce(ctx, "reduce_sum", shifted, axes, keepdims, ".sum")], name_suffix=".log")
    return ctx.emit("add", [total, _reshape(ctx, peak, total.type.shape, ".peak")])


@converter("ArgMax", "ArgMin")
def arg_reduce(ctx: ConvertContext, node: OnnxNode) -> Value:
    x = node.inputs[0]
    return ctx.emit(node.op_type.lower(), [x], {
        "axis": _axis(ctx, node.attr("axis", 0), x.type.rank), "keepdims": bool(node.attr("keepdims", 1)),
        "select_last_index": bool(node.attr("select_last_index", 0))})


# -- resizing ------------------------------------------------------------------------------------------
def _emit_resize(ctx: ConvertContext, x: Value, scales: list[float] | None, sizes: list[int] | None,
                 attrs: dict) -> Value:
    """Complete ONNX's scales or sizes into both (onnxruntime's float32 arithmetic) and emit `resize`."""
    shape = x.type.shape
    count = len(scales if sizes is None else sizes)
    if count != len(shape):
        raise _bad(ctx, f"needs one scale or size per axis of {x.type}, got {count}")
    if scales is None:
        scales = [float(np.float32(s) / np.float32(d)) if d else 1.0 for d, s in zip(shape, sizes)]
    if any(s <= 0 for s in scales):
        raise _bad(ctx, f"scales {scales} must be positive")
    if sizes is None:
        sizes = [int(np.floor(np.float32(d) * np.float32(s))) for d, s in zip(shape, scales)]
    if tuple(sizes) == shape and all(s == 1.0 for s in scales):
        return x
    return ctx.emit("resize", [x], {"sizes": tuple(sizes), "scales": tuple(scales), **attrs})


# Upsample and Resize-10 map coordinates back asymmetrically and round nearest down when enlarging
# (onnxruntime's "simple" rounding; opset 11 made both configurable).
_LEGACY_RESIZE = {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "simple"}


def _mode(ctx: ConvertContext, node: OnnxNode) -> str:
    mode = node.attr("mode", "nearest")
    mode = "linear" if mode == "bilinear" else mode
    if mode not in ("nearest", "linear", "cubic") or (mode == "cubic" and node.op_type == "Upsample"):
        raise ctx.unsupported(f"mode '{mode}'")
    return mode


@converter("Upsample")
def upsample(ctx: ConvertContext, node: OnnxNode) -> Value:
    scales = list(node.attr("scales", [])) if node.opset < 9 else _floats(ctx, node.input(1), "Upsample's scales")
    return _emit_resize(ctx, node.inputs[0], scales, None, {"mode": _mode(ctx, node), **_LEGACY_RESIZE})


@converter("Resize")
def resize(ctx: ConvertContext, node: OnnxNode) -> Value:
    x = node.inputs[0]
    mode = _mode(ctx, node)
    if node.opset < 11:
        return _emit_resize(ctx, x, _floats(ctx, node.input(1), "Resize's scales"), None,
                            {"mode": mode, **_LEGACY_RESIZE})
    coordinates = node.attr("coordinate_transformation_mode", "half_pixel")
    if coordinates == "tf_crop_and_resize":
        raise ctx.unsupported("coordinate_transformation_mode 'tf_crop_and_resize' (regions of interest)")
    scales = _floats(ctx, node.input(2), "Resize's scales") if _given(node.input(2)) else None
    sizes = _ints(ctx, node.input(3), "Resize's sizes") if _given(node.input(3)) else None
    scales, sizes = _resize_axes(ctx, node, x.type.shape, scales, sizes)
    if node.attr("antialias", 0) and mode != "nearest" and (
            any(s < 1 for s in scales or []) or any(s < d for s, d in zip(sizes or [], x.type.shape))):
        raise ctx.unsupported("antialias=1 when shrinking with linear or cubic interpolation")
    return _emit_resize(ctx, x, scales, sizes, {
        "mode": mode, "coordinate_transformation_mode": coordinates,
        "nearest_mode": node.attr("nearest_mode", "round_prefer_floor"),
        "cubic_coeff_a": node.attr("cubic_coeff_a", -0.75), "exclude_outside": bool(node.attr("exclude_outside", 0))})


def _resize_axes(ctx: ConvertContext, node: OnnxNode, shape: tuple[int, ...], scales: list[float] | None,
                 sizes: list[int] | None) -> tuple[list[float] | None, list[int] | None]:
    """Scales and/or sizes for every axis, given Resize-18's `axes` and `keep_aspect_ratio_policy`."""
    if (scales is None) == (sizes is None):
        raise _bad(ctx, "needs exactly one of scales and sizes")
    axes = _axes(ctx, node.attr("axes", range(len(shape))), len(shape))
    given = scales if sizes is None else sizes
    if len(given) != len(axes):
        raise _bad(ctx, f"needs one scale or size per resized axis {axes}, got {given}")
    policy = node.attr("keep_aspect_ratio_policy", "stretch")
    if sizes is not None and policy != "stretch":
        # One scale for all resized axes; it, not size / input size, maps coordinates back.
        if policy not in ("not_larger", "not_smaller"):
            raise ctx.unsupported(f"keep_aspect_ratio_policy '{policy}'")
        ratios = [size / shape[a] for a, size in zip(axes, sizes)]
        scale = min(ratios) if policy == "not_larger" else max(ratios)
        scales, sizes = [scale] * len(axes), [int(np.floor(scale * shape[a] + 0.5)) for a in axes]
    full_scales = None if scales is None else [1.0] * len(shape)
    full_sizes = None if sizes is None else list(shape)
    for i, axis in enumerate(axes):
        if scales is not None:
            full_scales[axis] = scales[i]
        if sizes is not None:
            full_sizes[axis] = sizes[i]
    return full_scales, full_sizes


# -- constants and shape computations (folded here; no IR op) -----------------------------------------
@converter("Shape")
def shape(ctx: ConvertContext, node: OnnxNode) -> Value:
    dims = node.inputs[0].type.shape
    start, end = node.attr("start", 0), node.attr("end", len(dims))
    # Python slicing clamps out-of-range bounds and counts negative ones from the end, as ONNX does.
    return ctx.constant(np.asarray(dims[start:end], dtype=np.int64))


@converter("Size")
def size(ctx: ConvertContext, node: OnnxNode) -> Value:
    return ctx.constant(np.asarray(node.inputs[0].type.size, dtype=np.int64))


def _tensor_attr(ctx: ConvertContext, tensor: onnx.TensorProto) -> np.ndarray:
    dtype = element_type(tensor.data_type, ctx.where())
    return np.asarray(numpy_helper.to_array(tensor)).astype(dtype.numpy)


_CONSTANT_ATTRS = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
                   "value_ints": np.int64}


@converter("Constant")
def constant(ctx: ConvertContext, node: OnnxNode) -> Value:
    if "value" in node.attrs:
        return ctx.constant(_tensor_attr(ctx, node.attrs["value"]))
    for name, dtype in _CONSTANT_ATTRS.items():
        if name in node.attrs:
            return ctx.constant(np.asarray(node.attrs[name], dtype=dtype))
    given = ", ".join(sorted(node.attrs)) or "none"
    raise ctx.unsupported(f"Constant with attribute(s) {given} (lowbit reads value, value_float(s), "
                          f"value_int(s); sparse and string constants are not supported)")


@converter("ConstantOfShape")
def constant_of_shape(ctx: ConvertContext, node: OnnxNode) -> Value:
    dims = _ints(ctx, node.input(0), "ConstantOfShape's shape")
    if any(d < 0 for d in dims):
        raise _bad(ctx, f"shape {dims} has a negative dimension")
    fill = _tensor_attr(ctx, node.attrs["value"]) if "value" in node.attrs else np.zeros(1, np.float32)
    if fill.size != 1:
        raise _bad(ctx, f"value must hold one element, it holds {fill.size}")
    return ctx.constant(np.full(dims, fill.reshape(-1)[0], dtype=fill.dtype))


@converter("Range")
def range_(ctx: ConvertContext, node: OnnxNode) -> Value:
    start, limit, delta = (ctx.const_data(node.input(i), f"Range's {what}")
                           for i, what in enumerate(("start", "limit", "delta")))
    if delta == 0:
        raise _bad(ctx, "delta is 0")
    count = max(int(np.ceil((float(limit) - float(start)) / float(delta))), 0)
    dtype = start.dtype
    return ctx.constant((start + np.arange(count, dtype=dtype) * delta.astype(dtype)).astype(dtype))
