"""Numerical equivalence of a graph before and after passes, on seeded random inputs."""
from __future__ import annotations

import numpy as np

import lowbit
from lowbit.ir import Graph


def random_feeds(graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in graph.inputs:
        dtype = value.type.dtype
        if dtype.is_float:
            feeds[value.name] = rng.standard_normal(value.type.shape).astype(dtype.numpy)
        elif dtype.name == "bool":
            feeds[value.name] = rng.random(value.type.shape) < 0.5
        else:
            feeds[value.name] = rng.integers(0, 8, value.type.shape).astype(dtype.numpy)
    return feeds


def assert_equivalent(before: Graph, after: Graph, *, rtol: float = 1e-5, atol: float = 1e-6,
                      seeds=(0, 1)) -> None:
    for seed in seeds:
        feeds = random_feeds(before, seed)
        expected = lowbit.run_reference(before, feeds)
        actual = lowbit.run_reference(after, feeds)
        assert list(actual) == list(expected)
        for name in expected:
            np.testing.assert_allclose(actual[name], expected[name], rtol=rtol, atol=atol, err_msg=name)


def optimize_text(text: str, pipeline: str) -> tuple[Graph, Graph]:
    """Parse `text`, run `pipeline` on a copy; returns (before, after) after checking equivalence."""
    before = lowbit.ir.parse(text)
    after = lowbit.optimize(before, pipeline)
    assert_equivalent(before, after)
    return before, after
