"""Re-run the ONNX node conformance cases lowbit supports and rewrite tests/conformance/exclusions.txt.

Failing cases stay or become excluded: an existing reason is kept, a new case gets "TODO reason"
followed by its error, for a person to replace. Cases that now pass, or no longer run, are dropped.

    python tools/update_conformance_exclusions.py [--dry-run] [--verbose]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "conformance"))

import onnx_conformance  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the changes, write nothing")
    parser.add_argument("--verbose", action="store_true", help="print every failure with its error")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    supported, unsupported = onnx_conformance.split_cases()
    old = onnx_conformance.load_exclusions()
    new: dict[str, str] = {}
    for case in supported:
        failure = onnx_conformance.run_case(case)
        if failure is None:
            continue
        first_line = failure.splitlines()[0][:160]
        new[case.name] = old.get(case.name) or f"{onnx_conformance.TODO_REASON} ({first_line})"
        if args.verbose:
            print(f"FAIL {case.name}: {first_line}")
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    for name in added:
        print(f"+ {name}: {new[name]}")
    for name in removed:
        print(f"- {name}: {old[name]}")
    op_types = set().union(*(onnx_conformance.unsupported_op_types(case) for case in unsupported))
    print(f"conformance: {len(supported) - len(new)} passed, {len(new)} excluded, {len(op_types)} op types "
          f"unsupported ({len(unsupported)} cases not run); {len(added)} added, {len(removed)} removed, "
          f"{time.perf_counter() - start:.1f} s")
    if not args.dry_run:
        onnx_conformance.write_exclusions(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
