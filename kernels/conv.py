"""float32 2-D convolutions (NCHW) as LLVM IR: GEMMs over im2col panels or over the input plane in
place, a direct depthwise kernel, and transposed convolutions as convolutions of a zero-inserted input.

Every convolution here slides its window over a *plane*: the input itself, or a copy in scratch with
the zero padding (and, for transposed convolutions, the zeros between pixels) written out, so the
inner loops never test bounds.

The general case is a GEMM per image and channel group, out[Mg, OH·OW] = W[Mg, Cg·kH·kW] · cols,
with the constant weights on the broadcast side (`pack_a` panels) and the im2col matrix written
straight into packed B panels, a chunk of pixel groups at a time so the panels stay in L2 while every
row tile reads them. A pixel group is a few whole output rows, flattened and cut into panels:
lcm(panel width, OW) pixels when that is a few panels (then no lane is wasted), else one row (wide
outputs) or as many rows as one panel holds (narrow ones); the rows left over form a tail group. A
panel's pixels are consecutive in the flattened output, so C is stored as a plain GEMM's, and each
panel row is copied from a few contiguous (or strided) runs of the plane, panel by panel so that
the stores form one stream. When the weights are too big to stay in L2, one GEMM call takes all
pixels and walks row tiles outside, so the weights are read once.

Stride-1 convolutions on wide planes skip im2col: their tiles read B straight from the plane
(`ConvSpec.implicit`), computing a few columns that are dropped, and store each output vector in the
(at most two) output rows it covers. Small outputs (a 7×7 or 2×2 feature map fills 16-lane vectors
badly) run transposed (`ConvSpec.transposed`): pixels are the rows of A, the weights' channels the
vectors, and the tile scatters its results into NCHW.

Depthwise convolutions (one input and one output channel per group) run directly: each output row
is a few vectors, each tap one FMA with the tap's weight broadcast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Callable

import numpy as np
from llvmlite import ir

from lowbit.kernels import llvm as ll
from lowbit.kernels.gemm_f32 import (F32, L2_BYTES, Columns, Epilogue, GemmSpec, RowChunks, Tile, advance,
                                     byte_at, fconst, finish, fma, fma_step, float_at, load_vector, loop,
                                     masked_load, masked_store, new_kernel, over_row_chunk, pack_a, pack_b,
                                     packed_b_elements, panel_count, prefer_m_outer, scaled, splat_at,
                                     store_vector, tile_function)
from lowbit.kernels.llvm import I1, I8, I32, I64, VOID
from lowbit.kernels.parallel import for_units, new_parallel_kernel, split_rows, thread_scratch

CHUNK_BYTES = 256 << 10  # packed im2col panels per GEMM call: stays in L2 while every row tile reads it
IMPLICIT_MIN_USE = 0.9  # least share of the implicit GEMM's columns that are output pixels
IMPLICIT_MAX_TAPS = 25  # the implicit tile unrolls a channel's taps
IMPLICIT_MAX_BYTES = 48 << 10  # plane rows a panel of implicit GEMM reads (measured: 64 channels win, 256 lose)
TRANSPOSED_MAX_PIXELS = 256  # transposed GEMMs pack all pixels at once
TRANSPOSED_GAIN = 0.1  # least gain in used vector lanes that makes a GEMM transposed


def _round(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class Plane:
    """P[c, top + iy·sy, left + ix·sx] = x[c, iy, ix] in a [height, width] plane per channel, zero
    elsewhere (negative top/left crop). The identity plane is x itself: nothing is copied."""

    h: int
    w: int
    height: int
    width: int
    top: int = 0
    left: int = 0
    sy: int = 1
    sx: int = 1

    @property
    def identity(self) -> bool:
        return (self.height, self.width, self.top, self.left, self.sy, self.sx) == (self.h, self.w, 0, 0, 1, 1)

    @property
    def size(self) -> int:
        return self.height * self.width

    def valid(self, axis: int) -> range:
        """Source indices along H (0) or W (1) that land inside the plane."""
        size, start, step, extent = ((self.h, self.top, self.sy, self.height) if axis == 0
                                     else (self.w, self.left, self.sx, self.width))
        low = max(0, -(start // step) if start < 0 else 0)
        high = min(size, (extent - 1 - start) // step + 1) if extent - 1 >= start else 0
        return range(low, max(low, high))


@dataclass(frozen=True)
class ConvSpec:
    """A convolution over a plane (no padding left): x [batch, channels, h, w] → [batch, m, oh, ow].

    Weights [m, channels/group, kh, kw] are already in cross-correlation form. The epilogue's bias is
    per output channel ("row"), its residual the output's shape.
    """

    batch: int
    channels: int
    m: int
    group: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    plane: Plane
    tile: Tile
    epilogue: Epilogue = field(default_factory=Epilogue)
    masked_loads: bool = False  # the target's masked loads cost what plain loads do (AVX-512)
    threads: int = 1  # threads that share the kernel (its row chunks are cut for them)

    @property
    def out(self) -> tuple[int, int]:
        return tuple((extent - d * (k - 1) - 1) // s + 1 for extent, k, s, d in
                     zip((self.plane.height, self.plane.width), self.kernel, self.strides, self.dilations))

    @property
    def depthwise(self) -> bool:
        return self.group == self.channels == self.m

    @cached_property
    def route(self) -> str:
        """How the convolution runs (module doc): "depthwise", "in_place", "implicit", "transposed"
        or "im2col".

        With stride 1, the tap (ky, kx) of output pixel (oy, ox) reads plane element (oy + ky·dh)·
        width + ox + kx·dw: on "virtual columns" j = oy·width + ox each tap is the plane shifted by a
        constant, so B's K rows are the plane itself ("implicit"; the columns with ox ≥ OW are
        computed and dropped, hence only when few are, and a vector must span at most two rows).
        When the output is as wide as the input, the virtual columns are the output's pixels and
        the taps read the input itself, the padding through load masks ("in_place", where masked
        loads cost no more than plain ones). Small outputs go "transposed" first when that fills the
        vectors better."""
        if self.depthwise:
            return "depthwise"
        if self._transposed_pays:
            return "transposed"
        (kh, kw), plane = self.kernel, self.plane
        # the plane rows one panel's K steps read must stay in L1 while every row tile reads them
        footprint = 4 * self.channels // self.group * kh * (self.tile.width + (kw - 1) * self.dilations[1])
        window = (self.strides == (1, 1) and plane.sx == plane.sy == 1 and 1 < kh * kw <= IMPLICIT_MAX_TAPS
                  and footprint <= IMPLICIT_MAX_BYTES)
        if window and self.masked_loads and self.out[1] == plane.w:
            return "in_place"
        if window and plane.width >= self.tile.lanes and self.out[1] >= IMPLICIT_MIN_USE * plane.width:
            return "implicit"
        return "im2col"

    @property
    def _transposed_pays(self) -> bool:
        """Whether outᵀ[pixels, channels] = colsᵀ · Wᵀ (stored transposed) fills vectors better:
        small outputs, whose few pixels fill vectors badly while the channels fill them well."""
        lanes, rows = self.tile.lanes, self.tile.rows
        pixels, channels = self.out[0] * self.out[1], self.m // self.group
        if channels < rows or pixels > TRANSPOSED_MAX_PIXELS:
            return False
        rest = pixels % rows  # a tile of few rows is latency-bound: it costs about 4 rows
        row_use = pixels / (pixels - rest + (max(rest, 4) if rest else 0))
        return (channels / _round(channels, lanes) * row_use
                > pixels / _round(pixels, lanes) + TRANSPOSED_GAIN)

    @property
    def copies_plane(self) -> bool:
        """Whether the plane is written to scratch (padding, spreading, or the implicit GEMM's reads
        past the last channel's end)."""
        return self.route == "implicit" or (not self.plane.identity and self.route != "in_place")

    @property
    def reduction(self) -> int:
        """K of the GEMM: input channels of a group times taps."""
        return self.channels // self.group * self.kernel[0] * self.kernel[1]

    @property
    def has_bias(self) -> bool:
        return self.epilogue.bias == "row"


def conv2d_spec(x_shape, w_shape, strides, pads, dilations, group, tile: Tile, epilogue: Epilogue,
                masked_loads: bool = False) -> ConvSpec:
    n, c, h, w = x_shape
    top, left, bottom, right = pads
    plane = Plane(h, w, h + top + bottom, w + left + right, top, left)
    return ConvSpec(n, c, w_shape[0], group, tuple(w_shape[2:]), tuple(strides), tuple(dilations), plane, tile,
                    epilogue, masked_loads)


def conv_transpose2d_spec(x_shape, w_shape, strides, pads, dilations, group, output_padding, tile: Tile,
                          epilogue: Epilogue, masked_loads: bool = False) -> ConvSpec:
    """The reference's formulation: a stride-1 convolution of x with strides − 1 zeros between pixels,
    padded by dilation·(k − 1) − pads (cropped where negative), with `transposed_weights`."""
    n, c, h, w = x_shape
    reach = [d * (k - 1) for d, k in zip(dilations, w_shape[2:])]
    begins = [reach[axis] - pads[axis] for axis in range(2)]
    ends = [reach[axis] - pads[axis + 2] + output_padding[axis] for axis in range(2)]
    sizes = [(extent - 1) * s + 1 + b + e for extent, s, b, e in zip((h, w), strides, begins, ends)]
    plane = Plane(h, w, sizes[0], sizes[1], begins[0], begins[1], strides[0], strides[1])
    return ConvSpec(n, c, w_shape[1] * group, group, tuple(w_shape[2:]), (1, 1), tuple(dilations), plane, tile,
                    epilogue, masked_loads)


def transposed_weights(w: np.ndarray, group: int) -> np.ndarray:
    """[C, M/group, kH, kW] → the flipped, channel-swapped [M, C/group, kH, kW] of the equivalent conv
    (a permutation, as `pack_conv_weights`)."""
    c, m_per_group = w.shape[:2]
    kernel = w.reshape(group, c // group, m_per_group, *w.shape[2:]).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(kernel.reshape(group * m_per_group, c // group, *w.shape[2:])[:, :, ::-1, ::-1])


def pack_conv_weights(spec: ConvSpec, w: np.ndarray) -> np.ndarray:
    """Weights as the kernel reads them: per group `pack_a` panels of [Mg, Cg·kH·kW] (GEMM path),
    `pack_b` panels of their transpose (transposed GEMM), or [C, kH·kW] as they are (depthwise).
    A permutation (with zeros padding `pack_b` panels): it also packs an array of indices."""
    w = np.asarray(w)
    if spec.depthwise:
        return np.ascontiguousarray(w.reshape(spec.m, -1))
    per_group = w.reshape(spec.group, spec.m // spec.group, spec.reduction)
    if spec.route == "transposed":  # Wᵀ on the vector side
        return np.concatenate([pack_b(block.T, spec.tile) for block in per_group])
    return np.concatenate([pack_a(block, spec.tile) for block in per_group])


# -- pixel groups -----------------------------------------------------------------------------------
Piece = tuple[int, int, int, int]  # (output row within the group, first output column, count, panel column)


@dataclass(frozen=True)
class PixelGroups:
    """`count` groups of `rows` output rows from output row `first_row` on, each split into `panels`
    ((first column, width) within the group) holding the runs of pixels `pieces` lists per panel."""

    panels: tuple[tuple[int, int], ...]
    pieces: tuple[tuple[Piece, ...], ...]
    rows: int
    count: int
    first_row: int
    ow: int

    def run(self, groups: int, first_group: int = 0) -> Columns:
        """`groups` of these groups from `first_group` on, as GEMM columns."""
        stride = self.rows * self.ow
        return Columns(self.panels, stride, groups, self.first_row * self.ow + first_group * stride)

    def floats(self, k: int, tile: Tile) -> int:
        """Packed B floats of one group."""
        return k * self.run(1).padded(tile)


MAX_GROUP_PANELS = 8  # bounds the unrolled packing code of one pixel group


def _flat_group(rows: int, count: int, first_row: int, ow: int, width: int) -> PixelGroups:
    """Groups of `rows` output rows, their pixels flattened and cut into panels of `width` (the last
    one narrower when `width` does not divide them); a panel's runs end at output row ends."""
    pixels = rows * ow
    panels = tuple((first, min(width, pixels - first)) for first in range(0, pixels, width))
    pieces = []
    for first, count_in_panel in panels:
        runs, j = [], first
        while j < first + count_in_panel:
            y, x = divmod(j, ow)
            length = min(ow - x, first + count_in_panel - j)
            runs.append((y, x, length, j - first))
            j += length
        pieces.append(tuple(runs))
    return PixelGroups(panels, tuple(pieces), rows, count, first_row, ow)


def pixel_groups(oh: int, ow: int, tile: Tile) -> tuple[PixelGroups | None, PixelGroups | None]:
    """The output's pixels as repeated groups of whole output rows, and a tail group of the rows left.

    A group is as many rows as make whole panels (lcm(panel width, OW) pixels) when that takes a few
    panels; otherwise one row (wide outputs) or as many rows as fit one panel (narrow ones)."""
    width = tile.width
    period = math.lcm(width, ow)
    if period // width <= MAX_GROUP_PANELS:
        rows = period // ow
    else:
        rows = 1 if ow >= width else width // ow
    count, rest = divmod(oh, rows)
    main = _flat_group(rows, count, 0, ow, width) if count else None
    return main, (_flat_group(rest, 1, count * rows, ow, width) if rest else None)


# -- plane preparation ------------------------------------------------------------------------------
def _memset_zero(builder: ir.IRBuilder, pointer: ir.Value, nbytes: int | ir.Value) -> None:
    if isinstance(nbytes, int):
        if nbytes <= 0:
            return
        nbytes = ir.Constant(I64, nbytes)
    memset = ll.declare(builder.module, "llvm.memset.p0i8.i64", VOID, I8.as_pointer(), I8, I64, I1)
    builder.call(memset, [pointer, ir.Constant(I8, 0), nbytes, ir.Constant(I1, 0)])


def _memcpy(builder: ir.IRBuilder, destination: ir.Value, source: ir.Value, nbytes: int) -> None:
    memcpy = ll.declare(builder.module, "llvm.memcpy.p0i8.p0i8.i64", VOID, I8.as_pointer(), I8.as_pointer(),
                        I64, I1)
    builder.call(memcpy, [destination, source, ir.Constant(I64, nbytes), ir.Constant(I1, 0)])


def emit_plane(module: ir.Module, plane: Plane, channels: int, name: str) -> ir.Function:
    """`name(x, dst)`: the planes of `channels` channels of x written to dst, every byte once: zero
    rows above and below, and per source row its zero borders around the copied pixels (spread
    rows and pixels of a transposed convolution: the zero rows between, pixels one by one)."""
    fn, builder = new_kernel(module, name, 2)
    x, dst = fn.args
    rows, cols = plane.valid(0), plane.valid(1)
    if not rows or not cols:
        _memset_zero(builder, dst, 4 * channels * plane.size)
        builder.ret_void()
        return fn
    first = plane.top + rows.start * plane.sy  # destination rows of the first and after the last source row
    after = plane.top + (rows.stop - 1) * plane.sy + 1
    left = plane.left + cols.start * plane.sx
    right = plane.left + (cols.stop - 1) * plane.sx + 1

    def channel(builder, c):
        source = advance(builder, x, c, plane.h * plane.w)
        target = advance(builder, dst, c, plane.size)
        _memset_zero(builder, target, 4 * first * plane.width)
        _memset_zero(builder, byte_at(builder, target, after * plane.width), 4 * (plane.height - after) * plane.width)

        def row(builder, i):
            iy = builder.add(i, ir.Constant(I64, rows.start))
            src_row = byte_at(builder, source, scaled(builder, iy, plane.w, cols.start))
            line = advance(builder, target, scaled(builder, i, plane.sy, first), plane.width)
            _memset_zero(builder, line, 4 * left)
            _memset_zero(builder, byte_at(builder, line, right), 4 * (plane.width - right))
            if plane.sx == 1:
                _memcpy(builder, byte_at(builder, line, left), src_row, 4 * len(cols))
            else:
                _memset_zero(builder, byte_at(builder, line, left), 4 * (right - left))
                loop(builder, len(cols), "ix", lambda b, j: b.store(
                    b.load(float_at(b, src_row, j)), float_at(b, line, scaled(b, j, plane.sx, left))))
            if plane.sy > 1:  # the zero rows up to the next source row
                between = byte_at(builder, line, plane.width)
                gap = builder.select(builder.icmp_unsigned("<", iy, ir.Constant(I64, rows.stop - 1)),
                                     ir.Constant(I64, 4 * (plane.sy - 1) * plane.width), ir.Constant(I64, 0))
                _memset_zero(builder, between, gap)

        loop(builder, len(rows), "iy", row)

    loop(builder, channels, "c", channel)
    builder.ret_void()
    return fn


def _vector_at(builder: ir.IRBuilder, base: ir.Value, index: ir.Value, lanes: int) -> ir.Value:
    return builder.bitcast(float_at(builder, base, index), ir.VectorType(F32, lanes).as_pointer())


# -- strided runs -----------------------------------------------------------------------------------
def load_run(builder: ir.IRBuilder, base: ir.Value, index: ir.Value, count: int, stride: int,
             lanes: int) -> ir.Value:
    """base[index + i·stride] for i < count (≤ lanes) as a vector, the other lanes 0, reading nothing
    past the last element (a masked load of the span, then every stride-th lane)."""
    if stride == 1:
        return load_vector(builder, base, index, lanes, count)
    span = ir.VectorType(F32, lanes * stride)
    pointer = builder.bitcast(float_at(builder, base, index), span.as_pointer())
    mask = ir.Constant(ir.VectorType(I1, lanes * stride),
                       [int(j % stride == 0 and j // stride < count) for j in range(lanes * stride)])
    wide = masked_load(builder, pointer, mask)
    return builder.shuffle_vector(wide, ir.Constant(span, ir.Undefined),
                                  ir.Constant(ir.VectorType(I32, lanes), [j * stride for j in range(lanes)]))


# -- im2col into packed panels ----------------------------------------------------------------------
class _ConvEmitter:
    def __init__(self, module: ir.Module, spec: ConvSpec, name: str) -> None:
        self.module, self.spec, self.name = module, spec, name
        self.oh, self.ow = spec.out
        self.lanes = spec.tile.lanes

    # the plane of channel 0 of a group, per image
    def _plane_at(self, builder, x, scratch_plane, image: ir.Value, first_channel: ir.Value) -> ir.Value:
        spec, plane = self.spec, self.spec.plane
        if not spec.copies_plane:  # x itself
            index = builder.add(builder.mul(image, ir.Constant(I64, spec.channels)), first_channel)
            return advance(builder, x, index, plane.h * plane.w)
        return byte_at(builder, scratch_plane, builder.mul(first_channel, ir.Constant(I64, plane.size)))

    def emit_pack(self, groups: PixelGroups, name: str, exact: bool = False) -> ir.Function:
        """pack(plane, dst, i64 first_output_row): one pixel group's im2col panels, each row of a
        panel padded to whole vectors (B panels) or not (`exact`: `pack_a` panels)."""
        spec, plane, lanes = self.spec, self.spec.plane, self.lanes
        kh, kw = spec.kernel
        (sh, sw), (dh, dw) = spec.strides, spec.dilations
        fn = ir.Function(self.module, ir.FunctionType(VOID, [I8.as_pointer(), I8.as_pointer(), I64]), name)
        fn.linkage = "internal"
        source, dst, oy0 = fn.args
        builder = ir.IRBuilder(fn.append_basic_block("entry"))
        panels, offset = [], 0
        for (first, width), pieces in zip(groups.panels, groups.pieces):
            padded = width if exact else _round(width, lanes)
            panels.append((offset, padded, width, pieces))
            offset += spec.reduction * padded

        def fill(panel_offset: int, padded: int, width: int, pieces) -> None:
            """The panel's K rows one after another: a single stream of stores."""
            def channel(builder, c):
                channel_plane = byte_at(builder, source, builder.mul(c, ir.Constant(I64, plane.size)))

                def tap(builder, ky, kx):
                    top = builder.add(builder.mul(oy0, ir.Constant(I64, sh)), builder.mul(ky, ir.Constant(I64, dh)))
                    r = builder.add(builder.mul(builder.add(builder.mul(c, ir.Constant(I64, kh)), ky),
                                                ir.Constant(I64, kw)), kx)
                    row_out = byte_at(builder, dst, scaled(builder, r, padded, panel_offset))
                    if width < padded:  # zeros, not stale scratch, in the padding lanes
                        store_vector(builder, fconst(ir.VectorType(F32, lanes), 0.0), row_out, padded - lanes)
                    left = builder.mul(kx, ir.Constant(I64, dw))
                    for dy, ox0, count, column in pieces:
                        row_in = builder.add(scaled(builder, builder.add(top, ir.Constant(I64, dy * sh)), plane.width,
                                                    ox0 * sw), left)
                        for v in range(-(-count // lanes)):
                            valid = min(lanes, count - v * lanes)
                            at = builder.add(row_in, ir.Constant(I64, v * lanes * sw))
                            value = load_run(builder, channel_plane, at, valid, sw, lanes)
                            store_vector(builder, value, row_out, column + v * lanes, valid)

                loop(builder, kh, "ky", lambda b, ky: loop(b, kw, "kx", lambda b, kx: tap(b, ky, kx)))

            loop(builder, spec.channels // spec.group, "c", channel)

        for panel in panels:
            fill(*panel)
        builder.ret_void()
        return fn

    def scratch_floats(self) -> tuple[int, int]:
        """(plane floats, packed-column floats) of scratch."""
        spec = self.spec
        if spec.depthwise:
            return (0 if spec.plane.identity else spec.plane.size), 0
        plane = spec.channels * spec.plane.size if spec.copies_plane else 0
        if spec.route == "implicit":  # the last channel's last panel reads on past the plane
            kh, kw = spec.kernel
            reach = (kh - 1) * spec.dilations[0] * spec.plane.width + (kw - 1) * spec.dilations[1]
            return max(plane, (spec.channels - 1) * spec.plane.size + self._virtual_panels * spec.tile.width
                       + reach), 0
        if spec.route == "transposed":
            return plane, spec.reduction * self.oh * self.ow
        if spec.route == "in_place":
            return plane, 0
        main, tail = pixel_groups(self.oh, self.ow, spec.tile)
        full, chunk, rest = self._chunks(main)
        k = spec.reduction
        return plane, (max(chunk, rest) * main.floats(k, spec.tile) if main else 0) + \
            (tail.floats(k, spec.tile) if tail else 0)

    @property
    def _virtual_panels(self) -> int:
        row = self.ow if self.spec.route == "in_place" else self.spec.plane.width
        return -(-self.oh * row // self.spec.tile.width)

    @property
    def _m_outer(self) -> bool:
        return prefer_m_outer(self.spec.m // self.spec.group, self.spec.reduction, self.oh * self.ow)

    def _chunks(self, main: PixelGroups | None) -> tuple[int, int, int]:
        """(full chunks, groups per chunk, groups of the last call): the pixel groups packed per GEMM
        call. The last call also takes the tail. Streaming the weights (row tiles outside) wants one
        call for everything, so that they are read once."""
        if main is None:
            return 0, 0, 0
        group_bytes = 4 * main.floats(self.spec.reduction, self.spec.tile)
        chunk = main.count if self._m_outer else max(1, min(main.count, CHUNK_BYTES // group_bytes))
        if self.spec.threads > 1:  # calls for every thread, so that threads share packing, not repeat it
            chunk = min(chunk, max(1, main.count // (2 * self.spec.threads)))
        full, rest = divmod(main.count, chunk)
        if rest == 0:
            full, rest = full - 1, chunk
        return full, chunk, rest

    def emit(self) -> ir.Function:
        """name(x, w, [bias], [residual], out, scratch, thread, threads); scratch holds
        `conv_scratch_bytes` per thread.

        Threads share units: (image, channel) pairs of a depthwise convolution, else (image, group,
        columns, chunk of output channels) where the columns are a panel of pixels (implicit GEMM), a
        GEMM call's packed pixel groups (im2col) or nothing (transposed: the chunks cut the pixels). A
        thread copies the plane of each image it works on and packs the columns of its units into its
        own scratch."""
        spec = self.spec
        epi = spec.epilogue
        buffers = 4 + spec.has_bias + epi.residual
        fn, builder, thread, threads = new_parallel_kernel(self.module, self.name, buffers)
        args = list(fn.args)[:buffers]
        x, w = args[0], args[1]
        bias = args[2] if spec.has_bias else None
        residual = args[2 + spec.has_bias] if epi.residual else None
        out = args[-2]
        plane_floats, _ = self.scratch_floats()
        scratch_plane = thread_scratch(builder, args[-1], thread, conv_scratch_bytes(spec))
        cols = byte_at(builder, scratch_plane, plane_floats)
        prepare = None if not spec.copies_plane else emit_plane(
            self.module, spec.plane, 1 if spec.depthwise else spec.channels, self.name + ".plane")
        image_out = spec.m * self.oh * self.ow
        image = _Operands(x, w, bias, residual, out, image_out)
        if spec.depthwise:
            for_units(builder, thread, threads, [spec.batch, spec.channels], "channel", lambda b, indices: (
                self._depthwise(b, image, scratch_plane, *indices, prepare)))
            builder.ret_void()
            return fn

        def copy_plane(builder, indices) -> None:
            builder.call(prepare, [advance(builder, x, indices[0], spec.channels * spec.plane.h * spec.plane.w),
                                   scratch_plane])
            planes = spec.channels * spec.plane.size  # zeros, not stale bits, where the last reads run on
            _memset_zero(builder, byte_at(builder, scratch_plane, planes), 4 * (plane_floats - planes))

        mg, cg = spec.m // spec.group, spec.channels // spec.group

        def group(builder, n: ir.Value, g: ir.Value) -> _Operands:
            """The operands of group g of image n (plane: channel 0 of the group)."""
            plane = self._plane_at(builder, x, scratch_plane, n, builder.mul(g, ir.Constant(I64, cg)))
            weights = (packed_b_elements(spec.reduction, mg, spec.tile) if spec.route == "transposed"
                       else mg * spec.reduction)
            return image.at_group(builder, n, g, mg, self.oh * self.ow, plane, weights)

        units = {"in_place": self._implicit_group, "implicit": self._implicit_group,
                 "transposed": lambda: self._transposed_group(cols),
                 "im2col": lambda: self._packed_group(cols)}[spec.route]()
        preparing = {0: copy_plane} if prepare is not None else {}
        if units.pack is not None:  # per group (depth 1) or per group and column (depth 2)
            preparing[2 if units.pack_columns else 1] = lambda b, indices: units.pack(
                b, group(b, *indices[:2]), *indices[2:])
        for_units(builder, thread, threads, [spec.batch, spec.group, units.columns, units.chunks], "unit",
                  lambda b, indices: units.run(b, group(b, *indices[:2]), *indices[2:]), preparing)
        builder.ret_void()
        return fn

    def _row_chunk(self, columns: int) -> int:
        """Output channels per chunk when each group of each image has `columns` other units."""
        spec = self.spec
        return split_rows(spec.m // spec.group, spec.tile.rows, spec.batch * spec.group * columns, spec.threads)

    def _packed_group(self, cols: ir.Value) -> "_Units":
        """im2col panels a chunk of pixel groups at a time, each chunk one GEMM call (the last call also
        takes the tail group, which has a call of its own when threads share the work): the calls are
        the columns."""
        spec = self.spec
        pixels = self.oh * self.ow
        main, tail = pixel_groups(self.oh, self.ow, spec.tile)
        gemm = GemmSpec(spec.m // spec.group, spec.reduction, spec.tile, pixels, a_packed=True,
                        epilogue=replace(spec.epilogue, residual_ld=pixels, residual_col=1),
                        m_outer=self._m_outer)
        pack_main = self.emit_pack(main, self.name + ".pack") if main else None
        pack_tail = self.emit_pack(tail, self.name + ".pack_tail") if tail else None
        full, chunk, rest = self._chunks(main)
        group_floats = main.floats(spec.reduction, spec.tile) if main else 0
        separate = tail is not None and main is not None and spec.threads > 1
        calls = full + 1 + separate
        chunks = RowChunks(self.module, gemm, self.name + ".gemm", self._row_chunk(calls))
        last_runs = ((main.run(rest, full * chunk),) if main else ()) + ((tail.run(1),) if tail and not separate
                                                                           else ())

        def pack_tail_at(builder, plane, offset: int) -> None:
            builder.call(pack_tail, [plane, byte_at(builder, cols, offset), ir.Constant(I64, tail.first_row)])

        def pack_groups(builder, plane, first_group: ir.Value, count: int) -> None:
            loop(builder, count, "pack", lambda b, i: b.call(pack_main, [
                plane, byte_at(b, cols, b.mul(i, ir.Constant(I64, group_floats))),
                b.mul(b.add(first_group, i), ir.Constant(I64, main.rows))]))

        def pack(builder, ops: _Operands, call: ir.Value) -> None:
            def last(b) -> None:
                pack_groups(b, ops.plane, ir.Constant(I64, full * chunk), rest)
                if tail is not None and not separate:
                    pack_tail_at(b, ops.plane, rest * group_floats)

            _switch(builder, call, [(full, lambda b: pack_groups(b, ops.plane, b.mul(call, ir.Constant(I64, chunk)),
                                                                 chunk)),
                                    (full + 1, last), (calls, lambda b: pack_tail_at(b, ops.plane, 0))])

        def run(builder, ops: _Operands, call: ir.Value, part: ir.Value) -> None:
            def whole(b) -> None:
                first = b.mul(call, ir.Constant(I64, chunk))
                stride = main.rows * self.ow
                chunks.call(b, part, (main.run(chunk),), ops.w, cols, advance(b, ops.out, first, stride), ops.bias,
                            advance(b, ops.residual, first, stride))

            def runs(selected: tuple[Columns, ...]):
                return lambda b: chunks.call(b, part, selected, ops.w, cols, ops.out, ops.bias, ops.residual)

            _switch(builder, call, [(full, whole), (full + 1, runs(last_runs)),
                                    (calls, runs((tail.run(1),) if separate else ()))])

        return _Units(calls, chunks.parts, pack, run, pack_columns=True)

    def _transposed_group(self, cols: ir.Value) -> "_Units":
        """Every pixel packed as A panels of tile-rows pixels, then one GEMM with the weights on the
        vector side, stored transposed; the columns are the weights' panels (so that threads share
        reading the weights, the bulk of the work's memory traffic)."""
        spec = self.spec
        pixels = self.oh * self.ow
        groups = _flat_group(self.oh, 1, 0, self.ow, spec.tile.rows)
        epilogue = replace(spec.epilogue, bias="col" if spec.has_bias else "none", residual_ld=pixels)
        gemm = GemmSpec(pixels, spec.reduction, spec.tile, pixels, a_packed=True, epilogue=epilogue,
                        c_transposed=True)
        chunks = RowChunks(self.module, gemm, self.name + ".gemm", pixels)
        pack = self.emit_pack(groups, self.name + ".pack", exact=True)
        mg = spec.m // spec.group

        def run(builder, ops: _Operands, panel: ir.Value, part: ir.Value) -> None:
            chunks.call_panel(builder, part, mg, panel, cols, ops.w, ops.out, ops.bias, ops.residual)

        return _Units(panel_count(mg, spec.tile), 1,
                      lambda b, ops: b.call(pack, [ops.plane, cols, ir.Constant(I64, 0)]), run)

    # -- implicit GEMM ------------------------------------------------------------------------------
    def _implicit_group(self):
        """Tiles over the virtual columns (`ConvSpec.route`): the panels are the columns, or, when the
        weights do not stay in L2 but the plane does, the chunks are (one row tile each) and the panels
        come inside, so a thread reads its weights once."""
        spec, tile = self.spec, self.spec.tile
        mg, cg = spec.m // spec.group, spec.channels // spec.group
        m_outer = 4 * mg * spec.reduction > L2_BYTES >= 4 * cg * spec.plane.size
        size = tile.rows if m_outer else self._row_chunk(self._virtual_panels)
        emit_tile = self._in_place_tile if spec.route == "in_place" else self._implicit_tile
        pixels = self.oh * self.ow

        def run(builder, ops: _Operands, panel: ir.Value, part: ir.Value) -> None:
            column = builder.mul(panel, ir.Constant(I64, tile.width))

            def call(builder, row: ir.Value, rows: int) -> None:
                builder.call(emit_tile(rows), [
                    advance(builder, ops.w, row, spec.reduction), byte_at(builder, ops.plane, column),
                    advance(builder, ops.out, row, pixels), advance(builder, ops.bias, row, 1) or ops.w,
                    advance(builder, ops.residual, row, pixels) or ops.w, column])

            over_row_chunk(builder, part, size, mg, tile.rows, call)

        if m_outer:
            return _Units(-(-mg // size), self._virtual_panels, None,
                          lambda b, ops, part, panel: run(b, ops, panel, part))
        return _Units(self._virtual_panels, -(-mg // size), None, run)

    def _implicit_tile(self, rows: int) -> ir.Function:
        """tile(w, plane, out, bias, residual, i64 column): rows × width outputs at virtual column
        `column` (plane at that column, the others at the tile's first row)."""
        spec, plane, lanes, epi = self.spec, self.spec.plane, self.lanes, self.spec.epilogue
        vectors = spec.tile.vectors
        (kh, kw), (dh, dw) = spec.kernel, spec.dilations
        cg = spec.channels // spec.group
        oh, ow, width = self.oh, self.ow, plane.width
        key = (rows, vectors, lanes, cg, spec.kernel, spec.dilations, plane.size, width, oh, ow,
               replace(epi, residual_ld=0))
        fn, builder = self._new_tile(rows, key)
        if builder is None:
            return fn
        w, source, out, bias, residual, column = fn.args

        def tap_row(builder, index, accs):  # index = c·kh + ky: the taps of one window row, unrolled
            c, ky = builder.udiv(index, ir.Constant(I64, kh)), builder.urem(index, ir.Constant(I64, kh))
            w_row = advance(builder, w, index, kw * rows)
            plane_row = advance(builder, source, builder.add(builder.mul(c, ir.Constant(I64, plane.size)),
                                                             builder.mul(ky, ir.Constant(I64, dh * plane.width))), 1)
            for kx in range(kw):
                accs = fma_step(builder, byte_at(builder, w_row, kx * rows), 1, byte_at(builder, plane_row, kx * dw),
                                rows, vectors, lanes, accs)
            return accs

        accs = ll.counted_loop(builder, ir.Constant(I64, cg * kh), "tap_row",
                               [fconst(ir.VectorType(F32, lanes), 0.0)] * (rows * vectors), tap_row)
        parts = [self._virtual_columns(builder, builder.add(column, ir.Constant(I64, v * lanes)))
                 for v in range(vectors)]
        pixels = oh * ow
        for r in range(rows):
            row_bias = splat_at(builder, bias, r, lanes) if epi.bias == "row" else None
            for v, halves in enumerate(parts):
                at = [(builder.add(offset, ir.Constant(I64, r * pixels)), mask) for offset, mask in halves]
                extra = None
                if epi.residual:
                    first, second = (masked_load(builder, _vector_at(builder, residual, offset, lanes), mask)
                                     for offset, mask in at)
                    extra = builder.select(at[0][1], first, second)
                y = finish(builder, epi, accs[r * vectors + v], row_bias, extra)
                for offset, mask in at:
                    masked_store(builder, y, _vector_at(builder, out, offset, lanes), mask)
        builder.ret_void()
        return fn

    def _new_tile(self, rows: int, key) -> tuple[ir.Function, ir.IRBuilder | None]:
        """The tile function for `key` (w, source, out, bias, residual, column) and a builder at its
        entry, or no builder when the module has it already."""
        spec = self.spec
        fn, new = tile_function(self.module, f"conv_f32.tile{rows}x{spec.tile.vectors}x{self.lanes}", key,
                                [I8.as_pointer()] * 5 + [I64])
        if not new:
            return fn, None
        for arg in fn.args[:5]:
            arg.add_attribute("noalias")
        return fn, ir.IRBuilder(fn.append_basic_block("entry"))

    def _in_place_tile(self, rows: int) -> ir.Function:
        """tile(w, x, out, bias, residual, i64 column): rows × width outputs from pixel `column` on (x
        at that pixel of the group's first channel, the others at the tile's first row). Each tap's
        vectors load from x shifted by the tap, masked to the lanes whose source pixel is inside."""
        spec, plane, lanes, epi = self.spec, self.spec.plane, self.lanes, self.spec.epilogue
        vectors = spec.tile.vectors
        (kh, kw), (dh, dw) = spec.kernel, spec.dilations
        cg = spec.channels // spec.group
        ow, pixels = self.ow, self.oh * self.ow
        key = ("in_place", rows, vectors, lanes, cg, spec.kernel, spec.dilations, plane, replace(epi, residual_ld=0))
        fn, builder = self._new_tile(rows, key)
        if builder is None:
            return fn
        w, source, out, bias, residual, column = fn.args
        i32s = ir.VectorType(I32, lanes)

        def splat(value: int | ir.Value) -> ir.Value:
            return ir.Constant(i32s, [value] * lanes) if isinstance(value, int) else ll.splat(builder, value, lanes)

        def inside(value: ir.Value, limit: int) -> ir.Value:  # 0 <= value < limit
            return builder.icmp_unsigned("<", value, splat(limit))

        first = builder.trunc(column, I32)
        pixel = [builder.add(splat(first), ir.Constant(i32s, list(range(v * lanes, (v + 1) * lanes))))
                 for v in range(vectors)]
        oy = [builder.udiv(j, splat(ow)) for j in pixel]
        ox = [builder.urem(j, splat(ow)) for j in pixel]
        real = [inside(j, pixels) for j in pixel]
        taps = []  # (offset from the output pixel, [lane mask per vector])
        for ky in range(kh):
            for kx in range(kw):
                dy, dx = ky * dh - plane.top, kx * dw - plane.left
                masks = [builder.and_(real[v], builder.and_(inside(builder.add(oy[v], splat(dy)), plane.h),
                                                            inside(builder.add(ox[v], splat(dx)), plane.w)))
                         for v in range(vectors)]
                taps.append((dy * plane.w + dx, masks))
        kind = ir.VectorType(F32, lanes)

        def channel(builder, c, accs):
            w_c, x_c = advance(builder, w, c, len(taps) * rows), advance(builder, source, c, plane.h * plane.w)
            for t, (offset, masks) in enumerate(taps):
                vecs = [masked_load(builder, _vector_at(builder, x_c, ir.Constant(I64, offset + v * lanes), lanes),
                                    masks[v]) for v in range(vectors)]
                accs = fma_step(builder, byte_at(builder, w_c, t * rows), 1, None, rows, vectors, lanes, accs, vecs)
            return accs

        accs = ll.counted_loop(builder, ir.Constant(I64, cg), "c", [fconst(kind, 0.0)] * (rows * vectors), channel)
        for r in range(rows):
            row_bias = splat_at(builder, bias, r, lanes) if epi.bias == "row" else None
            for v in range(vectors):
                at = builder.add(column, ir.Constant(I64, r * pixels + v * lanes))
                extra = (masked_load(builder, _vector_at(builder, residual, at, lanes), real[v])
                         if epi.residual else None)
                y = finish(builder, epi, accs[r * vectors + v], row_bias, extra)
                masked_store(builder, y, _vector_at(builder, out, at, lanes), real[v])
        builder.ret_void()
        return fn

    def _virtual_columns(self, builder: ir.IRBuilder, j: ir.Value) -> list[tuple[ir.Value, ir.Value]]:
        """Where the vector of virtual columns from `j` goes: (output offset of lane 0, lane mask) for
        the part in output row j // width and for the part in the next row."""
        lanes, width, oh, ow = self.lanes, self.spec.plane.width, self.oh, self.ow
        lane = ir.Constant(ir.VectorType(I64, lanes), list(range(lanes)))

        def splat(value: ir.Value) -> ir.Value:
            return ll.splat(builder, value, lanes)

        def const(value: int) -> ir.Constant:
            return ir.Constant(I64, value)

        oy, ox = builder.udiv(j, const(width)), builder.urem(j, const(width))
        rest = builder.sub(const(width), ox)  # lanes left in row oy
        here = builder.select(builder.icmp_unsigned("<", oy, const(oh)), builder.sub(const(ow), ox), const(0))
        next_row = builder.add(oy, const(1))
        there = builder.and_(builder.icmp_signed(">=", lane, splat(rest)),
                             builder.icmp_signed("<", lane, splat(builder.add(rest, const(ow)))))
        there = builder.and_(there, splat(builder.icmp_unsigned("<", next_row, const(oh))))
        return [(builder.add(builder.mul(oy, const(ow)), ox), builder.icmp_signed("<", lane, splat(here))),
                (builder.sub(builder.mul(next_row, const(ow)), rest), there)]

    # -- depthwise ----------------------------------------------------------------------------------
    def _depthwise(self, builder, ops: _Operands, scratch_plane, n: ir.Value, c: ir.Value, prepare) -> None:
        """Channel c of image n."""
        spec, plane, lanes, epi = self.spec, self.spec.plane, self.lanes, self.spec.epilogue
        kh, kw = spec.kernel
        (sh, sw), (dh, dw) = spec.strides, spec.dilations
        oh, ow = self.oh, self.ow
        kind = ir.VectorType(F32, lanes)
        index = builder.add(builder.mul(n, ir.Constant(I64, spec.channels)), c)
        x_c = advance(builder, ops.x, index, plane.h * plane.w)
        if prepare is not None:
            builder.call(prepare, [x_c, scratch_plane])
            x_c = scratch_plane
        w_c = advance(builder, ops.w, c, kh * kw)
        taps = [splat_at(builder, w_c, t, lanes) for t in range(kh * kw)]
        b_c = splat_at(builder, ops.bias, c, lanes) if ops.bias is not None else None
        out_c, res_c = advance(builder, ops.out, index, oh * ow), advance(builder, ops.residual, index, oh * ow)

        def row(builder, oy):
            def vector(builder, start: ir.Value, valid: int) -> None:
                acc = fconst(kind, 0.0)
                for ky in range(kh):
                    line = builder.mul(builder.add(builder.mul(oy, ir.Constant(I64, sh)),
                                                   ir.Constant(I64, ky * dh)), ir.Constant(I64, plane.width))
                    for kx in range(kw):
                        at = builder.add(line, scaled(builder, start, sw, kx * dw))
                        acc = fma(builder, taps[ky * kw + kx], load_run(builder, x_c, at, valid, sw, lanes), acc)
                at = builder.add(builder.mul(oy, ir.Constant(I64, ow)), start)
                extra = load_vector(builder, res_c, at, lanes, valid) if res_c is not None else None
                store_vector(builder, finish(builder, epi, acc, b_c, extra), out_c, at, valid)

            full, rest = divmod(ow, lanes)
            loop(builder, full, "ox", lambda b, v: vector(b, b.mul(v, ir.Constant(I64, lanes)), lanes))
            if rest:
                vector(builder, ir.Constant(I64, full * lanes), rest)

        loop(builder, oh, "oy", row)


@dataclass(frozen=True)
class _Units:
    """How threads share a convolution's GEMM route, per image and group: `columns` × `chunks` units;
    run(builder, group operands, column, chunk) computes one; pack(builder, group operands[, column])
    prepares what the units of a group (`pack_columns`: of a group and column) share."""

    columns: int
    chunks: int
    pack: Callable | None
    run: Callable
    pack_columns: bool = False


def _switch(builder: ir.IRBuilder, index: ir.Value, cases: list[tuple[int, Callable]]) -> None:
    """The first case(builder) whose limit exceeds `index` ((limit, case) by increasing limits; cases with
    an empty range, limit equal to the one before, are left out)."""
    ranges, start = [], 0
    for limit, case in cases:
        if limit > start:
            ranges.append((limit, case))
        start = max(start, limit)
    (limit, case), rest = ranges[0], ranges[1:]
    if not rest:
        case(builder)
        return
    with builder.if_else(builder.icmp_unsigned("<", index, ir.Constant(I64, limit))) as (then, otherwise):
        with then:
            case(builder)
        with otherwise:
            _switch(builder, index, rest)


@dataclass(frozen=True)
class _Operands:
    """A convolution kernel's pointers (absent optional ones None); `at_group` moves them to one group of
    one image, whose plane (channel 0 of the group) it adds."""

    x: ir.Value
    w: ir.Value
    bias: ir.Value | None
    residual: ir.Value | None
    out: ir.Value
    image_out: int
    plane: ir.Value | None = None

    def at_group(self, builder: ir.IRBuilder, n: ir.Value, g: ir.Value, mg: int, pixels: int, plane: ir.Value,
                 weights: int) -> "_Operands":
        out = advance(builder, self.out, n, self.image_out)
        residual = advance(builder, self.residual, n, self.image_out)
        return _Operands(self.x, advance(builder, self.w, g, weights), advance(builder, self.bias, g, mg),
                         advance(builder, residual, g, mg * pixels), advance(builder, out, g, mg * pixels),
                         self.image_out, plane)


def emit_conv(module: ir.Module, spec: ConvSpec, name: str) -> ir.Function:
    """Add `name(x, w, [bias], [residual], out, scratch, thread, threads)` to `module`; w as
    `pack_conv_weights` makes it."""
    return _ConvEmitter(module, spec, name).emit()


def conv_scratch_bytes(spec: ConvSpec) -> int:
    emitter = _ConvEmitter(None, spec, "")
    return 4 * sum(emitter.scratch_floats())
