"""The table of reference implementations, keyed by op name.

An implementation is `fn(attrs: dict, *operands: np.ndarray | None) -> np.ndarray | tuple[np.ndarray, ...]`.
It is the definition of what the op means; choices ONNX leaves open are documented on the function.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

ReferenceFn = Callable[..., "np.ndarray | tuple[np.ndarray, ...]"]

IMPLEMENTATIONS: dict[str, ReferenceFn] = {}


def reference(*ops: str) -> Callable[[ReferenceFn], ReferenceFn]:
    """Register `fn` as the reference implementation of each op in `ops`."""

    def decorate(fn: ReferenceFn) -> ReferenceFn:
        for op in ops:
            if op in IMPLEMENTATIONS:
                raise ValueError(f"op '{op}' already has a reference implementation")
            IMPLEMENTATIONS[op] = fn
        return fn

    return decorate
