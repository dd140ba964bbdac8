"""Integer 2-D convolutions on AMX tiles (`kernels.gemm_amx`): the route of qconv2d for targets with AMX when
a group has at least 16 output channels and 16 output pixels.

Per image and group, C[channels, pixels] = W̃ · cols, the centred weights as A (tile by tile), the
activations as they are as B (the instruction takes their signedness), into `kernels.requantize`'s "row"
epilogue. Two forms of B:

* direct (stride 1 along x, one group, ~64 input channels, output rows mostly whole 16-pixel tiles):
  each image becomes a padded plane of channel quads [C/4][H + pads][W + pads][4]; K runs (ky, kx, 64
  channels), so the B tile of 16 consecutive output pixels, one tap and 64 channels is 16 rows of that
  plane read in place (no im2col). Rows of at most 16 pixels put two output rows in a block.
* gathered (channels per group a multiple of 4, where it needs no more K steps than im2col): the same plane
  of channel quads, K running (ky, kx, channel quad) densely; a panel of 64 output pixels is gathered
  from it one K quad row at a time, each row's pixels whole 4-byte words copied 16 at a time (no byte
  shuffles), the way the tiles read B.
* windowed (neither, with narrow strides along x, where it needs no more K steps than im2col: a stem's 7×7
  taps over 3 channels): K running (c, ky, quad of kx) over the byte planes; one 64-byte load holds the
  windows of 16 output pixels, a byte shuffle puts each pixel's four taps together.
* im2col: `kernels.qconv`'s panels of 64 output pixels packed as VNNI panels (the same byte layout).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llvmlite import ir

from lowbit.ir.dtypes import DType
from lowbit.kernels import llvm as ll
from lowbit.kernels.gemm_amx import BLOCK, BYTES, STEP, TILE, AmxTiles, BLayout, configure, release, steps
from lowbit.kernels.gemm_int8 import Epilogue, store_groups
from lowbit.kernels.llvm import I8, I32, I64
from lowbit.kernels.movement import store_run
from lowbit.kernels.packing import ALIGNMENT
from lowbit.kernels.parallel import for_units, split_rows, thread_scratch
from lowbit.kernels.qconv import (ConvImage, ConvShape, FastConv, PixelRun, conv_kernel, emit_plane, for_run,
                                  pack_panel, plane_bytes, strided_row)


def _c(value: int) -> ir.Constant:
    return ir.Constant(I64, value)


PANEL_VECTORS = 4  # 64 output pixels per im2col panel: two column blocks
# A direct convolution computes whole 16-pixel tiles along output rows and whole 64-channel K steps per
# tap: below this share of real pixels (7-pixel rows: 7/16) or channels, im2col panels (several rows to a
# panel, K dense over channels and taps) waste less.
DIRECT_USE = 0.8
WINDOW = 4  # kx taps per K quad of a windowed panel


@dataclass(frozen=True)
class AmxConv:
    """A convolution on AMX tiles: its form (`direct`), geometry and scratch."""

    shape: ConvShape

    @property
    def direct(self) -> bool:
        shape, ow = self.shape, self.shape.out[1]
        return shape.strides[1] == 1 and shape.group == 1 and ow / (-(-ow // TILE) * TILE) >= DIRECT_USE \
            and shape.cg / (steps(shape.cg) * STEP) >= DIRECT_USE

    @property
    def gathered(self) -> bool:
        """Not direct, but K as (tap, channel quad) over a quad plane: groups must not share quads."""
        shape = self.shape
        return not self.direct and shape.cg % 4 == 0 and steps(self.taps * shape.cg) <= steps(shape.reduction)

    @property
    def windowed(self) -> bool:
        """Neither direct nor gathered, but K as (c, ky, quad of kx) over the byte planes: one 64-byte load
        holds a quad row's windows of 16 pixels (narrow strides), where that needs no more K steps than im2col."""
        shape = self.shape
        sw, dw = shape.strides[1], shape.dilations[1]
        return not self.direct and not self.gathered and (TILE - 1) * sw + (WINDOW - 1) * dw < STEP \
            and steps(shape.cg * shape.kernel[0] * self.kx_quads * WINDOW) <= steps(shape.reduction)

    @property
    def kx_quads(self) -> int:
        return -(-self.shape.kernel[1] // WINDOW)

    @property
    def quad_plane(self) -> bool:
        return self.direct or self.gathered

    @property
    def fast(self) -> FastConv:
        """The im2col panels' geometry and packing: 4-byte groups, no flip."""
        return FastConv(self.shape, BYTES, BLOCK * TILE, PANEL_VECTORS, 0)

    @property
    def channels(self) -> int:
        """Output channels per group, padded to whole tiles."""
        return -(-self.shape.mg // TILE) * TILE

    @property
    def inputs(self) -> int:
        """Input channels per tap of a direct convolution, padded to whole K steps."""
        return steps(self.shape.cg) * STEP

    @property
    def taps(self) -> int:
        return self.shape.kernel[0] * self.shape.kernel[1]

    @property
    def row_bytes(self) -> int:
        if self.direct:
            return self.taps * self.inputs
        if self.gathered:
            return steps(self.taps * self.shape.cg) * STEP
        if self.windowed:
            return steps(self.shape.cg * self.shape.kernel[0] * self.kx_quads * WINDOW) * STEP
        return steps(self.shape.reduction) * STEP

    @property
    def plane_bytes(self) -> int:
        if self.quad_plane:
            hp, wp = self.shape.plane
            channels = self.inputs if self.direct else self.shape.channels
            # slack: the last rows' edge tiles read up to two tiles past a row's real pixels; a gathered
            # panel row reads a whole vector of (strided) words past its last pixel
            slack = 4 * max(BLOCK * TILE + self.shape.dilations[1] * self.shape.kernel[1],
                            TILE * self.shape.strides[1])
            return -(-(channels * hp * wp + slack + ALIGNMENT) // ALIGNMENT) * ALIGNMENT
        return plane_bytes(self.shape, self.shape.channels, self.fast.slack)

    @property
    def scratch_bytes(self) -> int:
        """Per thread: the padded planes of one image, and off the direct form one panel of whole K steps
        (and the vector a gathered panel's last row writes past its end)."""
        panel = 0 if self.direct else self.row_bytes * self.fast.width + TILE * 4
        return self.plane_bytes + panel

    def gather_offsets(self) -> tuple[int, ...]:
        """A gathered panel's offset in the quad plane (in 4-byte words) of each K quad (ky, kx, channel quad), or a
        windowed panel's in the byte planes of each K quad (c, ky, quad of kx), for output pixel (0, 0)."""
        hp, wp = self.shape.plane
        (kh, kw), (dh, dw) = self.shape.kernel, self.shape.dilations
        if self.windowed:
            return tuple(c * hp * wp + ky * dh * wp + WINDOW * q * dw
                         for c in range(self.shape.cg) for ky in range(kh) for q in range(self.kx_quads))
        return tuple(q * hp * wp + ky * dh * wp + kx * dw
                     for ky in range(kh) for kx in range(kw) for q in range(self.shape.cg // 4))

    def tap_offsets(self) -> tuple[int, ...]:
        """A direct convolution's B offset of each K step (ky, kx, 64 channels) in the quad plane."""
        hp, wp = self.shape.plane
        (kh, kw), (dh, dw) = self.shape.kernel, self.shape.dilations
        quads = STEP // 4
        return tuple(4 * (c * quads * hp * wp + ky * dh * wp + kx * dw)
                     for ky in range(kh) for kx in range(kw) for c in range(self.inputs // STEP))


def pack_conv_weights(centred: np.ndarray, conv: AmxConv) -> np.ndarray:
    """Centred weights [M, K = (c, ky, kx)] (int8 values) → per group, A tiles of 16 channels, each its K steps
    of 16 × 64 bytes in order (K in the form's order: (ky, kx, c) on a quad plane, else (c, ky, kx);
    zero-padded; windowed: (c, ky, kx padded to quads)): [group][channel tile][K step][16][64]."""
    shape = conv.shape
    rows = np.zeros((shape.group, conv.channels, conv.row_bytes), np.int8)
    grouped = centred.reshape(shape.group, shape.mg, shape.cg, conv.taps)
    if conv.quad_plane:
        taps = np.zeros((shape.group, shape.mg, conv.taps, conv.inputs if conv.direct else shape.cg), np.int8)
        taps[..., :shape.cg] = grouped.transpose(0, 1, 3, 2)
        rows[:, :shape.mg, :taps[0, 0].size] = taps.reshape(shape.group, shape.mg, -1)
    elif conv.windowed:
        (kh, kw), width = shape.kernel, conv.kx_quads * WINDOW
        windows = np.zeros((shape.group, shape.mg, shape.cg, kh, width), np.int8)
        windows[..., :kw] = grouped.reshape(shape.group, shape.mg, shape.cg, kh, kw)
        rows[:, :shape.mg, :windows[0, 0].size] = windows.reshape(shape.group, shape.mg, -1)
    else:
        rows[:, :shape.mg, :shape.reduction] = grouped.reshape(shape.group, shape.mg, -1)
    tiles = rows.reshape(shape.group, conv.channels // TILE, TILE, conv.row_bytes // STEP, STEP)
    return np.ascontiguousarray(tiles.transpose(0, 1, 3, 2, 4))


def emit_quad_plane(builder: ir.IRBuilder, conv: AmxConv, source: ir.Value, target: ir.Value,
                    vector_bytes: int) -> None:
    """An image at `source` (NCHW, 8-bit) → its padded plane of channel quads at `target` (padding = the zero
    point; channels past the real ones are left as they are: their weights are zero)."""
    shape = conv.shape
    hp, wp = shape.plane
    top, left = shape.pads[:2]
    quads = -(-shape.channels // 4)
    if any(shape.pads):
        store_run(builder, target, _c(0), quads * hp * wp * 4, ir.Constant(I8, shape.zero_point & 0xFF), vector_bytes)

    def row(b: ir.IRBuilder, i: ir.Value, carried: list) -> list:
        q, y = b.udiv(i, _c(shape.h)), b.urem(i, _c(shape.h))
        at = b.mul(b.add(b.mul(b.add(b.mul(q, _c(hp)), b.add(y, _c(top))), _c(wp)), _c(left)), _c(4))

        def chunk(b2: ir.IRBuilder, x0: ir.Value, width: int) -> None:
            rows = []
            for j in range(4):
                channel = b2.add(b2.mul(q, _c(4)), _c(j))
                start = b2.add(b2.mul(b2.add(b2.mul(channel, _c(shape.h)), y), _c(shape.w)), x0)
                values = ll.load_vector(b2, source, start, width)
                if (quads - 1) * 4 + j >= shape.channels:  # the last quad's missing channels: zeros
                    values = b2.select(b2.icmp_signed("<", channel, _c(shape.channels)), values,
                                       ir.Constant(values.type, None))
                rows.append(values)
            store_groups(b2, BYTES, rows, b2.gep(target, [b2.add(at, b2.mul(x0, _c(4)))]))

        ll.strip_mine(b, _c(0), shape.w, TILE, "x", chunk)
        return carried

    ll.static_loop(builder, quads * shape.h, "row", row)


def _gather_panel(module: ir.Module, name: str, conv: AmxConv, run: PixelRun, offsets: ir.Value) -> ir.Function:
    """`name(planes, dst, first_row)`: the gathered (or windowed) panel of `run` whose pixels start at output row
    first_row: [K quad][panel width][4 bytes] from a group's quad plane (byte planes); `offsets` is the table of
    `gather_offsets`. Every copy moves 16 pixels' words (strided along x by the stride; windowed: each pixel's
    four window bytes picked from one 64-byte load by a byte shuffle) and may write past its piece: later
    copies (the next piece, the next K quad row; the scratch's slack after the last) overwrite it."""
    shape = conv.shape
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I8.as_pointer(), I64]), name)
    fn.linkage = "internal"
    planes, dst, first_row = fn.args
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    out = builder.bitcast(dst, I32.as_pointer())
    (sh, sw), (_, wp), dw = shape.strides, shape.plane, shape.dilations[1]
    width = -(-run.valid // TILE) * TILE
    row_base = builder.mul(first_row, _c(sh * wp))
    copies, lane = [], 0  # (plane element offset from the row base, panel lane) of each 16-word copy
    for dy, ox0, count in run.pieces:
        copies += [(dy * sh * wp + (ox0 + v) * sw, lane + v) for v in range(0, count, TILE)]
        lane += count
    if conv.windowed:
        windows = ll.const_vector(I32, [p * sw + j * dw for p in range(TILE) for j in range(WINDOW)])

        def load(b: ir.IRBuilder, at: ir.Value) -> ir.Value:
            values = ll.load_vector(b, planes, at, STEP)
            return b.bitcast(b.shuffle_vector(values, ir.Constant(values.type, ir.Undefined), windows),
                             ll.vector(I32, TILE))
    else:
        words = builder.bitcast(planes, I32.as_pointer())

        def load(b: ir.IRBuilder, at: ir.Value) -> ir.Value:
            return strided_row(b, words, at, TILE, sw)

    def row(b: ir.IRBuilder, r: ir.Value, carried: list) -> list:
        start = b.add(row_base, b.sext(b.load(b.gep(offsets, [r])), I64))
        target = b.mul(r, _c(width))
        for source, at in copies:
            ll.store_vector(b, load(b, b.add(start, _c(source))), out, b.add(target, _c(at)))
        return carried

    ll.static_loop(builder, len(conv.gather_offsets()), "quad", row)
    builder.ret_void()
    return fn


def emit_amx_conv(module: ir.Module, name: str, conv: AmxConv, epilogue: Epilogue, out_bytes: int,
                  residual: DType | None, vector_bytes: int, threads: int = 1) -> ir.Function:
    """`name(x, w, [residual], out, scratch, i32 thread, i32 threads)`: the convolution with `epilogue` (a "row"
    `ProductEpilogue`), w from `pack_conv_weights`; scratch holds `conv.scratch_bytes` per thread.

    Threads share units: for the direct form (image, group, block of 32 output channels, output row (pair of
    rows when narrow)), channel blocks outside rows so a block's weights stay in L1; off it (image, group,
    pixel panel, chunk of output channel blocks), channels cut into chunks only when the panels are too few
    for `threads` (as `qconv.emit_fast_conv`). A thread copies the planes of each image it works on (and
    packs each panel) into its own scratch."""
    shape = conv.shape
    fn, builder, x, w, res, out, scratch, thread, count = conv_kernel(module, name, residual)
    planes = thread_scratch(builder, scratch, thread, conv.scratch_bytes)
    image = ConvImage(shape, x, out, res, out_bytes, residual.bits // 8 if residual else 0)
    height = BLOCK * TILE
    full, blocks = shape.mg // height, -(-conv.channels // height)  # blocks of real channels; all blocks

    def plane(b: ir.IRBuilder, indices: list[ir.Value]) -> None:
        if conv.quad_plane:
            emit_quad_plane(b, conv, image.input(b, indices[0]), planes, vector_bytes)
        else:
            emit_plane(b, shape, image.input(b, indices[0]), planes, shape.channels, vector_bytes)

    def products(b: ir.IRBuilder, n: ir.Value, g: ir.Value, part: ir.Value, columns) -> None:
        """The channel blocks of chunk `part` of group g: columns(builder, weights of the group, row0, row tiles,
        real rows, epilogue args) emits their blocks."""
        group_first = b.mul(g, _c(shape.mg))  # the group's first output channel
        args = image.epilogue_args(b, n, group_first)
        w_g = b.gep(w, [b.mul(g, _c(conv.channels * conv.row_bytes))])
        first = b.mul(part, _c(chunk // height))
        last = b.add(first, _c(chunk // height))
        stop = b.select(b.icmp_signed("<", last, _c(full)), last, _c(full))
        ll.counted_loop(b, b.sub(stop, first), "channels", body=lambda b2, r, c: columns(
            b2, w_g, b2.mul(b2.add(first, r), _c(height)), BLOCK, height, args) or c)
        for r in range(full, blocks):  # the edge: padded rows
            with b.if_then(b.and_(b.icmp_signed("<=", first, _c(r)), b.icmp_signed("<", _c(r), last))):
                columns(b, w_g, _c(r * height), min(height, conv.channels - r * height) // TILE,
                        shape.mg - r * height, args)

    def run_columns(tiles: AmxTiles, b_ptr: ir.Value, valid: int, col0: ir.Value):
        """`products`' columns: `valid` columns of B at b_ptr from C's column col0, in blocks of 32."""
        return lambda b2, w_g, row0, row_tiles, rows, args: tiles.run_columns(
            b2, w_g, _c(conv.row_bytes), row0, row_tiles, rows, b_ptr, valid, _c(0), _c(-(-valid // (BLOCK * TILE))),
            args, col0)

    configure(builder, (TILE,) * BLOCK)
    if conv.direct:
        (oh, ow), (_, wp) = shape.out, shape.plane
        row_bytes = 4 * shape.strides[0] * wp  # between output rows in the quad plane
        narrow = ow <= TILE  # a block's two column tiles are two output rows
        tiles = AmxTiles(module, name, conv.taps * conv.inputs // STEP, True, shape.dtype.is_signed,
                         BLayout(stride=4 * shape.plane[0] * wp, tile=row_bytes if narrow else 4 * TILE,
                                 offsets=conv.tap_offsets()), epilogue, TILE * conv.row_bytes, ow if narrow else None)
        units = -(-oh // BLOCK) if narrow else oh
        chunk = height

        def output_rows(b: ir.IRBuilder, indices: list[ir.Value]) -> None:
            n, g, part, unit = indices
            oy = b.mul(unit, _c(BLOCK if narrow else 1))
            b_ptr, col0 = b.gep(planes, [b.mul(oy, _c(row_bytes))]), b.mul(oy, _c(ow))
            if not narrow:
                products(b, n, g, part, run_columns(tiles, b_ptr, ow, col0))
                return

            def pair(rows_out: int):
                def columns(b2, w_g, row0, row_tiles, rows, args) -> None:
                    b2.call(tiles.block(row_tiles, rows, rows_out, ow),
                            [tiles.a_at(b2, w_g, _c(conv.row_bytes), row0), _c(conv.row_bytes), b_ptr, row0, col0,
                             *args])
                return columns

            if oh % BLOCK:  # the last unit has one row
                with b.if_else(b.icmp_signed("==", unit, _c(oh // BLOCK))) as (last, other):
                    with last:
                        products(b, n, g, part, pair(1))
                    with other:
                        products(b, n, g, part, pair(BLOCK))
            else:
                products(b, n, g, part, pair(BLOCK))

        # channel blocks outside output rows: a block's weights stay in L1 while the rows stream by
        for_units(builder, thread, count, [shape.batch, shape.group, -(-conv.channels // chunk), units], "unit",
                  output_rows, {0: plane})
    else:
        fast = conv.fast
        panel = builder.gep(planes, [_c(conv.plane_bytes)])
        runs = fast.runs()
        if conv.gathered or conv.windowed:
            offsets = ll.global_table(module, f"{name}.quads", I32, conv.gather_offsets())
            packs = [_gather_panel(module, f"{name}.gather{i}", conv, run, offsets) for i, run in enumerate(runs)]
        else:
            offsets = ll.global_table(module, f"{name}.taps", I32, shape.tap_offsets())
            packs = [pack_panel(module, f"{name}.pack{i}", fast, run, offsets) for i, run in enumerate(runs)]
        tiles = [AmxTiles(module, f"{name}.r{i}", conv.row_bytes // STEP, True, shape.dtype.is_signed,
                          BLayout(stride=4 * width, tile=4 * TILE, step=4 * TILE * width), epilogue,
                          TILE * conv.row_bytes)
                 for i, width in enumerate(-(-run.valid // TILE) * TILE for run in runs)]
        hp, wp = shape.plane
        panels = sum(run.count for run in runs)
        chunk = split_rows(conv.channels, height, shape.batch * shape.group * panels, threads)

        def first_row(b: ir.IRBuilder, run: PixelRun, i: ir.Value) -> ir.Value:
            return b.add(_c(run.first_row), b.mul(i, _c(run.rows)))

        def pack(b: ir.IRBuilder, indices: list[ir.Value]) -> None:
            _, g, q = indices
            planes_g = b.gep(planes, [b.mul(g, _c(shape.cg * hp * wp * shape.element_bytes))])
            for_run(b, runs, q, lambda b2, r, i: b2.call(packs[r], [planes_g, panel, first_row(b2, runs[r], i)]))

        def panel_unit(b: ir.IRBuilder, indices: list[ir.Value]) -> None:
            n, g, q, part = indices
            for_run(b, runs, q, lambda b2, r, i: products(b2, n, g, part, run_columns(
                tiles[r], panel, runs[r].valid,
                b2.add(b2.mul(first_row(b2, runs[r], i), _c(shape.out[1])), _c(runs[r].pieces[0][1])))))

        for_units(builder, thread, count, [shape.batch, shape.group, panels, -(-conv.channels // chunk)], "unit",
                  panel_unit, {0: plane, 2: pack})
    release(builder)
    builder.ret_void()
    return fn
