"""Native lowerings of the integer products: qlinear, qconv2d, qmatmul, dynamic_linear, dynamic_matmul.

Route choice, per node:
* int8 route (`kernels.gemm_int8`, by target features: VNNI, AVX2 `vpmaddubsw` only where the weights
  prove it exact, else `vpmaddwd`; NEON `sdot`; a widening fallback) when both operands are 8-bit, the
  constant weights minus their zero points still fit int8, and the static accumulator bound is below
  2^31 (int32 lanes, exact modulo 2^32). Zero-point and flip terms are folded into compile-time
  per-channel offsets, or for two run-time operands into row and column sums computed before the tiles.
  On targets with AMX, qlinear and qconv2d under the same conditions take AMX tiles instead
  (`kernels.gemm_amx`, `kernels.qconv_amx`) when the product has at least 16 rows (output channels per
  group) and 16 columns (`gemm_amx.worth`); smaller ones stay on VNNI. Convolutions with a tiny reduction
  (Cin/group·kh·kw ≤ 32) take `kernels.qconv_small` on VNNI targets, AMX or not: tiles would waste most
  of each K step.
* depthwise convolutions run directly (`kernels.qconv`), in int32 or int64 lanes by the bound.
* qmatmul and dynamic_matmul (two run-time operands) take `kernels.runtime_products` under the same
  conditions: AMX tiles when the product has 16 rows and 16 columns, else the register tiles of the
  int8 route for run-time B (`gemm_int8.runtime_route`); B is packed per call, the zero-point terms are
  row and column sums (run-time values for dynamic_matmul, whose u8 operands bound |acc| by K·255²).
  dynamic_linear takes AMX or the int8 tiles like qlinear, after quantizing x at run time.
* everything else (16-bit activations, deep int64 accumulators, weights that do not centre into int8)
  takes the exact wide route (`kernels.gemm_wide`, int64 lanes).
The epilogue requantizes (or scales, for dynamic quantization) straight from the accumulators; qconv2d's
(and single-scale qmatmul's) with `kernels.fast_requant` (even/odd int64 lanes) where the
accumulator bounds make that exact.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir

from lowbit.backends.native.lowering import Buffer, LowerContext, lowering
from lowbit.backends.native.lowerings.quantized import requant_of
from lowbit.backends.native.sparse_selection import lower_sparse_qlinear
from lowbit.errors import ShapeError, UnsupportedOpError
from lowbit.ir import DType, Node, constant_value, quant_math
from lowbit.kernels import gemm_amx, qconv_amx, qconv_small, runtime_products
from lowbit.kernels import llvm as ll
from lowbit.kernels.gemm_int8 import (GemmPlan, TileEmitter, activation_shift, choose_route, emit_plan_pack_a,
                                      emit_shared_panels, plan_gemm)
from lowbit.kernels.fast_requant import PairedEpilogue
from lowbit.kernels.gemm_wide import Side, emit_wide_gemm
from lowbit.kernels.llvm import F32, I8, I32, I64
from lowbit.kernels.movement import loop_nest, new_kernel
from lowbit.kernels.packing import column_sums
from lowbit.kernels.gemm_f32 import batch_offset
from lowbit.kernels.parallel import new_parallel_kernel, share, split_rows, thread_scratch
from lowbit.kernels.qconv import (ConvShape, FastConv, depthwise_scratch_bytes, emit_depthwise, emit_fast_conv,
                                  emit_wide_conv, pack_weight_rows, wide_scratch_bytes)
from lowbit.kernels.reduce import reduce_row
from lowbit.kernels.requantize import (Corrections, FloatEpilogue, ProductEpilogue, emit_dynamic_quantize)

INT32_LIMIT = 1 << 31
EIGHT_BIT = (DType.u8, DType.i8)


def _has(node: Node, index: int) -> bool:
    return len(node.inputs) > index and node.inputs[index] is not None


def _lanes(ctx: LowerContext) -> int:
    """int32 lanes of one vector register (the epilogues' width off the int8 routes)."""
    return max(ctx.target.vector_bytes // 4, 4)


def _constant(node: Node, index: int, what: str) -> np.ndarray:
    data = constant_value(node.inputs[index])
    if data is None:
        raise UnsupportedOpError(f"{node.describe()}: the native backend needs constant {what} (they are packed "
                                 f"at compile time)")
    return np.asarray(data)


def _centred_weights(node: Node) -> np.ndarray:
    """w − zw as int64 [output channels, K] (zero points per output channel or one)."""
    w = _constant(node, 1, "weights")
    params = node.inputs[1].type.quant
    flat = w.reshape(w.shape[0], -1).astype(np.int64)
    return flat - np.asarray(params.zero_point, np.int64).reshape(-1, 1)


def _bias(node: Node, channels: int) -> np.ndarray:
    if not _has(node, 2):
        return np.zeros(channels, np.int64)
    return _constant(node, 2, "biases").astype(np.int64)


def _residual(node: Node) -> tuple[DType, int] | None:
    if not _has(node, 3):
        return None
    t = node.inputs[3].type
    return t.dtype, t.quant.zero_point[0]


def _bound(node: Node, depth: int, bias: np.ndarray | None = None) -> int:
    x, w = node.inputs[0].type, node.inputs[1].type
    bias_bound = int(np.abs(bias).max(initial=0)) if bias is not None else 0
    return quant_math.accumulator_bound(x.dtype, x.quant.zero_point, w.dtype, w.quant.zero_point, depth, bias_bound)


def _int8_ok(centred: np.ndarray) -> bool:
    return bool(centred.size) and -128 <= centred.min() and centred.max() <= 127


def _guarantee_7bit(node: Node) -> bool:
    """Activations that are unsigned and at most 7 bits wide lie in [0, 127]."""
    x = node.inputs[0].type
    return not x.dtype.is_signed and x.quant is not None and x.quant.bits <= 7


def _wrap32(values: np.ndarray) -> tuple[int, ...]:
    """int64 values as the int32 they are modulo 2^32 (offsets added in wrapping int32 lanes)."""
    return tuple(np.asarray(values, np.int64).astype(np.int32).tolist())


def _call(ctx: LowerContext, key: tuple, build, buffers: list[Buffer]) -> None:
    ctx.call(ctx.kernel(key, build), buffers)


def _out_bytes(node: Node) -> int:
    return ll.element_bytes(ll.element_type(node.outputs[0].type.dtype))


# -- qlinear ---------------------------------------------------------------------------------------------
def _linear_plan(ctx: LowerContext, node: Node, centred: np.ndarray, offset: np.ndarray | None) -> GemmPlan | None:
    """The int8 route's plan for x [rows, K] · centredᵀ, or None when it does not apply."""
    x = node.inputs[0].type
    if x.dtype not in EIGHT_BIT or not _int8_ok(centred):
        return None
    try:
        return plan_gemm(np.ascontiguousarray(centred.T).astype(np.int8), x.dtype, ctx.target, _guarantee_7bit(node),
                         offset)
    except ShapeError:  # the int32 accumulator could overflow: the wide route
        return None


def _emit_linear(module: ir.Module, name: str, plan: GemmPlan, rows: int, epilogue, operands: int,
                 threads: int) -> ir.Function:
    """`name(x, w, [residual], out, scratch, thread, threads)`: the int8 GEMM of plan over `rows` rows into
    `epilogue` (arguments out, [residual], channel0 = 0); threads share (panel, row chunk) units, each
    packing A (when the plan does) into its part of the per-thread scratch."""
    fn, builder, thread, count = new_parallel_kernel(module, name, operands)
    x, w, *rest, scratch = fn.args[:operands]
    a, lda, prepare = x, ir.Constant(I64, plan.k), None
    if plan.packs_a:
        own = thread_scratch(builder, scratch, thread, rows * plan.packed_row_bytes)
        pack = emit_plan_pack_a(module, f"{name}.pack_a", plan)
        prepare = lambda bld, _: bld.call(  # noqa: E731
            pack, [x, ir.Constant(I64, plan.k), ir.Constant(I64, rows), own])
        a, lda = own, ir.Constant(I64, plan.packed_row_bytes)
    tiles = TileEmitter(module, name, plan.route, plan.groups, plan.mr, epilogue, aligned=False)
    chunk = split_rows(rows, plan.mr, len(plan.weights.panels), threads)
    emit_shared_panels(builder, tiles, plan, a, lda, rows, w, [rest[-1], *rest[:-1], ir.Constant(I64, 0)], thread,
                       count, chunk, prepare)
    builder.ret_void()
    return fn


def _lower_amx_linear(ctx: LowerContext, node: Node, centred: np.ndarray, offset: np.ndarray, rows: int,
                      extra: list[Buffer]) -> bool:
    """qlinear on AMX tiles (`kernels.gemm_amx`) when the target has them and the product fills them; threads
    split the column blocks. False when the route does not apply."""
    x = node.inputs[0].type
    n, k = centred.shape
    if x.dtype not in EIGHT_BIT or not _int8_ok(centred) or not gemm_amx.worth(ctx.target, rows, n):
        return False
    plan = gemm_amx.plan_amx(np.ascontiguousarray(centred.T).astype(np.int8), x.dtype)
    requant, residual = requant_of(node), _residual(node)
    scratch_bytes = rows * plan.packed_row_bytes if plan.packs_a else 1

    def build(module: ir.Module, name: str) -> ir.Function:
        fn, builder, thread, threads = new_parallel_kernel(module, name, 4 + len(extra))
        xs, w, *rest, scratch = fn.args[:4 + len(extra)]
        epilogue = ProductEpilogue(module, name, gemm_amx.TILE, n, "col", requant, Corrections(_wrap32(offset)),
                                   residual)
        blocks = -(-n // (gemm_amx.BLOCK * gemm_amx.TILE))
        gemm_amx.emit_amx_linear(builder, plan, name, xs, ir.Constant(I64, k), ir.Constant(I64, rows),
                                 thread_scratch(builder, scratch, thread, scratch_bytes), w, epilogue,
                                 [rest[-1], *rest[:-1], ir.Constant(I64, 0)], share(builder, thread, threads, blocks))
        builder.ret_void()
        return fn

    key = ("qlinear.amx", rows, k, n, x.dtype, _wrap32(offset), requant, residual)
    ctx.call(ctx.kernel(key, build), [ctx.operand(0), ctx.constant(plan.data, "qlinear weights"), *extra,
                                      ctx.result(0), ctx.scratch(scratch_bytes, per_thread=True)], parallel=True)
    return True


@lowering("qlinear")
def lower_qlinear(ctx: LowerContext, node: Node) -> None:
    x = node.inputs[0].type
    n, k = node.inputs[1].type.shape
    rows = math.prod(x.shape[:-1])
    centred, bias, residual = _centred_weights(node), _bias(node, n), _residual(node)
    requant, zx = requant_of(node), x.quant.zero_point[0]
    bound = _bound(node, k, bias)
    if bound < INT32_LIMIT and lower_sparse_qlinear(ctx, node, centred, bias, requant, residual, bound):
        return
    extra = [ctx.operand(3)] if residual else []
    if bound < INT32_LIMIT and _lower_amx_linear(ctx, node, centred, bias - zx * centred.sum(axis=1), rows, extra):
        return
    plan = _linear_plan(ctx, node, centred, bias - zx * centred.sum(axis=1)) if bound < INT32_LIMIT else None
    if plan is not None:
        lanes = plan.route.lanes
        key = ("qlinear", rows, k, n, x.dtype, plan.route.name, plan.mr, plan.offset.tobytes(), requant, residual)
        build = lambda module, name: _emit_linear(module, name, plan, rows, ProductEpilogue(  # noqa: E731
            module, name, lanes, n, "col", requant, Corrections(_wrap32(plan.offset[:n])), residual), 4 + len(extra),
            ctx.num_threads)
        scratch = ctx.scratch(rows * plan.packed_row_bytes if plan.packs_a else 1, per_thread=True)
        ctx.call(ctx.kernel(key, build), [ctx.operand(0), ctx.constant(plan.weights.data, "qlinear weights"), *extra,
                                          ctx.result(0), scratch], parallel=True)
        return
    weights = np.ascontiguousarray(centred.T).astype(np.int32)
    lanes = _lanes(ctx)

    def build(module: ir.Module, name: str) -> ir.Function:
        fn, builder = new_kernel(module, name, 4 + len(extra))
        xs, w, *rest, _ = fn.args
        epilogue = ProductEpilogue(module, name, lanes, n, "col", requant, Corrections(tuple(bias.tolist())), residual)
        a = Side(builder.bitcast(xs, ll.element_type(x.dtype).as_pointer()), x.dtype, k, ir.Constant(I64, zx))
        b = Side(builder.bitcast(w, I32.as_pointer()), DType.i32, n, ir.Constant(I64, 0))
        emit_wide_gemm(builder, rows, n, k, a, b, epilogue, [rest[-1], *rest[:-1], ir.Constant(I64, 0)], lanes)
        builder.ret_void()
        return fn

    key = ("qlinear.wide", rows, k, n, x.dtype, zx, tuple(bias.tolist()), requant, residual)
    _call(ctx, key, build, [ctx.operand(0), ctx.constant(weights, "qlinear weights"), *extra, ctx.result(0),
                            ctx.scratch(1)])


# -- qconv2d ---------------------------------------------------------------------------------------------
def _conv_shape(node: Node) -> ConvShape:
    x, w, attrs = node.inputs[0].type, node.inputs[1].type, node.attrs
    return ConvShape(*x.shape, w.shape[0], attrs["group"], tuple(w.shape[2:]), tuple(attrs["strides"]),
                     tuple(attrs["pads"]), tuple(attrs["dilations"]), x.dtype, x.quant.zero_point[0])


@lowering("qconv2d")
def lower_qconv2d(ctx: LowerContext, node: Node) -> None:
    shape = _conv_shape(node)
    centred, bias, residual = _centred_weights(node), _bias(node, shape.m), _residual(node)
    requant = requant_of(node)
    bound = _bound(node, shape.reduction, bias)
    extra = [ctx.operand(3)] if residual else []
    out_bytes, vector_bytes = _out_bytes(node), ctx.target.vector_bytes
    # |int32 accumulators| before their offsets on the 8-bit routes: K products of (possibly flipped or
    # centred) 8-bit activations, at most 255, and centred int8 weights
    raw_bound = shape.reduction * 255 * 128 if shape.dtype in EIGHT_BIT else None

    def epilogue(module: ir.Module, name: str, lanes: int, offsets: np.ndarray) -> ProductEpilogue:
        return PairedEpilogue(module, name, lanes, shape.pixels, "row", requant, Corrections(_wrap32(offsets)),
                              residual, bound, raw_bound)

    residual_dtype = residual[0] if residual else None
    if shape.depthwise:
        lanes, wide = _lanes(ctx), bound >= INT32_LIMIT
        key = ("qconv.depthwise", shape, lanes, wide, tuple(bias.tolist()), requant, residual)
        build = lambda module, name: emit_depthwise(  # noqa: E731
            module, name, shape, lanes, wide, epilogue(module, name, lanes, bias), out_bytes, residual_dtype,
            vector_bytes)
        weights, scratch = centred.astype(np.int32), depthwise_scratch_bytes(shape, lanes)
    elif _int8_ok(centred) and bound < INT32_LIMIT and qconv_small.applies(ctx.target, shape):
        small = qconv_small.SmallConv(shape, qconv_small.route_for(ctx.target))
        offsets = bias - (shape.zero_point + small.shift) * centred.sum(axis=1)
        key = ("qconv.small", small, tuple(offsets.tolist()), requant, residual)
        build = lambda module, name: qconv_small.emit_small_conv(  # noqa: E731
            module, name, small, PairedEpilogue(module, name, small.route.lanes, shape.pixels, "row", requant,
                                                residual=residual, bound=bound), out_bytes, residual_dtype,
            vector_bytes)
        weights, scratch = qconv_small.pack_quads(centred, offsets, small), small.scratch_bytes
    elif shape.dtype in EIGHT_BIT and _int8_ok(centred) and bound < INT32_LIMIT \
            and gemm_amx.worth(ctx.target, shape.mg, shape.pixels):
        conv = qconv_amx.AmxConv(shape)
        offsets = bias - shape.zero_point * centred.sum(axis=1)
        key = ("qconv.amx", shape, tuple(offsets.tolist()), requant, residual)
        build = lambda module, name: qconv_amx.emit_amx_conv(  # noqa: E731
            module, name, conv, epilogue(module, name, gemm_amx.TILE, offsets), out_bytes, residual_dtype,
            vector_bytes, ctx.num_threads)
        ctx.call(ctx.kernel(key, build), [ctx.operand(0), ctx.constant(qconv_amx.pack_conv_weights(centred, conv),
                                                                       "qconv2d weights"),
                                          *extra, ctx.result(0), ctx.scratch(conv.scratch_bytes, per_thread=True)],
                 parallel=True)
        return
    elif shape.dtype in EIGHT_BIT and _int8_ok(centred) and bound < INT32_LIMIT:
        route = choose_route(ctx.target, np.ascontiguousarray(centred.T).astype(np.int8), _guarantee_7bit(node))
        mr, vectors = route.tile(ctx.target)
        conv = FastConv(shape, route, mr, vectors, activation_shift(route, shape.dtype, _guarantee_7bit(node)))
        offsets = bias - (shape.zero_point + conv.shift) * centred.sum(axis=1)
        key = ("qconv", conv, tuple(offsets.tolist()), requant, residual)
        build = lambda module, name: emit_fast_conv(  # noqa: E731
            module, name, conv, epilogue(module, name, route.lanes, offsets), out_bytes, residual_dtype, vector_bytes,
            ctx.num_threads)
        weights, scratch = pack_weight_rows(centred, route), conv.scratch_bytes
    else:
        lanes = _lanes(ctx)
        key = ("qconv.wide", shape, lanes, tuple(bias.tolist()), requant, residual)
        build = lambda module, name: emit_wide_conv(  # noqa: E731
            module, name, shape, lanes, epilogue(module, name, lanes, bias), out_bytes, residual_dtype, vector_bytes,
            ctx.num_threads)
        weights, scratch = centred.astype(np.int32), wide_scratch_bytes(shape)
    ctx.call(ctx.kernel(key, build), [ctx.operand(0), ctx.constant(weights, "qconv2d weights"), *extra,
                                      ctx.result(0), ctx.scratch(scratch, per_thread=True)], parallel=True)


# -- qmatmul ---------------------------------------------------------------------------------------------
def _batch(node: Node) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """The broadcast batch shape of a matmul node and per operand and result the byte strides of its
    matrices along each batch axis (0 where broadcast)."""
    a, b, y = (v.type for v in (*node.inputs[:2], node.outputs[0]))
    batch = y.shape[:-2]
    strides = []
    for t in (a, b, y):
        size = math.prod(t.shape[-2:]) * ll.element_bytes(ll.element_type(t.dtype))
        padded = (1,) * (len(batch) - (t.rank - 2)) + t.shape[:-2]
        inner, result = size, []
        for dim in reversed(padded):
            result.append(inner if dim > 1 else 0)
            inner *= dim
        strides.append(tuple(reversed(result)))
    return batch, strides


def _over_batch(builder: ir.IRBuilder, node: Node, pointers: list[ir.Value], body) -> None:
    """body(builder, [a, b, out] of one batch index) for every batch index."""
    batch, strides = _batch(node)
    loop_nest(builder, batch, [ir.Constant(I64, 0)] * 3, strides,
              lambda b, offsets: body(b, [b.gep(p, [o]) for p, o in zip(pointers, offsets)]))


def _column_table(module: ir.Module, name: str, values, element=I64) -> ir.Value:
    return ll.global_table(module, name, element, list(values) + [0] * 64)


def _i32(value: int | ir.Value) -> ir.Value:
    return value if isinstance(value, ir.Value) else ir.Constant(I32, value)


def _row_sums(builder: ir.IRBuilder, target, a: ir.Value, signed: bool, rows: int, k: int,
              coefficient: int | ir.Value, out: ir.Value) -> None:
    """out[m] = coefficient · Σ_k a[m, k] (int32, wrapping) for 8-bit rows of A; the coefficient a constant or
    a run-time i32."""
    lanes = ll.vector_lanes(target, I32)
    typed = builder.bitcast(a, I8.as_pointer())

    def row(b: ir.IRBuilder, m: ir.Value, carried: list) -> list:
        base = b.mul(m, ir.Constant(I64, k))

        def load(b2: ir.IRBuilder, offset: ir.Value, width: int) -> ir.Value:
            values = ll.load_vector(b2, typed, b2.add(base, offset), width)
            return (b2.sext if signed else b2.zext)(values, ll.vector(I32, width))

        total = reduce_row(b, k, lanes, load, lambda b2, u, v: b2.add(u, v),
                           lambda width: ir.Constant(ll.vector(I32, width), None))
        total = b.mul(b.extract_element(total, ir.Constant(I32, 0)), _i32(coefficient))
        b.store(total, b.gep(out, [m]))
        return carried

    ll.static_loop(builder, rows, "rowsum", row)


def _column_sums(builder: ir.IRBuilder, target, b_matrix: ir.Value, signed: bool, k: int, n: int,
                 coefficient: int | ir.Value, out: ir.Value, addend: ir.Value | None = None) -> None:
    """out[n] = coefficient · Σ_k B[k, n] (+ addend) (int32, wrapping) for an 8-bit row-major B; coefficient and
    addend constants or run-time i32."""
    lanes = ll.vector_lanes(target, I32)
    typed = builder.bitcast(b_matrix, I8.as_pointer())

    def chunk(b: ir.IRBuilder, column: ir.Value, width: int) -> None:
        def add(b2: ir.IRBuilder, i: ir.Value, carried: list) -> list:
            values = ll.load_vector(b2, typed, b2.add(b2.mul(i, ir.Constant(I64, n)), column), width)
            return [b2.add(carried[0], (b2.sext if signed else b2.zext)(values, ll.vector(I32, width)))]

        total, = ll.counted_loop(b, ir.Constant(I64, k), "k", [ir.Constant(ll.vector(I32, width), None)], add)
        scaled = b.mul(total, ll.splat(b, _i32(coefficient), width))
        if addend is not None:
            scaled = b.add(scaled, ll.splat(b, addend, width))
        ll.store_vector(b, scaled, out, column)

    ll.strip_mine(builder, ir.Constant(I64, 0), n, lanes, "colsum", chunk)


def _amx_product(node: Node, signed: tuple[bool, bool] | None = None) -> runtime_products.AmxProduct:
    a, b = node.inputs[0].type, node.inputs[1].type
    signed = signed or (a.dtype.is_signed, b.dtype.is_signed)
    return runtime_products.AmxProduct(*a.shape[-2:], b.shape[-1], *signed)


def _batch_count(node: Node) -> int:
    return math.prod(_batch(node)[0])


def _operands(node: Node, pointers: list[ir.Value], divisors: tuple[int, int, int] = (1, 1, 1)):
    """(builder, batch index) -> a, b, out of that index (`runtime_products.Operands`); byte strides divided
    by `divisors` (dynamic_matmul's quantized copies keep its float operands' layouts)."""
    batch, strides = _batch(node)
    strides = [tuple(s // d for s in axis) for axis, d in zip(strides, divisors)]
    return lambda bld, index: [bld.gep(p, [batch_offset(bld, index, batch, s)]) for p, s in zip(pointers, strides)]


def _matmul_int32(ctx: LowerContext, node: Node, bound: int, amx: bool) -> None:
    """qmatmul on AMX tiles or the int8 routes' register tiles (`kernels.runtime_products`): raw products of
    the operands as the tiles read them (shifted by sa, sb on the register tiles; none on AMX), then
    −(zb + sb)·Σa (rows), −(za + sa)·Σb (columns) and K·(za·zb − sa·sb) (compile-time offsets)."""
    a, b = node.inputs[0].type, node.inputs[1].type
    m, k = a.shape[-2:]
    n = b.shape[-1]
    product = _amx_product(node) if amx else \
        runtime_products.TileProduct.plan(ctx.target, m, k, n, a.dtype, b.dtype)
    shift_a, shift_b = (0, 0) if amx else (product.shift_a, product.shift_b)
    lanes = gemm_amx.TILE if amx else product.route.lanes
    za = a.quant.zero_point[0]
    zb = np.broadcast_to(np.asarray(b.quant.zero_point, np.int64), (n,))
    big_za, big_zb = za + shift_a, zb + shift_b
    constant = k * (za * zb - shift_a * shift_b)
    need_rows, need_cols = bool(big_zb.any()), big_za != 0
    uniform_zb = len(set(big_zb.tolist())) == 1
    # a constant that is one value joins the column sums when there are any (one addition less per vector)
    folded = need_cols and uniform_zb
    corrections = Corrections(_wrap32(constant) if constant.any() and not folded else None, need_cols, need_rows,
                              None if uniform_zb else _wrap32(-big_zb))
    requant = requant_of(node)
    # one requantization for the whole tensor: the paired sequence of `fast_requant` (written for channels
    # along rows; here every table holds one value)
    single = len(requant.multipliers) == 1 and len(requant.shifts) == 1 and uniform_zb

    def sums(bld: ir.IRBuilder, a_t: ir.Value, b_t: ir.Value, rows: ir.Value, cols: ir.Value) -> None:
        if need_cols:
            _column_sums(bld, ctx.target, b_t, b.dtype.is_signed, k, n, -int(big_za), cols,
                         ir.Constant(I32, _wrap32(constant[:1])[0]) if folded else None)
        if need_rows:
            _row_sums(bld, ctx.target, a_t, a.dtype.is_signed, m, k, -int(big_zb[0]) if uniform_zb else 1, rows)

    def build(module: ir.Module, name: str) -> ir.Function:
        fn, builder, thread, threads = new_parallel_kernel(module, name, 4)
        a_ptr, b_ptr, out, scratch = fn.args[:4]
        epilogue = PairedEpilogue(module, name, lanes, n, "row", requant, corrections, bound=bound) if single \
            else ProductEpilogue(module, name, lanes, n, "col", requant, corrections)
        common = (builder, name, product, _batch_count(node), _operands(node, [a_ptr, b_ptr, out]), sums,
                  thread_scratch(builder, scratch, thread, product.scratch_bytes), epilogue,
                  lambda out_t, rows, cols: [out_t, ir.Constant(I64, 0)] + [cols] * need_cols + [rows] * need_rows,
                  thread, threads)
        runtime_products.emit_product(amx, ctx.num_threads, *common)
        builder.ret_void()
        return fn

    key = ("qmatmul", a.shape, b.shape, a.dtype, b.dtype, za, tuple(zb.tolist()), requant,
           "amx" if amx else product.route.name)
    ctx.call(ctx.kernel(key, build), [ctx.operand(0), ctx.operand(1), ctx.result(0),
                                      ctx.scratch(product.scratch_bytes, per_thread=True)], parallel=True)


def _matmul_wide(ctx: LowerContext, node: Node) -> None:
    a, b = node.inputs[0].type, node.inputs[1].type
    m, k = a.shape[-2:]
    n = b.shape[-1]
    za, zb = a.quant.zero_point[0], tuple(np.broadcast_to(np.asarray(b.quant.zero_point), (n,)).tolist())
    requant, lanes = requant_of(node), _lanes(ctx)

    def build(module: ir.Module, name: str) -> ir.Function:
        fn, builder = new_kernel(module, name, 3)
        epilogue = ProductEpilogue(module, name, lanes, n, "col", requant)
        columns = None if len(set(zb)) == 1 else _column_table(module, f"{name}.zb", zb)

        def one(bld: ir.IRBuilder, pointers: list[ir.Value]) -> None:
            a_t, b_t, out_t = pointers
            lhs = Side(bld.bitcast(a_t, ll.element_type(a.dtype).as_pointer()), a.dtype, k, ir.Constant(I64, za))
            rhs = Side(bld.bitcast(b_t, ll.element_type(b.dtype).as_pointer()), b.dtype, n, ir.Constant(I64, zb[0]),
                       columns)
            emit_wide_gemm(bld, m, n, k, lhs, rhs, epilogue, [out_t, ir.Constant(I64, 0)], lanes)

        _over_batch(builder, node, list(fn.args), one)
        builder.ret_void()
        return fn

    key = ("qmatmul.wide", a.shape, b.shape, a.dtype, b.dtype, za, zb, requant)
    _call(ctx, key, build, [ctx.operand(0), ctx.operand(1), ctx.result(0)])


@lowering("qmatmul")
def lower_qmatmul(ctx: LowerContext, node: Node) -> None:
    a, b = node.inputs[0].type, node.inputs[1].type
    bound = quant_math.accumulator_bound(a.dtype, a.quant.zero_point, b.dtype, b.quant.zero_point, a.shape[-1])
    if a.dtype in EIGHT_BIT and b.dtype in EIGHT_BIT and bound < INT32_LIMIT:
        _matmul_int32(ctx, node, bound, gemm_amx.worth(ctx.target, a.shape[-2], b.shape[-1]))
    else:
        _matmul_wide(ctx, node)


# -- dynamic quantization ----------------------------------------------------------------------------------
def _require_f32(node: Node, *indices: int) -> None:
    if any(node.inputs[i].type.dtype is not DType.f32 for i in indices if _has(node, i)):
        raise UnsupportedOpError(f"{node.describe()}: the native backend computes {node.op} in float32 only")


@lowering("dynamic_linear")
def lower_dynamic_linear(ctx: LowerContext, node: Node) -> None:
    """Quantize x at run time (min/max pass, then u8), the integer product, then float32(acc) · float32(sx·sw)
    + bias."""
    _require_f32(node, 0, 2)
    x = node.inputs[0].type
    n, k = node.inputs[1].type.shape
    rows, count = math.prod(x.shape[:-1]), x.size
    centred, has_bias = _centred_weights(node), _has(node, 2)
    w_scales = np.broadcast_to(np.asarray(node.inputs[1].type.quant.scale, np.float32), (n,))
    amx, plan = None, None
    try:  # (a ShapeError: the int32 accumulator could overflow, the wide route)
        if _int8_ok(centred) and gemm_amx.worth(ctx.target, rows, n):
            amx = gemm_amx.plan_amx(np.ascontiguousarray(centred.T).astype(np.int8), DType.u8)
        elif _int8_ok(centred):
            plan = plan_gemm(np.ascontiguousarray(centred.T).astype(np.int8), DType.u8, ctx.target)
    except ShapeError:
        pass
    lanes = gemm_amx.TILE if amx is not None else plan.route.lanes if plan is not None else _lanes(ctx)
    int8 = amx or plan
    row_bytes = int8.packed_row_bytes if int8 is not None and int8.packs_a else 0
    sizes = [count, rows * row_bytes, 4 * n + 256, 4 * n + 256]
    starts = np.cumsum([0] + [-(-size // 64) * 64 for size in sizes]).tolist()
    sums = column_sums(centred.T)

    def build(module: ir.Module, name: str) -> ir.Function:
        """Every thread quantizes x (and packs it) into its own scratch; threads share the AMX route's column
        blocks or the int8 route's (panel, row chunk) units; the wide route runs on thread 0."""
        fn, builder, thread, threads = new_parallel_kernel(module, name, 4 + has_bias)
        xs, w, *rest, scratch = fn.args[:4 + has_bias]
        own = thread_scratch(builder, scratch, thread, starts[-1])
        q, packed, corrections, factors = (builder.gep(own, [ir.Constant(I64, s)]) for s in starts[:4])
        scale, zero_point = emit_dynamic_quantize(builder, ctx.target, builder.bitcast(xs, F32.as_pointer()), count, q)
        corrections = builder.bitcast(corrections, I32.as_pointer())
        factors_f = builder.bitcast(factors, F32.as_pointer())
        sum_table = _column_table(module, f"{name}.colsum", _wrap32(sums), I32)
        scale_table = _column_table(module, f"{name}.scale", w_scales.tolist(), F32)
        minus_zp = builder.trunc(builder.neg(zero_point), I32)

        def column(b: ir.IRBuilder, index: ir.Value, width: int) -> None:
            ll.store_vector(b, b.mul(ll.load_vector(b, sum_table, index, width), ll.splat(b, minus_zp, width)),
                            corrections, index)
            ll.store_vector(b, b.fmul(ll.splat(b, scale, width), ll.load_vector(b, scale_table, index, width)),
                            factors_f, index)

        ll.strip_mine(builder, ir.Constant(I64, 0), n, ll.vector_lanes(ctx.target, F32), "column", column)
        args = [rest[-1], factors, *rest[:-1]]  # out, factors, [bias]
        if amx is not None:
            epilogue = FloatEpilogue(module, name, lanes, n, Corrections(col_sums=True), False, has_bias)
            blocks = -(-n // (gemm_amx.BLOCK * gemm_amx.TILE))
            gemm_amx.emit_amx_linear(builder, amx, name, q, ir.Constant(I64, k), ir.Constant(I64, rows), packed, w,
                                     epilogue, [*args, ir.Constant(I64, 0), corrections],
                                     share(builder, thread, threads, blocks))
        elif plan is not None:
            epilogue = FloatEpilogue(module, name, lanes, n, Corrections(
                _wrap32(plan.offset[:n]) if plan.offset is not None else None, col_sums=True), False, has_bias)
            a, lda = q, ir.Constant(I64, k)
            if plan.packs_a:
                builder.call(emit_plan_pack_a(module, f"{name}.pack_a", plan), [q, lda, ir.Constant(I64, rows), packed])
                a, lda = packed, ir.Constant(I64, plan.packed_row_bytes)
            tiles = TileEmitter(module, name, plan.route, plan.groups, plan.mr, epilogue, aligned=False)
            emit_shared_panels(builder, tiles, plan, a, lda, rows, w, [*args, ir.Constant(I64, 0), corrections], thread,
                               threads, split_rows(rows, plan.mr, len(plan.weights.panels), ctx.num_threads))
        else:
            epilogue = FloatEpilogue(module, name, lanes, n, Corrections(), False, has_bias)
            lhs = Side(q, DType.u8, k, zero_point)
            rhs = Side(builder.bitcast(w, I32.as_pointer()), DType.i32, n, ir.Constant(I64, 0))
            with builder.if_then(builder.icmp_unsigned("==", thread, ir.Constant(I32, 0))):
                emit_wide_gemm(builder, rows, n, k, lhs, rhs, epilogue, [*args, ir.Constant(I64, 0)], lanes)
        builder.ret_void()
        return fn

    if amx is not None:
        weights = ctx.constant(amx.data, "dynamic_linear weights")
        key = ("dynamic_linear.amx", x.shape, n, sums.tobytes(), tuple(w_scales.tolist()), has_bias)
    elif plan is not None:
        weights = ctx.constant(plan.weights.data, "dynamic_linear weights")
        key = ("dynamic_linear", x.shape, n, plan.route.name, plan.mr, plan.offset.tobytes() if plan.offset is not None
               else None, sums.tobytes(), tuple(w_scales.tolist()), has_bias)
    else:
        weights = ctx.constant(np.ascontiguousarray(centred.T).astype(np.int32), "dynamic_linear weights")
        key = ("dynamic_linear.wide", x.shape, n, tuple(w_scales.tolist()), has_bias)
    bias = [ctx.operand(2)] if has_bias else []
    ctx.call(ctx.kernel(key, build), [ctx.operand(0), weights, *bias, ctx.result(0),
                                      ctx.scratch(starts[-1], per_thread=True)], parallel=True)


def _dynamic_matmul_int32(ctx: LowerContext, node: Node, amx: bool) -> None:
    """dynamic_matmul on AMX tiles or the int8 routes' register tiles (`kernels.runtime_products`): every
    thread quantizes both operands into its own scratch (the scales are reductions over whole tensors), then
    threads share the product's units. The raw sums of the u8 copies (converted by the route's shifts
    sa, sb; none on AMX) are corrected by −(zb + sb)·Σa (rows) and −(za + sa)·Σb + K·(za·zb − sa·sb)
    (columns), run-time values."""
    a, b = node.inputs[0].type, node.inputs[1].type
    m, k = a.shape[-2:]
    n = b.shape[-1]
    product = _amx_product(node, (False, False)) if amx else \
        runtime_products.TileProduct.plan(ctx.target, m, k, n, DType.u8, DType.u8)
    shift_a, shift_b = (0, 0) if amx else (product.shift_a, product.shift_b)
    lanes = gemm_amx.TILE if amx else product.route.lanes
    starts = np.cumsum([0] + [-(-size // 64) * 64 for size in (a.size, b.size, 64, product.scratch_bytes)]).tolist()

    def build(module: ir.Module, name: str) -> ir.Function:
        fn, builder, thread, threads = new_parallel_kernel(module, name, 4)
        a_ptr, b_ptr, out, scratch = fn.args[:4]
        own = thread_scratch(builder, scratch, thread, starts[-1])
        qa, qb, factor, rest = (builder.gep(own, [ir.Constant(I64, s)]) for s in starts[:4])
        sa, za = emit_dynamic_quantize(builder, ctx.target, builder.bitcast(a_ptr, F32.as_pointer()), a.size, qa)
        sb, zb = emit_dynamic_quantize(builder, ctx.target, builder.bitcast(b_ptr, F32.as_pointer()), b.size, qb)
        builder.store(builder.fmul(sa, sb), builder.bitcast(factor, F32.as_pointer()))
        za, zb = builder.trunc(za, I32), builder.trunc(zb, I32)
        constant = builder.mul(builder.sub(builder.mul(za, zb), ir.Constant(I32, shift_a * shift_b)),
                               ir.Constant(I32, k))
        epilogue = FloatEpilogue(module, name, lanes, n, Corrections(col_sums=True, row_sums=True), True, False)

        def sums(bld: ir.IRBuilder, a_t: ir.Value, b_t: ir.Value, rows: ir.Value, cols: ir.Value) -> None:
            _column_sums(bld, ctx.target, b_t, False, k, n, bld.neg(bld.add(za, ir.Constant(I32, shift_a))), cols,
                         constant)
            _row_sums(bld, ctx.target, a_t, False, m, k, bld.neg(bld.add(zb, ir.Constant(I32, shift_b))), rows)

        # the quantized copies keep the operands' layouts: their byte strides are the f32 ones / 4
        common = (builder, name, product, _batch_count(node), _operands(node, [qa, qb, out], (4, 4, 1)), sums, rest,
                  epilogue, lambda out_t, rows, cols: [out_t, factor, ir.Constant(I64, 0), cols, rows], thread,
                  threads)
        runtime_products.emit_product(amx, ctx.num_threads, *common)
        builder.ret_void()
        return fn

    key = ("dynamic_matmul.int32", a.shape, b.shape, "amx" if amx else product.route.name)
    ctx.call(ctx.kernel(key, build), [ctx.operand(0), ctx.operand(1), ctx.result(0),
                                      ctx.scratch(starts[-1], per_thread=True)], parallel=True)


@lowering("dynamic_matmul")
def lower_dynamic_matmul(ctx: LowerContext, node: Node) -> None:
    """Both operands quantized at run time (u8, run-time zero points), the integer product, then
    float32(acc) · float32(sa·sb). |acc| ≤ K·255² whatever the zero points: below 2^31, the int32 routes are
    exact; deeper products take the wide route (int64 lanes)."""
    _require_f32(node, 0, 1)
    a, b = node.inputs[0].type, node.inputs[1].type
    m, k = a.shape[-2:]
    n = b.shape[-1]
    bound = quant_math.accumulator_bound(DType.u8, (0, 255), DType.u8, (0, 255), k)
    if bound < INT32_LIMIT:
        _dynamic_matmul_int32(ctx, node, gemm_amx.worth(ctx.target, m, n))
        return
    lanes = _lanes(ctx)
    starts = np.cumsum([0] + [-(-size // 64) * 64 for size in (a.size, b.size, 64)]).tolist()

    def build(module: ir.Module, name: str) -> ir.Function:
        fn, builder = new_kernel(module, name, 4)
        a_ptr, b_ptr, out, scratch = fn.args
        qa, qb, factor = (builder.gep(scratch, [ir.Constant(I64, s)]) for s in starts[:3])
        sa, za = emit_dynamic_quantize(builder, ctx.target, builder.bitcast(a_ptr, F32.as_pointer()), a.size, qa)
        sb, zb = emit_dynamic_quantize(builder, ctx.target, builder.bitcast(b_ptr, F32.as_pointer()), b.size, qb)
        builder.store(builder.fmul(sa, sb), builder.bitcast(factor, F32.as_pointer()))
        epilogue = FloatEpilogue(module, name, lanes, n, Corrections(), True, False)
        # the quantized copies keep the operands' layouts: their byte strides are the f32 ones / 4
        batch, strides = _batch(node)

        def one(bld: ir.IRBuilder, offsets: list[ir.Value]) -> None:
            a_off, b_off, out_off = offsets
            lhs = Side(bld.gep(qa, [bld.udiv(a_off, ir.Constant(I64, 4))]), DType.u8, k, za)
            rhs = Side(bld.gep(qb, [bld.udiv(b_off, ir.Constant(I64, 4))]), DType.u8, n, zb)
            emit_wide_gemm(bld, m, n, k, lhs, rhs, epilogue, [bld.gep(out, [out_off]), factor, ir.Constant(I64, 0)],
                           lanes)

        loop_nest(builder, batch, [ir.Constant(I64, 0)] * 3, strides, one)
        builder.ret_void()
        return fn

    key = ("dynamic_matmul", a.shape, b.shape)
    _call(ctx, key, build, [ctx.operand(0), ctx.operand(1), ctx.result(0), ctx.scratch(starts[-1])])
