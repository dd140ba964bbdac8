"""Reference semantics of fused epilogues: exactly the standalone ops, applied in order."""
from __future__ import annotations

import numpy as np

from lowbit.backends.reference.registry import IMPLEMENTATIONS
from lowbit.ir.ops.epilogue import activation_attrs


def apply_epilogue(attrs: dict, y: np.ndarray, residual: np.ndarray | None) -> np.ndarray:
    """y (already including bias) + residual, then the activation; dtype of y is kept."""
    if residual is not None:
        y = (y + residual).astype(y.dtype, copy=False)
    activation = attrs["activation"]
    if activation == "none":
        return y
    return IMPLEMENTATIONS[activation](activation_attrs(activation, attrs["activation_params"]), y)
