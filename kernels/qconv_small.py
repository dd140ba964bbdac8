"""Integer 2-D convolutions whose reduction is tiny (Cin/group · kh · kw ≤ `MAX_REDUCTION`, such as a first
layer on a one-channel image) on `vpdpbusd`, vectorised over output pixels.

A GEMM route wastes most of such a product: an AMX tile step reads 64 K values, a VNNI tile pads its
pixel panels to whole tile widths and packs them for a handful of K rows. Here, per image and group, the
windows of all output pixels become one *quad panel* in scratch, [⌈K/4⌉][pixels][4 bytes]: lane p of a
64-byte vector holds taps 4q … 4q+3 of pixel p, the bytes `vpdpbusd` multiplies together, and pixels run
on across output rows, so only the image's last vector is partial. Every output channel then costs
⌈K/4⌉ `vpdpbusd` per vector of 16 (8 with AVX-VNNI) pixels, its four weights of each quad broadcast and
its compile-time offset as the starting value, then the requantizing epilogue ("row" orientation).
Signed activations are flipped to unsigned (x ^ 0x80 = x + 128) as the panel is built; the correction
−128·ΣW̃ is part of the offsets (`shift`).

The image is first copied into a padded plane (`qconv.emit_plane`, padding = the zero point), so windows
need no bounds checks; taps past K are zeros against zero weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llvmlite import ir

from lowbit.ir.dtypes import DType
from lowbit.kernels import llvm as ll
from lowbit.kernels.gemm_int8 import ROUTE_NAMES, Route, convert_values
from lowbit.kernels.llvm import I8, I32, I64, TargetSpec
from lowbit.kernels.packing import ALIGNMENT
from lowbit.kernels.parallel import for_units, thread_scratch
from lowbit.kernels.qconv import ConvImage, ConvShape, conv_kernel, emit_plane, plane_bytes, strided_row

MAX_REDUCTION = 32  # K values per output: a channel's (at most 8) weight quads stay in registers; deeper
# reductions waste little of a GEMM route's K steps
ROW_CHUNK = 64  # output pixels of a row gathered at a time
QUAD = 4  # bytes `vpdpbusd` sums per int32 lane
CHANNEL_BLOCK = 8  # output channels per unit of work: threads share blocks when an image has few
ROUTES = ("avx512-vnni", "avx-vnni")


def _c(value: int) -> ir.Constant:
    return ir.Constant(I64, value)


def route_for(target: TargetSpec) -> Route | None:
    """The `vpdpbusd` route of `target` (the widest), or None."""
    return next((ROUTE_NAMES[name] for name in ROUTES if ROUTE_NAMES[name].available(target)), None)


def applies(target: TargetSpec, shape: ConvShape) -> bool:
    """Whether the small-reduction route takes this convolution (8-bit activations; int8 centred weights and
    the accumulator bound are the caller's checks)."""
    return route_for(target) is not None and shape.dtype in (DType.u8, DType.i8) and not shape.depthwise \
        and shape.reduction <= MAX_REDUCTION


@dataclass(frozen=True)
class SmallConv:
    """A convolution on the small-reduction route: `shift` is what the quads add to the activations."""

    shape: ConvShape
    route: Route

    @property
    def shift(self) -> int:
        return 128 if self.shape.dtype.is_signed else 0

    @property
    def quads(self) -> int:
        return -(-self.shape.reduction // QUAD)

    @property
    def chunk(self) -> int:
        """Output pixels of a row gathered at a time: a power of two."""
        return min(1 << (self.shape.out[1] - 1).bit_length(), ROW_CHUNK)

    @property
    def slack(self) -> int:
        """Bytes a chunk may read past a plane's last pixel."""
        return (self.chunk + 1) * self.shape.strides[1] + ALIGNMENT

    @property
    def plane_bytes(self) -> int:
        return plane_bytes(self.shape, self.shape.channels, self.slack)

    @property
    def panel_row(self) -> int:
        """Bytes of one quad row of the panel: every pixel, and what the last (partial) vector reads past it."""
        return -(-(self.shape.pixels + self.route.lanes) * QUAD // ALIGNMENT) * ALIGNMENT

    @property
    def scratch_bytes(self) -> int:
        """Per thread: the padded planes of one image and its quad panel."""
        return self.plane_bytes + self.quads * self.panel_row


def pack_quads(centred: np.ndarray, offsets: np.ndarray, conv: SmallConv) -> np.ndarray:
    """Centred weights [M, K = (c, ky, kx)] (int8 values) and the int32 offsets (modulo 2^32) → [M, 1 + quads]
    int32 words: the channel's offset, then words of four int8 taps each (little-endian: tap 4q in the low
    byte; K zero-padded)."""
    m, k = centred.shape
    taps = np.zeros((m, conv.quads * QUAD), np.int8)
    taps[:, :k] = centred
    words = np.ascontiguousarray(taps).view(np.int32)
    return np.ascontiguousarray(np.concatenate([np.asarray(offsets, np.int64).astype(np.int32)[:, None], words], 1))


def emit_small_conv(module: ir.Module, name: str, conv: SmallConv, epilogue, out_bytes: int,
                    residual: DType | None, vector_bytes: int) -> ir.Function:
    """`name(x, w, [residual], out, scratch, i32 thread, i32 threads)`: w from `pack_quads`, `epilogue` a "row"
    `ProductEpilogue` with `route.lanes` lanes and no offsets (they start the accumulators); scratch holds
    `conv.scratch_bytes` per thread. Threads share units (image, group, block of `CHANNEL_BLOCK` output
    channels); a thread builds the plane and quad panel of each (image, group) it works on."""
    shape, route = conv.shape, conv.route
    lanes = route.lanes
    fn, builder, x, w, res, out, scratch, thread, count = conv_kernel(module, name, residual)
    planes = thread_scratch(builder, scratch, thread, conv.scratch_bytes)
    panel = builder.gep(planes, [_c(conv.plane_bytes)])
    words = builder.bitcast(w, I32.as_pointer())
    image = ConvImage(shape, x, out, res, out_bytes, residual.bits // 8 if residual else 0)
    (sh, sw), (hp, wp), (oh, ow) = shape.strides, shape.plane, shape.out
    offsets = shape.tap_offsets()
    word = ll.vector(I32, lanes)
    columns = conv.quads + 1  # per channel: its offset, then its quads

    def build_panel(b: ir.IRBuilder, indices: list[ir.Value]) -> None:
        n, g = indices
        group_planes = b.gep(planes, [b.mul(g, _c(shape.cg * hp * wp))])
        width = conv.chunk
        zero = ir.Constant(ll.vector(I8, width), None)

        def row(b2: ir.IRBuilder, oy: ir.Value, carried: list) -> list:
            for x0 in range(0, ow, width):
                base = b2.add(b2.mul(oy, _c(sh * wp)), _c(x0 * sw))
                taps = [convert_values(b2, strided_row(b2, group_planes, b2.add(base, _c(offsets[k])), width, sw),
                                       conv.shift, 8, shape.dtype.is_signed) if k < shape.reduction else zero
                        for k in range(conv.quads * QUAD)]
                for q in range(conv.quads):
                    at = b2.add(_c(q * conv.panel_row + x0 * QUAD), b2.mul(oy, _c(ow * QUAD)))
                    ll.store_partial(b2, _quad(b2, taps[q * QUAD:(q + 1) * QUAD]), b2.gep(panel, [at]),
                                     min(width, ow - x0) * QUAD)
            return carried

        emit_plane(b, shape, image.input(b, n), planes, shape.channels, vector_bytes)
        ll.static_loop(b, oh, "row", row)

    def channels(b: ir.IRBuilder, indices: list[ir.Value]) -> None:
        n, g, block = indices
        group_first = b.mul(g, _c(shape.mg))
        args = image.epilogue_args(b, n, group_first)
        first = b.mul(block, _c(CHANNEL_BLOCK))
        last = b.select(b.icmp_signed("<", b.add(first, _c(CHANNEL_BLOCK)), _c(shape.mg)),
                        b.add(first, _c(CHANNEL_BLOCK)), _c(shape.mg))

        def channel(b2: ir.IRBuilder, i: ir.Value, carried: list) -> list:
            m = b2.add(first, i)
            at = b2.mul(b2.add(group_first, m), _c(columns))
            start, *taps = [ll.splat(b2, b2.load(b2.gep(words, [b2.add(at, _c(j))])), lanes) for j in range(columns)]

            def vector(b3: ir.IRBuilder, v: ir.Value, valid: int) -> None:
                acc = start
                for q in range(conv.quads):
                    quads = ll.pointer_at(b3, panel, b3.add(_c(q * conv.panel_row), b3.mul(v, _c(QUAD))), word)
                    acc = route.mac(b3, module, acc, b3.load(quads, align=QUAD), taps[q])
                epilogue.emit(b3, [[acc]], m, v, valid, args)

            ll.strip_mine(b2, _c(0), shape.pixels, lanes, "pixels", vector)
            return carried

        ll.counted_loop(b, b.sub(last, first), "channel", body=channel)

    for_units(builder, thread, count, [shape.batch, shape.group, -(-shape.mg // CHANNEL_BLOCK)], "channels", channels,
              {1: build_panel})
    builder.ret_void()
    return fn


def _quad(builder: ir.IRBuilder, rows: list[ir.Value]) -> ir.Value:
    """Four byte vectors of W pixels → one of 4·W bytes, pixel p's four bytes together (row j's at 4p + j)."""
    width = rows[0].type.count
    low = builder.shuffle_vector(rows[0], rows[1], ll.const_vector(I32, range(2 * width)))
    high = builder.shuffle_vector(rows[2], rows[3], ll.const_vector(I32, range(2 * width)))
    mask = [j * width + p for p in range(width) for j in range(QUAD)]
    return builder.shuffle_vector(low, high, ll.const_vector(I32, mask))
