"""Element types of tensors in the IR and their numpy storage."""
from __future__ import annotations

import enum

import numpy as np


class DType(enum.Enum):
    """An element type. Sub-byte types (i4, u4) are stored one value per byte in numpy arrays."""

    f64 = "f64"
    f32 = "f32"
    f16 = "f16"
    i64 = "i64"
    i32 = "i32"
    i16 = "i16"
    i8 = "i8"
    u64 = "u64"
    u32 = "u32"
    u16 = "u16"
    u8 = "u8"
    i4 = "i4"
    u4 = "u4"
    bool = "bool"

    def __repr__(self) -> str:
        return f"DType.{self.value}"

    def __str__(self) -> str:
        return self.value

    @property
    def numpy(self) -> np.dtype:
        """The numpy dtype that stores values of this type."""
        return _STORAGE[self]

    @property
    def bits(self) -> int:
        return _BITS[self]

    @property
    def is_float(self) -> bool:
        return self in (DType.f64, DType.f32, DType.f16)

    @property
    def is_integer(self) -> bool:
        return not self.is_float and self is not DType.bool

    @property
    def is_signed(self) -> bool:
        return self.is_float or self.value.startswith("i")

    @property
    def min(self) -> int | float:
        """Smallest representable value (integer types use their own bit width, i4 is -8)."""
        if self.is_float:
            return float(np.finfo(self.numpy).min)
        if self is DType.bool:
            return 0
        return -(1 << (self.bits - 1)) if self.is_signed else 0

    @property
    def max(self) -> int | float:
        if self.is_float:
            return float(np.finfo(self.numpy).max)
        if self is DType.bool:
            return 1
        return (1 << (self.bits - 1)) - 1 if self.is_signed else (1 << self.bits) - 1

    @staticmethod
    def from_numpy(dtype: np.dtype | type) -> "DType":
        """The DType stored as `dtype`; sub-byte types are never inferred from storage."""
        dtype = np.dtype(dtype)
        try:
            return _FROM_NUMPY[dtype]
        except KeyError:
            from lowbit.errors import ShapeError

            raise ShapeError(f"numpy dtype {dtype} has no lowbit element type") from None

    @staticmethod
    def parse(text: str) -> "DType":
        try:
            return DType(text)
        except ValueError:
            from lowbit.errors import ParseError

            raise ParseError(f"unknown element type {text!r}") from None


_STORAGE = {
    DType.f64: np.dtype(np.float64),
    DType.f32: np.dtype(np.float32),
    DType.f16: np.dtype(np.float16),
    DType.i64: np.dtype(np.int64),
    DType.i32: np.dtype(np.int32),
    DType.i16: np.dtype(np.int16),
    DType.i8: np.dtype(np.int8),
    DType.u64: np.dtype(np.uint64),
    DType.u32: np.dtype(np.uint32),
    DType.u16: np.dtype(np.uint16),
    DType.u8: np.dtype(np.uint8),
    DType.i4: np.dtype(np.int8),
    DType.u4: np.dtype(np.uint8),
    DType.bool: np.dtype(np.bool_),
}
_BITS = {
    DType.f64: 64, DType.f32: 32, DType.f16: 16,
    DType.i64: 64, DType.i32: 32, DType.i16: 16, DType.i8: 8,
    DType.u64: 64, DType.u32: 32, DType.u16: 16, DType.u8: 8,
    DType.i4: 4, DType.u4: 4, DType.bool: 8,
}
_FROM_NUMPY = {
    np.dtype(np.float64): DType.f64,
    np.dtype(np.float32): DType.f32,
    np.dtype(np.float16): DType.f16,
    np.dtype(np.int64): DType.i64,
    np.dtype(np.int32): DType.i32,
    np.dtype(np.int16): DType.i16,
    np.dtype(np.int8): DType.i8,
    np.dtype(np.uint64): DType.u64,
    np.dtype(np.uint32): DType.u32,
    np.dtype(np.uint16): DType.u16,
    np.dtype(np.uint8): DType.u8,
    np.dtype(np.bool_): DType.bool,
}
