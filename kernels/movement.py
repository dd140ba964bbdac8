"""Data-movement kernels: strided N-d copies and fills, gathers.

Every data-movement op (transpose, slice, concat, split, pad, tile, expand) is a list of `Copy` and
`Fill` steps over static shapes: a loop nest whose pointers advance by fixed byte strides per axis
(negative for reversed slices, 0 for broadcast axes). `collapse` merges axes the strides allow, so the
innermost loop is as long as possible; it then runs as one `memcpy` (both sides contiguous), a
vector splat store (source broadcast along it), or an element loop. Element loops that read across
the source's contiguous axis (transposes of the innermost axis) are blocked so reads and writes both
stay within a few cache lines. Gathers read their indices at run time.

Generators take byte offsets and strides (the element size is a parameter), so one kernel serves
every element type of a given size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from llvmlite import ir

from lowbit.kernels.llvm import I1, I8, I64, VOID, TargetSpec, counted_loop, declare, pointer_at, splat
from lowbit.kernels.parallel import new_parallel_kernel, share

BYTE_PTR = I8.as_pointer()
TILE = 16  # elements per side of a transpose block: 16 rows of 64-byte lines stay in L1

Body = Callable[[ir.IRBuilder, list[ir.Value]], None]


def collapse(dims: Sequence[int], strides: Sequence[Sequence[int]],
             keep: Sequence[int] = ()) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """Drop size-1 axes and merge neighbours that every stride set walks contiguously.

    Axes i and i+1 merge when, for each set, stride[i] == stride[i+1] * dims[i+1]. Axes in `keep`
    are never dropped or merged (gathers address them separately). Returns (dims, strides per set).
    """
    axes = [a for a in range(len(dims)) if dims[a] != 1 or a in keep]
    out_dims: list[int] = []
    out_strides: list[list[int]] = [[] for _ in strides]
    previous = None
    for axis in axes:
        if out_dims and previous not in keep and axis not in keep and all(
                s[previous] == s[axis] * dims[axis] for s in strides):
            out_dims[-1] *= dims[axis]
            for merged, s in zip(out_strides, strides):
                merged[-1] = s[axis]
        else:
            out_dims.append(dims[axis])
            for merged, s in zip(out_strides, strides):
                merged.append(s[axis])
        previous = axis
    return tuple(out_dims), [tuple(s) for s in out_strides]


def contiguous_strides(shape: Sequence[int], element_bytes: int = 1) -> tuple[int, ...]:
    """Row-major strides of `shape`, in units of `element_bytes`."""
    strides, step = [], element_bytes
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def broadcast_strides(shape: Sequence[int], operand: Sequence[int], element_bytes: int = 1) -> tuple[int, ...]:
    """Strides of row-major `operand` read at the coordinates of `shape` it broadcasts to: 0 where broadcast."""
    padded = (1,) * (len(shape) - len(operand)) + tuple(operand)
    return tuple(0 if dim == 1 else stride
                 for dim, stride in zip(padded, contiguous_strides(padded, element_bytes)))


@dataclass(frozen=True)
class Copy:
    """dst[dst_offset + Σ i·dst_strides] = src[src_offset + Σ i·src_strides] over `dims` (bytes)."""

    dims: tuple[int, ...]
    src: int
    src_offset: int
    src_strides: tuple[int, ...]
    dst: int
    dst_offset: int
    dst_strides: tuple[int, ...]


@dataclass(frozen=True)
class Fill:
    """dst[dst_offset + Σ i·dst_strides] = `value` (one element's bytes, little-endian) over `dims`."""

    dims: tuple[int, ...]
    dst: int
    dst_offset: int
    dst_strides: tuple[int, ...]
    value: bytes


def new_kernel(module: ir.Module, name: str, buffers: int) -> tuple[ir.Function, ir.IRBuilder]:
    """An internal `void name(i8* noalias ...)` with its entry block (kernel convention)."""
    function = ir.Function(module, ir.FunctionType(VOID, [BYTE_PTR] * buffers), name)
    function.linkage = "internal"
    for arg in function.args:
        arg.add_attribute("noalias")
    return function, ir.IRBuilder(function.append_basic_block("entry"))


def i64(value: int) -> ir.Constant:
    return ir.Constant(I64, value)


def loop_nest(builder: ir.IRBuilder, dims: Sequence[int], bases: Sequence[ir.Value],
              strides: Sequence[Sequence[int]], body: Body, name: str = "axis") -> None:
    """Loops over `dims`; `body(builder, offsets)` gets each pointer's i64 offset, base + Σ i·stride."""
    if not dims:
        body(builder, list(bases))
        return

    def level(b: ir.IRBuilder, index: ir.Value, _):
        offsets = [base if s[0] == 0 else b.add(base, b.mul(index, i64(s[0])))
                   for base, s in zip(bases, strides)]
        loop_nest(b, dims[1:], offsets, [s[1:] for s in strides], body, name)
        return []

    counted_loop(builder, i64(dims[0]), name, (), level)


def memcpy(builder: ir.IRBuilder, destination: ir.Value, source: ir.Value, nbytes: ir.Value | int) -> None:
    module = builder.module
    function = declare(module, "llvm.memcpy.p0i8.p0i8.i64", VOID, BYTE_PTR, BYTE_PTR, I64, I1)
    builder.call(function, [destination, source, i64(nbytes) if isinstance(nbytes, int) else nbytes,
                            ir.Constant(I1, 0)])


def memset(builder: ir.IRBuilder, destination: ir.Value, byte: int, nbytes: ir.Value | int) -> None:
    function = declare(builder.module, "llvm.memset.p0i8.i64", VOID, BYTE_PTR, I8, I64, I1)
    builder.call(function, [destination, ir.Constant(I8, byte), i64(nbytes) if isinstance(nbytes, int)
                            else nbytes, ir.Constant(I1, 0)])


def store_run(builder: ir.IRBuilder, base: ir.Value, offset: ir.Value, count: int, element: ir.Value,
              vector_bytes: int) -> None:
    """`count` copies of scalar `element` stored contiguously from base + offset (vector stores)."""
    width = element.type.width // 8
    lanes = max(vector_bytes // width, 1)
    if count >= lanes > 1:
        block = splat(builder, element, lanes)

        def vector_step(b: ir.IRBuilder, index: ir.Value, _):
            at = b.add(offset, b.mul(index, i64(lanes * width)))
            b.store(block, pointer_at(b, base, at, block.type), align=width)
            return []

        counted_loop(builder, i64(count // lanes), "fill.vec", (), vector_step)
    done = count // lanes * lanes if lanes > 1 else 0

    def scalar_step(b: ir.IRBuilder, index: ir.Value, _):
        at = b.add(offset, b.mul(b.add(index, i64(done)), i64(width)))
        b.store(element, pointer_at(b, base, at, element.type), align=width)
        return []

    if count > done:
        counted_loop(builder, i64(count - done), "fill.tail", (), scalar_step)


def _emit_fill(builder: ir.IRBuilder, args: Sequence[ir.Value], step: Fill, vector_bytes: int) -> None:
    width = len(step.value)
    dims, (strides,) = collapse(step.dims, [step.dst_strides])
    if 0 in dims:
        return
    element_type = ir.IntType(8 * width)
    element = ir.Constant(element_type, int.from_bytes(step.value, "little"))
    destination = args[step.dst]
    if dims and strides[-1] == width:
        outer, inner = dims[:-1], dims[-1]
        uniform = len(set(step.value)) == 1

        def run(b: ir.IRBuilder, offsets: list[ir.Value]) -> None:
            if uniform:
                memset(b, b.gep(destination, [offsets[0]]), step.value[0], inner * width)
            else:
                store_run(b, destination, offsets[0], inner, element, vector_bytes)

        loop_nest(builder, outer, [i64(step.dst_offset)], [strides[:-1]], run, "fill")
        return
    loop_nest(builder, dims, [i64(step.dst_offset)], [strides],
              lambda b, o: b.store(element, pointer_at(b, destination, o[0], element_type), align=width), "fill")


def _transpose_axis(dims: Sequence[int], src: Sequence[int], dst: Sequence[int], width: int) -> int | None:
    """The axis to block with the innermost one when the innermost reads across the source, or None."""
    if len(dims) < 2 or dst[-1] != width or src[-1] in (0, width) or dims[-1] < TILE:
        return None
    for axis in range(len(dims) - 1):
        if src[axis] == width and dims[axis] >= TILE:
            return axis
    return None


def _emit_blocked(builder: ir.IRBuilder, source: ir.Value, destination: ir.Value, step: Copy,
                  dims: Sequence[int], src: Sequence[int], dst: Sequence[int], axis: int, width: int) -> None:
    """A transpose-like copy: `axis` (contiguous in the source) is walked in blocks of TILE, innermost.

    For every block of TILE source-contiguous elements and every position along the innermost axis,
    the TILE reads share one source line and the TILE writes go to TILE destination lines that the
    next positions keep filling: both sides touch few lines at a time.
    """
    element_type = ir.IntType(8 * width)
    others = [a for a in range(len(dims) - 1) if a != axis]
    blocks, last = divmod(dims[axis], TILE)

    def block(b: ir.IRBuilder, offsets: list[ir.Value], count: int) -> None:
        def inner(b2: ir.IRBuilder, at: list[ir.Value]) -> None:
            value = b2.load(pointer_at(b2, source, at[0], element_type), align=width)
            b2.store(value, pointer_at(b2, destination, at[1], element_type), align=width)

        loop_nest(b, [dims[-1], count], offsets, [(src[-1], src[axis]), (dst[-1], dst[axis])], inner, "tile")

    def blocked(b: ir.IRBuilder, offsets: list[ir.Value]) -> None:
        if blocks:
            loop_nest(b, [blocks], offsets, [(src[axis] * TILE,), (dst[axis] * TILE,)],
                      lambda b2, o: block(b2, o, TILE), "blocks")
        if last:
            tail = [b.add(o, i64(blocks * TILE * s)) for o, s in zip(offsets, (src[axis], dst[axis]))]
            block(b, tail, last)

    loop_nest(builder, [dims[a] for a in others], [i64(step.src_offset), i64(step.dst_offset)],
              [[src[a] for a in others], [dst[a] for a in others]], blocked, "outer")


def _emit_copy(builder: ir.IRBuilder, args: Sequence[ir.Value], step: Copy, width: int,
               vector_bytes: int) -> None:
    dims, (src, dst) = collapse(step.dims, [step.src_strides, step.dst_strides])
    if 0 in dims:
        return
    source, destination = args[step.src], args[step.dst]
    element_type = ir.IntType(8 * width)
    bases = [i64(step.src_offset), i64(step.dst_offset)]
    axis = _transpose_axis(dims, src, dst, width)
    if axis is not None:
        _emit_blocked(builder, source, destination, step, dims, src, dst, axis, width)
        return
    if dims and dst[-1] == width and src[-1] in (0, width):
        inner = dims[-1]

        def run(b: ir.IRBuilder, offsets: list[ir.Value]) -> None:
            if src[-1] == width:
                memcpy(b, b.gep(destination, [offsets[1]]), b.gep(source, [offsets[0]]), inner * width)
            else:
                element = b.load(pointer_at(b, source, offsets[0], element_type), align=width)
                store_run(b, destination, offsets[1], inner, element, vector_bytes)

        loop_nest(builder, dims[:-1], bases, [src[:-1], dst[:-1]], run, "copy")
        return

    def element(b: ir.IRBuilder, offsets: list[ir.Value]) -> None:
        value = b.load(pointer_at(b, source, offsets[0], element_type), align=width)
        b.store(value, pointer_at(b, destination, offsets[1], element_type), align=width)

    loop_nest(builder, dims, bases, [src, dst], element, "copy")


def movement_kernel(module: ir.Module, name: str, buffers: int, steps: Sequence[Copy | Fill],
                    element_bytes: int, target: TargetSpec) -> ir.Function:
    """`name(buffers...)` running `steps` in order; elements are `element_bytes` wide."""
    function, builder = new_kernel(module, name, buffers)
    for step in steps:
        if isinstance(step, Fill):
            _emit_fill(builder, function.args, step, target.vector_bytes)
        else:
            _emit_copy(builder, function.args, step, element_bytes, target.vector_bytes)
    builder.ret_void()
    return function


def _load_index(builder: ir.IRBuilder, base: ir.Value, offset: ir.Value, index_bytes: int,
                axis_dim: int) -> tuple[ir.Value, ir.Value]:
    """The index at base + offset, negative ones wrapped by `axis_dim`, and whether it is in range."""
    index_type = ir.IntType(8 * index_bytes)
    index = builder.load(pointer_at(builder, base, offset, index_type), align=index_bytes)
    if index_bytes < 8:
        index = builder.sext(index, I64)
    wrapped = builder.select(builder.icmp_signed("<", index, i64(0)), builder.add(index, i64(axis_dim)), index)
    # One unsigned compare checks 0 <= wrapped < axis_dim.
    return wrapped, builder.icmp_unsigned("<", wrapped, i64(axis_dim))


def gather_kernel(module: ir.Module, name: str, outer: int, axis_dim: int, count: int, inner_bytes: int,
                  index_bytes: int) -> ir.Function:
    """`name(data, indices, out)`: out[o, j, :] = data[o, indices[j], :] (rows of `inner_bytes`).

    data is [outer, axis_dim, inner] and out [outer, count, inner] (bytes, row-major); indices are
    `count` signed integers of `index_bytes`. Negative indices count from the end; an index still
    outside [0, axis_dim) yields a zero row (the reference raises; native code has no error channel).
    """
    function, builder = new_kernel(module, name, 3)
    data, indices, out = function.args

    def row(b: ir.IRBuilder, offsets: list[ir.Value]) -> None:
        o_data, o_index, o_out = offsets
        index, valid = _load_index(b, indices, o_index, index_bytes, axis_dim)
        target = b.gep(out, [o_out])
        with b.if_else(valid) as (then, otherwise):
            with then:
                memcpy(b, target, b.gep(data, [b.add(o_data, b.mul(index, i64(inner_bytes)))]), inner_bytes)
            with otherwise:
                memset(b, target, 0, inner_bytes)

    if outer and count and inner_bytes:
        loop_nest(builder, [outer, count], [i64(0), i64(0), i64(0)],
                  [(axis_dim * inner_bytes, 0), (0, index_bytes), (count * inner_bytes, inner_bytes)], row, "gather")
    builder.ret_void()
    return function


def gather_elements_kernel(module: ir.Module, name: str, data_shape: Sequence[int], index_shape: Sequence[int],
                           axis: int, element_bytes: int, index_bytes: int) -> ir.Function:
    """`name(data, indices, out)`: out[i] = data[i with axis coordinate indices[i]] (take_along_axis).

    Indices wrap and are bounds-checked as in `gather_kernel`; out-of-range ones give 0.
    """
    function, builder = new_kernel(module, name, 3)
    data, indices, out = function.args
    # The axis coordinate comes from the index; size-1 data axes broadcast (numpy's take_along_axis).
    data_strides = [0 if dim == 1 else stride for dim, stride in
                    zip(data_shape, contiguous_strides(data_shape, element_bytes))]
    axis_stride = contiguous_strides(data_shape, element_bytes)[axis]
    data_strides[axis] = 0
    dims, strides = collapse(index_shape, [data_strides, contiguous_strides(index_shape, index_bytes),
                                           contiguous_strides(index_shape, element_bytes)], keep=(axis,))
    element_type = ir.IntType(8 * element_bytes)

    def element(b: ir.IRBuilder, offsets: list[ir.Value]) -> None:
        o_data, o_index, o_out = offsets
        index, valid = _load_index(b, indices, o_index, index_bytes, data_shape[axis])
        safe = b.select(valid, index, i64(0))
        value = b.load(pointer_at(b, data, b.add(o_data, b.mul(safe, i64(axis_stride))), element_type),
                       align=element_bytes)
        b.store(b.select(valid, value, ir.Constant(element_type, 0)), pointer_at(b, out, o_out, element_type),
                align=element_bytes)

    if 0 not in index_shape:
        loop_nest(builder, dims, [i64(0)] * 3, strides, element, "gather")
    builder.ret_void()
    return function



LOOKUP_LANES = 16
LOOKUP_PADDING = 3  # bytes after a table: each lane gathers 4 bytes from its entry's first byte on


def lookup_kernel(module: ir.Module, name: str, count: int, index: ir.IntType, signed: bool, offset: int,
                  element: ir.Type) -> ir.Function:
    """`name(x, table, out, thread, threads)`: out[i] = table[x[i] + offset] for the `count` integers x (of
    type `index`, sign- or zero-extended), table and out holding `element`s (1, 2 or 4 bytes). `offset`
    makes every value x can hold a valid position (−min of x's type). Parallel: each thread looks up its
    share of the elements.

    Vectors of 16 lanes gather 4 bytes per lane from the entry's address (`llvm.masked.gather`: one or two
    gather instructions with AVX-512/AVX2) and keep the entry's low bytes (little-endian targets), so the
    table needs `LOOKUP_PADDING` bytes after its end and no widening; the last elements go one by one.
    """
    function, builder, thread, threads = new_parallel_kernel(module, name, 3)
    x, table, out = (builder.bitcast(arg, kind.as_pointer()) for arg, kind in
                     zip(function.args[:3], (index, element, element)))
    begin, end = share(builder, thread, threads, count)
    width = element.width // 8 if isinstance(element, ir.IntType) else 4
    word, lanes = ir.IntType(32), LOOKUP_LANES
    words, longs = ir.VectorType(word, lanes), ir.VectorType(I64, lanes)
    gather = declare(module, f"llvm.masked.gather.v{lanes}i32.v{lanes}p0", words,
                     ir.VectorType(word.as_pointer(), lanes), word, ir.VectorType(I1, lanes), words)
    table_address = builder.ptrtoint(function.args[1], I64)

    def extend(b: ir.IRBuilder, value: ir.Value, kind: ir.Type) -> ir.Value:
        return b.sext(value, kind) if signed else b.zext(value, kind)

    def vector(b: ir.IRBuilder, v: ir.Value, carried: list) -> list:
        at = b.add(begin, b.mul(v, i64(lanes)))
        values = b.load(b.bitcast(b.gep(x, [at]), ir.VectorType(index, lanes).as_pointer()), align=1)
        positions = b.mul(b.add(extend(b, values, longs), splat(b, i64(offset), lanes)), splat(b, i64(width), lanes))
        pointers = b.inttoptr(b.add(splat(b, table_address, lanes), positions), gather.args[0].type)
        found = b.call(gather, [pointers, ir.Constant(word, 1), ir.Constant(ir.VectorType(I1, lanes), [1] * lanes),
                                ir.Constant(words, ir.Undefined)])
        kind = ir.VectorType(element, lanes)
        found = b.bitcast(found, kind) if width == 4 else b.trunc(found, kind)
        b.store(found, b.bitcast(b.gep(out, [at]), kind.as_pointer()), align=1)
        return carried

    def one(b: ir.IRBuilder, i: ir.Value, carried: list) -> list:
        at = b.add(tail, i)
        position = b.add(extend(b, b.load(b.gep(x, [at])), I64), i64(offset))
        b.store(b.load(b.gep(table, [position])), b.gep(out, [at]))
        return carried

    total = builder.sub(end, begin)
    full = builder.udiv(total, i64(lanes))
    counted_loop(builder, full, "lookup", body=vector)
    tail = builder.add(begin, builder.mul(full, i64(lanes)))
    counted_loop(builder, builder.sub(end, tail), "rest", body=one)
    builder.ret_void()
    return function
