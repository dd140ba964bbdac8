"""Lowerings of the float products: linear, matmul, conv2d, conv_transpose2d and attention.

All of them run on the float32 GEMM template (`lowbit.kernels.gemm_f32`); constant weights are packed
into the template's panel layouts here, at compile time; run-time weights are packed by a kernel
before every run. Float16 and float64 nodes run through float32 (`float_width`).
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Sequence

import numpy as np

from lowbit.backends.native.lowering import LowerContext, lowering
from lowbit.backends.native.lowerings.float_width import in_float32
from lowbit.backends.native.sparse_selection import lower_sparse_linear
from lowbit.ir import Node, constant_value
from lowbit.kernels.conv import (conv2d_spec, conv_scratch_bytes, conv_transpose2d_spec, emit_conv,
                                 pack_conv_weights, transposed_weights)
from lowbit.kernels.gemm_f32 import (AttentionSpec, Batched, Epilogue, GemmSpec, choose_tile, default_tile,
                                     emit_attention, emit_batched_gemm, emit_gather, pack_b, prefer_m_outer)


def _has(node: Node, index: int) -> bool:
    return len(node.inputs) > index and node.inputs[index] is not None


def _epilogue(node: Node, bias: str, residual_ld: int = 0) -> Epilogue:
    """The node's fused epilogue (bias "row" / "col" when it has a bias operand)."""
    return Epilogue(bias=bias if _has(node, 2) else "none", residual=_has(node, 3), residual_ld=residual_ld,
                    activation=node.attrs.get("activation", "none"),
                    params=tuple(node.attrs.get("activation_params", ())))


def _batch_strides(shape: Sequence[int], batch: Sequence[int], matrix: int) -> tuple[int, ...]:
    """Floats between consecutive indices of each axis of `batch` for an operand whose batch axes are
    `shape` (right-aligned) and whose matrices hold `matrix` floats; 0 where it is broadcast."""
    strides, inner = [], matrix
    padded = (1,) * (len(batch) - len(shape)) + tuple(shape)
    for size in reversed(padded):
        strides.append(inner if size > 1 else 0)
        inner *= size
    return tuple(reversed(strides))


def _call_batched(ctx: LowerContext, node: Node, spec: Batched, b_buffer, extra: list) -> None:
    spec = replace(spec, threads=ctx.num_threads)
    kernel = ctx.kernel(("gemm_f32", spec), lambda module, name: emit_batched_gemm(module, spec, name))
    scratch = [ctx.scratch(spec.scratch_bytes, per_thread=True)] if not spec.packed else []
    ctx.call(kernel, [ctx.operand(0), b_buffer, *extra, ctx.result(0), *scratch], parallel=True)


@lowering("linear")
@in_float32
def lower_linear(ctx: LowerContext, node: Node) -> None:
    """x [..., K] · wᵀ: the rows of x are A; w [N, K] is B transposed, packed now when constant."""
    x = node.inputs[0].type
    n, k = node.inputs[1].type.shape
    if lower_sparse_linear(ctx, node, _epilogue(node, "col", n)):
        return
    rows = math.prod(x.shape[:-1])
    tile = choose_tile(ctx.target, rows, n)
    weights = constant_value(node.inputs[1])
    gemm = GemmSpec(rows, k, tile, n, lda=k, epilogue=_epilogue(node, "col", n), m_outer=prefer_m_outer(rows, k, n))
    spec = Batched(gemm, n, packed=weights is not None, b_layout=(1, k), has_bias=_has(node, 2))
    b_buffer = (ctx.constant(pack_b(np.asarray(weights, np.float32).T, tile), "linear weights")
                if weights is not None else ctx.operand(1))
    extra = [ctx.operand(i) for i in (2, 3) if _has(node, i)]
    _call_batched(ctx, node, spec, b_buffer, extra)


@lowering("matmul")
@in_float32
def lower_matmul(ctx: LowerContext, node: Node) -> None:
    """numpy matmul with broadcast batch axes; B packed now when constant, else per batch index."""
    a_shape, b_shape = node.inputs[0].type.shape, node.inputs[1].type.shape
    rows_shape = (1,) + a_shape if len(a_shape) == 1 else a_shape
    cols_shape = b_shape + (1,) if len(b_shape) == 1 else b_shape
    m, k = rows_shape[-2:]
    n = cols_shape[-1]
    batch = tuple(np.broadcast_shapes(rows_shape[:-2], cols_shape[:-2]))
    tile = choose_tile(ctx.target, m, n)
    weights = constant_value(node.inputs[1])
    a_strides = _batch_strides(rows_shape[:-2], batch, m * k)
    if weights is not None:
        slices = np.asarray(weights, np.float32).reshape((-1, k, n))
        packed = [pack_b(matrix, tile) for matrix in slices]
        b_strides = _batch_strides(cols_shape[:-2], batch, packed[0].size)
        b_buffer = ctx.constant(np.concatenate(packed), "matmul weights")
    else:
        b_strides = _batch_strides(cols_shape[:-2], batch, k * n)
        b_buffer = ctx.operand(1)
    spec = Batched(GemmSpec(m, k, tile, n, lda=k, m_outer=prefer_m_outer(m, k, n)), n, batch, a_strides, b_strides,
                   packed=weights is not None, b_layout=(n, 1))
    _call_batched(ctx, node, spec, b_buffer, [])


