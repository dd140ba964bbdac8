"""Lowerings of data-movement ops: views, strided copies (transpose, slice, concat, split, pad, tile,
expand) and gathers.

Strided ops become lists of `Copy`/`Fill` steps in bytes (`kernels.movement`); one kernel per distinct
list. A copy that moves every byte unchanged (identity perm, full slice, ...) is a view instead.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lowbit.backends.native.lowering import LowerContext, lowering
from lowbit.errors import UnsupportedOpError
from lowbit.ir import Node
from lowbit.ir.ops.tensor import slice_length
from lowbit.kernels.copy import copy_kernel
from lowbit.kernels.elementwise import element_bytes
from lowbit.kernels.movement import (Copy, Fill, broadcast_strides, collapse, contiguous_strides,
                                     gather_elements_kernel, gather_kernel, movement_kernel)


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


def _width(node: Node) -> int:
    return element_bytes(node.inputs[0].type.dtype)


def _strides(shape: Sequence[int], node: Node) -> tuple[int, ...]:
    return contiguous_strides(shape, _width(node))


def _is_plain_copy(node: Node, steps: Sequence[Copy | Fill]) -> bool:
    """Whether `steps` copy the operand's bytes to the result unchanged (one contiguous run)."""
    if len(node.inputs) != 1 or len(node.outputs) != 1 or len(steps) != 1 or not isinstance(steps[0], Copy):
        return False
    step, width = steps[0], _width(node)
    if step.src_offset or step.dst_offset or node.inputs[0].type.nbytes != node.outputs[0].type.nbytes:
        return False
    dims, strides = collapse(step.dims, [step.src_strides, step.dst_strides])
    return len(dims) == 0 or (len(dims) == 1 and strides == [(width,), (width,)])


def _emit(ctx: LowerContext, node: Node, steps: Sequence[Copy | Fill]) -> None:
    """Run `steps` over the node's operands then results (or make the result a view of the operand)."""
    if _is_plain_copy(node, steps):
        lower_view(ctx, node)
        return
    buffers = [ctx.operand(i) for i in range(len(node.inputs))] + \
              [ctx.result(i) for i in range(len(node.outputs))]
    width, steps = _width(node), tuple(steps)
    kernel = ctx.kernel(("move", len(buffers), width, steps), lambda module, name: movement_kernel(
        module, name, len(buffers), steps, width, ctx.target))
    ctx.call(kernel, buffers)


@lowering("transpose")
def lower_transpose(ctx: LowerContext, node: Node) -> None:
    source = _strides(node.inputs[0].type.shape, node)
    shape = node.outputs[0].type.shape
    _emit(ctx, node, [Copy(shape, 0, 0, tuple(source[p] for p in node.attrs["perm"]),
                           1, 0, _strides(shape, node))])


@lowering("slice")
def lower_slice(ctx: LowerContext, node: Node) -> None:
    strides = list(_strides(node.inputs[0].type.shape, node))
    shape, offset = node.outputs[0].type.shape, 0
    for start, end, axis, step in zip(*(node.attrs[k] for k in ("starts", "ends", "axes", "steps"))):
        if slice_length(start, end, step):
            offset += start * strides[axis]
        strides[axis] *= step
    _emit(ctx, node, [Copy(shape, 0, offset, tuple(strides), 1, 0, _strides(shape, node))])


@lowering("concat")
def lower_concat(ctx: LowerContext, node: Node) -> None:
    axis = node.attrs["axis"]
    target = _strides(node.outputs[0].type.shape, node)
    steps, position = [], 0
    for index, value in enumerate(node.inputs):
        shape = value.type.shape
        steps.append(Copy(shape, index, 0, _strides(shape, node), len(node.inputs), position * target[axis], target))
        position += shape[axis]
    _emit(ctx, node, steps)


@lowering("split")
def lower_split(ctx: LowerContext, node: Node) -> None:
    axis = node.attrs["axis"]
    source = _strides(node.inputs[0].type.shape, node)
    steps, position = [], 0
    for index, value in enumerate(node.outputs):
        shape = value.type.shape
        steps.append(Copy(shape, 0, position * source[axis], source, 1 + index, 0, _strides(shape, node)))
        position += shape[axis]
    _emit(ctx, node, steps)


@lowering("expand")
def lower_expand(ctx: LowerContext, node: Node) -> None:
    shape = node.outputs[0].type.shape
    _emit(ctx, node, [Copy(shape, 0, 0, broadcast_strides(shape, node.inputs[0].type.shape, _width(node)),
                           1, 0, _strides(shape, node))])


@lowering("tile")
def lower_tile(ctx: LowerContext, node: Node) -> None:
    """The result viewed as [r0, d0, r1, d1, ...]: repeats walk the operand again (stride 0)."""
    shape = node.inputs[0].type.shape
    dims = tuple(n for r, d in zip(node.attrs["repeats"], shape) for n in (r, d))
    source = tuple(s for stride in _strides(shape, node) for s in (0, stride))
    _emit(ctx, node, [Copy(dims, 0, 0, source, 1, 0, _strides(dims, node))])


