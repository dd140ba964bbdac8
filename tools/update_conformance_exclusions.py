"""Re-run the ONNX node conformance cases on a backend and rewrite that backend's exclusions file.

The files are in tests/conformance/: exclusions.txt (reference interpreter), native_exclusions.txt (native).

Failing cases stay or become excluded: an existing reason is kept, a new case gets "TODO reason"
followed by its error, for a person to replace. Cases that now pass, or no longer run, are dropped.
Update the reference's file first: the native backend runs the cases the reference passes.

    python tools/update_conformance_exclusions.py [--backend reference|native] [--dry-run] [--verbose]
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
    parser.add_argument("--backend", choices=onnx_conformance.BACKENDS, default="reference",
                        help="the backend whose cases run (default: reference)")
    parser.add_argument("--dry-run", action="store_true", help="print the changes, write nothing")
    parser.add_argument("--verbose", action="store_true", help="print every failure with its error")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    cases = onnx_conformance.backend_cases(args.backend)
    old = onnx_conformance.load_exclusions(args.backend)
    new: dict[str, str] = {}
    for case in cases:
        failure = onnx_conformance.run_case(case, args.backend)
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
    summary = f"{args.backend} conformance: {len(cases) - len(new)} passed, {len(new)} excluded"
    if args.backend == "reference":
        _, unsupported = onnx_conformance.split_cases()
        op_types = set().union(*(onnx_conformance.unsupported_op_types(case) for case in unsupported))
        summary += f", {len(op_types)} op types unsupported ({len(unsupported)} cases not run)"
    print(f"{summary}; {len(added)} added, {len(removed)} removed, {time.perf_counter() - start:.1f} s")
    if not args.dry_run:
        onnx_conformance.write_exclusions(new, args.backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
