"""The table of ONNX converters, keyed by ONNX op type (default domain)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from lowbit.frontends.onnx.context import ConvertContext, OnnxNode
    from lowbit.ir import Value

Converter = Callable[["ConvertContext", "OnnxNode"], "Value | Sequence[Value | None]"]

CONVERTERS: dict[str, Converter] = {}


def converter(*op_types: str) -> Callable[[Converter], Converter]:
    """Register `fn` as the converter of each ONNX op type in `op_types`."""

    def decorate(fn: Converter) -> Converter:
        for op_type in op_types:
            if op_type in CONVERTERS:
                raise ValueError(f"ONNX op type '{op_type}' already has a converter")
            CONVERTERS[op_type] = fn
        return fn

    return decorate
