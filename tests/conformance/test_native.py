"""The ONNX backend node test cases the reference interpreter passes, compiled by the native backend
(`lowbit.compile(graph, "host")`, and again for x86_64-avx2 where this machine runs it) and compared with
the cases' expected outputs as the reference's are (`onnx_conformance`, beside this file). Cases listed
in `native_exclusions.txt` are expected to fail (strict: one that passes fails the run).

Compiling ≈ 1100 small models costs about a minute with a cold compile cache; a warm one (same code,
same machine) makes reruns cheaper, and no result depends on it: a cache hit is the same object code.
"""
from __future__ import annotations

import onnx_conformance
import pytest

from lowbit.backends.native import Target
from lowbit.kernels.llvm import runs_here


@pytest.mark.parametrize("case", onnx_conformance.parameters("native"))
def test_native_node(case) -> None:
    failure = onnx_conformance.run_case(case, "native")
    if failure:
        pytest.fail(failure, pytrace=False)


AVX2_RUNS = runs_here(Target.named("x86_64-avx2"))


@pytest.mark.skipif(not AVX2_RUNS, reason="runs AVX2 code on this machine")
@pytest.mark.parametrize("case", onnx_conformance.parameters("native"))
def test_native_node_avx2(case) -> None:
    """The same cases for x86_64-avx2, the class of machine without AVX-512 (its kernels take other routes,
    and its float64 → float16 conversion is not one instruction)."""
    failure = onnx_conformance.run_case(case, "native", "x86_64-avx2")
    if failure:
        pytest.fail(failure, pytrace=False)


def test_native_exclusions_name_run_cases() -> None:
    """Every excluded case is one the native backend runs: one the reference passes (else it is stale)."""
    stale = onnx_conformance.stale_exclusions("native")
    assert not stale, f"native_exclusions.txt lists cases that are not run natively: {stale}"


def test_native_exclusions_give_reasons() -> None:
    """The update script marks new exclusions TODO; each needs a real reason before it is committed."""
    todo = onnx_conformance.exclusions_without_reason("native")
    assert not todo, f"native_exclusions.txt needs reasons for: {todo}"
