"""The SparseGPT weight update (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be
Accurately Pruned in One-Shot"): prune a weight matrix W [rows, K] column by column and let the
weights not yet visited absorb each pruned weight's error through the inverse Hessian, so that the
layer's output on calibration inputs X (H = XᵀX) changes as little as possible (Optimal Brain Surgeon
restricted to one row at a time, all rows sharing H).

The columns are processed in blocks of `block_size`: inside a block the update is applied column by
column, to the rest of the matrix once per block. The mask is chosen on the fly from the OBS saliency
w² / [H⁻¹]²_jj of the partially updated weights: `select(weights, inverse_diagonal, start)` is called for
each run of `step` columns (a whole block for unstructured and block patterns, each group of m
columns for N:M) and returns which of those weights to prune.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from lowbit.passes.prune.layers import PruneError

Select = Callable[[np.ndarray, np.ndarray, int], np.ndarray]
BLOCK_SIZE = 128


def inverse_hessian_factor(hessian: np.ndarray, damping: float) -> np.ndarray:
    """The upper Cholesky factor U of (H + λI)⁻¹ = UᵀU, with λ = damping · mean(diag H); raises λ
    tenfold (up to 4 times) when the damped H is still not positive definite."""
    size = hessian.shape[0]
    scale = float(np.mean(np.diag(hessian))) or 1.0
    for attempt in range(5):
        damped = hessian + (damping * 10 ** attempt) * scale * np.eye(size)
        try:
            lower_inverse = np.linalg.inv(np.linalg.cholesky(damped))
            return np.linalg.cholesky(lower_inverse.T @ lower_inverse).T
        except np.linalg.LinAlgError:
            continue
    raise PruneError("the calibration inputs' second-moment matrix is not positive definite even with "
                     f"damping {damping * 1e4:g}; calibrate with more samples")


def sparsegpt(weight: np.ndarray, hessian: np.ndarray, select: Select, step: int, *,
              damping: float = 0.01, block_size: int = BLOCK_SIZE) -> np.ndarray:
    """W [rows, K] pruned by `select` and updated to compensate, in float64."""
    weight = np.array(weight, dtype=np.float64)
    hessian = np.array(hessian, dtype=np.float64)
    cols = weight.shape[1]
    # Inputs that are always zero carry no information: their weights are free, so they go.
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    weight[:, dead] = 0.0
    factor = inverse_hessian_factor(hessian, damping)
    pruned = np.zeros(weight.shape, dtype=bool)
    block_size = max(step, block_size // step * step)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = weight[:, start:end].copy()
        errors = np.zeros_like(block)
        local = factor[start:end, start:end]
        diagonal = np.diag(local)
        for i in range(end - start):
            if i % step == 0:
                stop = min(i + step, end - start)
                pruned[:, start + i:start + stop] = select(block[:, i:stop], diagonal[i:stop], start + i)
            column = block[:, i]
            kept = np.where(pruned[:, start + i], 0.0, column)
            error = (column - kept) / diagonal[i]
            block[:, i:] -= np.outer(error, local[i, i:])
            block[:, i] = kept
            errors[:, i] = error
        weight[:, start:end] = block
        weight[:, end:] -= errors @ factor[start:end, end:]
    return weight


def output_error(before: np.ndarray, after: np.ndarray, hessian: np.ndarray) -> tuple[float, float]:
    """(‖(W − Ŵ)X‖², ‖WX‖²) per calibration row, from H = XᵀX / rows."""
    delta = after - before
    return float(np.sum((delta @ hessian) * delta)), float(np.sum((before @ hessian) * before))
