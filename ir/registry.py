"""The op registry: every op is declared once — operands, attributes, type inference, traits.

The verifier, the printer and parser, and the per-op rule tables elsewhere (reference
implementations, quantization rules, kernel selection) all key on these declarations.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from lowbit.errors import ShapeError, UnsupportedOpError
from lowbit.ir.dtypes import DType
from lowbit.ir.types import TensorType

REQUIRED = object()

# Attribute kinds and the Python values they hold (lists are stored as tuples so attrs hash).
ATTR_KINDS = ("int", "float", "str", "bool", "ints", "floats", "strs", "dtype")


@dataclass(frozen=True)
class Attr:
    kind: str
    default: Any = REQUIRED
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ATTR_KINDS:
            raise ValueError(f"unknown attribute kind {self.kind!r}")


@dataclass(frozen=True)
class Operand:
    name: str
    optional: bool = False
    variadic: bool = False


@dataclass
class InferContext:
    """What a type-inference rule sees: operand types, attributes (defaults filled), constant data."""

    op: str
    types: list[TensorType | None]
    attrs: dict[str, Any]
    constants: list[np.ndarray | None]
    where: str = ""

    def const(self, index: int) -> np.ndarray | None:
        """Data of operand `index` if it is a constant, else None."""
        return self.constants[index] if index < len(self.constants) else None

    def type(self, index: int) -> TensorType:
        t = self.types[index] if index < len(self.types) else None
        if t is None:
            self.fail(f"operand {index} is missing")
        return t

    def has(self, index: int) -> bool:
        return index < len(self.types) and self.types[index] is not None

    def fail(self, message: str) -> None:
        raise ShapeError(f"{self.where or self.op}: {message}")


InferFn = Callable[[InferContext], "TensorType | Sequence[TensorType]"]


@dataclass(frozen=True)
class OpDef:
    name: str
    operands: tuple[Operand, ...]
    attrs: dict[str, Attr]
    infer: InferFn
    traits: frozenset[str] = field(default_factory=frozenset)
    doc: str = ""

    @property
    def min_operands(self) -> int:
        count = 0
        for operand in self.operands:
            if operand.optional or operand.variadic:
                break
            count += 1
        return count

    @property
    def max_operands(self) -> int | None:
        if any(o.variadic for o in self.operands):
            return None
        return len(self.operands)

    def normalize_attrs(self, attrs: dict[str, Any], where: str = "") -> dict[str, Any]:
        """Attributes with defaults filled and values coerced to their declared kind."""
        where = where or self.name
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise ShapeError(f"{where}: unknown attribute(s) {sorted(unknown)} for op '{self.name}'")
        result = {}
        for name, spec in self.attrs.items():
            if name in attrs and attrs[name] is not None:
                result[name] = coerce_attr(spec.kind, attrs[name], f"{where}: attribute '{name}'")
            elif spec.default is REQUIRED:
                raise ShapeError(f"{where}: op '{self.name}' needs attribute '{name}'")
            else:
                result[name] = spec.default
        return result


def coerce_attr(kind: str, value: Any, where: str) -> Any:
    try:
        if kind == "int":
            if isinstance(value, (float, np.floating)) and not float(value).is_integer():
                raise TypeError
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            return bool(value)
        if kind == "str":
            if not isinstance(value, str):
                raise TypeError
            return value
        if kind == "dtype":
            return value if isinstance(value, DType) else DType.parse(str(value))
        items = list(np.asarray(value).reshape(-1).tolist()) if isinstance(value, np.ndarray) else list(value)
        if kind == "ints":
            return tuple(coerce_attr("int", v, where) for v in items)
        if kind == "floats":
            return tuple(float(v) for v in items)
        if kind == "strs":
            return tuple(coerce_attr("str", v, where) for v in items)
    except (TypeError, ValueError):
        pass
    raise ShapeError(f"{where} must be of kind {kind}, got {value!r}")


_REGISTRY: dict[str, OpDef] = {}


def register_op(
    name: str,
    operands: Sequence[str] = (),
    attrs: dict[str, Attr] | None = None,
    traits: Sequence[str] = (),
    doc: str = "",
) -> Callable[[InferFn], InferFn]:
    """Declare an op; decorates its type-inference rule.

    Operands are names; a trailing '?' marks an optional one, a trailing '*' a variadic tail.
    The rule receives an `InferContext` and returns the output type (or a sequence of them).
    """

    def decorate(infer: InferFn) -> InferFn:
        if name in _REGISTRY:
            raise ValueError(f"op '{name}' is already registered")
        specs = []
        for operand in operands:
            if operand.endswith("*"):
                specs.append(Operand(operand[:-1], variadic=True))
            elif operand.endswith("?"):
                specs.append(Operand(operand[:-1], optional=True))
            else:
                specs.append(Operand(operand))
        _REGISTRY[name] = OpDef(name, tuple(specs), dict(attrs or {}), infer, frozenset(traits),
                                doc or (infer.__doc__ or "").strip())
        return infer

    return decorate


def get_op(name: str) -> OpDef:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnsupportedOpError(f"op '{name}' is not registered in lowbit's op registry") from None


def is_registered(name: str) -> bool:
    return name in _REGISTRY


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)


def infer_types(
    op: str,
    types: list[TensorType | None],
    attrs: dict[str, Any],
    constants: list[np.ndarray | None] | None = None,
    where: str = "",
) -> list[TensorType]:
    """Output types of `op` applied to operands of `types`; `attrs` must already be normalized."""
    opdef = get_op(op)
    where = where or op
    count = len(types)
    while count and types[count - 1] is None:
        count -= 1
    if count < opdef.min_operands:
        raise ShapeError(f"{where}: op '{op}' needs at least {opdef.min_operands} operands, got {count}")
    if opdef.max_operands is not None and count > opdef.max_operands:
        raise ShapeError(f"{where}: op '{op}' takes at most {opdef.max_operands} operands, got {count}")
    for index in range(min(count, opdef.min_operands)):
        if types[index] is None:
            raise ShapeError(f"{where}: operand '{opdef.operands[index].name}' of '{op}' is required")
    context = InferContext(op, list(types), attrs, list(constants or [None] * len(types)), where)
    result = opdef.infer(context)
    return [result] if isinstance(result, TensorType) else list(result)
