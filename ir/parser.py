"""Parser of the text form written by `lowbit.ir.printer` (see there for the grammar by example)."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.errors import LowbitError, ParseError
from lowbit.ir.dtypes import DType
from lowbit.ir.graph import Graph, Value
from lowbit.ir.registry import coerce_attr, get_op
from lowbit.ir.types import QuantParams, SparseLayout, TensorType

_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r\n]+|\#[^\n]*)
  | (?P<string>"[^"\\]*(?:\\.[^"\\]*)*")
  | (?P<value>%(?:[A-Za-z0-9_.]+|"[^"\\]*(?:\\.[^"\\]*)*"))
  | (?P<const>@(?:[A-Za-z0-9_.]+|"[^"\\]*(?:\\.[^"\\]*)*"))
  | (?P<number>-?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|inf\b|nan\b))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<punct>[=(){}\[\]<>,:])
""", re.VERBOSE)


class _Tokens:
    def __init__(self, text: str) -> None:
        self.text = text
        self.items: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            match = _TOKEN.match(text, pos)
            if not match:
                raise self._error(pos, f"unexpected character {text[pos]!r}")
            kind = match.lastgroup
            if kind != "ws":
                self.items.append((kind, match.group(), pos))
            pos = match.end()
        self.index = 0

    def _error(self, pos: int, message: str) -> ParseError:
        line = self.text.count("\n", 0, pos) + 1
        column = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        return ParseError(f"line {line}, column {column}: {message}")

    def error(self, message: str, *, previous: bool = False) -> ParseError:
        """An error at the next token, or at the one just consumed with `previous=True`."""
        index = self.index - 1 if previous else self.index
        pos = self.items[index][2] if index < len(self.items) else len(self.text)
        return self._error(pos, message)

    def peek(self, offset: int = 0) -> tuple[str, str]:
        index = self.index + offset
        if index < len(self.items):
            return self.items[index][:2]
        return ("eof", "")

    def next(self) -> tuple[str, str]:
        token = self.peek()
        if token[0] == "eof":
            raise self.error("unexpected end of text")
        self.index += 1
        return token

    def accept(self, text: str) -> bool:
        if self.peek()[1] == text and self.peek()[0] in ("punct", "ident"):
            self.index += 1
            return True
        return False

    def expect(self, text: str) -> None:
        if not self.accept(text):
            raise self.error(f"expected '{text}', found '{self.peek()[1] or 'end of text'}'")

    def expect_kind(self, kind: str) -> str:
        if self.peek()[0] != kind:
            raise self.error(f"expected {kind}, found '{self.peek()[1] or 'end of text'}'")
        return self.next()[1]


def _sigil_name(token: str) -> str:
    body = token[1:]
    return json.loads(body) if body.startswith('"') else body


def _parse_literal(tokens: _Tokens) -> Any:
    """A JSON-like literal: numbers, strings, true/false/null, bare identifiers, lists, objects."""
    kind, text = tokens.peek()
    if text == "[" and kind == "punct":
        tokens.next()
        items = []
        while not tokens.accept("]"):
            items.append(_parse_literal(tokens))
            if not tokens.accept(","):
                tokens.expect("]")
                break
        return items
    if text == "{" and kind == "punct":
        tokens.next()
        result = {}
        while not tokens.accept("}"):
            key = json.loads(tokens.expect_kind("string"))
            tokens.expect(":")
            result[key] = _parse_literal(tokens)
            if not tokens.accept(","):
                tokens.expect("}")
                break
        return result
    tokens.next()
    if kind == "string":
        return json.loads(text)
    if kind == "number":
        if re.fullmatch(r"-?\d+", text):
            return int(text)
        return float(text)
    if kind == "ident":
        return {"true": True, "false": False, "null": None, "inf": float("inf"),
                "nan": float("nan")}.get(text, text)
    raise tokens.error(f"unexpected '{text}'")


