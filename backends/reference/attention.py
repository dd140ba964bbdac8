"""Reference implementation of fused attention: exactly the unfused ops' arithmetic, in their order."""
from __future__ import annotations

import numpy as np

from lowbit.backends.reference.nn import softmax
from lowbit.backends.reference.registry import reference


@reference("attention")
def attention(attrs, q, k_t, v, mask=None):
    """Scores are (q @ k_t) * scale, then + mask, softmax over the last axis, then @ v."""
    scores = np.matmul(q, k_t) * q.dtype.type(attrs["scale"])
    if mask is not None:
        scores = scores + mask
    probs = softmax({"axis": -1}, scores)
    if attrs["zero_nan_probs"]:
        probs = np.where(np.isnan(probs), probs.dtype.type(0), probs)
    return np.matmul(probs, v)
