"""ONNX export of tensor ops: shapes, joining and slicing, indexing, padding, reductions and resizing.

lowbit's static attributes become the constant inputs ONNX takes (Reshape's shape, Slice's bounds, Pad's
pads, ...), in the form of the target opset (reduction axes are inputs from opset 13 for ReduceSum and
from 18 for the others).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lowbit.backends.onnx.context import ExportContext
from lowbit.backends.onnx.registry import exporter
from lowbit.errors import UnsupportedOpError
from lowbit.ir import Node

REDUCE = {"reduce_sum": "ReduceSum", "reduce_mean": "ReduceMean", "reduce_max": "ReduceMax",
          "reduce_min": "ReduceMin", "reduce_prod": "ReduceProd"}
# The opset in which each reduction's axes moved from an attribute to an input.
AXES_INPUT_SINCE = {"ReduceSum": 13}
# Resize's coordinate modes and the opsets (from 13 on) that have them.
COORDINATE_MODES = {"half_pixel": 13, "pytorch_half_pixel": 13, "align_corners": 13, "asymmetric": 13,
                    "half_pixel_symmetric": 19}


def _operands(ctx: ExportContext, node: Node) -> list[str]:
    return [ctx.name(v) for v in node.inputs]


def reduce_nodes(ctx: ExportContext, op_type: str, x: str, axes: Sequence[int], keepdims: bool,
                 out: str | None = None) -> str:
    """An ONNX reduction over `axes` (never empty: ONNX reads no axes as all of them)."""
    if ctx.opset >= AXES_INPUT_SINCE.get(op_type, 18):
        return ctx.emit(op_type, [x, ctx.ints(axes, "axes")], out, keepdims=int(keepdims))
    return ctx.emit(op_type, [x], out, axes=list(axes), keepdims=int(keepdims))


@exporter("reshape")
def reshape(ctx: ExportContext, node: Node) -> None:
    """A 0 in the shape means "copy that dimension" to ONNX unless allowzero=1 (opset 14)."""
    shape = node.attrs["shape"]
    allowzero = None
    if 0 in shape:
        ctx.require_opset(14, "Reshape to an empty shape (allowzero)")
        allowzero = 1
    ctx.emit("Reshape", [ctx.name(node.inputs[0]), ctx.ints(shape, "shape")], ctx.outputs(node),
             allowzero=allowzero)


@exporter("transpose")
def transpose(ctx: ExportContext, node: Node) -> None:
    ctx.emit("Transpose", _operands(ctx, node), ctx.outputs(node), perm=list(node.attrs["perm"]))


@exporter("concat")
def concat(ctx: ExportContext, node: Node) -> None:
    ctx.emit("Concat", _operands(ctx, node), ctx.outputs(node), axis=node.attrs["axis"])


@exporter("split")
def split(ctx: ExportContext, node: Node) -> None:
    ctx.emit("Split", [ctx.name(node.inputs[0]), ctx.ints(node.attrs["sizes"], "split")], ctx.outputs(node),
             axis=node.attrs["axis"])


@exporter("slice")
def slice_(ctx: ExportContext, node: Node) -> None:
    """lowbit's end -1 with a negative step ("through index 0") is -(dim + 1) to ONNX, which reads -1 as
    the last index."""
    shape = node.inputs[0].type.shape
    attrs = node.attrs
    ends = [end if end >= 0 else -shape[axis] - 1 for end, axis in zip(attrs["ends"], attrs["axes"])]
    ctx.emit("Slice", [ctx.name(node.inputs[0]), ctx.ints(attrs["starts"], "starts"), ctx.ints(ends, "ends"),
                       ctx.ints(attrs["axes"], "axes"), ctx.ints(attrs["steps"], "steps")], ctx.outputs(node))


@exporter("gather", "gather_elements")
def gather(ctx: ExportContext, node: Node) -> None:
    ctx.emit("Gather" if node.op == "gather" else "GatherElements", _operands(ctx, node), ctx.outputs(node),
             axis=node.attrs["axis"])


@exporter("expand")
def expand(ctx: ExportContext, node: Node) -> None:
    ctx.emit("Expand", [ctx.name(node.inputs[0]), ctx.ints(node.attrs["shape"], "shape")], ctx.outputs(node))


@exporter("tile")
def tile(ctx: ExportContext, node: Node) -> None:
    ctx.emit("Tile", [ctx.name(node.inputs[0]), ctx.ints(node.attrs["repeats"], "repeats")], ctx.outputs(node))


@exporter("pad")
def pad(ctx: ExportContext, node: Node) -> None:
    """The constant is the operand's element type, converted as the reference converts it (numpy)."""
    x = node.inputs[0]
    mode = node.attrs["mode"]
    if mode == "wrap":
        ctx.require_opset(19, "Pad mode 'wrap'")
    value = None
    if mode == "constant":
        value = ctx.scalar(node.attrs["value"], x.type.dtype, "value")
    ctx.emit("Pad", [ctx.name(x), ctx.ints(node.attrs["pads"], "pads"), value], ctx.outputs(node), mode=mode)


