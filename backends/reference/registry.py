"""The table of reference implementations, keyed by op name.

An implementation is `fn(attrs: dict, *operands: np.ndarray | None) -> np.ndarray | tuple[np.ndarray, ...]`.
It is the definition of what the op means; choices ONNX leaves open are documented on the function.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

ReferenceFn = Callable[..., "np.ndarray | tuple[np.ndarray, ...]"]

IMPLEMENTATIONS: dict[str, ReferenceFn] = {}
# Ops whose implementation also takes `types=` (the operands' TensorTypes, None where absent): integer ops
# read their operands' quantization parameters there.
TYPED: set[str] = set()


def reference(*ops: str, typed: bool = False) -> Callable[[ReferenceFn], ReferenceFn]:
    """Register `fn` as the reference implementation of each op in `ops`."""

    def decorate(fn: ReferenceFn) -> ReferenceFn:
        for op in ops:
            if op in IMPLEMENTATIONS:
                raise ValueError(f"op '{op}' already has a reference implementation")
            IMPLEMENTATIONS[op] = fn
            if typed:
                TYPED.add(op)
        return fn

    return decorate
