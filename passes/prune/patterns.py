"""Sparsity patterns on a weight matrix [outputs, K]: which weights to prune, given a saliency per weight.

- unstructured: the `count` least salient weights;
- N:M: in every group of m consecutive weights along K, the m - n least salient;
- block (r×c): whole r×c blocks, the `count` blocks of least total saliency (with |w| as saliency that is
  the block's L1 norm).
Counts are exact: a fraction `s` of U selectable units prunes round(s·U) of them, ties broken by position.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def prune_count(units: int, fraction: float) -> int:
    """How many of `units` a `fraction` prunes (rounded half up, so 0.5 of 9 is 5)."""
    return int(np.floor(units * fraction + 0.5))


def lowest(scores: np.ndarray, count: int) -> np.ndarray:
    """A boolean mask of the `count` lowest scores (ties: the earlier position first)."""
    flat = scores.reshape(-1)
    mask = np.zeros(flat.size, dtype=bool)
    mask[np.argsort(flat, kind="stable")[:count]] = True
    return mask.reshape(scores.shape)


@dataclass(frozen=True)
class Pattern:
    """How a layer's zeros are arranged: "unstructured", "nm" (n of every m along K kept) or "block"."""

    kind: str = "unstructured"
    n: int = 0
    m: int = 0
    block: tuple[int, int] = (1, 1)

    def check(self, rows: int, cols: int) -> str | None:
        """Why a matrix [rows, cols] cannot take this pattern, or None."""
        if self.kind == "nm" and cols % self.m:
            return f"K={cols} is not a multiple of m={self.m}"
        if self.kind == "block" and (rows % self.block[0] or cols % self.block[1]):
            return f"a [{rows}, {cols}] weight matrix is not tiled by {self.block[0]}x{self.block[1]} blocks"
        return None

    @property
    def step(self) -> int:
        """Columns that one selection must see together (a group or a block's width)."""
        return {"nm": self.m, "block": self.block[1]}.get(self.kind, 1)

    def units(self, rows: int, cols: int) -> int:
        """Selectable units (weights or blocks) in a matrix [rows, cols]."""
        if self.kind == "block":
            return (rows // self.block[0]) * (cols // self.block[1])
        return rows * cols

    def select(self, scores: np.ndarray, count: int) -> np.ndarray:
        """The weights to prune (a boolean mask like `scores` [rows, cols]): `count` units of the least
        saliency; N:M ignores `count` (its groups decide)."""
        rows, cols = scores.shape
        if self.kind == "nm":
            groups = scores.reshape(rows, cols // self.m, self.m)
            order = np.argsort(groups, axis=-1, kind="stable")
            pruned = np.zeros(groups.shape, dtype=bool)
            np.put_along_axis(pruned, order[..., :self.m - self.n], True, axis=-1)
            return pruned.reshape(rows, cols)
        if self.kind == "block":
            r, c = self.block
            sums = scores.reshape(rows // r, r, cols // c, c).sum(axis=(1, 3))
            return np.repeat(np.repeat(lowest(sums, count), r, axis=0), c, axis=1)
        return lowest(scores, count)

    def record(self) -> dict:
        """The pattern as JSON-ready metadata."""
        if self.kind == "nm":
            return {"pattern": "nm", "n": self.n, "m": self.m}
        if self.kind == "block":
            return {"pattern": "block", "block": list(self.block)}
        return {"pattern": "unstructured"}


def satisfies_nm(matrix: np.ndarray, n: int, m: int) -> bool:
    """Whether every group of m consecutive entries along each row has at most n nonzeros."""
    rows, cols = matrix.shape
    if cols % m:
        return False
    return bool((np.count_nonzero(matrix.reshape(rows, cols // m, m), axis=-1) <= n).all())


def zero_block_fraction(matrix: np.ndarray, block: tuple[int, int]) -> float:
    """The fraction of r×c blocks that are all zero (0 when the blocks do not tile the matrix)."""
    rows, cols = matrix.shape
    r, c = block
    if rows % r or cols % c:
        return 0.0
    nonzero = np.count_nonzero(matrix.reshape(rows // r, r, cols // c, c), axis=(1, 3))
    return float(np.mean(nonzero == 0))
