"""The float islands of quantized models against the reference interpreter, bit for bit.

Native softmax and layer norm compute the reference's operations in its order (numpy's float32 exp,
numpy's pairwise summation, divisions rather than products with reciprocals), and a float chain on one
small integer (dequantize → GELU / tanh / ... → quantize) is a table built from the reference's own
functions (`lowerings.lookup`). So on a host where numpy runs its SIMD float32 exp (x86 with AVX2 + FMA or
AVX-512F) a quantized transformer runs natively with the very same integers and floats as in the
reference. Where numpy calls libm's expf instead, softmax's exp may differ by up to 3 ulp; one such
difference can flip a rounding step of the next quantize, so there the models are only checked within
the tolerance of tests/backends/native/test_quantized.py (rtol 1e-4).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.backends.native import Target
from lowbit.backends.native.compiler import Program
from lowbit.backends.reference import run_reference
from lowbit.ir import DType, Graph, TensorType
from lowbit.ir.types import QuantParams

DATA = Path(__file__).resolve().parents[2] / "data"
NUMPY_SIMD_EXP = Target.host().has("avx2", "fma")  # numpy's own float32 exp (else libm's expf)
LENGTHS = st.one_of(st.integers(1, 40), st.sampled_from([61, 97, 127, 128, 129, 136, 257, 384, 1000, 2053]))


def assert_same(got: np.ndarray, want: np.ndarray, name: str, exact: bool = True) -> None:
    if exact:
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8), err_msg=name)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)


def _bert(name: str) -> tuple[Graph, list[dict]]:
    graph = lowbit.import_onnx(DATA / name, batch_size=2, dims={"sequence": 16})
    rng = np.random.default_rng(0)
    names = {v.name for v in graph.inputs}

    def feeds() -> dict:
        mask = np.ones((2, 16), np.int64)
        mask[1, rng.integers(4, 16):] = 0
        result = {"input_ids": rng.integers(0, 100, (2, 16)).astype(np.int64), "attention_mask": mask}
        if "token_type_ids" in names:
            result["token_type_ids"] = np.zeros((2, 16), np.int64)
        return result

    return lowbit.quantize(graph, [feeds() for _ in range(4)], progress=False), [feeds() for _ in range(3)]


@pytest.mark.parametrize("model", ["torch_bert_tiny_classic.onnx", "torch_bert_tiny.onnx"])
def test_quantized_bert_matches_the_reference_bit_for_bit(model: str) -> None:
    quantized, samples = _bert(model)
    ops = {node.op for node in quantized.nodes}
    assert {"softmax", "layer_norm", "gelu", "qmatmul", "qlinear"} <= ops
    compiled = lowbit.compile(quantized)
    for feeds in samples:
        got, want = compiled.run(feeds), run_reference(quantized, feeds)
        for name in want:
            assert_same(got[name], want[name], name, exact=NUMPY_SIMD_EXP)


def test_quantized_bert_gelu_and_tanh_are_lookups() -> None:
    quantized, _ = _bert("torch_bert_tiny_classic.onnx")
    """GELU between a 16-bit linear result and an 8-bit quantize: one lookup at the quantize; the pooler's
    tanh of a 16-bit linear result (a graph output): one lookup in a float32 table."""
    ops = {node.describe(): node.op for node in quantized.nodes}
    calls = Program(quantized, Target.host()).calls
    called = [ops.get(call.node) for call in calls]
    assert "gelu" not in called and called.count("tanh") == 1 and {"softmax", "layer_norm"} <= set(called)
    tanh = calls[called.index("tanh")]
    assert tanh.buffers[1].kind == "weights" and tanh.buffers[1].nbytes == (1 << 16) * 4 + 3


def _single(op: str, shape: tuple[int, ...], **attrs) -> Graph:
    graph = Graph(op)
    x = graph.add_input("x", TensorType(shape, DType.f32))
    operands = [x]
    if op == "layer_norm":
        rng = np.random.default_rng(len(shape))
        operands += [graph.add_constant(rng.standard_normal(shape[-1:]).astype(np.float32), "scale"),
                     graph.add_constant(rng.standard_normal(shape[-1:]).astype(np.float32), "bias")]
    graph.set_outputs([("y", graph.add(op, *operands, **attrs))])
    return graph


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 5), length=LENGTHS, spread=st.sampled_from([0.1, 3.0, 40.0]), masked=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_softmax_is_the_references(rows: int, length: int, spread: float, masked: bool, seed: int) -> None:
    """Including rows where most entries are -3.4e38 (an attention mask): exp underflows to 0 there, and
    entries within about 104 of the maximum give subnormal probabilities, as numpy's do."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, length)) * spread).astype(np.float32)
    if masked:
        x[:, rng.random(length) < 0.7] = np.float32(-3.4028235e38)
    graph = _single("softmax", (rows, length))
    assert_same(lowbit.compile(graph).run({"x": x})["y"], run_reference(graph, {"x": x})["y"], "softmax",
                exact=NUMPY_SIMD_EXP)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 5), length=LENGTHS, offset=st.sampled_from([0.0, 1.0, 100.0]), seed=st.integers(0, 2 ** 16))
