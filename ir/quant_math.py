"""The arithmetic of lowbit's integer ops, shared by the reference interpreter, passes and kernels.

Everything here is exact integer arithmetic (Python ints or numpy int64) except `quantize_values` and
`dequantize_values`, the two float borders, which are written once here so that a pass quantizing a
weight and the `quantize` op agree bit for bit. docs/quantization.md states the rules in prose.

Requantization (the one rounding every integer op uses): a real multiplier M ≥ 0 is stored as an
integer `m` in [0, 2^31) and a right shift `s` in [0, 62], M ≈ m · 2^-s. A sum of integer terms
t_i with multipliers m_i sharing shift s becomes

    y = clamp(zp + ((Σ t_i · m_i + 2^(s-1)) >> s), qmin, qmax)      (2^(s-1) is 0 when s = 0)

in int64 with an arithmetic (flooring) shift: round half toward +infinity, applied once. The terms are
exact (no intermediate saturates); the multipliers are chosen so that the int64 sum cannot overflow
for any term within its static bound (`quantize_multipliers`), and the verifier re-checks that.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import numpy as np

from lowbit.errors import ShapeError
from lowbit.ir.dtypes import DType

INT64_MAX = (1 << 63) - 1
MULTIPLIER_LIMIT = 1 << 31  # multipliers fit a non-negative int32: kernels use 32x32 → 64-bit products
MAX_SHIFT = 62
INT32_BOUND = 1 << 31  # the largest |value| of an int32, the default bound of a requantized term


def _rounding_term(shift: int) -> int:
    return (1 << shift) >> 1


def multiplier_problem(multipliers: Sequence[int], shift: int, bounds: Sequence[int]) -> str | None:
    """Why `multipliers` with a shared `shift` are invalid for terms with |t_i| <= bounds[i], or None."""
    if not 0 <= shift <= MAX_SHIFT:
        return f"shift {shift} is outside [0, {MAX_SHIFT}]"
    for m in multipliers:
        if not 0 <= m < MULTIPLIER_LIMIT:
            return f"multiplier {m} is outside [0, 2^31)"
    total = sum(b * m for b, m in zip(bounds, multipliers)) + _rounding_term(shift)
    if total > INT64_MAX:
        return (f"multipliers {list(multipliers)} >> {shift} can overflow int64 for terms bounded by "
                f"{list(bounds)}")
    return None


def quantize_multipliers(reals: Sequence[float], bounds: Sequence[int]) -> tuple[tuple[int, ...], int]:
    """Integers m_i < 2^31 and one shift s with m_i · 2^-s ≈ reals[i], for terms |t_i| <= bounds[i].

    The shift is the largest in [0, 62] for which every m_i = round_half_up(reals[i] · 2^s) stays below
    2^31 and Σ bounds[i] · m_i + 2^(s-1) fits int64, so precision is as high as the largest real and
    the int64 headroom allow. With the default int32 bound and one real M in [2^-32, 2^31) this is the
    usual normal form m in [2^30, 2^31) (relative error at most 2^-31); smaller reals keep s = 62 and a
    smaller m (absolute error at most 2^-63; there |M · t| <= 1/2 for every int32 term anyway).
    """
    if len(reals) != len(bounds) or not reals:
        raise ValueError("quantize_multipliers needs one bound per real multiplier")
    exact = []
    for real in reals:
        if not math.isfinite(real) or real < 0:
            raise ShapeError(f"real multiplier {real} must be finite and non-negative")
        exact.append(Fraction(real))
    largest = max(exact)
    if largest == 0:
        return tuple(0 for _ in reals), 0
    # Start where the largest real lands in [2^30, 2^31), then give up bits until everything fits.
    shift = min(MAX_SHIFT, 31 - math.frexp(float(largest))[1])
    while shift >= 0:
        multipliers = tuple(math.floor(r * (1 << shift) + Fraction(1, 2)) for r in exact)
        if multiplier_problem(multipliers, shift, bounds) is None:
            return multipliers, shift
        shift -= 1
    raise ShapeError(f"real multiplier(s) {list(reals)} are too large for a fixed-point multiplier "
                     f"(below 2^31 and terms bounded by {list(bounds)})")


def quantize_multiplier(real: float, bound: int = INT32_BOUND) -> tuple[int, int]:
    """(m, s) with m · 2^-s ≈ real for one term bounded by `bound` (see `quantize_multipliers`)."""
    (multiplier,), shift = quantize_multipliers([real], [bound])
    return multiplier, shift


def term_bound(dtype: DType, zero_points: Sequence[int]) -> int:
    """The largest |q - z| for any value q of `dtype` and any of the zero points."""
    return max(max(int(dtype.max) - z, z - int(dtype.min)) for z in zero_points)


def data_bound(data: np.ndarray | None, dtype: DType) -> int:
    """The largest |value| of `data` when it is known (a constant), else of any value of `dtype`."""
    if data is None:
        return max(-int(dtype.min), int(dtype.max))
    return int(np.abs(data.astype(np.int64)).max(initial=0))


def accumulator_bound(x_dtype: DType, x_zero_points: Sequence[int], w_dtype: DType,
                      w_zero_points: Sequence[int], depth: int, bias_bound: int = 0) -> int:
    """The largest |Σ_k (x - zx)(w - zw) + bias| over `depth` products, for |bias| <= bias_bound.

    Kernels may accumulate in int32 exactly when this is below 2^31.
    """
    return depth * term_bound(x_dtype, x_zero_points) * term_bound(w_dtype, w_zero_points) + bias_bound


def rounding_shift(values: np.ndarray, shift: np.ndarray | int) -> np.ndarray:
    """round_half_up(values / 2^shift) for int64 values: (v + 2^(s-1)) >> s with a flooring shift."""
    shift = np.asarray(shift, dtype=np.int64)
    half = np.left_shift(np.int64(1), shift) >> 1
    return np.right_shift(values + half, shift)


def requantize_sum(terms: Sequence[np.ndarray], multipliers: Sequence[np.ndarray | int],
                   shift: np.ndarray | int, zero_point: int, qmin: int, qmax: int) -> np.ndarray:
    """clamp(zero_point + rounding_shift(Σ terms[i] · multipliers[i], shift), qmin, qmax) as int64.

    Multipliers and shift broadcast against the terms (one per output channel, or one for all).
    """
    total = sum(np.asarray(t, dtype=np.int64) * np.asarray(m, dtype=np.int64) for t, m in zip(terms, multipliers))
    return np.clip(rounding_shift(total, shift) + zero_point, qmin, qmax)


def quantize_values(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """ONNX QuantizeLinear as int64: clamp(round_half_even(x / scale) + zero_point, qmin, qmax).

    x and scale are float32 and the division is float32 (bit-exact with ONNX Runtime); infinities saturate
    and NaN becomes qmin (as ONNX Runtime on x86 does). `scale` and `zero_point` broadcast against x.
    """
    with np.errstate(all="ignore"):
        ratio = np.rint(np.asarray(x, dtype=np.float32) / np.asarray(scale, dtype=np.float32))
    # Clip in float before the cast so huge values and infinities convert to a defined integer.
    ratio = np.where(np.isnan(ratio), -np.inf, ratio)
    ratio = np.clip(ratio, -float(1 << 40), float(1 << 40)).astype(np.int64)
    return np.clip(ratio + zero_point, qmin, qmax)


def dequantize_values(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """ONNX DequantizeLinear: float32(q - zero_point) · scale, the subtraction exact in int64."""
    centred = np.asarray(q, dtype=np.int64) - zero_point
    return centred.astype(np.float32) * np.asarray(scale, dtype=np.float32)