def _parse_type(tokens: _Tokens) -> TensorType:
    dtype = DType.parse(tokens.expect_kind("ident"))
    tokens.expect("[")
    shape = []
    while not tokens.accept("]"):
        shape.append(int(tokens.expect_kind("number")))
        if not tokens.accept(","):
            tokens.expect("]")
            break
    quant = layout = None
    while True:
        if tokens.accept("quant"):
            quant = _parse_quant(tokens)
        elif tokens.accept("sparse"):
            layout = _parse_layout(tokens)
        else:
            break
    return TensorType(tuple(shape), dtype, quant, layout)


def _parse_fields(tokens: _Tokens) -> dict[str, Any]:
    tokens.expect("<")
    fields: dict[str, Any] = {}
    while not tokens.accept(">"):
        key = tokens.expect_kind("ident")
        fields[key] = _parse_literal(tokens) if tokens.accept("=") else True
        if not tokens.accept(","):
            tokens.expect(">")
            break
    return fields


def _parse_quant(tokens: _Tokens) -> QuantParams:
    fields = _parse_fields(tokens)
    scale, zero_point = fields.get("scale"), fields.get("zp")
    if scale is None or zero_point is None:
        raise tokens.error("quant<...> needs scale and zp")
    as_tuple = lambda v: tuple(v) if isinstance(v, list) else (v,)  # noqa: E731
    return QuantParams(tuple(float(s) for s in as_tuple(scale)), tuple(int(z) for z in as_tuple(zero_point)),
                       fields.get("axis"), fields.get("group"), int(fields.get("bits", 8)),
                       not fields.get("unsigned", False))


def _parse_layout(tokens: _Tokens) -> SparseLayout:
    tokens.expect("<")
    kind = tokens.expect_kind("ident")
    fields: dict[str, Any] = {}
    while tokens.accept(","):
        key = tokens.expect_kind("ident")
        tokens.expect("=")
        fields[key] = _parse_literal(tokens)
    tokens.expect(">")
    return SparseLayout(kind, tuple(fields.get("block", ())), int(fields.get("n", 0)), int(fields.get("m", 0)))


def _dense_array(literal: Any, type: TensorType, tokens: _Tokens) -> np.ndarray:
    try:
        array = np.array(literal, dtype=type.dtype.numpy)
    except (ValueError, TypeError, OverflowError) as error:
        raise tokens.error(f"constant data does not fit {type}: {error}") from None
    if array.shape != type.shape:
        raise tokens.error(f"constant data has shape {list(array.shape)}, its type says {type}")
    return array


def parse(text: str) -> Graph:
    """Parse the text form of one graph."""
    tokens = _Tokens(text)
    tokens.expect("graph")
    graph = Graph(json.loads(tokens.expect_kind("string")))
    tokens.expect("{")
    values: dict[str, Value] = {}
    constants: dict[str, Value] = {}

    def lookup(token: str) -> Value:
        table, name = (constants if token.startswith("@") else values), _sigil_name(token)
        if name not in table:
            raise tokens.error(f"'{token}' is used before it is defined", previous=True)
        return table[name]

    while not tokens.accept("}"):
        kind, text = tokens.peek()
        if kind == "eof":
            raise tokens.error("unexpected end of text: the graph's closing '}' is missing")
        try:
            if text == "meta" and kind == "ident":
                tokens.next()
                graph.metadata = _parse_literal(tokens)
            elif text == "input" and kind == "ident":
                tokens.next()
                name = _sigil_name(tokens.expect_kind("value"))
                tokens.expect(":")
                values[name] = graph.add_input(name, _parse_type(tokens))
            elif text == "output" and kind == "ident":
                tokens.next()
                name = json.loads(tokens.expect_kind("string"))
                tokens.expect("=")
                token = tokens.next()[1]
                graph.outputs.append(lookup(token))
                graph.output_names.append(name)
            elif kind == "const":
                _parse_constant(tokens, graph, constants)
            elif kind == "value":
                _parse_node(tokens, graph, values, lookup)
            else:
                raise tokens.error(f"expected a statement, found '{text or 'end of text'}'")
        except ParseError:
            raise
        except LowbitError as error:
            raise tokens.error(str(error)) from None
    if tokens.peek()[0] != "eof":
        raise tokens.error("text after the end of the graph")
    return graph


