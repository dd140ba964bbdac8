"""Reference implementations of tensor ops: shapes, indexing, padding, reductions and resizing.

Choices ONNX leaves open:
- `pad` with negative pads crops first, then pads the cropped tensor; `value` is converted to the
  operand's element type as numpy converts a Python float (integers truncate toward zero).
- `reduce_sum` and `reduce_mean` of f16 accumulate in f32; integer sums wrap in the operand's type;
  the integer mean is the int64 sum divided by the count, truncated toward zero (onnxruntime's rule).
  `reduce_max` / `reduce_min` of an empty set give the type's lowest / highest value (-inf / inf for
  floats), `reduce_prod` gives 1 and `reduce_sum` 0. NaN propagates through max and min.
- `argmax` / `argmin` treat NaN as larger / smaller than everything (numpy's rule): the first NaN wins.
- `resize` computes source coordinates in float32, as onnxruntime does, so rounding ties of `nearest`
  agree with it. `align_corners` and `pytorch_half_pixel` use the integer input and output lengths;
  the other modes use `scales` (half_pixel_symmetric both); ONNX's own reference uses
  scale * input length for the output length even where that is not an integer. `linear` clamps the source coordinate into the operand (edge values
  beyond it); `cubic` clamps the four tap indices instead. Nearest mode `simple` (ONNX Resize-10 and
  Upsample) rounds down when the axis is enlarged and up when it is shrunk.
"""
from __future__ import annotations

import numpy as np

from lowbit.backends.reference.registry import reference


@reference("reshape")
def reshape(attrs, x):
    return x.reshape(attrs["shape"])


@reference("transpose")
def transpose(attrs, x):
    return np.transpose(x, attrs["perm"])


@reference("concat")
def concat(attrs, *inputs):
    return np.concatenate(inputs, axis=attrs["axis"])


@reference("split")
def split(attrs, x):
    return tuple(np.split(x, np.cumsum(attrs["sizes"])[:-1], axis=attrs["axis"]))


@reference("slice")
def slice_(attrs, x):
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(attrs["starts"], attrs["ends"], attrs["axes"], attrs["steps"]):
        # A normalised end of -1 (negative step) means "through index 0", which Python spells None.
        index[axis] = slice(start, end if end >= 0 else None, step)
    return x[tuple(index)]


@reference("gather")
def gather(attrs, data, indices):
    return np.take(data, indices, axis=attrs["axis"])


@reference("gather_elements")
def gather_elements(attrs, data, indices):
    return np.take_along_axis(data, indices.astype(np.intp), axis=attrs["axis"])


@reference("expand")
def expand(attrs, x):
    return np.broadcast_to(x, attrs["shape"])


@reference("tile")
def tile(attrs, x):
    return np.tile(x, attrs["repeats"])


@reference("pad")
def pad(attrs, x):
    rank, pads = x.ndim, attrs["pads"]
    begins, ends = pads[:rank], pads[rank:]
    x = x[tuple(slice(max(-b, 0), x.shape[i] - max(-e, 0)) for i, (b, e) in enumerate(zip(begins, ends)))]
    widths = [(max(b, 0), max(e, 0)) for b, e in zip(begins, ends)]
    if attrs["mode"] == "constant":
        return np.pad(x, widths, constant_values=np.asarray(attrs["value"]).astype(x.dtype))
    return np.pad(x, widths, mode=attrs["mode"])


def _accumulator(x: np.ndarray) -> np.dtype:
    return np.dtype(np.float32) if x.dtype == np.float16 else x.dtype


@reference("reduce_sum")
def reduce_sum(attrs, x):
    return np.sum(x, axis=attrs["axes"], keepdims=attrs["keepdims"], dtype=_accumulator(x)).astype(x.dtype)


@reference("reduce_prod")
def reduce_prod(attrs, x):
    return np.prod(x, axis=attrs["axes"], keepdims=attrs["keepdims"], dtype=_accumulator(x)).astype(x.dtype)


