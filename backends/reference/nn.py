"""Reference implementations of the neural-network ops.

Convolutions are im2col + one batched matrix product over groups (no Python loop over pixels or
groups): a strided sliding-window view of the padded input is copied once into a
[group, C/group*kH*kW, N*OH*OW] matrix that the weights multiply with BLAS.

Precision: float32 computes in float32 (BLAS accumulates in float32, as ONNX Runtime's MLAS does);
float16 computes in float32 and rounds the result once; float64 stays float64. Normalisation
statistics are two-pass (mean first, then the mean of squared deviations), which keeps float32
within ONNX Runtime's results without float64 accumulation.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from lowbit.backends.reference.epilogue import apply_epilogue
from lowbit.backends.reference.registry import reference
from lowbit.ir.ops.nn import window_count


def _compute_type(dtype: np.dtype) -> np.dtype:
    """The type arithmetic runs in: float16 widens to float32, everything else stays as it is."""
    return np.dtype(np.float32) if dtype == np.float16 else dtype


def _pad_spatial(x: np.ndarray, begins: Sequence[int], ends: Sequence[int], value: float) -> np.ndarray:
    """Pad (or, for negative amounts, crop) the two trailing axes of x."""
    crop = tuple(slice(max(0, -b), x.shape[axis + 2] - max(0, -e))
                 for axis, (b, e) in enumerate(zip(begins, ends)))
    x = x[(Ellipsis,) + crop]
    widths = [(0, 0)] * (x.ndim - 2) + [(max(0, b), max(0, e)) for b, e in zip(begins, ends)]
    if not any(b or e for b, e in widths):
        return x
    return np.pad(x, widths, constant_values=value)


def _windows(x: np.ndarray, kernel: Sequence[int], strides: Sequence[int],
             dilations: Sequence[int]) -> np.ndarray:
    """A view [N, C, OH, OW, kH, kW] of every window of the (already padded) x [N, C, H, W]."""
    spans = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilations))
    view = sliding_window_view(x, spans, axis=(2, 3))
    return view[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]


def _convolve(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, strides: Sequence[int],
              begins: Sequence[int], ends: Sequence[int], dilations: Sequence[int], group: int) -> np.ndarray:
    compute = _compute_type(x.dtype)
    padded = _pad_spatial(x.astype(compute, copy=False), begins, ends, 0)
    windows = _windows(padded, w.shape[2:], strides, dilations)
    n, c, oh, ow, kh, kw = windows.shape
    m = w.shape[0]
    # [N, G, C/G, OH, OW, kH, kW] → [G, C/G, kH, kW, N, OH, OW]: the only copy of the input (im2col). Weights
    # on the left ([G, M/G, K] @ [G, K, N*OH*OW]) is the operand order BLAS runs fastest here.
    cols = windows.reshape(n, group, c // group, oh, ow, kh, kw).transpose(1, 2, 5, 6, 0, 3, 4)
    cols = cols.reshape(group, c // group * kh * kw, n * oh * ow)
    out = np.matmul(w.astype(compute, copy=False).reshape(group, m // group, -1), cols)
    out = out.reshape(m, n, oh, ow).transpose(1, 0, 2, 3)
    if b is not None:
        out += b.astype(compute).reshape(1, m, 1, 1)
    return out.astype(x.dtype, copy=False)


@reference("conv2d")
def conv2d(attrs, x, w, b=None, residual=None):
    pads = attrs["pads"]
    y = _convolve(x, w, b, attrs["strides"], pads[:2], pads[2:], attrs["dilations"], attrs["group"])
    return apply_epilogue(attrs, y, residual)


@reference("conv_transpose2d")
def conv_transpose2d(attrs, x, w, b=None):
    """A stride-1 convolution of x with zeros inserted between its pixels (strides - 1 of them) and padded by
    dilation * (k - 1) - pads (cropped where negative), with the flipped, channel-swapped kernel."""
    strides, dilations, pads, group = attrs["strides"], attrs["dilations"], attrs["pads"], attrs["group"]
    n, c, h, width = x.shape
    spread = np.zeros((n, c, (h - 1) * strides[0] + 1, (width - 1) * strides[1] + 1), x.dtype)
    spread[:, :, ::strides[0], ::strides[1]] = x
    reach = [d * (k - 1) for d, k in zip(dilations, w.shape[2:])]
    begins = [reach[axis] - pads[axis] for axis in range(2)]
    ends = [reach[axis] - pads[axis + 2] + attrs["output_padding"][axis] for axis in range(2)]
    m_per_group = w.shape[1]
    kernel = w.reshape(group, c // group, m_per_group, *w.shape[2:]).transpose(0, 2, 1, 3, 4)
    kernel = kernel.reshape(group * m_per_group, c // group, *w.shape[2:])[:, :, ::-1, ::-1]
    return _convolve(spread, kernel, b, (1, 1), begins, ends, dilations, group)


@reference("matmul")
def matmul(attrs, a, b):
    compute = _compute_type(a.dtype)
    return np.matmul(a.astype(compute, copy=False), b.astype(compute, copy=False)).astype(a.dtype, copy=False)


@reference("linear")
def linear(attrs, x, w, b=None, residual=None):
    compute = _compute_type(x.dtype)
    out = np.matmul(x.astype(compute, copy=False), w.astype(compute, copy=False).T)
    if b is not None:
        out += b.astype(compute)
    return apply_epilogue(attrs, out.astype(x.dtype, copy=False), residual)


def _pool_taps(x: np.ndarray, attrs: dict, fill: float, pad_fill: float | None = None) -> list[np.ndarray]:
    """For each kernel tap, the view [N, C, OH, OW] of x padded with `fill` that the tap reads in every window
    (ceil_mode's partial windows included). With `pad_fill`, the explicit padding holds `pad_fill` and only
    what ceil_mode adds holds `fill`. Reducing over taps is much faster than over a window view's last axes."""
    kernel, strides, dilations, pads = attrs["kernel"], attrs["strides"], attrs["dilations"], attrs["pads"]
    counts, ends = [], []
    for axis in range(2):
        size = x.shape[axis + 2]
        count = window_count(size, kernel[axis], strides[axis], dilations[axis], pads[axis], pads[axis + 2],
                             attrs["ceil_mode"])
        needed = (count - 1) * strides[axis] + dilations[axis] * (kernel[axis] - 1) + 1
        counts.append(count)
        ends.append(max(pads[axis + 2], needed - size - pads[axis]))
    begins = pads[:2]
    if pad_fill is not None:
        x = _pad_spatial(x, pads[:2], pads[2:], pad_fill)
        begins, ends = (0, 0), [end - pad for end, pad in zip(ends, pads[2:])]
    padded = _pad_spatial(x, begins, ends, fill)
    rows, cols = ([slice(start, start + (count - 1) * stride + 1, stride)
                   for start in range(0, dilation * kernel_size, dilation)]
                  for count, stride, dilation, kernel_size in zip(counts, strides, dilations, kernel))
    return [padded[:, :, row, col] for row in rows for col in cols]


def _reduce_taps(taps: list[np.ndarray], combine: np.ufunc) -> np.ndarray:
    result = taps[0].copy()
    for tap in taps[1:]:
        combine(result, tap, out=result)
    return result


@reference("max_pool2d")
def max_pool2d(attrs, x):
    lowest = -np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min
    return _reduce_taps(_pool_taps(x, attrs, lowest), np.maximum)


@reference("avg_pool2d")
def avg_pool2d(attrs, x):
    """The divisor counts the taps inside the input, plus those in the explicit padding when
    count_include_pad; taps that ceil_mode adds beyond the padding never count (ONNX Runtime, PyTorch)."""
    compute = _compute_type(x.dtype)
    sums = _reduce_taps(_pool_taps(x.astype(compute, copy=False), attrs, 0), np.add)
    inside = np.ones((1, 1) + x.shape[2:], compute)
    counts = _reduce_taps(_pool_taps(inside, attrs, 0, 1 if attrs["count_include_pad"] else None), np.add)
    return (sums / counts).astype(x.dtype, copy=False)


@reference("global_avg_pool")
def global_avg_pool(attrs, x):
    axes = tuple(range(2, x.ndim))
    return x.mean(axis=axes, keepdims=True, dtype=_compute_type(x.dtype)).astype(x.dtype, copy=False)


@reference("global_max_pool")
def global_max_pool(attrs, x):
    return x.max(axis=tuple(range(2, x.ndim)), keepdims=True)


def _channel_view(param: np.ndarray, ndim: int, compute: np.dtype) -> np.ndarray:
    """A per-channel parameter [C] shaped to broadcast along axis 1 of a rank-`ndim` tensor."""
    return param.astype(compute, copy=False).reshape((1, -1) + (1,) * (ndim - 2))


def _normalize(x: np.ndarray, axes: tuple[int, ...], epsilon: float) -> np.ndarray:
    mean = x.mean(axis=axes, keepdims=True)
    centred = x - mean
    variance = np.mean(np.square(centred), axis=axes, keepdims=True)
    return centred / np.sqrt(variance + x.dtype.type(epsilon))


@reference("batch_norm")
def batch_norm(attrs, x, scale, bias, mean, var):
    compute = _compute_type(x.dtype)
    scale, bias, mean, var = (_channel_view(p, x.ndim, compute) for p in (scale, bias, mean, var))
    factor = scale / np.sqrt(var + compute.type(attrs["epsilon"]))
    return ((x.astype(compute, copy=False) - mean) * factor + bias).astype(x.dtype, copy=False)


@reference("instance_norm")
def instance_norm(attrs, x, scale, bias):
    compute = _compute_type(x.dtype)
    normal = _normalize(x.astype(compute, copy=False), tuple(range(2, x.ndim)), attrs["epsilon"])
    out = normal * _channel_view(scale, x.ndim, compute) + _channel_view(bias, x.ndim, compute)
    return out.astype(x.dtype, copy=False)


@reference("layer_norm")
def layer_norm(attrs, x, scale, bias=None):
    compute = _compute_type(x.dtype)
    axes = tuple(range(attrs["axis"] % x.ndim, x.ndim))
    out = _normalize(x.astype(compute, copy=False), axes, attrs["epsilon"]) * scale.astype(compute, copy=False)
    if bias is not None:
        out += bias.astype(compute, copy=False)
    return out.astype(x.dtype, copy=False)


@reference("lrn")
def lrn(attrs, x):
    compute = _compute_type(x.dtype)
    size = attrs["size"]
    squares = np.square(x.astype(compute, copy=False))
    widths = [(0, 0)] * x.ndim
    widths[1] = ((size - 1) // 2, size // 2)
    sums = sliding_window_view(np.pad(squares, widths), size, axis=1).sum(axis=-1)
    base = compute.type(attrs["bias"]) + compute.type(attrs["alpha"] / size) * sums
    return (x / base ** compute.type(attrs["beta"])).astype(x.dtype, copy=False)


def _shifted(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """x minus its maximum along `axis` (so exp never overflows), and the sum of exp of that."""
    shifted = x.astype(_compute_type(x.dtype), copy=False)
    shifted = shifted - shifted.max(axis=axis, keepdims=True)
    return shifted, np.exp(shifted).sum(axis=axis, keepdims=True)


@reference("softmax")
def softmax(attrs, x):
    shifted, total = _shifted(x, attrs["axis"])
    return (np.exp(shifted) / total).astype(x.dtype, copy=False)


@reference("log_softmax")
def log_softmax(attrs, x):
    shifted, total = _shifted(x, attrs["axis"])
    return (shifted - np.log(total)).astype(x.dtype, copy=False)
