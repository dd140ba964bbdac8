"""Reference implementations of elementwise ops.

Choices ONNX leaves open:
- integer `div` truncates toward zero (C semantics); division by zero gives 0 for integers.
- `cast` from float to integer truncates toward zero; NaN and out-of-range values give the
  storage type's conversion result of numpy (implementation defined, never used by lowbit's passes).
  Casts to i4/u4 keep the low four bits (two's complement wrap-around), as ONNX's reference does.
- `mod` with fmod=false on floats takes the divisor's sign like Python's `%` (ONNX requires fmod=true
  for floats); an integer remainder by zero is 0.
- `shift_left`/`shift_right` by at least the bit width follow numpy (the storage type's result).
- `round` rounds half to even, as ONNX specifies.
- `erf` is computed in float64 with `math.erf` and rounded to the operand's type.
"""
from __future__ import annotations

import math

import numpy as np

from lowbit.backends.reference.registry import reference

_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "maximum": np.maximum, "minimum": np.minimum,
    "equal": np.equal, "less": np.less, "greater": np.greater, "less_equal": np.less_equal,
    "greater_equal": np.greater_equal, "logical_and": np.logical_and, "logical_or": np.logical_or,
    "logical_xor": np.logical_xor, "bitwise_and": np.bitwise_and, "bitwise_or": np.bitwise_or,
    "bitwise_xor": np.bitwise_xor, "shift_left": np.left_shift, "shift_right": np.right_shift,
}
_UNARY = {
    "neg": np.negative, "abs": np.abs, "sign": np.sign, "sqrt": np.sqrt, "exp": np.exp, "log": np.log,
    "tanh": np.tanh, "reciprocal": np.reciprocal, "floor": np.floor, "ceil": np.ceil, "round": np.round,
    "logical_not": np.logical_not, "sin": np.sin, "cos": np.cos, "tan": np.tan, "asin": np.arcsin,
    "acos": np.arccos, "atan": np.arctan, "sinh": np.sinh, "cosh": np.cosh, "asinh": np.arcsinh,
    "acosh": np.arccosh, "atanh": np.arctanh, "bitwise_not": np.invert,
}


def _binary(ufunc):
    return lambda attrs, a, b: ufunc(a, b)


def _unary(ufunc):
    return lambda attrs, x: ufunc(x)


for _op, _ufunc in _BINARY.items():
    reference(_op)(_binary(_ufunc))
for _op, _ufunc in _UNARY.items():
    reference(_op)(_unary(_ufunc))


@reference("div")
def div(attrs, a, b):
    if a.dtype.kind in "iu":
        safe = np.where(b == 0, 1, b)
        quotient = np.trunc(a.astype(np.float64) / safe) if a.dtype.itemsize < 8 else _trunc_div(a, safe)
        return np.where(b == 0, 0, quotient).astype(a.dtype)
    return np.divide(a, b)


def _trunc_div(a, b):
    quotient = np.floor_divide(a, b)
    remainder = a - quotient * b
    return quotient + ((remainder != 0) & ((a < 0) != (b < 0)))


@reference("pow")
def pow_(attrs, a, b):
    if a.dtype.kind in "iu":
        return np.power(a.astype(np.float64), b.astype(np.float64)).astype(a.dtype)
    return np.power(a, b)


@reference("mod")
def mod(attrs, a, b):
    return np.fmod(a, b) if attrs["fmod"] else np.mod(a, b)


@reference("prelu")
def prelu(attrs, x, slope):
    return np.where(x < 0, x * slope, x)


@reference("relu")
def relu(attrs, x):
    return np.maximum(x, np.zeros((), x.dtype))


@reference("sigmoid")
def sigmoid(attrs, x):
    # exp(-|x|) never overflows; both branches are the same function.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype)


@reference("softplus")
def softplus(attrs, x):
    return (np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))).astype(x.dtype)


@reference("erf")
def erf(attrs, x):
    return np.frompyfunc(math.erf, 1, 1)(x.astype(np.float64)).astype(x.dtype)


@reference("hard_swish")
def hard_swish(attrs, x):
    return x * np.clip(x + 3, 0, 6) / 6


@reference("leaky_relu")
def leaky_relu(attrs, x):
    return np.where(x >= 0, x, x * x.dtype.type(attrs["alpha"]))


@reference("elu")
def elu(attrs, x):
    return np.where(x >= 0, x, x.dtype.type(attrs["alpha"]) * np.expm1(np.minimum(x, 0)))


@reference("hard_sigmoid")
def hard_sigmoid(attrs, x):
    return np.clip(x * x.dtype.type(attrs["alpha"]) + x.dtype.type(attrs["beta"]), 0, 1)


@reference("gelu")
def gelu(attrs, x):
    wide = x.astype(np.float64)
    if attrs["approximate"] == "tanh":
        result = 0.5 * wide * (1 + np.tanh(math.sqrt(2 / math.pi) * (wide + 0.044715 * wide ** 3)))
    else:
        result = 0.5 * wide * (1 + np.frompyfunc(math.erf, 1, 1)(wide / math.sqrt(2)).astype(np.float64))
    return result.astype(x.dtype)


@reference("clip")
def clip(attrs, x):
    low, high = attrs["min"], attrs["max"]
    if x.dtype.kind in "iu":
        info = np.iinfo(x.dtype)
        low = info.min if low == float("-inf") else max(int(math.ceil(low)), info.min)
        high = info.max if high == float("inf") else min(int(math.floor(high)), info.max)
    return np.clip(x, x.dtype.type(low), x.dtype.type(high))


@reference("where")
def where(attrs, condition, a, b):
    return np.where(condition, a, b)


@reference("cast")
def cast(attrs, x):
    target = attrs["to"]
    if x.dtype.kind == "f" and target.is_integer:
        x = np.trunc(np.nan_to_num(x, nan=0.0))
    if target.is_integer and target.bits < 8 * target.numpy.itemsize:
        # Sub-byte storage holds any byte; keep the value in range by wrapping, like a 4-bit register.
        low = int(target.min)
        x = ((x.astype(np.int64) - low) & ((1 << target.bits) - 1)) + low
    return x.astype(target.numpy)


@reference("identity")
def identity(attrs, x):
    return x