def _pad_sources(mode: str, begin: int, length: int, end: int) -> list[tuple[int, int, int, int]]:
    """Border runs along one padded axis as (first position, count, source position, source step):
    positions are the result's, sources lie in the interior [begin, begin + length)."""
    if mode == "edge":
        return [(0, begin, begin, 0), (begin + length, end, begin + length - 1, 0)]
    if mode == "reflect":
        return [(0, begin, 2 * begin, -1), (begin + length, end, begin + length - 2, -1)]
    runs = []  # wrap: runs that restart at the interior's start every `length` positions
    for first, count in ((0, begin), (begin + length, end)):
        position = first
        while position < first + count:
            phase = (position - begin) % length
            run = min(length - phase, first + count - position)
            runs.append((position, run, begin + phase, 1))
            position += run
    return runs


@lowering("pad")
def lower_pad(ctx: LowerContext, node: Node) -> None:
    """The (cropped) operand into the interior, then the border slabs axis by axis, last axis first.

    Slab k spans the interior along axes before k and the whole result along axes after k, so the
    slabs cover the border exactly once; for reflect/edge/wrap a slab copies from the result itself,
    whose later axes are complete by then.
    """
    x, out = node.inputs[0].type, node.outputs[0].type
    rank, pads, mode = x.rank, node.attrs["pads"], node.attrs["mode"]
    begins, ends = pads[:rank], pads[rank:]
    source, target = _strides(x.shape, node), _strides(out.shape, node)
    lengths = [d + min(b, 0) + min(e, 0) for d, b, e in zip(x.shape, begins, ends)]
    starts = [max(b, 0) for b in begins]
    steps: list[Copy | Fill] = [Copy(tuple(lengths), 0, sum(max(-b, 0) * s for b, s in zip(begins, source)),
                                     source, 1, sum(p * s for p, s in zip(starts, target)), target)]
    value = np.asarray(node.attrs["value"]).astype(out.dtype.numpy).tobytes()
    for axis in reversed(range(rank)):
        dims = list(lengths[:axis]) + [0] + list(out.shape[axis + 1:])
        base = sum(p * s for p, s in zip(starts[:axis], target))
        after = max(ends[axis], 0)
        if mode == "constant":
            runs = [(0, starts[axis], 0, 0), (starts[axis] + lengths[axis], after, 0, 0)]
        else:
            runs = _pad_sources(mode, starts[axis], lengths[axis], after)
        for first, count, origin, step in runs:
            if count == 0:
                continue
            dims[axis] = count
            at = base + first * target[axis]
            if mode == "constant":
                steps.append(Fill(tuple(dims), 1, at, target, value))
            else:
                walk = target[:axis] + (step * target[axis],) + target[axis + 1:]
                steps.append(Copy(tuple(dims), 1, base + origin * target[axis], walk, 1, at, target))
    if 0 in out.shape:
        steps = []
    _emit(ctx, node, steps)


def _index_bytes(node: Node) -> int:
    return element_bytes(node.inputs[1].type.dtype)


@lowering("gather")
def lower_gather(ctx: LowerContext, node: Node) -> None:
    """Indices are read at run time; out-of-range ones give zero rows (the reference raises)."""
    shape, axis = node.inputs[0].type.shape, node.attrs["axis"]
    outer, inner = int(np.prod(shape[:axis], dtype=np.int64)), int(np.prod(shape[axis + 1:], dtype=np.int64))
    count, width, index_bytes = node.inputs[1].type.size, _width(node), _index_bytes(node)
    key = ("gather", outer, shape[axis], count, inner * width, index_bytes)
    kernel = ctx.kernel(key, lambda module, name: gather_kernel(
        module, name, outer, shape[axis], count, inner * width, index_bytes))
    ctx.call(kernel, [ctx.operand(0), ctx.operand(1), ctx.result(0)])


@lowering("gather_elements")
def lower_gather_elements(ctx: LowerContext, node: Node) -> None:
    """Like numpy's take_along_axis; out-of-range indices give 0 (the reference raises)."""
    data, indices, axis = node.inputs[0].type.shape, node.inputs[1].type.shape, node.attrs["axis"]
    if any(i > d != 1 for k, (d, i) in enumerate(zip(data, indices)) if k != axis):
        raise UnsupportedOpError(f"{node.describe()}: indices {list(indices)} reach past data {list(data)}")
    width, index_bytes = _width(node), _index_bytes(node)
    key = ("gather_elements", data, indices, axis, width, index_bytes)
    kernel = ctx.kernel(key, lambda module, name: gather_elements_kernel(
        module, name, data, indices, axis, width, index_bytes))
    ctx.call(kernel, [ctx.operand(0), ctx.operand(1), ctx.result(0)])
