"""The table of ONNX exporters, keyed by lowbit op name."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from lowbit.ir.tables import OpTable

if TYPE_CHECKING:
    from lowbit.backends.onnx.context import ExportContext
    from lowbit.ir import Node

# An exporter writes ONNX nodes whose final outputs are `ctx.outputs(node)`.
Exporter = Callable[["ExportContext", "Node"], None]

EXPORTERS: OpTable[Exporter] = OpTable("ONNX exporter")
exporter = EXPORTERS.register
