"""Shared pieces of the float kernel tests: targets this machine can run, and the check against the reference."""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

import lowbit
from lowbit.backends.native import Target
from lowbit.ir import Graph

HOST = Target.host()
# The AVX2 target too where the host runs it but its own vectors are wider (so both tile shapes run).
TARGETS = st.sampled_from(["host"] + (["x86_64-avx2"] if HOST.arch == "x86_64" and HOST.has("avx2", "fma")
                                      and HOST.vector_bytes != 32 else []))


def check(graph: Graph, feeds: dict, target: str = "host") -> None:
    """Native results within rtol 1e-4 (atol 1e-5 of the largest magnitude) of the reference."""
    got, want = lowbit.compile(graph, target).run(feeds), lowbit.run_reference(graph, feeds)
    for name, expected in want.items():
        assert got[name].shape == expected.shape, name
        scale = float(np.nanmax(np.abs(expected), initial=0.0))
        np.testing.assert_allclose(got[name], expected, rtol=1e-4, atol=1e-5 * max(scale, 1e-30), err_msg=name)
