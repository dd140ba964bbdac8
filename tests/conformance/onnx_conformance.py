"""Runs the ONNX backend node test cases that ship with the `onnx` package through lowbit.

A case (`onnx.backend.test.case.node.collect_testcases()`) is a one-node model, or a function's
expansion into several nodes (`*_expanded`), with input data and the expected outputs. A case runs
when every node in its model is in the default ONNX domain and has a lowbit converter
(`lowbit.frontends.onnx.registry.CONVERTERS`); the others are counted as unsupported and not run.

How a case runs:
- Static shapes: every graph input's dimensions are rewritten to the concrete shape of its test data
  before import, so symbolic dimensions never reach lowbit.
- Shape-determining operands (Reshape's shape, Slice's starts, Clip's bounds, ...) must be constants
  in lowbit. The rule: import with no input bound; if the import says an operand "must be a
  constant", bind every non-float input to its test data (`constant_inputs`) and retry; if it still
  says so, bind every input but the first (float operands such as Resize's scales), and last every
  input (Range's float start; the node then folds to a constant, still computed by the reference).
- The graph runs on a backend: "reference" (`lowbit.run_reference`) or "native" (`lowbit.compile(graph,
  "host")`, through the on-disk compile cache like any compile). Each output must have the expected
  dtype and shape, integer and bool outputs must be equal, float outputs close (rtol 1e-3, atol 1e-5,
  or the case's own tolerances where looser; NaN equals NaN). rtol is at least two units in the last
  place of the output's type, so float16 results may differ by the rounding of intermediate float16 values.

The native backend runs the cases the reference passes. A failing case must be listed with a reason in
the backend's exclusions file, `exclusions.txt` or `native_exclusions.txt`
(`python tools/update_conformance_exclusions.py [--backend native]` rewrites it).
"""
from __future__ import annotations

import contextlib
import functools
import io
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnx.backend.test.case.node import collect_testcases
from onnx.backend.test.case.test_case import TestCase

import lowbit
from lowbit.errors import LowbitError, UnsupportedOpError
from lowbit.frontends.onnx.registry import CONVERTERS

BACKENDS = ("reference", "native")
EXCLUSION_FILES = {"reference": Path(__file__).with_name("exclusions.txt"),
                   "native": Path(__file__).with_name("native_exclusions.txt")}
RTOL = 1e-3
ATOL = 1e-5
DEFAULT_DOMAINS = ("", "ai.onnx")
TODO_REASON = "TODO reason"
# ml_dtypes' sub-byte integers are stored one value per byte by lowbit.
_SUB_BYTE_STORAGE = {"int4": np.int8, "uint4": np.uint8}


@functools.lru_cache(maxsize=1)
def all_cases() -> tuple[TestCase, ...]:
    """Every node test case of the installed `onnx` (generating them prints and warns; both are muted)."""
    with warnings.catch_warnings(), np.errstate(all="ignore"), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return tuple(sorted(collect_testcases(), key=lambda case: case.name))


def op_types(graph: onnx.GraphProto) -> Iterator[tuple[str, str]]:
    """(domain, op type) of every node in `graph` and its subgraphs."""
    for node in graph.node:
        yield node.domain, node.op_type
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.HasField("g") else list(attribute.graphs)
            for subgraph in subgraphs:
                yield from op_types(subgraph)


def unsupported_op_types(case: TestCase) -> set[str]:
    """The op types of `case` that lowbit cannot import (domain-qualified when not the default)."""
    return {op if domain in DEFAULT_DOMAINS else f"{domain}.{op}"
            for domain, op in op_types(case.model.graph)
            if domain not in DEFAULT_DOMAINS or op not in CONVERTERS}


def split_cases() -> tuple[list[TestCase], list[TestCase]]:
    """(cases lowbit supports, cases with an unsupported op type)."""
    supported, unsupported = [], []
    for case in all_cases():
        (unsupported if unsupported_op_types(case) else supported).append(case)
    return supported, unsupported


def backend_cases(backend: str) -> list[TestCase]:
    """The cases a backend runs: every supported one on the reference, those it passes natively."""
    supported, _ = split_cases()
    if backend == "reference":
        return supported
    failing = load_exclusions("reference")
    return [case for case in supported if case.name not in failing]


def run_case(case: TestCase, backend: str = "reference", target: str = "host") -> str | None:
    """None when lowbit's `backend` reproduces every data set of `case`, else one line saying why not
    (`target`: the native backend's)."""
    try:
        for inputs, expected in case.data_sets:
            failure = _run_data_set(case, [_array(x) for x in inputs], [_array(x) for x in expected], backend,
                                    target)
            if failure:
                return failure
    except LowbitError as error:
        return f"{type(error).__name__}: {error}"
    except Exception as error:  # a bare exception from lowbit is a bug worth its traceback
        where = traceback.extract_tb(error.__traceback__)[-1]
        return f"crash: {type(error).__name__}: {error} (at {Path(where.filename).name}:{where.lineno})"
    return None


def _run_data_set(case: TestCase, inputs: list[np.ndarray], expected: list[np.ndarray], backend: str,
                  target: str) -> str | None:
    model = case.model
    initializers = {t.name for t in model.graph.initializer}
    names = [info.name for info in model.graph.input if info.name not in initializers]
    data = dict(zip(names, inputs))
    model = _with_data_shapes(model, data)
    graph = _import(model, names, data)
    feeds = {value.name: data[value.name] for value in graph.inputs}
    results = lowbit.compile(graph, target).run(feeds) if backend == "native" else lowbit.run_reference(graph, feeds)
    rtol, atol = max(RTOL, case.rtol), max(ATOL, case.atol)
    for info, want in zip(model.graph.output, expected):
        failure = _compare(info.name, results[info.name], want, rtol, atol)
        if failure:
            return failure
    return None


