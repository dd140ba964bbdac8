"""Makes the conformance harness importable and prints the conformance summary lines."""
from __future__ import annotations

import sys
from pathlib import Path

# The harness is a plain module beside the tests, shared with tools/update_conformance_exclusions.py.
sys.path.insert(0, str(Path(__file__).parent))

import onnx_conformance  # noqa: E402

_CASE_TESTS = {"reference": "test_onnx_node.py::test_onnx_node[", "native": "test_native.py::test_native_node[",
               "native x86_64-avx2": "test_native.py::test_native_node_avx2["}


def pytest_terminal_summary(terminalreporter) -> None:
    for backend, case_test in _CASE_TESTS.items():
        counts = {outcome: sum(1 for report in terminalreporter.stats.get(outcome, ())
                               if case_test in getattr(report, "nodeid", ""))
                  for outcome in ("passed", "xfailed", "failed")}
        if not any(counts.values()):
            continue
        if backend == "reference":
            _, unsupported = onnx_conformance.split_cases()
            op_types = set().union(*(onnx_conformance.unsupported_op_types(case) for case in unsupported))
            rest = f", {len(op_types)} op types unsupported ({len(unsupported)} cases not run)"
        else:
            rest = " (of the cases the reference passes)"
        terminalreporter.write_line(f"{backend} conformance: {counts['passed']} passed, {counts['xfailed']} "
                                    f"excluded, {counts['failed']} failed{rest}")
