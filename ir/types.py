"""Tensor types: shape, element type, quantization parameters and sparse layout."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lowbit.errors import ShapeError
from lowbit.ir.dtypes import DType


def format_float(value: float, dtype: DType = DType.f32) -> str:
    """The shortest text that parses back to the same value of `dtype` (always has '.', 'e', inf or nan)."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    scalar = dtype.numpy.type(value) if dtype.is_float else np.float64(value)
    text = np.format_float_positional(scalar, unique=True, trim="0")
    if len(text) > 16:
        text = np.format_float_scientific(scalar, unique=True, trim="0")
    if "." not in text and "e" not in text:
        text += ".0"
    return text


@dataclass(frozen=True)
class QuantParams:
    """Affine quantization: real = scale * (q - zero_point).

    Granularity follows from the fields:
    - per-tensor: `axis is None`, one scale and one zero point;
    - per-channel: `axis` set, one scale per index along `axis`;
    - per-group: `axis` and `group_size` set; consecutive blocks of `group_size` elements along `axis`
      share a scale, and scales are laid out as the tensor's shape with `shape[axis] // group_size`
      in place of `shape[axis]`, flattened in row-major order.
    `bits` may be narrower than the storage type (e.g. 7-bit weights held in i8).
    """

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int | None = None
    group_size: int | None = None
    bits: int = 8
    signed: bool = True

    def __post_init__(self) -> None:
        # Scales are float32 values everywhere (kernels and the ONNX format use float32).
        object.__setattr__(self, "scale", tuple(float(s) for s in np.asarray(self.scale, np.float32).reshape(-1)))
        object.__setattr__(self, "zero_point", tuple(int(z) for z in np.asarray(self.zero_point).reshape(-1)))
        if len(self.scale) != len(self.zero_point):
            raise ShapeError(
                f"quantization parameters need as many zero points ({len(self.zero_point)}) "
                f"as scales ({len(self.scale)})")
        if not self.scale:
            raise ShapeError("quantization parameters need at least one scale")
        if self.axis is None and len(self.scale) != 1:
            raise ShapeError(f"per-tensor quantization takes one scale, got {len(self.scale)}")
        if self.group_size is not None and self.axis is None:
            raise ShapeError("per-group quantization needs an axis")

    @property
    def granularity(self) -> str:
        if self.axis is None:
            return "tensor"
        return "channel" if self.group_size is None else "group"

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    def scale_array(self, shape: tuple[int, ...]) -> np.ndarray:
        """Scales as float32, broadcastable against a tensor of `shape`."""
        return self._broadcast(np.asarray(self.scale, dtype=np.float32), shape)

    def zero_point_array(self, shape: tuple[int, ...]) -> np.ndarray:
        """Zero points as int32, broadcastable against a tensor of `shape`."""
        return self._broadcast(np.asarray(self.zero_point, dtype=np.int32), shape)

    def _broadcast(self, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.axis is None:
            return values.reshape(())
        axis = self.axis % len(shape)
        if self.group_size is None:
            view = [1] * len(shape)
            view[axis] = shape[axis]
            return values.reshape(view)
        grouped = list(shape)
        grouped[axis] = shape[axis] // self.group_size
        return np.repeat(values.reshape(grouped), self.group_size, axis=axis)

    def check_fits(self, shape: tuple[int, ...]) -> str | None:
        """Why these parameters cannot describe a tensor of `shape`, or None if they can."""
        if self.axis is None:
            return None
        if not -len(shape) <= self.axis < len(shape):
            return f"quantization axis {self.axis} is out of range for rank {len(shape)}"
        dim = shape[self.axis % len(shape)]
        if self.group_size is None:
            expected = dim
        else:
            if self.group_size <= 0 or dim % self.group_size:
                return f"group size {self.group_size} does not divide dimension {dim}"
            expected = int(np.prod(shape)) // self.group_size
        if len(self.scale) != expected:
            return f"expected {expected} scales for shape {list(shape)}, got {len(self.scale)}"
        return None

    def __str__(self) -> str:
        parts = []
        if self.axis is not None:
            parts.append(f"axis={self.axis}")
        if self.group_size is not None:
            parts.append(f"group={self.group_size}")
        if self.bits != 8:
            parts.append(f"bits={self.bits}")
        if not self.signed:
            parts.append("unsigned")
        if self.axis is None:
            parts.append(f"scale={format_float(self.scale[0])}")
            parts.append(f"zp={self.zero_point[0]}")
        else:
            parts.append("scale=[" + ", ".join(format_float(s) for s in self.scale) + "]")
            parts.append("zp=[" + ", ".join(str(z) for z in self.zero_point) + "]")
        return "quant<" + ", ".join(parts) + ">"


SPARSE_FORMATS = ("csr", "bsr", "nm")


@dataclass(frozen=True)
class SparseLayout:
    """How a constant weight is stored sparsely: CSR, block-sparse rows with `block`, or N:M packed."""

    format: str
    block: tuple[int, ...] = ()
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if self.format not in SPARSE_FORMATS:
            raise ShapeError(f"unknown sparse format {self.format!r}; expected one of {SPARSE_FORMATS}")
        if self.format == "bsr" and len(self.block) != 2:
            raise ShapeError("a bsr layout needs a 2-d block shape")
        if self.format == "nm" and not 0 < self.n <= self.m:
            raise ShapeError(f"an N:M layout needs 0 < n <= m, got {self.n}:{self.m}")

    def __str__(self) -> str:
        if self.format == "bsr":
            return f"sparse<bsr, block=[{self.block[0]}, {self.block[1]}]>"
        if self.format == "nm":
            return f"sparse<nm, n={self.n}, m={self.m}>"
        return "sparse<csr>"


@dataclass(frozen=True)
class TensorType:
    """Static shape, element type, and optional quantization parameters and sparse layout."""

    shape: tuple[int, ...]
    dtype: DType
    quant: QuantParams | None = field(default=None)
    layout: SparseLayout | None = field(default=None)

    def __post_init__(self) -> None:
        shape = tuple(int(d) for d in self.shape)
        if any(d < 0 for d in shape):
            raise ShapeError(f"negative dimension in shape {list(shape)}")
        object.__setattr__(self, "shape", shape)
        if self.quant is not None:
            problem = self.quant.check_fits(shape)
            if problem:
                raise ShapeError(problem)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes when packed densely (sub-byte types count half a byte)."""
        return (self.size * self.dtype.bits + 7) // 8

    def with_shape(self, shape: tuple[int, ...]) -> "TensorType":
        return TensorType(tuple(shape), self.dtype)

    def with_dtype(self, dtype: DType) -> "TensorType":
        return TensorType(self.shape, dtype)

    @staticmethod
    def of(array: np.ndarray) -> "TensorType":
        array = np.asarray(array)
        return TensorType(array.shape, DType.from_numpy(array.dtype))

    def __str__(self) -> str:
        text = f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"
        if self.quant is not None:
            text += f" {self.quant}"
        if self.layout is not None:
            text += f" {self.layout}"
        return text