def test_layer_norm_is_the_references(rows: int, length: int, offset: float, seed: int) -> None:
    """No exp here: the same sums in the same order and IEEE division and sqrt give identical results on any
    host."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, length)) * 3 + offset).astype(np.float32)
    graph = _single("layer_norm", (rows, length), epsilon=1e-12)
    assert_same(lowbit.compile(graph).run({"x": x})["y"], run_reference(graph, {"x": x})["y"], "layer_norm")


CHAINS = {
    "gelu": [("gelu", {})],
    "tanh": [("tanh", {})],
    "scaled sigmoid": [("mul", {"constant": 0.75}), ("sigmoid", {})],
    "erf": [("erf", {})],
}


def _chain_graph(source: DType, size: int, chain: str, quantize_to: DType | None, scale: float) -> Graph:
    graph = Graph("chain")
    info = np.iinfo(source.numpy)
    zero_point = 3 if source.is_signed else int(info.max + 1) // 2
    x = graph.add_input("x", TensorType((size,), source, QuantParams((scale,), (zero_point,), bits=source.bits,
                                                                     signed=source.is_signed)))
    value = graph.add("dequantize", x)
    for op, attrs in CHAINS[chain]:
        if "constant" in attrs:
            value = graph.add(op, value, graph.add_constant(np.array([attrs["constant"]], np.float32), "c"))
        else:
            value = graph.add(op, value, **attrs)
    if quantize_to is not None:
        qinfo = np.iinfo(quantize_to.numpy)
        value = graph.add("quantize", value, dtype=quantize_to, scale=[0.02], zero_point=[int(qinfo.min) + 5])
    graph.set_outputs([("y", value)])
    return graph


@settings(max_examples=30, deadline=None)
@given(source=st.sampled_from([DType.i8, DType.u8, DType.i16, DType.u16]), size=LENGTHS,
       chain=st.sampled_from(sorted(CHAINS)), quantize_to=st.sampled_from([None, DType.i8, DType.u8, DType.i16]),
       scale=st.sampled_from([1e-4, 0.01, 0.3]), seed=st.integers(0, 2 ** 16))
def test_integer_float_chains_are_one_exact_lookup(source, size, chain, quantize_to, scale, seed) -> None:
    graph = _chain_graph(source, size, chain, quantize_to, scale)
    assert len(Program(graph, Target.host()).calls) == 1  # the lookup
    info = np.iinfo(source.numpy)
    x = np.random.default_rng(seed).integers(info.min, int(info.max) + 1, size).astype(source.numpy)
    x[:2] = [info.min, info.max][:min(2, size)]  # both ends of the table
    assert_same(lowbit.compile(graph).run({"x": x})["y"], run_reference(graph, {"x": x})["y"], chain)


def test_chain_with_a_second_reader_stays_float_code() -> None:
    """A value read twice is needed as floats: the chain is not looked up, and the result is still right."""
    graph = Graph("shared")
    x = graph.add_input("x", TensorType((300,), DType.i8, QuantParams((0.05,), (1,))))
    real = graph.add("dequantize", x)
    gelu = graph.add("gelu", real)
    graph.set_outputs([("y", graph.add("quantize", gelu, dtype=DType.i8, scale=[0.02], zero_point=[0])),
                       ("real", real)])
    program = Program(graph, Target.host())
    assert len(program.calls) == 3  # dequantize, gelu, quantize
    feeds = {"x": np.arange(-128, 172, dtype=np.int64).clip(-128, 127).astype(np.int8)}
    got, want = lowbit.compile(graph).run(feeds), run_reference(graph, feeds)
    assert_same(got["real"], want["real"], "real")
    np.testing.assert_allclose(got["y"].astype(np.int64), want["y"].astype(np.int64), atol=1)


def test_quantized_bert_is_the_same_on_any_thread_count() -> None:
    """Softmax and layer norm split rows between threads, lookups split elements: never a sum."""
    quantized, samples = _bert("torch_bert_tiny_classic.onnx")
    one = lowbit.compile(quantized).run(samples[0])
    for threads in (2, 3):
        many = lowbit.compile(quantized, num_threads=threads).run(samples[0])
        for name in one:
            assert_same(many[name], one[name], f"{name} x{threads}")
