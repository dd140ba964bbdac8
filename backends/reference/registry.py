"""The table of reference implementations, keyed by op name.

An implementation is `fn(attrs: dict, *operands: np.ndarray | None) -> np.ndarray | tuple[np.ndarray, ...]`.
It is the definition of what the op means; choices ONNX leaves open are documented on the function.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from lowbit.ir.tables import OpTable

ReferenceFn = Callable[..., "np.ndarray | tuple[np.ndarray, ...]"]

IMPLEMENTATIONS: OpTable[ReferenceFn] = OpTable("reference implementation")
# Ops whose implementation also takes `types=` (the operands' TensorTypes, None where absent): integer ops
# read their operands' quantization parameters there.
TYPED: set[str] = set()


def reference(*ops: str, typed: bool = False) -> Callable[[ReferenceFn], ReferenceFn]:
    """Register `fn` as the reference implementation of each op in `ops`."""

    def decorate(fn: ReferenceFn) -> ReferenceFn:
        if typed:
            TYPED.update(ops)
        return IMPLEMENTATIONS.register(*ops)(fn)

    return decorate