def _import(model: onnx.ModelProto, names: Sequence[str], data: dict[str, np.ndarray]) -> lowbit.ir.Graph:
    """Import `model`, binding inputs to their data only as far as lowbit needs constants (module doc)."""
    non_float = [name for name in names if data[name].dtype.kind not in "fc"]
    bindings = list(dict.fromkeys(((), tuple(non_float), tuple(names[1:]), tuple(names))))
    for bound in bindings[:-1]:
        try:
            return _import_binding(model, data, bound)
        except UnsupportedOpError as error:
            if "must be a constant" not in str(error):
                raise
    return _import_binding(model, data, bindings[-1])


def _import_binding(model: onnx.ModelProto, data: dict[str, np.ndarray], bound: Sequence[str]) -> lowbit.ir.Graph:
    return lowbit.import_onnx(model, constant_inputs={name: data[name] for name in bound})


def _with_data_shapes(model: onnx.ModelProto, data: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` whose graph inputs have the concrete shapes of their data."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for info in model.graph.input:
        if info.name not in data or not info.type.HasField("tensor_type"):
            continue
        shape = info.type.tensor_type.shape
        shape.ClearField("dim")
        for size in data[info.name].shape:
            shape.dim.add().dim_value = size
    return model


def _array(value: Any) -> np.ndarray:
    """Test data as a numpy array lowbit can hold (TensorProto decoded, sub-byte types widened)."""
    array = numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)
    storage = _SUB_BYTE_STORAGE.get(array.dtype.name)
    return array.astype(storage) if storage is not None else array


def _compare(name: str, got: np.ndarray, want: np.ndarray, rtol: float, atol: float) -> str | None:
    if got.dtype != want.dtype:
        return f"output '{name}': dtype {got.dtype}, expected {want.dtype}"
    if got.shape != want.shape:
        return f"output '{name}': shape {list(got.shape)}, expected {list(want.shape)}"
    if want.dtype.kind != "f":
        if not np.array_equal(got, want):
            return f"output '{name}': values differ{_first_difference(got, want)}"
        return None
    rtol = max(rtol, 2 * float(np.finfo(want.dtype).eps))
    close = np.isclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
    if close.all():
        return None
    error = np.where(close, 0, np.abs(got.astype(np.float64) - want.astype(np.float64)))
    worst = np.unravel_index(np.nanargmax(np.nan_to_num(error, nan=np.inf)), got.shape)
    return (f"output '{name}': {int((~close).sum())} of {close.size} values not close (rtol {rtol}, atol {atol}); "
            f"worst at {[int(i) for i in worst]}: {got[worst]!r}, expected {want[worst]!r}")


def _first_difference(got: np.ndarray, want: np.ndarray) -> str:
    if got.size == 0:
        return ""
    index = tuple(int(i) for i in np.argwhere(got != want)[0])
    return f" (first at {list(index)}: {got[index]!r}, expected {want[index]!r})"


def load_exclusions(backend: str = "reference") -> dict[str, str]:
    """Excluded case name → reason, from lines `name: reason` (`#` starts a comment line)."""
    path = EXCLUSION_FILES[backend]
    exclusions = {}
    if not path.exists():
        return exclusions
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, reason = line.partition(":")
        if not sep or not reason.strip():
            raise ValueError(f"{path}:{number}: expected 'case_name: reason', got {line!r}")
        exclusions[name.strip()] = reason.strip()
    return exclusions


HEADERS = {
    "reference": """\
# ONNX node test cases (onnx.backend.test) of op types lowbit supports that it does not pass.
# One `case_name: reason` per line. tests/conformance/test_onnx_node.py fails when a case not
# listed here fails, and when a listed case passes or no longer exists.
# Refresh with `python tools/update_conformance_exclusions.py` (keeps reasons, marks new ones TODO).
""",
    "native": """\
# ONNX node test cases that lowbit's reference interpreter passes and its native backend does not.
# One `case_name: reason` per line. tests/conformance/test_native.py fails when a case not listed
# here fails natively, and when a listed case passes or is no longer run.
# Refresh with `python tools/update_conformance_exclusions.py --backend native`.
""",
}


def parameters(backend: str) -> list:
    """The backend's cases as pytest parameters, each excluded one a strict xfail with its reason."""
    exclusions = load_exclusions(backend)
    return [pytest.param(case, id=case.name, marks=[pytest.mark.xfail(reason=exclusions[case.name], strict=True)]
                         if case.name in exclusions else []) for case in backend_cases(backend)]


def stale_exclusions(backend: str) -> list[str]:
    """Excluded cases the backend does not run (gone from onnx, unsupported, or failing on the reference)."""
    return sorted(set(load_exclusions(backend)) - {case.name for case in backend_cases(backend)})


def exclusions_without_reason(backend: str) -> list[str]:
    """Excluded cases still marked TODO by the update script."""
    return sorted(name for name, reason in load_exclusions(backend).items() if reason.startswith(TODO_REASON))


def write_exclusions(exclusions: dict[str, str], backend: str = "reference") -> None:
    lines = [f"{name}: {reason}" for name, reason in sorted(exclusions.items())]
    EXCLUSION_FILES[backend].write_text(HEADERS[backend] + "\n".join(lines) + ("\n" if lines else ""))
