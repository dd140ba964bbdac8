"""`fast_requant.PairedEpilogue` (the even/odd int64 requantization of "row" epilogues) against the rounding
of docs/quantization.md computed with Python integers: accumulators and per-channel offsets up to their
bounds (folded into the rounding terms or not), shifts below, at and above 32 and outside the paired range,
residual terms, every result type, partial vectors."""
from __future__ import annotations

import ctypes

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from llvmlite import ir

from lowbit.backends.native import Target
from lowbit.ir.dtypes import DType
from lowbit.kernels import llvm as ll
from lowbit.kernels.fast_requant import PairedEpilogue, applies
from lowbit.kernels.llvm import I8, I32, I64
from lowbit.kernels.requantize import Corrections, Requant

LANES = 16
RANGES = {DType.i8: (-128, 127), DType.u8: (0, 255), DType.i16: (-32768, 32767), DType.i32: (-2**31, 2**31 - 1)}


def reference(acc: np.ndarray, requant: Requant, residual: np.ndarray | None, residual_zp: int) -> np.ndarray:
    rows = []
    for c, values in enumerate(acc.tolist()):
        m, s = requant.multipliers[c], requant.shifts[c]
        out = []
        for i, a in enumerate(values):
            total = a * m + ((int(residual[c, i]) - residual_zp) * requant.residual_multipliers[c]
                             if residual is not None else 0)
            q = requant.zero_point + ((total + ((1 << s) >> 1)) >> s)
            out.append(min(max(q, requant.qmin), requant.qmax))
        rows.append(out)
    return np.array(rows, requant.dtype.numpy)


@st.composite
def cases(draw) -> dict:
    channels = draw(st.integers(1, 4))
    out = draw(st.sampled_from(list(RANGES)))
    low, high = RANGES[out]
    paired = draw(st.booleans())
    shifts = tuple(draw(st.integers(20, 44) if paired else st.integers(0, 50)) for _ in range(channels))
    zero_point = draw(st.integers(max(low, -1000), min(high, 1000)))
    qmin = draw(st.sampled_from([low, zero_point]))
    residual = draw(st.sampled_from([None, DType.u8, DType.i16]))
    return dict(channels=channels, out=out, shifts=shifts, zero_point=zero_point, qmin=qmin, qmax=high,
                multipliers=tuple(draw(st.integers(0, 2**31 - 1)) for _ in range(channels)),
                residual_multipliers=tuple(draw(st.integers(0, 2**31 - 1)) for _ in range(channels))
                if residual else (), residual=residual, valid=draw(st.sampled_from([1, 7, 16])),
                bound=draw(st.sampled_from([2**12, 2**20, 2**24, 2**31])),
                raw_bound=draw(st.sampled_from([None, 2**10, 2**20, 2**26])),
                seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=80, deadline=None)
@given(cases())
def test_paired_epilogue_is_exact(case: dict) -> None:
    target = Target.host()
    requant = Requant(case["multipliers"], case["shifts"], case["zero_point"], case["qmin"], case["qmax"], case["out"],
                      case["residual_multipliers"])
    channels, residual = case["channels"], case["residual"]
    residual_spec = (residual, 3) if residual else None
    module = ll.new_module("paired", target)
    pointer = I8.as_pointer()
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [pointer, pointer, pointer]), "run")
    fn.linkage = "external"
    acc_bytes, res_bytes, out_bytes = fn.args
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    rng = np.random.default_rng(case["seed"])
    bound = min(case["bound"], 2**31 - 1)
    raw_bound = min(case["raw_bound"] or bound, bound // 2)
    offsets = tuple(int(v) for v in rng.integers(-(bound // 2), bound // 2 + 1, channels))
    epilogue = PairedEpilogue(module, "paired", LANES, LANES, "row", requant, Corrections(offsets),
                              residual=residual_spec, bound=case["bound"], raw_bound=case["raw_bound"] and raw_bound)
    assert epilogue.paired == applies(requant, "row", LANES, residual_spec, case["bound"])
    accs = builder.bitcast(acc_bytes, ll.vector(I32, LANES).as_pointer())
    for c in range(channels):
        acc = builder.load(builder.gep(accs, [ir.Constant(I64, c)]), align=4)
        args = [out_bytes] + ([res_bytes] if residual else []) + [ir.Constant(I64, 0)]
        epilogue.emit(builder, [[acc]], ir.Constant(I64, c), ir.Constant(I64, 0), case["valid"], args)
    builder.ret_void()
    jit = ll.JitModule(module, target)
    raw = rng.integers(-raw_bound, raw_bound + 1, (channels, LANES), dtype=np.int64)
    raw[0, :4] = [-raw_bound, raw_bound, 0, -1]  # (with the offsets: |acc| ≤ bound)
    acc = raw.astype(np.int32)
    low, high = RANGES.get(residual, (0, 0)) if residual else (0, 0)
    r = rng.integers(low, high + 1, (channels, LANES)).astype(residual.numpy) if residual else np.zeros(1, np.int8)
    out = np.zeros((channels, LANES), case["out"].numpy)
    jit.function("run", None, *[ctypes.c_void_p] * 3)(acc.ctypes.data, r.ctypes.data, out.ctypes.data)
    want = reference(raw + np.array(offsets)[:, None], requant, r if residual else None, 3)
    valid = case["valid"]
    np.testing.assert_array_equal(out[:, :valid], want[:, :valid])
    assert not out[:, valid:].any()  # nothing stored past the valid lanes
