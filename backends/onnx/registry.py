"""The table of ONNX exporters, keyed by lowbit op name."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from lowbit.backends.onnx.context import ExportContext
    from lowbit.ir import Node

# An exporter writes ONNX nodes whose final outputs are `ctx.outputs(node)`.
Exporter = Callable[["ExportContext", "Node"], None]

EXPORTERS: dict[str, Exporter] = {}


def exporter(*ops: str) -> Callable[[Exporter], Exporter]:
    """Register `fn` as the ONNX exporter of each lowbit op in `ops`."""

    def decorate(fn: Exporter) -> Exporter:
        for op in ops:
            if op in EXPORTERS:
                raise ValueError(f"lowbit op '{op}' already has an ONNX exporter")
            EXPORTERS[op] = fn
        return fn

    return decorate
