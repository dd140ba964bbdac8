"""Observers: streaming statistics of a tensor that end in a clipping range, and range → scale/zero point.

Every observer takes batches one at a time (`update`) and keeps bounded state (a min/max, or a
histogram with a fixed number of bins), then gives a clipping range (`range`): floats per tensor, or
float64 arrays of shape (channels,) when created with `axis`. Methods, by registry name:

- `minmax`: the smallest and largest value seen.
- `percentile`: clip the rarest values. `symmetric=True` (default, ONNX Runtime's default) clips
  |x| at its `percentile`-th percentile t; `symmetric=False` cuts (100 - percentile) / 2 percent from
  each tail of x separately (ONNX Runtime's asymmetric variant).
- `entropy`: the KL-divergence threshold of TensorRT / MXNet / ONNX Runtime on the histogram of |x|.
- `mse`: the clipping range whose quantization (for the given dtype, bits, symmetry) has the least
  mean squared error over the histogram.

The three histogram methods give a range that never reaches past the data: a threshold t on |x|
becomes (max(-t, min), min(t, max)), so data that never went negative gets (0, t).

Values that carry no range information are ignored and counted in `ignored`: NaN and ±inf always,
and values below `ignore_below` (default -1e30). The last is the attention-mask trap: exported
transformers add float32-minimum constants (about -3.4e38) to scores to mask them out; observing
those would give a scale of about 1e36 and wipe out every real value. `ignore_below=None` keeps them.
An observer that saw no value at all gives the range (0, 0).
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import numpy as np

from lowbit.errors import LowbitError
from lowbit.ir import DType

Range = tuple[Any, Any]
MASK_THRESHOLD = -1e30
MAX_RANGE = 1e30


class CalibrationError(LowbitError):
    """An unknown observer or bad option, data an observer cannot use, or a range that cannot be quantized."""


# -- scale and zero point ---------------------------------------------------------------------------

def quant_limits(dtype: DType, bits: int | None = None, narrow_range: bool = False) -> tuple[int, int]:
    """(qmin, qmax) of `bits`-bit values stored in the integer `dtype` (narrow range drops qmin)."""
    if not dtype.is_integer or dtype.bits > 16:
        raise CalibrationError(f"activations and weights quantize to integer types of at most 16 bits, not {dtype}")
    bits = dtype.bits if bits is None else int(bits)
    if not 2 <= bits <= dtype.bits:
        raise CalibrationError(f"{bits} bits do not fit in {dtype}")
    qmin, qmax = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if dtype.is_signed else (0, (1 << bits) - 1)
    return qmin + int(narrow_range), qmax


def choose_qparams(low: Any, high: Any, *, dtype: DType = DType.i8, symmetric: bool, bits: int | None = None,
                   narrow_range: bool = False, min_scale: float = float(np.finfo(np.float32).eps)
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (int32) arrays, shaped like `low` and `high` broadcast together.

    Quantization is real = scale * (q - zero_point) with q in [qmin, qmax] of `bits` bits stored in
    `dtype` (`bits` defaults to the dtype's width; `narrow_range` drops qmin, e.g. i8 → [-127, 127]).
    - The range is first widened to include 0, so 0 is always exactly representable (q = zero point).
    - Symmetric: the zero point is the middle level, (qmin + qmax + 1) // 2 (0 for signed types,
      128 for u8), and scale = max(|low|, |high|) / min(qmax - zp, zp - qmin), so both ±max(|low|,
      |high|) are representable (i8: scale = absmax / 127, -128 is used only by clipping).
    - Asymmetric: scale = (high - low) / (qmax - qmin), zero point = qmin - round(low / scale); low
      maps to qmin and high to within half a step of qmax.
    - Scales never go below `min_scale` (float32 epsilon by default, as PyTorch does): a tensor that is
      constant zero gets scale 1.19e-7. NaN bounds count as 0 (nothing observed).
    - Infinite bounds, or bounds beyond ±1e30, raise `CalibrationError`: such a range comes from
      mask constants (see this module's docstring) and no scale would serve the real values.
    """
    qmin, qmax = quant_limits(dtype, bits, narrow_range)
    low, high = (np.where(np.isnan(bound), 0.0, bound)
                 for bound in np.broadcast_arrays(np.asarray(low, np.float64), np.asarray(high, np.float64)))
    if np.any(np.abs(low) > MAX_RANGE) or np.any(np.abs(high) > MAX_RANGE):
        raise CalibrationError(
            f"range [{np.min(low):g}, {np.max(high):g}] reaches past ±{MAX_RANGE:g} and cannot be quantized "
            f"(an attention mask of float32-minimum constants? observe with ignore_below, or keep the tensor float)")
    low, high = np.minimum(low, 0.0), np.maximum(high, 0.0)
    if symmetric:
        middle = (qmin + qmax + 1) // 2
        scale = _float32_scale(np.maximum(-low, high) / min(qmax - middle, middle - qmin), min_scale)
        zero_point = np.full(scale.shape, middle)
    else:
        scale = _float32_scale((high - low) / (qmax - qmin), min_scale)
        zero_point = np.clip(qmin - np.round(low / scale.astype(np.float64)), qmin, qmax)
    return np.asarray(scale), np.asarray(zero_point, np.int32)