def _parse_constant(tokens: _Tokens, graph: Graph, constants: dict[str, Value]) -> None:
    name = _sigil_name(tokens.next()[1])
    if name in constants:
        raise tokens.error(f"constant '@{name}' is defined twice")
    tokens.expect("=")
    tokens.expect("const")
    type = _parse_type(tokens)
    form = tokens.expect_kind("ident")
    tokens.expect("<")
    if form == "dense":
        array = _dense_array(_parse_literal(tokens), type, tokens)
        value = graph.add_constant(array, name, type)
    elif form == "base64":
        raw = base64.b64decode(json.loads(tokens.expect_kind("string")))
        storage = type.dtype.numpy.newbyteorder("<")
        if len(raw) != type.size * storage.itemsize:
            raise tokens.error(f"constant '@{name}' holds {len(raw)} bytes, its type {type} needs "
                               f"{type.size * storage.itemsize}")
        array = np.frombuffer(raw, dtype=storage).astype(type.dtype.numpy).reshape(type.shape)
        value = graph.add_constant(array, name, type)
    elif form == "elided":
        value = graph.add_elided_constant(type, json.loads(tokens.expect_kind("string")), name)
    else:
        raise tokens.error(f"unknown constant form '{form}'; expected dense, base64 or elided")
    tokens.expect(">")
    constants[name] = value


def _parse_node(tokens: _Tokens, graph: Graph, values: dict[str, Value], lookup) -> None:
    results = [_sigil_name(tokens.next()[1])]
    while tokens.accept(","):
        results.append(_sigil_name(tokens.expect_kind("value")))
    tokens.expect("=")
    op = tokens.expect_kind("ident")
    opdef = get_op(op)
    tokens.expect("(")
    operands: list[Value | None] = []
    while not tokens.accept(")"):
        token = tokens.next()[1]
        operands.append(None if token == "none" else lookup(token))
        if not tokens.accept(","):
            tokens.expect(")")
            break
    attrs: dict[str, Any] = {}
    if tokens.accept("{"):
        while not tokens.accept("}"):
            key = tokens.expect_kind("ident")
            tokens.expect("=")
            literal = _parse_literal(tokens)
            if key not in opdef.attrs:
                raise tokens.error(f"op '{op}' has no attribute '{key}'")
            attrs[key] = coerce_attr(opdef.attrs[key].kind, literal, f"attribute '{key}'")
            if not tokens.accept(","):
                tokens.expect("}")
                break
    tokens.expect(":")
    types = [_parse_type(tokens)]
    while tokens.accept(","):
        types.append(_parse_type(tokens))
    if len(types) != len(results):
        raise tokens.error(f"{len(results)} results but {len(types)} types")
    name = None
    if tokens.accept("loc"):
        tokens.expect("(")
        name = json.loads(tokens.expect_kind("string"))
        tokens.expect(")")
    node = graph.add_node(op, operands, attrs, name=name, output_types=types)
    for result, value in zip(results, node.outputs):
        if result in values:
            raise tokens.error(f"'%{result}' is defined twice")
        values[result] = value


def load(path: str | Path) -> Graph:
    """Read a graph from a `.lbir` text file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ParseError(f"cannot read IR file '{path}': {error}") from None
    try:
        return parse(text)
    except ParseError as error:
        raise ParseError(f"{path}: {error}") from None


def save(graph: Graph, path: str | Path) -> None:
    """Write a graph as a `.lbir` text file with every weight included."""
    Path(path).write_text(graph.to_text(full=True), encoding="utf-8")
