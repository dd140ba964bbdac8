"""Native float32 products (linear, matmul, attention) against the reference interpreter.

Float results match within rtol 1e-4 and atol 1e-5·max|reference| (the kernels fuse multiply-adds and
sum in another order than BLAS). Sizes include 1, primes and non-multiples of every vector width and
register tile, so every edge tile and masked edge vector runs.
"""
from __future__ import annotations

import sys
from pathlib import Path
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.backends.native import Target
from lowbit.ir import DType, Graph, TensorType
from lowbit.kernels import gemm_f32
from lowbit.kernels.llvm import emit_assembly, new_module

sys.path.insert(0, str(Path(__file__).parent))  # float_cases: shared with the conv tests
from float_cases import TARGETS, check  # noqa: E402

# The host, and AVX2's narrower vectors and smaller tile where the host can run them.
RNG = np.random.default_rng(11)
SIZES = st.sampled_from([1, 2, 3, 5, 7, 8, 12, 13, 16, 17, 31, 32, 33, 47, 64, 97])
ACTIVATIONS = [("none", ()), ("relu", ()), ("clip", (-0.5, 0.75)), ("leaky_relu", (0.1,)), ("sigmoid", ()),
               ("hard_swish", ())]


def f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)



def inputs(graph: Graph, **arrays: np.ndarray):
    return [graph.add_input(name, TensorType(array.shape, DType.f32)) for name, array in arrays.items()]


@settings(max_examples=20, deadline=None)
@given(rows=SIZES, n=SIZES, k=SIZES, lead=st.sampled_from([(), (2,)]), bias=st.booleans(),
       residual=st.booleans(), activation=st.sampled_from(ACTIVATIONS), constant=st.booleans(), target=TARGETS)
def test_linear(rows, n, k, lead, bias, residual, activation, constant, target):
    x, w = f32(*lead, rows, k), f32(n, k)
    feeds = {"x": x} if constant else {"x": x, "w": w}
    graph = Graph("linear")
    weights = graph.add_constant(w) if constant else inputs(graph, w=w)[0]
    b = graph.add_constant(f32(n)) if bias else None
    r = None
    if residual:
        feeds["r"] = f32(*lead, rows, n)
        r = inputs(graph, r=feeds["r"])[0]
    name, params = activation
    y = graph.add("linear", graph.add_input("x", TensorType(x.shape, DType.f32)), weights, b, r,
                  activation=name, activation_params=params)
    graph.set_outputs([("y", y)])
    check(graph, feeds, target)


@settings(max_examples=15, deadline=None)
@given(m=SIZES, n=SIZES, k=SIZES, batches=st.sampled_from([((), ()), ((3,), ()), ((), (2,)), ((2, 1), (3,)),
                                                             ((1, 2), (2, 1))]),
       constant=st.booleans(), target=TARGETS)
def test_matmul(m, n, k, batches, constant, target):
    a, b = f32(*batches[0], m, k), f32(*batches[1], k, n)
    graph = Graph("matmul")
    a_value, = inputs(graph, a=a)
    b_value = graph.add_constant(b) if constant else inputs(graph, b=b)[0]
    graph.set_outputs([("y", graph.add("matmul", a_value, b_value))])
    check(graph, {"a": a} if constant else {"a": a, "b": b}, target)


def test_matmul_vectors():
    """1-D operands: a row on the left, a column on the right, dropped from the result."""
    a, b, v = f32(2, 3, 7, 19), f32(19, 33), f32(19)
    graph = Graph("vectors")
    a_value, b_value, v_value = inputs(graph, a=a, b=b, v=v)
    graph.set_outputs([("av", graph.add("matmul", a_value, v_value)), ("vb", graph.add("matmul", v_value, b_value)),
                       ("vv", graph.add("matmul", v_value, v_value))])
    check(graph, {"a": a, "b": b, "v": v})


# mask shapes; 0 stands for the score axis' size (sq or sk)
MASKS = [None, (1, 1, 1, 0), (2, 1, 1, 0), (1, 1, 0, 0), (2, 4, 0, 0), (0, 0), (2, 1, 0, 1)]


@settings(max_examples=12, deadline=None)
@given(sq=SIZES, sk=SIZES, d=st.sampled_from([1, 8, 17, 64]), dv=st.sampled_from([1, 8, 19, 64]),
       mask=st.sampled_from(MASKS), zero_nan=st.booleans(), shared_kv=st.booleans(), target=TARGETS)
def test_attention(sq, sk, d, dv, mask, zero_nan, shared_kv, target):
    q, k_t, v = f32(2, 4, sq, d), f32(1 if shared_kv else 2, 4, d, sk), f32(4, sk, dv)
    feeds = {"q": q, "k": k_t, "v": v}
    graph = Graph("attention")
    operands = inputs(graph, **feeds)
    if mask is not None:
        shape = tuple(size or (sq, sk)[i - len(mask) + 2] for i, size in enumerate(mask))
        # -inf entries: fully masked rows give NaN, or 0 with zero_nan_probs
        feeds["m"] = np.where(RNG.random(shape) < 0.3, -np.inf, RNG.standard_normal(shape)).astype(np.float32)
        operands += inputs(graph, m=feeds["m"])
    graph.set_outputs([("o", graph.add("attention", *operands, scale=0.3, zero_nan_probs=zero_nan))])
    got, want = lowbit.compile(graph, target).run(feeds)["o"], lowbit.run_reference(graph, feeds)["o"]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-4, atol=1e-5 * np.abs(want[finite]).max(initial=1))


def test_long_attention_blocks():
    """More score rows than one block holds: the rows are processed block by block."""
    sq, sk = 200, 2000
    q, k_t, v = f32(1, sq, 16), f32(1, 16, sk), f32(1, sk, 24)
    graph = Graph("long")
    graph.set_outputs([("o", graph.add("attention", *inputs(graph, q=q, k=k_t, v=v), scale=0.25))])
    assert gemm_f32.AttentionSpec((1,), (0,), (0,), (0,), sq, 16, sk, 24, 0.25,
                                  gemm_f32.default_tile(Target.host())).block < sq
    check(graph, {"q": q, "k": k_t, "v": v})


def test_gemm_512_matches_numpy():
    a, b = f32(512, 512), f32(512, 512)
    graph = Graph("big")
    graph.set_outputs([("y", graph.add("matmul", *inputs(graph, a=a, b=b)))])
    got = lowbit.compile(graph).run({"a": a, "b": b})["y"]
    np.testing.assert_allclose(got, a @ b, rtol=1e-4, atol=1e-4 * np.abs(a @ b).max())


def _gemm_assembly(target: Target) -> str:
    tile = gemm_f32.default_tile(target)
    module = new_module("gemm", target)
    spec = gemm_f32.Batched(gemm_f32.GemmSpec(29, 37, tile, 41, lda=37,
                                              epilogue=gemm_f32.Epilogue(bias="col", activation="relu")),
                            41, has_bias=True)
    gemm_f32.emit_batched_gemm(module, spec, "gemm").linkage = "external"
    return emit_assembly(module, target)


@pytest.mark.parametrize("name, instruction", [("x86_64-avx2", "vfmadd231ps\t%ymm"),
                                               ("x86_64-avx512vnni", "vfmadd231ps\t%zmm"),
                                               ("aarch64", "fmla\tv"), ("aarch64-dotprod", "fmla\tv")])
def test_tile_instructions(name, instruction):
    """The register tile is FMAs on full vectors for every target (AArch64: compiled, not run)."""
    assembly = _gemm_assembly(Target.named(name))
    assert assembly.count(instruction) >= 24
