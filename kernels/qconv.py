"""Integer 2-D convolutions (NCHW) as LLVM IR: im2col into int8 GEMM panels, a direct depthwise kernel,
and an exact wide route, all finishing in a `kernels.requantize` epilogue (one output channel per row).

Every route first copies an image into a *plane* in scratch: each channel [H + pads, W + pads] with the
padding holding the input's zero point (real 0, as the reference pads), followed by slack bytes, so
windows never test bounds and row vectors may read a little past their last pixel.

* int8 route (`FastConv`): out[Mg, pixels] = W̃[Mg, K] · cols[K, pixels] per image and group, with the
  constant centred weights on the broadcast side of `gemm_int8.TileEmitter` (swapped operands) and the
  im2col matrix packed one panel of pixels at a time, straight before the tiles use it (it stays in
  L1). A panel holds consecutive output pixels: part of one output row when rows are wide, else
  several whole rows. Packing flips or widens the activations as the route wants them; the flip's
  correction, the zero-point term −zx·ΣW̃ and the bias are one compile-time offset per channel.
* depthwise (one input and output channel per group): per output row, vectors of pixels, one multiply
  per tap with the tap's centred weight broadcast; int32 or int64 lanes as the accumulator bound says.
* wide route (16-bit activations, deep int64 accumulators, weights that do not centre into int8): the
  centred im2col matrix in int32, then `gemm_wide`.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
from llvmlite import ir

from lowbit.ir.dtypes import DType
from lowbit.kernels import llvm as ll
from lowbit.kernels.gemm_int8 import Route, TileEmitter, convert_values, store_groups
from lowbit.kernels.gemm_wide import ROWS as WIDE_ROWS
from lowbit.kernels.gemm_wide import Side, emit_wide_gemm
from lowbit.kernels.llvm import I8, I32, I64
from lowbit.kernels.movement import memcpy, store_run
from lowbit.kernels.packing import ALIGNMENT
from lowbit.kernels.parallel import chunk_bounds, for_units, new_parallel_kernel, split_rows, thread_scratch
from lowbit.kernels.reduce import nested_loops

BYTE_PTR = I8.as_pointer()


def _const(value: int) -> ir.Constant:
    return ir.Constant(I64, value)


def _round_up(value: int, step: int = ALIGNMENT) -> int:
    return -(-value // step) * step


@dataclass(frozen=True)
class ConvShape:
    """x [batch, channels, h, w] (elements of `dtype`, zero point `zero_point`) convolved by weights
    [m, channels/group, kh, kw] with conv2d's strides, pads (top, left, bottom, right) and dilations."""

    batch: int
    channels: int
    h: int
    w: int
    m: int
    group: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    dilations: tuple[int, int]
    dtype: DType
    zero_point: int

    @property
    def out(self) -> tuple[int, int]:
        return tuple((size + self.pads[a] + self.pads[a + 2] - self.dilations[a] * (self.kernel[a] - 1) - 1)
                     // self.strides[a] + 1 for a, size in enumerate((self.h, self.w)))

    @property
    def pixels(self) -> int:
        return self.out[0] * self.out[1]

    @property
    def plane(self) -> tuple[int, int]:
        return self.h + self.pads[0] + self.pads[2], self.w + self.pads[1] + self.pads[3]

    @property
    def cg(self) -> int:
        return self.channels // self.group

    @property
    def mg(self) -> int:
        return self.m // self.group

    @property
    def reduction(self) -> int:
        return self.cg * self.kernel[0] * self.kernel[1]

    @property
    def depthwise(self) -> bool:
        return self.group == self.channels == self.m

    @property
    def element_bytes(self) -> int:
        return ll.element_bytes(ll.element_type(self.dtype))

    def tap_offsets(self) -> list[int]:
        """Element offset in a group's planes of each k = (c, ky, kx) for output pixel (0, 0)."""
        hp, wp = self.plane
        (kh, kw), (dh, dw) = self.kernel, self.dilations
        return [c * hp * wp + ky * dh * wp + kx * dw for c in range(self.cg) for ky in range(kh) for kx in range(kw)]


# -- planes ------------------------------------------------------------------------------------------
def plane_bytes(shape: ConvShape, channels: int, slack: int) -> int:
    hp, wp = shape.plane
    return _round_up(channels * hp * wp * shape.element_bytes + slack)


def emit_plane(builder: ir.IRBuilder, shape: ConvShape, source: ir.Value, target: ir.Value, channels: int,
               vector_bytes: int) -> None:
    """`channels` channels of an image at `source` → padded planes at `target` (padding = zero point)."""
    hp, wp = shape.plane
    eb = shape.element_bytes
    top, left = shape.pads[:2]
    element = ll.element_type(shape.dtype)
    fill = ir.Constant(element, shape.zero_point & ((1 << (8 * eb)) - 1))
    if any(shape.pads):
        store_run(builder, target, _const(0), channels * hp * wp, fill, vector_bytes)

    def row(b: ir.IRBuilder, i: ir.Value, carried: list) -> list:
        c, y = b.udiv(i, _const(shape.h)), b.urem(i, _const(shape.h))
        at = b.add(b.mul(b.add(b.mul(c, _const(hp)), b.add(y, _const(top))), _const(wp)), _const(left))
        memcpy(b, b.gep(target, [b.mul(at, _const(eb))]), b.gep(source, [b.mul(i, _const(shape.w * eb))]),
               shape.w * eb)
        return carried

    ll.static_loop(builder, channels * shape.h, "row", row)


def strided_row(builder: ir.IRBuilder, base: ir.Value, at: ir.Value, count: int, stride: int) -> ir.Value:
    """base[at + stride·i] for i < count (`base` a typed pointer), from one contiguous load of
    count·stride elements (it may read past the last element needed: planes end in slack)."""
    values = ll.load_vector(builder, base, at, count * stride)
    if stride == 1:
        return values
    return builder.shuffle_vector(values, ir.Constant(values.type, ir.Undefined),
                                  ll.const_vector(I32, [i * stride for i in range(count)]))


# -- pixel panels --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PixelRun:
    """`count` panels of consecutive output pixels; panel i starts at output row first_row + i·rows and
    holds `pieces` (output row offset, first column, pixels) in order, `valid` pixels in all."""

    count: int
    first_row: int
    rows: int
    pieces: tuple[tuple[int, int, int], ...]

    @property
    def valid(self) -> int:
        return sum(piece[2] for piece in self.pieces)


def pixel_runs(oh: int, ow: int, width: int) -> list[PixelRun]:
    """The output's pixels as panels of at most `width`: wide rows split into panels, narrow rows
    grouped whole (and a shorter tail group)."""
    per_panel = min(width // ow, oh)
    if per_panel < 2:
        return [PixelRun(oh, 0, 1, ((0, first, min(width, ow - first)),)) for first in range(0, ow, width)]
    runs = [PixelRun(oh // per_panel, 0, per_panel, tuple((dy, 0, ow) for dy in range(per_panel)))]
    if oh % per_panel:
        rest = oh % per_panel
        runs.append(PixelRun(1, oh - rest, rest, tuple((dy, 0, ow) for dy in range(rest))))
    return runs


# -- the int8 route ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FastConv:
    """A convolution on an int8 GEMM route: `shift` is what packing adds to the activations (flip),
    weights are `pack_weight_rows`'s rows."""

    shape: ConvShape
    route: Route
    mr: int
    vectors: int
    shift: int

    @property
    def groups(self) -> int:
        return -(-self.shape.reduction // self.route.kr)

    @property
    def row_bytes(self) -> int:
        return self.groups * self.route.group_bytes

    @property
    def width(self) -> int:
        return self.vectors * self.route.lanes

    def runs(self) -> list[PixelRun]:
        return pixel_runs(*self.shape.out, self.width)

    @property
    def slack(self) -> int:
        return (self.width + 1) * self.shape.strides[1] + ALIGNMENT

    @property
    def scratch_bytes(self) -> int:
        panel = self.groups * self.width * self.route.group_bytes
        return plane_bytes(self.shape, self.shape.channels, self.slack) + panel


def pack_weight_rows(centred: np.ndarray, route: Route) -> np.ndarray:
    """Centred weights [M, K] → rows of whole K groups in the route's element type (K zero-padded)."""
    m, k = centred.shape
    groups = -(-k // route.kr)
    rows = np.zeros((m, groups * route.kr), np.int8 if route.bits == 8 else np.int16)
    rows[:, :k] = centred
    return rows


def pack_panel(module: ir.Module, name: str, conv: FastConv, run: PixelRun, offsets: ir.Value) -> ir.Function:
    """`name(planes, dst, first_row)`: the im2col panel of `run` whose pixels start at output row first_row,
    [K groups][panel width][kr], converted for the route (K padding: zeros); `offsets` is the table of
    `ConvShape.tap_offsets`."""
    shape, route = conv.shape, conv.route
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [BYTE_PTR, BYTE_PTR, I64]), name)
    fn.linkage = "internal"
    planes, dst, first_row = fn.args
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    element = ll.element_type(shape.dtype)
    planes = builder.bitcast(planes, element.as_pointer())
    (sh, sw), (_, wp) = shape.strides, shape.plane
    width = -(-run.valid // route.lanes) * route.lanes
    row_base = builder.mul(first_row, _const(sh * wp))
    zero = ir.Constant(ll.vector(element, width), None)

    def panel_row(b: ir.IRBuilder, k: ir.Value | None) -> ir.Value:
        """Row k of the panel as the route stores it (zeros for K padding, k None)."""
        if k is None:
            values = zero
        else:
            start = b.add(row_base, b.sext(b.load(b.gep(offsets, [k])), I64))
            if len(run.pieces) == 1:
                _, ox0, _ = run.pieces[0]
                values = strided_row(b, planes, b.add(start, _const(ox0 * sw)), width, sw)
            else:
                values, lane = zero, 0
                for dy, ox0, count in run.pieces:
                    span = 1 << (count - 1).bit_length()
                    piece = strided_row(b, planes, b.add(start, _const(dy * sh * wp + ox0 * sw)), span, sw)
                    wide = b.shuffle_vector(piece, ir.Constant(piece.type, ir.Undefined),
                                            ll.const_vector(I32, [min(i, span - 1) for i in range(width)]))
                    mask = [width + i - lane if lane <= i < lane + count else i for i in range(width)]
                    values = b.shuffle_vector(values, wide, ll.const_vector(I32, mask))
                    lane += count
        return convert_values(b, values, conv.shift, route.bits, shape.dtype.is_signed)

    group_bytes = width * route.group_bytes
    k_total, kr = shape.reduction, route.kr

    def group(b: ir.IRBuilder, g: ir.Value, carried: list) -> list:
        rows = [panel_row(b, b.add(b.mul(g, _const(kr)), _const(j))) for j in range(kr)]
        store_groups(b, route, rows, b.gep(dst, [b.mul(g, _const(group_bytes))]))
        return carried

    full = k_total // kr
    if full:
        ll.static_loop(builder, full, "g", group)
    if k_total % kr:
        rows = [panel_row(builder, _const(full * kr + j) if full * kr + j < k_total else None) for j in range(kr)]
        store_groups(builder, route, rows, builder.gep(dst, [_const(full * group_bytes)]))
    builder.ret_void()
    return fn


def conv_kernel(module: ir.Module, name: str, residual: DType | None) -> tuple:
    """A parallel convolution kernel `name(x, w, [residual], out, scratch, thread, threads)`: (function,
    builder, x, w, residual or None, out, scratch, thread, threads)."""
    fn, builder, thread, threads = new_parallel_kernel(module, name, 5 if residual else 4)
    args = list(fn.args)
    return fn, builder, args[0], args[1], (args[2] if residual else None), args[-4], args[-3], thread, threads


class ConvImage:
    """Pointers of image n and of its group g: output and residual, as the epilogue's arguments."""

    def __init__(self, shape: ConvShape, x: ir.Value, out: ir.Value, residual: ir.Value | None, out_bytes: int,
                 residual_bytes: int) -> None:
        self.shape, self.x, self.out, self.residual = shape, x, out, residual
        self.out_bytes, self.residual_bytes = out_bytes, residual_bytes

    def input(self, b: ir.IRBuilder, n: ir.Value) -> ir.Value:
        return b.gep(self.x, [b.mul(n, _const(self.shape.channels * self.shape.h * self.shape.w
                                               * self.shape.element_bytes))])

    def epilogue_args(self, b: ir.IRBuilder, n: ir.Value, first_channel: ir.Value) -> list[ir.Value]:
        """out, [residual] at the image's channel `first_channel`, then that channel's index."""
        shape = self.shape
        at = b.add(b.mul(n, _const(shape.m)), first_channel)
        args = [b.gep(self.out, [b.mul(at, _const(shape.pixels * self.out_bytes))])]
        if self.residual is not None:
            args.append(b.gep(self.residual, [b.mul(at, _const(shape.pixels * self.residual_bytes))]))
        return args + [first_channel]


def for_run(builder: ir.IRBuilder, runs: list[PixelRun], panel: ir.Value, body) -> None:
    """body(builder, run number, index in the run) for the run that holds flat panel number `panel`."""
    start = 0
    for number, run in enumerate(runs):
        inside = builder.icmp_unsigned("<", builder.sub(panel, _const(start)), _const(run.count))
        with builder.if_then(inside) if len(runs) > 1 else nullcontext():
            body(builder, number, builder.sub(panel, _const(start)))
        start += run.count


def emit_fast_conv(module: ir.Module, name: str, conv: FastConv, epilogue, out_bytes: int,
                   residual: DType | None, vector_bytes: int, threads: int = 1) -> ir.Function:
    """`name(x, w, [residual], out, scratch, thread, threads)` on the int8 route; `epilogue` a "row"
    `ProductEpilogue`; scratch holds `conv.scratch_bytes` per thread.

    Threads share units (image, group, pixel panel, chunk of output channels), chunks cut only when the
    panels are too few for `threads`; a thread copies the planes of each image it works on and packs
    each panel it works on into its own scratch."""
    shape, route = conv.shape, conv.route
    fn, builder, x, w, res, out, scratch, thread, count = conv_kernel(module, name, residual)
    planes = thread_scratch(builder, scratch, thread, conv.scratch_bytes)
    panel = builder.gep(planes, [_const(plane_bytes(shape, shape.channels, conv.slack))])
    tiles = TileEmitter(module, name, route, conv.groups, conv.mr, epilogue, swapped=True, aligned=False)
    offsets = ll.global_table(module, f"{name}.taps", I32, shape.tap_offsets())
    runs = conv.runs()
    packs = [pack_panel(module, f"{name}.pack{i}", conv, run, offsets) for i, run in enumerate(runs)]
    hp, wp = shape.plane
    image = ConvImage(shape, x, out, res, out_bytes, residual.bits // 8 if residual else 0)
    panels = sum(run.count for run in runs)
    chunk = split_rows(shape.mg, conv.mr, shape.batch * shape.group * panels, threads)

    def group_planes(b: ir.IRBuilder, g: ir.Value) -> ir.Value:
        return b.gep(planes, [b.mul(g, _const(shape.cg * hp * wp * shape.element_bytes))])

    def first_row(b: ir.IRBuilder, run: PixelRun, i: ir.Value) -> ir.Value:
        return b.add(_const(run.first_row), b.mul(i, _const(run.rows)))

    def pack(b: ir.IRBuilder, indices: list[ir.Value]) -> None:
        _, g, q = indices
        for_run(b, runs, q, lambda b2, r, i: b2.call(packs[r], [group_planes(b2, g), panel,
                                                               first_row(b2, runs[r], i)]))

    def unit(b: ir.IRBuilder, indices: list[ir.Value]) -> None:
        n, g, q, part = indices
        first, rows = chunk_bounds(b, part, chunk, shape.mg)
        group_first = b.mul(g, _const(shape.mg))  # the group's first output channel
        w_g = b.gep(w, [b.mul(group_first, _const(conv.row_bytes))])
        args = image.epilogue_args(b, n, group_first)

        def tiles_of(b2: ir.IRBuilder, r: int, i: ir.Value) -> None:
            run = runs[r]
            col0 = b2.add(b2.mul(first_row(b2, run, i), _const(shape.out[1])), _const(run.pieces[0][1]))
            tiles.run_panel(b2, w_g, _const(conv.row_bytes), rows, panel, col0, -(-run.valid // route.lanes),
                            run.valid, args, first)

        for_run(b, runs, q, tiles_of)

    for_units(builder, thread, count, [shape.batch, shape.group, panels, -(-shape.mg // chunk)], "unit", unit,
              {0: lambda b, indices: emit_plane(b, shape, image.input(b, indices[0]), planes, shape.channels,
                                                vector_bytes), 2: pack})
    builder.ret_void()
    return fn


# -- depthwise --------------------------------------------------------------------------------------------
def depthwise_scratch_bytes(shape: ConvShape, lanes: int) -> int:
    return plane_bytes(shape, 1, (lanes + 1) * shape.strides[1] * shape.element_bytes + ALIGNMENT)


def emit_depthwise(module: ir.Module, name: str, shape: ConvShape, lanes: int, wide: bool, epilogue,
                   out_bytes: int, residual: DType | None, vector_bytes: int) -> ir.Function:
    """`name(x, w, [residual], out, scratch, thread, threads)`: w holds the centred weights as int32
    [C, kh·kw]; `wide` accumulates in int64 lanes. Threads share the (image, channel) pairs, each with
    its own plane: `depthwise_scratch_bytes` per thread."""
    fn, builder, x, w, res, out, scratch, thread, threads = conv_kernel(module, name, residual)
    element = ll.element_type(shape.dtype)
    scratch = thread_scratch(builder, scratch, thread, depthwise_scratch_bytes(shape, lanes))
    plane = builder.bitcast(scratch, element.as_pointer())
    weights = builder.bitcast(w, I32.as_pointer())
    acc_element = I64 if wide else I32
    kind = ll.vector(acc_element, lanes)
    (kh, kw), (sh, sw), (dh, dw) = shape.kernel, shape.strides, shape.dilations
    hp, wp = shape.plane
    oh, ow = shape.out
    image_plane = shape.h * shape.w * shape.element_bytes
    image = ConvImage(shape, x, out, res, out_bytes, residual.bits // 8 if residual else 0)
    zero_point = ir.Constant(kind, [shape.zero_point] * lanes)

    def widen(b: ir.IRBuilder, value: ir.Value) -> ir.Value:
        return b.sext(value, kind) if shape.dtype.is_signed else b.zext(value, kind)

    def channel(b2: ir.IRBuilder, indices: list[ir.Value]) -> None:
        n, c = indices
        emit_plane(b2, shape, b2.gep(image.input(b2, n), [b2.mul(c, _const(image_plane))]), scratch, 1,
                   vector_bytes)
        taps = []
        for t in range(kh * kw):
            value = b2.load(b2.gep(weights, [b2.add(b2.mul(c, _const(kh * kw)), _const(t))]))
            taps.append(ll.splat(b2, b2.sext(value, acc_element) if wide else value, lanes))
        args = image.epilogue_args(b2, n, _const(0))

        def vector(b3: ir.IRBuilder, oy: ir.Value, ox: ir.Value, valid: int) -> None:
            acc = ir.Constant(kind, None)
            for ky in range(kh):
                line = b3.mul(b3.add(b3.mul(oy, _const(sh)), _const(ky * dh)), _const(wp))
                for kx in range(kw):
                    at = b3.add(line, b3.add(b3.mul(ox, _const(sw)), _const(kx * dw)))
                    values = b3.sub(widen(b3, strided_row(b3, plane, at, lanes, sw)), zero_point)
                    acc = b3.add(acc, b3.mul(values, taps[ky * kw + kx]))
            epilogue.emit(b3, [[acc]], c, b3.add(b3.mul(oy, _const(ow)), ox), valid, args)

        def row(b3: ir.IRBuilder, oy: ir.Value, c3: list) -> list:
            full, rest = divmod(ow, lanes)
            if full:
                ll.static_loop(b3, full, "ox",
                               lambda b4, v, c4: vector(b4, oy, b4.mul(v, _const(lanes)), lanes) or c4)
            if rest:
                vector(b3, oy, _const(full * lanes), rest)
            return c3

        ll.static_loop(b2, oh, "oy", row)

    for_units(builder, thread, threads, [shape.batch, shape.channels], "channel", channel)
    builder.ret_void()
    return fn


# -- the wide route ---------------------------------------------------------------------------------------
def wide_scratch_bytes(shape: ConvShape) -> int:
    return plane_bytes(shape, shape.channels, ALIGNMENT) + 4 * shape.reduction * shape.pixels


def emit_wide_conv(module: ir.Module, name: str, shape: ConvShape, lanes: int, epilogue, out_bytes: int,
                   residual: DType | None, vector_bytes: int, threads: int = 1) -> ir.Function:
    """`name(x, w, [residual], out, scratch, thread, threads)`: w holds the centred weights as int32 [M, K];
    per image and group the centred im2col matrix [K, pixels] (int32) goes through `gemm_wide`. Threads
    share units (image, group, chunk of output channels), each with its own planes and im2col matrix
    (`wide_scratch_bytes` per thread)."""
    fn, builder, x, w, res, out, scratch, thread, count = conv_kernel(module, name, residual)
    element = ll.element_type(shape.dtype)
    planes = thread_scratch(builder, scratch, thread, wide_scratch_bytes(shape))
    cols = builder.bitcast(builder.gep(planes, [_const(plane_bytes(shape, shape.channels, ALIGNMENT))]),
                           I32.as_pointer())
    typed = builder.bitcast(planes, element.as_pointer())
    weights = builder.bitcast(w, I32.as_pointer())
    hp, wp = shape.plane
    (sh, sw), (oh, ow) = shape.strides, shape.out
    k_total, pixels = shape.reduction, shape.pixels
    offsets = ll.global_table(module, f"{name}.taps", I64, shape.tap_offsets())
    image = ConvImage(shape, x, out, res, out_bytes, residual.bits // 8 if residual else 0)
    chunk = split_rows(shape.mg, WIDE_ROWS, shape.batch * shape.group, threads)
    parts = -(-shape.mg // chunk)

    def im2col(b: ir.IRBuilder, indices: list[ir.Value]) -> None:
        base = b.mul(indices[1], _const(shape.cg * hp * wp))

        def column(b3: ir.IRBuilder, indices: list, c: list) -> list:
            k, oy, ox = indices
            at = b3.add(b3.add(base, b3.load(b3.gep(offsets, [k]))),
                        b3.add(b3.mul(oy, _const(sh * wp)), b3.mul(ox, _const(sw))))
            value = b3.load(b3.gep(typed, [at]))
            wide = b3.sext(value, I32) if shape.dtype.is_signed else b3.zext(value, I32)
            index = b3.add(b3.mul(k, _const(pixels)), b3.add(b3.mul(oy, _const(ow)), ox))
            b3.store(b3.sub(wide, ir.Constant(I32, shape.zero_point)), b3.gep(cols, [index]))
            return c

        nested_loops(b, [k_total, oh, ow], "im2col", column)

    def unit(b: ir.IRBuilder, indices: list[ir.Value]) -> None:
        n, g, part = indices
        first = b.add(b.mul(g, _const(shape.mg)), b.mul(part, _const(chunk)))  # the chunk's first channel
        args = image.epilogue_args(b, n, first)
        a = Side(b.gep(weights, [b.mul(first, _const(k_total))]), DType.i32, k_total, _const(0))

        def rows(b2: ir.IRBuilder, count: int) -> None:
            emit_wide_gemm(b2, count, pixels, k_total, a, Side(cols, DType.i32, pixels, _const(0)), epilogue, args,
                           lanes)

        last = shape.mg - (parts - 1) * chunk
        if last == chunk:
            rows(b, chunk)
            return
        with b.if_else(b.icmp_unsigned("<", part, _const(parts - 1))) as (full, tail):
            with full:
                rows(b, chunk)
            with tail:
                rows(b, last)

    for_units(builder, thread, count, [shape.batch, shape.group, parts], "unit", unit,
              {0: lambda b, indices: emit_plane(b, shape, image.input(b, indices[0]), planes, shape.channels,
                                                vector_bytes), 1: im2col})
    builder.ret_void()
    return fn
