"""Checks the IR's invariants; each error names the node (its loc name, op and position)."""
from __future__ import annotations

import numpy as np

from lowbit.errors import LowbitError, VerificationError
from lowbit.ir.graph import ElidedData, Graph, Value
from lowbit.ir.registry import get_op, infer_types


def verify(graph: Graph) -> None:
    """Raise `VerificationError` at the first broken invariant: SSA order, use lists, types, attributes."""
    defined: set[int] = set()
    expected_uses: dict[int, list] = {}
    names = [v.name for v in graph.inputs]
    if any(not name for name in names) or len(set(names)) != len(names):
        raise VerificationError(f"graph inputs need unique non-empty names, got {names}")
    for value in graph.inputs:
        _check_value_kind(value, "graph input", producer=None)
        defined.add(id(value))
    for value in graph.constants:
        _check_value_kind(value, f"constant '{value.name}'", producer=None)
        data = value.data
        if data is None:
            raise VerificationError(f"constant '{value.name}' has no data")
        if not isinstance(data, ElidedData) and (
                tuple(data.shape) != value.type.shape or data.dtype != value.type.dtype.numpy):
            raise VerificationError(f"constant '{value.name}' holds {data.dtype}{list(data.shape)} "
                                    f"but its type is {value.type}")
        defined.add(id(value))
    all_values: list[Value] = list(graph.inputs) + list(graph.constants)
    for position, node in enumerate(graph.nodes):
        where = f"{node.describe()} at position {position}"
        if node.erased or node.graph is not graph:
            raise VerificationError(f"{where} is erased or belongs to another graph")
        try:
            opdef = get_op(node.op)
            normalized = opdef.normalize_attrs(node.attrs, where)
        except LowbitError as error:
            raise VerificationError(f"{where}: {error}") from None
        if normalized != node.attrs:
            raise VerificationError(f"{where}: attributes {node.attrs} are not in normalized form")
        for index, value in enumerate(node.inputs):
            if value is None:
                continue
            if id(value) not in defined:
                raise VerificationError(f"{where}: operand {index} is not defined before use "
                                        f"(not a graph input, constant, or result of an earlier node)")
            expected_uses.setdefault(id(value), []).append((id(node), index))
        try:
            constants = [v.data if v is not None and isinstance(v.data, np.ndarray) else None
                         for v in node.inputs]
            inferred = infer_types(node.op, [v.type if v is not None else None for v in node.inputs],
                                   node.attrs, constants, where)
        except LowbitError as error:
            raise VerificationError(str(error)) from None
        if len(inferred) != len(node.outputs):
            raise VerificationError(f"{where}: has {len(node.outputs)} results, op declares {len(inferred)}")
        for index, (value, want) in enumerate(zip(node.outputs, inferred)):
            _check_value_kind(value, f"{where}: result {index}", producer=node)
            # Quantization parameters are compared where inference determines them (integer ops).
            if value.type.shape != want.shape or value.type.dtype != want.dtype or \
                    (want.quant is not None and value.type.quant != want.quant):
                raise VerificationError(f"{where}: result {index} has type {value.type}, "
                                        f"inference gives {want}")
            if id(value) in defined:
                raise VerificationError(f"{where}: result {index} is defined twice")
            defined.add(id(value))
            all_values.append(value)
    for value in all_values:
        actual = sorted((id(node), index) for node, index in value.uses)
        if actual != sorted(expected_uses.get(id(value), [])):
            raise VerificationError(f"use list of {value!r} does not match its uses in the graph")
    if len(graph.outputs) != len(graph.output_names):
        raise VerificationError("graph outputs and output names differ in number")
    if len(set(graph.output_names)) != len(graph.output_names) or not all(graph.output_names):
        raise VerificationError(f"graph outputs need unique non-empty names, got {graph.output_names}")
    for name, value in zip(graph.output_names, graph.outputs):
        if id(value) not in defined:
            raise VerificationError(f"graph output '{name}' is not defined in the graph")


def _check_value_kind(value: Value, where: str, producer) -> None:
    if value.producer is not producer:
        raise VerificationError(f"{where}: value's producer link is wrong")
