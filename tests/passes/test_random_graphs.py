"""The default pipeline preserves results on hypothesis-generated conv / linear graphs."""
import numpy as np
from equivalence import assert_equivalent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.ir import DType, Graph, TensorType, verify

ACTIVATIONS = [("relu", {}), ("clip", {"min": 0.0, "max": 6.0}), ("leaky_relu", {"alpha": 0.1}),
               ("sigmoid", {}), ("hard_swish", {})]


@st.composite
def conv_graphs(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    graph = Graph("random")
    channels, size = draw(st.integers(1, 4)), draw(st.integers(3, 6))
    x = graph.add_input("x", TensorType((1, channels, size, size), DType.f32))
    pool = [x]
    for _ in range(draw(st.integers(1, 7))):
        current = pool[-1]
        c = current.type.shape[1]
        kind = draw(st.sampled_from(["conv", "bn", "act", "bias", "residual", "noop"]))
        if kind == "conv":
            kernel = draw(st.sampled_from([1, 3]))
            weight = graph.add_constant(rng.standard_normal((c, c, kernel, kernel)).astype(np.float32) * 0.5)
            bias = graph.add_constant(rng.standard_normal(c).astype(np.float32)) if draw(st.booleans()) else None
            pad = kernel // 2
            out = graph.add("conv2d", current, weight, bias, pads=(pad, pad, pad, pad))
        elif kind == "bn":
            params = [rng.standard_normal(c), rng.standard_normal(c), rng.standard_normal(c), rng.random(c) + 0.5]
            out = graph.add("batch_norm", current, *(graph.add_constant(p.astype(np.float32)) for p in params))
        elif kind == "act":
            op, attrs = draw(st.sampled_from(ACTIVATIONS))
            out = graph.add(op, current, **attrs)
        elif kind == "bias":
            out = graph.add("add", current, graph.add_constant(rng.standard_normal((c, 1, 1)).astype(np.float32)))
        elif kind == "residual":
            out = graph.add("add", current, draw(st.sampled_from([v for v in pool if v.type == current.type])))
        else:
            shape = current.type.shape
            flat = graph.add("reshape", current, shape=(shape[0], int(np.prod(shape[1:]))))
            out = graph.add("reshape", flat, shape=shape)
        pool.append(out)
    graph.set_outputs([("y", pool[-1])])
    verify(graph)
    return graph


@st.composite
def linear_graphs(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    graph = Graph("random_linear")
    width = draw(st.integers(1, 6))
    current = graph.add_input("x", TensorType((draw(st.integers(1, 3)), width), DType.f32))
    for _ in range(draw(st.integers(1, 5))):
        out_width = draw(st.integers(1, 6))
        weight = graph.add_constant(rng.standard_normal((current.type.shape[1], out_width)).astype(np.float32))
        current = graph.add("matmul", current, weight)
        if draw(st.booleans()):
            current = graph.add("add", current, graph.add_constant(rng.standard_normal(out_width).astype(np.float32)))
        if draw(st.booleans()):
            op, attrs = draw(st.sampled_from(ACTIVATIONS))
            current = graph.add(op, current, **attrs)
    graph.set_outputs([("y", current)])
    return graph


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(conv_graphs(), linear_graphs()))
def test_default_pipeline_preserves_results(graph):
    optimized = lowbit.optimize(graph)
    assert len(optimized.nodes) <= len(graph.nodes)
    assert_equivalent(graph, optimized, rtol=1e-4, atol=1e-4)