def _conv_tile(ctx: LowerContext, m_per_group: int):
    """The register tile for a convolution's GEMM: its N (pixels) is large, its M the group's channels."""
    return choose_tile(ctx.target, m_per_group, 1 << 16)


def _masked_loads(ctx: LowerContext) -> bool:
    """Whether masked vector loads cost what plain ones do (AVX-512's mask registers)."""
    return "avx512f" in ctx.target.features


def _lower_conv(ctx: LowerContext, node: Node, spec, arrange: Callable[[np.ndarray], np.ndarray]) -> None:
    """`arrange` puts weights in the kernel's order: constant ones now; for run-time ones it orders
    their indices now, into a table a gather follows before every run."""
    weights = constant_value(node.inputs[1])
    if weights is not None:
        packed = ctx.constant(arrange(np.asarray(weights, np.float32)), "conv weights")
    else:
        shape = node.inputs[1].type.shape
        # indices from 1, so that the zeros packing pads with become −1: "no weight, 0"
        table = arrange(np.arange(1, math.prod(shape) + 1, dtype=np.int32).reshape(shape)) - 1
        gather = ctx.kernel(("gather_f32", table.size), lambda module, name: emit_gather(module, table.size, name))
        packed = ctx.scratch(4 * table.size, "conv weights")
        ctx.call(gather, [ctx.operand(1), ctx.constant(table, "conv weight order"), packed])
    spec = replace(spec, threads=ctx.num_threads)
    kernel = ctx.kernel(("conv_f32", spec), lambda module, name: emit_conv(module, spec, name))
    extra = [ctx.operand(i) for i in (2, 3) if _has(node, i)]
    ctx.call(kernel, [ctx.operand(0), packed, *extra, ctx.result(0),
                      ctx.scratch(conv_scratch_bytes(spec), per_thread=True)], parallel=True)


@lowering("conv2d")
@in_float32
def lower_conv2d(ctx: LowerContext, node: Node) -> None:
    attrs = node.attrs
    w_shape = node.inputs[1].type.shape
    spec = conv2d_spec(node.inputs[0].type.shape, w_shape, attrs["strides"], attrs["pads"], attrs["dilations"],
                       attrs["group"], _conv_tile(ctx, w_shape[0] // attrs["group"]), _epilogue(node, "row"),
                       _masked_loads(ctx))
    _lower_conv(ctx, node, spec, lambda w: pack_conv_weights(spec, w))


@lowering("conv_transpose2d")
@in_float32
def lower_conv_transpose2d(ctx: LowerContext, node: Node) -> None:
    """As the reference: a convolution of the zero-inserted, padded input with the flipped kernel."""
    attrs = node.attrs
    w_shape = node.inputs[1].type.shape
    spec = conv_transpose2d_spec(node.inputs[0].type.shape, w_shape, attrs["strides"], attrs["pads"],
                                 attrs["dilations"], attrs["group"], attrs["output_padding"],
                                 _conv_tile(ctx, w_shape[1]), _epilogue(node, "row"), _masked_loads(ctx))
    _lower_conv(ctx, node, spec, lambda w: pack_conv_weights(spec, transposed_weights(w, attrs["group"])))


@lowering("attention")
@in_float32
def lower_attention(ctx: LowerContext, node: Node) -> None:
    q, k_t, v = (node.inputs[i].type.shape for i in range(3))
    sq, d = q[-2:]
    sk, dv = v[-2:]
    batch = tuple(np.broadcast_shapes(q[:-2], k_t[:-2], v[:-2]))
    mask = {}
    if _has(node, 3):
        shape = node.inputs[3].type.shape
        full = (1,) * (len(batch) + 2 - len(shape)) + tuple(shape)
        mask = dict(mask=True, mask_strides=_batch_strides(full[:-2], batch, full[-2] * full[-1]),
                    mask_rows=full[-1] if full[-2] > 1 else 0, mask_cols=1 if full[-1] > 1 else 0)
    spec = AttentionSpec(batch, _batch_strides(q[:-2], batch, sq * d), _batch_strides(k_t[:-2], batch, d * sk),
                         _batch_strides(v[:-2], batch, sk * dv), sq, d, sk, dv, node.attrs["scale"],
                         default_tile(ctx.target), node.attrs["zero_nan_probs"], **mask)
    kernel = ctx.kernel(("attention_f32", spec), lambda module, name: emit_attention(module, spec, name))
    operands = [ctx.operand(i) for i in range(4 if spec.mask else 3)]
    ctx.call(kernel, [*operands, ctx.result(0), ctx.scratch(spec.scratch_bytes, per_thread=True)], parallel=True)
