"""Compile-time packing of GEMM weights and the exact zero-point algebra, in numpy.

For C = A·B with A [M, K] activations and B [K, N] weights, zero points za (per tensor) and zb (per
tensor or per output column) enter exactly as

    Σ_k (a − za)(b − zb) = Σ_k a·b − zb·rowsum(A) − za·colsum(B) + K·za·zb

The kernels compute only the raw Σ a·b (plus an optional per-column int32 offset); the compile-time
terms fold into that offset (`zero_point_offset`), the run-time term is `zb · row_sums(A)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALIGNMENT = 64  # bytes: a cache line and the widest vector


def aligned_empty(nbytes: int, dtype: np.dtype | type = np.uint8) -> np.ndarray:
    """An uninitialised 1-D array of `nbytes` bytes whose data starts on a 64-byte boundary."""
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + nbytes].view(dtype)


@dataclass(frozen=True)
class Panel:
    """`vectors` accumulator vectors wide (vectors × lanes columns), of which `valid` are real."""

    start: int
    vectors: int
    valid: int


@dataclass(frozen=True)
class PackedWeights:
    """B split into column panels, each stored as [K groups][panel columns][kr values]."""

    data: np.ndarray  # uint8 bytes, 64-byte aligned
    panels: tuple[Panel, ...]
    groups: int  # ceil(K / kr)
    padded_columns: int  # sum of the panels' widths

    def panel_bytes(self, panel: Panel, lanes: int, kr: int, element_bytes: int) -> int:
        return self.groups * panel.vectors * lanes * kr * element_bytes


def column_panels(n: int, lanes: int, vectors: int) -> tuple[Panel, ...]:
    """Full panels of `vectors · lanes` columns, then one narrower edge panel for the rest."""
    width = vectors * lanes
    panels = [Panel(start, vectors, width) for start in range(0, n - n % width, width)]
    rest = n % width
    if rest:
        panels.append(Panel(n - rest, -(-rest // lanes), rest))
    return tuple(panels)


def pack_weights(weights: np.ndarray, lanes: int, vectors: int, kr: int,
                 element: np.dtype | type) -> PackedWeights:
    """Pack int8 `weights` [K, N] for a micro-kernel reading `kr` consecutive K values per i32 lane.

    K is padded with zeros to a multiple of kr and N to whole vectors; `element` is the stored type
    (int8, or int16 for routes that multiply 16-bit values).
    """
    k, n = weights.shape
    groups = -(-k // kr)
    panels = column_panels(n, lanes, vectors)
    padded_columns = sum(panel.vectors * lanes for panel in panels)
    padded = np.zeros((groups * kr, padded_columns), dtype=element)
    padded[:k, :n] = weights
    parts = []
    for panel in panels:
        width = panel.vectors * lanes
        block = padded[:, panel.start:panel.start + width].reshape(groups, kr, width)
        parts.append(block.transpose(0, 2, 1).ravel())
    flat = np.concatenate(parts)
    data = aligned_empty(flat.nbytes)
    data[:] = flat.view(np.uint8)
    return PackedWeights(data, panels, groups, padded_columns)


def column_sums(weights: np.ndarray) -> np.ndarray:
    """Σ_k B[k, n] as int64 [N]."""
    return weights.astype(np.int64).sum(axis=0)


def row_sums(activations: np.ndarray) -> np.ndarray:
    """Σ_k A[m, k] as int64 [M]: the run-time zero-point term is zb · row_sums(A)."""
    return activations.astype(np.int64).sum(axis=1)


def zero_point_offset(weights: np.ndarray, za: int, zb: int | np.ndarray,
                      bias: np.ndarray | None = None) -> np.ndarray:
    """The compile-time part of Σ (a − za)(b − zb) (+ bias) per column, int64 [N].

    bias − za·colsum(B) + K·za·zb; zb may be a scalar or per column ([N]).
    """
    k, n = weights.shape
    zb = np.broadcast_to(np.asarray(zb, dtype=np.int64), (n,))
    offset = -int(za) * column_sums(weights) + k * int(za) * zb
    if bias is not None:
        offset = offset + np.asarray(bias, dtype=np.int64)
    return offset