@reference("reduce_mean")
def reduce_mean(attrs, x):
    axes, keepdims = attrs["axes"], attrs["keepdims"]
    if x.dtype.kind in "iu":
        count = max(int(np.prod([x.shape[a] for a in axes], dtype=np.int64)), 1)
        total = np.sum(x, axis=axes, keepdims=keepdims, dtype=np.int64)
        return (np.sign(total) * (np.abs(total) // count)).astype(x.dtype)
    return np.mean(x, axis=axes, keepdims=keepdims, dtype=_accumulator(x)).astype(x.dtype)


def _extreme(x: np.ndarray, lowest: bool):
    if x.dtype.kind == "f":
        return -np.inf if lowest else np.inf
    if x.dtype == np.bool_:
        return not lowest
    info = np.iinfo(x.dtype)
    return info.min if lowest else info.max


@reference("reduce_max")
def reduce_max(attrs, x):
    return np.max(x, axis=attrs["axes"], keepdims=attrs["keepdims"], initial=_extreme(x, lowest=True))


@reference("reduce_min")
def reduce_min(attrs, x):
    return np.min(x, axis=attrs["axes"], keepdims=attrs["keepdims"], initial=_extreme(x, lowest=False))


def _arg_reduce(pick):
    def implementation(attrs, x):
        axis = attrs["axis"]
        if attrs["select_last_index"]:
            index = x.shape[axis] - 1 - pick(np.flip(x, axis), axis=axis)
        else:
            index = pick(x, axis=axis)
        return np.expand_dims(index, axis) if attrs["keepdims"] else index

    return implementation


reference("argmax")(_arg_reduce(np.argmax))
reference("argmin")(_arg_reduce(np.argmin))


@reference("resize")
def resize(attrs, x):
    """Separable: each axis whose size or scale changes is interpolated in turn."""
    compute = np.float64 if x.dtype == np.float64 else np.float32
    result = x
    for axis, (size, scale) in enumerate(zip(attrs["sizes"], attrs["scales"])):
        length = x.shape[axis]
        if size == length and scale == 1.0:
            continue
        source = _source_coordinates(attrs["coordinate_transformation_mode"], length, size, scale)
        if attrs["mode"] == "nearest":
            result = np.take(result, _nearest(attrs["nearest_mode"], source, length, scale), axis=axis)
            continue
        if attrs["mode"] == "linear":
            taps, weights = _linear_taps(source, length)
        else:
            taps, weights = _cubic_taps(source, length, attrs["cubic_coeff_a"], attrs["exclude_outside"])
        gathered = np.take(result, taps, axis=axis).astype(compute)  # axis becomes (size, taps)
        shape = [1] * gathered.ndim
        shape[axis:axis + 2] = weights.shape
        result = np.sum(gathered * weights.reshape(shape).astype(compute), axis=axis + 1)
    return result.astype(x.dtype)


def _source_coordinates(mode: str, length: int, size: int, scale: float) -> np.ndarray:
    """Coordinate in the operand of every result index along one axis (float32, like onnxruntime)."""
    f32 = np.float32
    x, scale, half = np.arange(size, dtype=f32), f32(scale), f32(0.5)
    if mode == "align_corners":
        return x * f32(length - 1) / f32(size - 1) if size > 1 else np.zeros(size, f32)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_half_pixel_for_nn":
        return (x + half) / scale
    if mode == "pytorch_half_pixel" and size <= 1:
        return np.zeros(size, f32)
    offset = f32(0)
    if mode == "half_pixel_symmetric":
        adjustment = f32(size) / (scale * f32(length))
        offset = f32(length) / f32(2) * (f32(1) - adjustment)
    return offset + (x + half) / scale - half


def _nearest(mode: str, source: np.ndarray, length: int, scale: float) -> np.ndarray:
    if mode == "simple":
        mode = "floor" if scale >= 1 else "ceil"
    if mode == "round_prefer_floor":
        index = np.ceil(source - np.float32(0.5))
    elif mode == "round_prefer_ceil":
        index = np.floor(source + np.float32(0.5))
    else:
        index = np.floor(source) if mode == "floor" else np.ceil(source)
    return np.clip(index, 0, length - 1).astype(np.intp)


def _linear_taps(source: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    source = np.clip(source, 0, length - 1)
    low = np.floor(source)
    ratio = source - low
    low = low.astype(np.intp)
    taps = np.stack([low, np.minimum(low + 1, length - 1)], axis=1)
    return taps, np.stack([1 - ratio, ratio], axis=1)


def _cubic_taps(source: np.ndarray, length: int, a: float, exclude_outside: bool) -> tuple[np.ndarray, np.ndarray]:
    low = np.floor(source)
    ratio = (source - low)[:, None]
    taps = low.astype(np.intp)[:, None] + np.arange(-1, 3)
    distance = np.concatenate([ratio + 1, ratio, 1 - ratio, 2 - ratio], axis=1).astype(np.float64)
    near = ((a + 2) * distance - (a + 3)) * distance * distance + 1
    far = ((a * distance - 5 * a) * distance + 8 * a) * distance - 4 * a
    weights = np.where(distance <= 1, near, np.where(distance < 2, far, 0.0))
    if exclude_outside:
        weights = np.where((taps >= 0) & (taps < length), weights, 0.0)
        weights /= weights.sum(axis=1, keepdims=True)
    return np.clip(taps, 0, length - 1), weights.astype(np.float32)
