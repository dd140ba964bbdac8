"""The table of ONNX converters, keyed by ONNX op type (default domain)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

from lowbit.ir.tables import OpTable

if TYPE_CHECKING:
    from lowbit.frontends.onnx.context import ConvertContext, OnnxNode
    from lowbit.ir import Value

Converter = Callable[["ConvertContext", "OnnxNode"], "Value | Sequence[Value | None]"]

CONVERTERS: OpTable[Converter] = OpTable("converter")
converter = CONVERTERS.register
