"""Runs a graph node by node with the reference implementations."""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from lowbit.backends.reference import attention, elementwise, nn, quantized, tensor  # noqa: F401  (fill the table)
from lowbit.backends.reference.registry import IMPLEMENTATIONS, TYPED
from lowbit.errors import InputError, LowbitError, UnsupportedOpError, VerificationError
from lowbit.ir import ElidedData, Graph, Node

Observer = Callable[[Node, list[np.ndarray]], None]


def evaluate_node(node: Node, operands: list[np.ndarray | None]) -> list[np.ndarray]:
    """Apply `node`'s reference implementation; results are checked against the node's result types."""
    implementation = IMPLEMENTATIONS.get(node.op)
    if implementation is None:
        raise UnsupportedOpError(f"{node.describe()}: op '{node.op}' has no reference implementation")
    try:
        with np.errstate(all="ignore"):
            if node.op in TYPED:
                result = implementation(node.attrs, *operands,
                                        types=[v.type if v is not None else None for v in node.inputs])
            else:
                result = implementation(node.attrs, *operands)
    except LowbitError:
        raise
    except (ValueError, IndexError, TypeError, ZeroDivisionError) as error:
        raise InputError(f"{node.describe()}: {error}") from None
    results = [result] if isinstance(result, np.ndarray) or np.isscalar(result) else list(result)
    if len(results) != len(node.outputs):
        raise VerificationError(f"{node.describe()}: reference gave {len(results)} results, "
                                f"node has {len(node.outputs)}")
    checked = []
    for value, array in zip(node.outputs, results):
        array = np.asarray(array)
        if tuple(array.shape) != value.type.shape:
            raise VerificationError(f"{node.describe()}: reference result has shape {list(array.shape)}, "
                                    f"its type says {value.type}")
        array = np.asarray(array, dtype=value.type.dtype.numpy)
        checked.append(array if array.flags.c_contiguous else array.copy(order="C"))
    return checked


def check_feeds(graph: Graph, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds as arrays of the inputs' exact shapes and dtypes, or an `InputError` saying what is wrong."""
    names = [v.name for v in graph.inputs]
    unknown = sorted(set(feeds) - set(names))
    if unknown:
        raise InputError(f"unknown input name(s) {unknown}; the graph's inputs are {names}")
    missing = [n for n in names if n not in feeds]
    if missing:
        raise InputError(f"missing feed(s) for input(s) {missing}")
    checked = {}
    for value in graph.inputs:
        array = np.asarray(feeds[value.name])
        want = value.type
        if tuple(array.shape) != want.shape:
            raise InputError(f"input '{value.name}' expects shape {list(want.shape)}, got {list(array.shape)}")
        if array.dtype != want.dtype.numpy:
            raise InputError(f"input '{value.name}' expects dtype {want.dtype} ({want.dtype.numpy}), "
                             f"got {array.dtype}")
        checked[value.name] = array
    return checked


def run_reference(graph: Graph, feeds: Mapping[str, np.ndarray], *,
                  observe: Observer | None = None) -> dict[str, np.ndarray]:
    """Run `graph` on `feeds` (keyed by input name); returns outputs keyed by output name.

    `observe(node, results)` is called after every node (calibration uses it).
    """
    checked = check_feeds(graph, feeds)
    env: dict[int, np.ndarray] = {}
    for value in graph.inputs:
        env[id(value)] = checked[value.name]
    for value in graph.constants:
        if isinstance(value.data, ElidedData):
            raise InputError(f"constant '{value.name}' was elided in the text form this graph came from; "
                             f"load a file written with full=True to run it")
        env[id(value)] = value.data
    last_use = _last_uses(graph)
    keep = {id(v) for v in graph.outputs}
    for position, node in enumerate(graph.nodes):
        operands = [env[id(v)] if v is not None else None for v in node.inputs]
        results = evaluate_node(node, operands)
        for value, array in zip(node.outputs, results):
            env[id(value)] = array
        if observe is not None:
            observe(node, results)
        for value in node.inputs:
            if value is not None and value.producer is not None and last_use.get(id(value)) == position \
                    and id(value) not in keep:
                env.pop(id(value), None)
    return {name: env[id(value)] for name, value in zip(graph.output_names, graph.outputs)}


def _last_uses(graph: Graph) -> dict[int, int]:
    last: dict[int, int] = {}
    for position, node in enumerate(graph.nodes):
        for value in node.inputs:
            if value is not None:
                last[id(value)] = position
    return last