@exporter(*REDUCE)
def reduce(ctx: ExportContext, node: Node) -> None:
    if not node.attrs["axes"]:
        ctx.emit("Identity", _operands(ctx, node), ctx.outputs(node))
        return
    reduce_nodes(ctx, REDUCE[node.op], ctx.name(node.inputs[0]), node.attrs["axes"], node.attrs["keepdims"],
                 ctx.outputs(node)[0])


@exporter("argmax", "argmin")
def arg_reduce(ctx: ExportContext, node: Node) -> None:
    ctx.emit("ArgMax" if node.op == "argmax" else "ArgMin", _operands(ctx, node), ctx.outputs(node),
             axis=node.attrs["axis"], keepdims=int(node.attrs["keepdims"]),
             select_last_index=int(node.attrs["select_last_index"]))


@exporter("resize")
def resize(ctx: ExportContext, node: Node) -> None:
    """Resize with `sizes` when lowbit's scales are what ONNX derives from them (size / length), else with
    `scales` when floor(length · scale) gives lowbit's sizes (the scales then map coordinates as lowbit's do).
    Nearest mode `simple` (Resize-10) is `floor` where every resized axis grows and `ceil` where every one
    shrinks."""
    x = node.inputs[0]
    attrs = node.attrs
    mode = attrs["coordinate_transformation_mode"]
    if mode not in COORDINATE_MODES:
        raise UnsupportedOpError(f"{ctx.where()}: coordinate_transformation_mode '{mode}' is not in ONNX "
                                 f"Resize from opset 13")
    ctx.require_opset(COORDINATE_MODES[mode], f"coordinate_transformation_mode '{mode}'")
    lengths, sizes = x.type.shape, attrs["sizes"]
    scales = np.asarray(attrs["scales"], np.float32)
    scale_input = size_input = None
    if all(s == np.float32(size) / np.float32(n) for n, s, size in zip(lengths, scales, sizes) if n):
        size_input = ctx.ints(sizes, "sizes")
    elif all(int(np.floor(np.float32(n) * s)) == size == int(np.floor(n * float(s)))
             for n, s, size in zip(lengths, scales, sizes)):  # the same in float32 and float64
        scale_input = ctx.initializer(scales, f"{node.name or 'resize'}.scales")
    else:
        raise UnsupportedOpError(f"{ctx.where()}: scales {list(attrs['scales'])} and sizes {list(sizes)} of an "
                                 f"input {list(lengths)} are not related as ONNX Resize relates them")
    ctx.emit("Resize", [ctx.name(x), None, scale_input, size_input], ctx.outputs(node), mode=attrs["mode"],
             coordinate_transformation_mode=mode, nearest_mode=_nearest_mode(ctx, attrs, lengths),
             cubic_coeff_a=float(attrs["cubic_coeff_a"]), exclude_outside=int(attrs["exclude_outside"]))


def _nearest_mode(ctx: ExportContext, attrs: dict, lengths: Sequence[int]) -> str:
    mode = attrs["nearest_mode"]
    if mode != "simple":
        return mode
    directions = {s >= 1 for s, size, n in zip(attrs["scales"], attrs["sizes"], lengths) if size != n or s != 1}
    if len(directions) > 1:
        raise UnsupportedOpError(f"{ctx.where()}: nearest mode 'simple' that enlarges one axis and shrinks another")
    return "floor" if directions != {False} else "ceil"
