"""Makes the conformance harness importable and prints the conformance summary line."""
from __future__ import annotations

import sys
from pathlib import Path

# The harness is a plain module beside the tests, shared with tools/update_conformance_exclusions.py.
sys.path.insert(0, str(Path(__file__).parent))

import onnx_conformance  # noqa: E402

_CASE_TEST = "test_onnx_node.py::test_onnx_node["


def pytest_terminal_summary(terminalreporter) -> None:
    counts = {outcome: sum(1 for report in terminalreporter.stats.get(outcome, ())
                           if _CASE_TEST in getattr(report, "nodeid", ""))
              for outcome in ("passed", "xfailed", "failed")}
    if not any(counts.values()):
        return
    _, unsupported = onnx_conformance.split_cases()
    op_types = set().union(*(onnx_conformance.unsupported_op_types(case) for case in unsupported))
    terminalreporter.write_line(
        f"conformance: {counts['passed']} passed, {counts['xfailed']} excluded, {counts['failed']} failed, "
        f"{len(op_types)} op types unsupported ({len(unsupported)} cases not run)")
