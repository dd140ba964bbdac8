"""The ONNX backend node test cases, run through lowbit's importer and reference interpreter.

What runs, how inputs are bound and how outputs are compared: see `onnx_conformance` (beside this
file). Cases listed in `exclusions.txt` are expected to fail (strict: one that passes fails the run).
"""
from __future__ import annotations

import onnx_conformance
import pytest


@pytest.mark.parametrize("case", onnx_conformance.parameters("reference"))
def test_onnx_node(case) -> None:
    failure = onnx_conformance.run_case(case)
    if failure:
        pytest.fail(failure, pytrace=False)


def test_exclusions_name_supported_cases() -> None:
    """Every excluded case exists and is of a supported op type (else the entry is stale)."""
    stale = onnx_conformance.stale_exclusions("reference")
    assert not stale, f"exclusions.txt lists cases that are not run: {stale}"


def test_exclusions_give_reasons() -> None:
    """The update script marks new exclusions TODO; each needs a real reason before it is committed."""
    todo = onnx_conformance.exclusions_without_reason("reference")
    assert not todo, f"exclusions.txt needs reasons for: {todo}"