def _float32_scale(scale: np.ndarray, min_scale: float) -> np.ndarray:
    return np.maximum(scale, min_scale).astype(np.float32)


def fake_quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """x quantized and dequantized (round half to even, clip to [qmin, qmax]) in float64.

    A model of quantization error for choosing ranges; the `quantize` op's bit-exact float32 rule is
    the reference interpreter's, not this.
    """
    scale = np.asarray(scale, np.float64)
    q = np.clip(np.round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


# -- the observer interface and registry ------------------------------------------------------------

class Observer:
    """Base class: keeps the count, min and max of the usable values, per channel when `axis` is set.

    Subclasses accumulate more in `_accumulate(rows, valid)` (rows: float64 (channels, elements),
    valid: bool mask of the same shape, or None when every element is usable) and compute their
    range in `_range()` as (low, high) arrays per channel.
    """

    name: ClassVar[str] = ""

    def __init__(self, *, axis: int | None = None, ignore_below: float | None = MASK_THRESHOLD) -> None:
        self.axis = axis
        self.ignore_below = ignore_below
        self.count = 0
        self.ignored = 0
        self.channels: int | None = None
        self.min: np.ndarray | None = None
        self.max: np.ndarray | None = None

    def update(self, array: Any) -> None:
        """Add one batch (any shape; per channel, the channel dimension must keep its size)."""
        rows = self._rows(np.asarray(array))
        valid = np.isfinite(rows)
        if self.ignore_below is not None:
            valid &= rows > self.ignore_below
        usable = int(np.count_nonzero(valid))
        self.ignored += rows.size - usable
        self.count += usable
        if not usable:
            return
        complete = usable == rows.size
        if not complete:
            rows = np.where(valid, rows, 0.0)
        low = rows.min(axis=1, initial=np.inf, where=True if complete else valid)
        high = rows.max(axis=1, initial=-np.inf, where=True if complete else valid)
        self.min = low if self.min is None else np.minimum(self.min, low)
        self.max = high if self.max is None else np.maximum(self.max, high)
        self._accumulate(rows, None if complete else valid)

    def range(self) -> Range:
        """The clipping range: floats per tensor, float64 arrays of shape (channels,) per channel."""
        if self.min is None:
            channels = self.channels or 1
            low, high = np.zeros(channels), np.zeros(channels)
        else:
            low, high = self._range()
            # A channel that saw nothing usable holds min +inf and max -inf (empty reductions).
            seen = np.isfinite(self.min)
            low, high = np.where(seen, low, 0.0), np.where(seen, high, 0.0)
        if self.axis is None:
            return float(low[0]), float(high[0])
        return low, high

    def _rows(self, array: np.ndarray) -> np.ndarray:
        if self.axis is None:
            rows = array.reshape(1, -1)
        else:
            if not -array.ndim <= self.axis < array.ndim:
                raise CalibrationError(f"{self.name} observer: axis {self.axis} is out of range for a "
                                       f"tensor of shape {list(array.shape)}")
            rows = np.moveaxis(array, self.axis, 0).reshape(array.shape[self.axis], -1)
        if self.channels is None:
            self.channels = rows.shape[0]
        elif rows.shape[0] != self.channels:
            raise CalibrationError(f"{self.name} observer: batch has {rows.shape[0]} channels along axis "
                                   f"{self.axis}, earlier batches had {self.channels}")
        return rows.astype(np.float64, copy=False)

    def _accumulate(self, rows: np.ndarray, valid: np.ndarray | None) -> None:
        """Hook for subclasses that keep more than the min and max."""

    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        return self.min, self.max

    def _clip_to_data(self, threshold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A threshold on |x| as a range that does not reach past the observed data."""
        return np.maximum(-threshold, self.min), np.minimum(threshold, self.max)


OBSERVERS: dict[str, type[Observer]] = {}


def register_observer(name: str) -> Callable[[type[Observer]], type[Observer]]:
    """Class decorator: make an observer available to `make_observer(name, ...)` and calibration."""
    def decorate(cls: type[Observer]) -> type[Observer]:
        cls.name = name
        OBSERVERS[name] = cls
        return cls
    return decorate


def make_observer(name: str, **options: Any) -> Observer:
    """A new observer of method `name` (`minmax`, `percentile`, `entropy`, `mse`) with keyword options."""
    cls = OBSERVERS.get(name)
    if cls is None:
        raise CalibrationError(f"unknown calibration method {name!r}; expected one of {sorted(OBSERVERS)}")
    try:
        return cls(**options)
    except TypeError as error:
        raise CalibrationError(f"calibration method {name!r}: {error}") from None


@register_observer("minmax")
class MinMaxObserver(Observer):
    """The smallest and largest usable value seen."""


# -- histograms ----------------------------------------------------------------------------------

class Histogram:
    """Per-channel counts of |x| in `bins` equal bins over [0, limit], kept apart for x < 0 and x >= 0.

    `counts` has shape (channels, 2, bins): [:, 0] counts negative values, [:, 1] the others. When a
    batch reaches past `limit`, the limit grows by the smallest integer factor k that covers it and
    each k neighbouring bins merge into one, so old counts stay exact and memory stays fixed (the new
    limit is below twice the largest value). A channel that has only seen zeros has limit 0.
    """

    def __init__(self, channels: int, bins: int) -> None:
        self.bins = bins
        self.limit = np.zeros(channels)
        self.counts = np.zeros((channels, 2, bins))

    def add(self, rows: np.ndarray, valid: np.ndarray | None) -> None:
        magnitude = np.abs(rows)
        self._grow(magnitude.max(axis=1))
        width = np.where(self.limit > 0, self.limit / self.bins, 1.0)
        index = np.minimum((magnitude / width[:, None]).astype(np.int64), self.bins - 1)
        index += ((np.arange(len(rows)) * 2)[:, None] + (rows >= 0)) * self.bins
        if valid is not None:
            index = index[valid]
        self.counts += np.bincount(index.ravel(), minlength=self.counts.size).reshape(self.counts.shape)

    def _grow(self, largest: np.ndarray) -> None:
        for channel in np.flatnonzero(largest > self.limit):
            old = self.limit[channel]
            ratio = largest[channel] / old if old > 0 else np.inf
            if ratio >= self.bins:
                # Everything seen so far is below the new bin width: it all lands in the first bins.
                self.counts[channel, :, 0] = self.counts[channel].sum(axis=1)
                self.counts[channel, :, 1:] = 0
                self.limit[channel] = largest[channel]
                continue
            factor = math.ceil(ratio)
            merged = np.zeros((2, self.bins))
            np.add.at(merged, (slice(None), np.arange(self.bins) // factor), self.counts[channel])
            self.counts[channel] = merged
            self.limit[channel] = old * factor

    @property
    def width(self) -> np.ndarray:
        return self.limit / self.bins

    def magnitude(self) -> np.ndarray:
        """Counts of |x|, (channels, bins), over [0, limit]."""
        return self.counts.sum(axis=1)

    def signed(self) -> np.ndarray:
        """Counts of x, (channels, 2 * bins), over [-limit, limit]."""
        return np.concatenate([self.counts[:, 0, ::-1], self.counts[:, 1]], axis=1)


def histogram_quantile(counts: np.ndarray, start: np.ndarray, width: np.ndarray, q: float) -> np.ndarray:
    """Per row of `counts` (bins of `width` from `start`), the value below which a fraction q of the mass
    lies, interpolating linearly inside the bin that holds it."""
    cdf = np.cumsum(counts, axis=1)
    target = q * cdf[:, -1]
    index = np.minimum(np.sum(cdf < target[:, None], axis=1), counts.shape[1] - 1)
    rows = np.arange(len(counts))
    before = np.where(index > 0, cdf[rows, index - 1], 0.0)
    inside = counts[rows, index]
    fraction = np.divide(target - before, inside, out=np.zeros_like(target), where=inside > 0)
    return start + (index + np.clip(fraction, 0.0, 1.0)) * width


class HistogramObserver(Observer):
    """Base of the observers that keep a `Histogram` of `bins` bins per sign."""

    def __init__(self, *, bins: int = 2048, **options: Any) -> None:
        super().__init__(**options)
        if bins < 16:
            raise CalibrationError(f"{self.name} observer: bins={bins} is too few (at least 16)")
        self.bins = bins
        self.histogram: Histogram | None = None

    def _accumulate(self, rows: np.ndarray, valid: np.ndarray | None) -> None:
        if self.histogram is None:
            self.histogram = Histogram(len(rows), self.bins)
        self.histogram.add(rows, valid)


@register_observer("percentile")
class PercentileObserver(HistogramObserver):
    """Clips the rarest values: |x| at its `percentile`-th percentile (symmetric), or each tail of x."""

    def __init__(self, *, percentile: float = 99.99, symmetric: bool = True, **options: Any) -> None:
        super().__init__(**options)
        if not 0 < percentile <= 100:
            raise CalibrationError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile
        self.symmetric = symmetric

    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        histogram = self.histogram
        q = self.percentile / 100
        if self.symmetric:
            threshold = histogram_quantile(histogram.magnitude(), 0.0, histogram.width, q)
            return self._clip_to_data(threshold)
        counts, start = histogram.signed(), -histogram.limit
        tail = (1 - q) / 2
        low = histogram_quantile(counts, start, histogram.width, tail)
        high = histogram_quantile(counts, start, histogram.width, 1 - tail)
        return np.maximum(low, self.min), np.minimum(high, self.max)


@register_observer("entropy")
class EntropyObserver(HistogramObserver):
    """The threshold on |x| whose quantization to `num_quantized_bins` levels loses least information.

    TensorRT's calibration (Migacz, "8-bit Inference with TensorRT", 2017) as MXNet and ONNX Runtime
    implement it, on the histogram of |x| (`bins` = 2048): for every candidate end bin i from
    `num_quantized_bins` to `bins`, P is the first i bins with the clipped outliers added to bin i-1;
    Q merges those i bins (without outliers) into `num_quantized_bins` groups of i // levels bins (the
    last group takes the rest) and spreads each group's count evenly over the bins where P is not
    zero. Both are smoothed (each zero bin gets 1e-4, taken evenly from the others) and the threshold
    is the right edge of bin i with the least KL(P || Q). 128 levels (the default) suit signed 8-bit
    symmetric quantization; use 256 for unsigned 8-bit data that never goes negative.
    """

    def __init__(self, *, num_quantized_bins: int = 128, **options: Any) -> None:
        super().__init__(**options)
        if not 2 <= num_quantized_bins <= self.bins:
            raise CalibrationError(f"num_quantized_bins must be in [2, bins={self.bins}], got {num_quantized_bins}")
        self.num_quantized_bins = num_quantized_bins

    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        histogram = self.histogram
        ends = [entropy_threshold_bin(counts, self.num_quantized_bins) for counts in histogram.magnitude()]
        return self._clip_to_data(np.asarray(ends) * histogram.width)


def entropy_threshold_bin(hist: np.ndarray, num_quantized_bins: int) -> int:
    """The number of leading bins of `hist` (a histogram of |x|) whose KL-divergence threshold is best."""
    hist = np.asarray(hist, np.float64)
    outliers = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])
    positions = np.arange(len(hist))
    best_end, best = len(hist), np.inf
    for end in range(num_quantized_bins, len(hist) + 1):
        sliced = hist[:end]
        p = sliced.copy()
        p[-1] += outliers[end]
        nonzero = p != 0
        group = np.minimum(positions[:end] // (end // num_quantized_bins), num_quantized_bins - 1)
        merged = np.bincount(group, weights=sliced, minlength=num_quantized_bins)
        spread = np.bincount(group, weights=nonzero, minlength=num_quantized_bins)
        q = np.where(nonzero, merged[group] / np.maximum(spread[group], 1), 0.0)
        divergence = _kl_divergence(_smooth(p), _smooth(q))
        if divergence < best:
            best_end, best = end, divergence
    return best_end


def _smooth(counts: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """Give each zero bin `eps`, taken evenly from the non-zero bins; None when all are zero."""
    zero = counts == 0
    nonzero = counts.size - int(np.count_nonzero(zero))
    if not nonzero:
        return None
    return counts + np.where(zero, eps, -eps * (counts.size - nonzero) / nonzero)


def _kl_divergence(p: np.ndarray | None, q: np.ndarray | None) -> float:
    if p is None or q is None:
        return np.inf
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))


@register_observer("mse")
class MseObserver(HistogramObserver):
    """The clipping range whose quantization has the least mean squared error over the histogram.

    The target quantization is given as to `choose_qparams` (`dtype`, `symmetric`, `bits`,
    `narrow_range`). Candidates shrink the observed range by a factor k / `steps` for k = 1..steps:
    symmetric ones clip |x| at k / steps of max |x|, asymmetric ones scale min and max together. Each
    candidate's error is that of fake-quantizing the centres of the non-empty bins of the histogram
    of x, weighted by their counts; rounding inside a bin is not modelled, which matters only when a
    quantization step is narrower than a bin (16-bit targets).
    """

    def __init__(self, *, dtype: DType = DType.i8, symmetric: bool = True, bits: int | None = None,
                 narrow_range: bool = False, steps: int = 256, **options: Any) -> None:
        super().__init__(**options)
        self.quantization = dict(dtype=dtype, symmetric=symmetric, bits=bits, narrow_range=narrow_range)
        self.limits = quant_limits(dtype, bits, narrow_range)
        if steps < 1:
            raise CalibrationError(f"mse observer: steps must be positive, got {steps}")
        self.steps = steps

    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        histogram = self.histogram
        shrink = np.arange(1, self.steps + 1) / self.steps
        lows, highs = [], []
        for channel, counts in enumerate(histogram.signed()):
            width = histogram.width[channel]
            low, high = self.min[channel], self.max[channel]
            if not np.isfinite(low):
                lows.append(0.0)
                highs.append(0.0)
                continue
            if self.quantization["symmetric"]:
                threshold = shrink * max(-low, high)
                candidates = np.maximum(-threshold, low), np.minimum(threshold, high)
            else:
                candidates = shrink * low, shrink * high
            filled = np.flatnonzero(counts)
            centres = -histogram.limit[channel] + (filled + 0.5) * width
            scale, zero_point = choose_qparams(*candidates, **self.quantization)
            error = fake_quantize(centres[None, :], scale[:, None], zero_point[:, None], *self.limits) - centres
            best = int(np.argmin((error ** 2) @ counts[filled]))
            lows.append(candidates[0][best])
            highs.append(candidates[1][best])
        return np.asarray(lows), np.asarray(highs)
