"""The deterministic text form of a graph.

```
graph "digits" {
  meta {"batch": {"dim": "batch", "size": 1}}
  input %input: f32[1,1,28,28]
  @conv.weight = const f32[32,1,3,3] elided<"sha1:3b0e9c1f4a2d min=-0.61 max=0.58">
  @conv.bias = const f32[4] dense<[0.1, -0.2, 0.0, 0.5]>
  %0 = conv2d(%input, @conv.weight, @conv.bias) {pads = [1, 1, 1, 1]} : f32[1,32,28,28] loc("Conv_0")
  output "logits" = %0
}
```

Names are assigned here, at print time: graph inputs keep theirs, constants use their name hint
(made unique), every other value is numbered in definition order. Only attributes that differ
from their declared default are printed. Constants of at most `INLINE_LIMIT` elements are written
out; larger ones are summarised unless `full=True`, which writes their bytes in base64.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re

import numpy as np

from lowbit.ir.dtypes import DType
from lowbit.ir.graph import ElidedData, Graph, Value
from lowbit.ir.registry import get_op
from lowbit.ir.types import format_float

INLINE_LIMIT = 16
_BARE_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


def quote_name(name: str) -> str:
    return name if _BARE_NAME.match(name) else json.dumps(name)


def format_scalar(value, dtype: DType) -> str:
    if dtype is DType.bool:
        return "true" if value else "false"
    if dtype.is_float:
        return format_float(float(value), dtype)
    return str(int(value))


def format_dense(array: np.ndarray, dtype: DType) -> str:
    if array.ndim == 0:
        return format_scalar(array.item(), dtype)
    return "[" + ", ".join(format_dense(sub, dtype) for sub in array) + "]"


def format_attr(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format_float(value, DType.f64)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, DType):
        return value.value
    if isinstance(value, tuple):
        return "[" + ", ".join(format_attr(v) for v in value) + "]"
    raise TypeError(f"attribute value {value!r} has no text form")


def summarize(array: np.ndarray) -> str:
    digest = hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()[:12]
    if array.size == 0:
        return f"sha1:{digest} empty"
    dtype = DType.from_numpy(array.dtype)
    low, high = array.min(), array.max()
    return f"sha1:{digest} min={format_scalar(low, dtype)} max={format_scalar(high, dtype)}"


def format_constant_data(value: Value, full: bool) -> str:
    data = value.data
    if isinstance(data, ElidedData):
        return f"elided<{json.dumps(data.summary)}>"
    # NaN payloads and signs have no decimal form, so the full form keeps such data as bytes.
    exact_in_decimal = not (full and data.dtype.kind == "f" and np.isnan(data).any())
    if data.size <= INLINE_LIMIT and exact_in_decimal:
        return f"dense<{format_dense(data, value.type.dtype)}>"
    if full:
        raw = np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<"), copy=False).tobytes()
        return f"base64<\"{base64.b64encode(raw).decode('ascii')}\">"
    return f"elided<{json.dumps(summarize(data))}>"


class Namer:
    """Assigns the printed names of one graph."""

    def __init__(self, graph: Graph) -> None:
        self.names: dict[int, str] = {}
        taken_values: set[str] = set()
        for value in graph.inputs:
            self.names[id(value)] = "%" + quote_name(value.name)
            taken_values.add(value.name)
        taken_constants: set[str] = set()
        for index, value in enumerate(graph.constants):
            base = re.sub(r"[^A-Za-z0-9_.]", "_", value.name) if value.name else f"c{index}"
            name, suffix = base, 0
            while name in taken_constants:
                suffix += 1
                name = f"{base}_{suffix}"
            taken_constants.add(name)
            self.names[id(value)] = "@" + name
        counter = 0
        for node in graph.nodes:
            for value in node.outputs:
                while str(counter) in taken_values:
                    counter += 1
                self.names[id(value)] = f"%{counter}"
                counter += 1

    def __call__(self, value: Value | None) -> str:
        if value is None:
            return "none"
        try:
            return self.names[id(value)]
        except KeyError:
            return f"%<undefined {value.name or id(value)}>"


def print_graph(graph: Graph, *, full: bool = False) -> str:
    name_of = Namer(graph)
    lines = [f"graph {json.dumps(graph.name)} {{"]
    if graph.metadata:
        lines.append(f"  meta {json.dumps(graph.metadata, sort_keys=True)}")
    for value in graph.inputs:
        lines.append(f"  input {name_of(value)}: {value.type}")
    for value in graph.constants:
        lines.append(f"  {name_of(value)} = const {value.type} {format_constant_data(value, full)}")
    for node in graph.nodes:
        results = ", ".join(name_of(v) for v in node.outputs)
        operands = ", ".join(name_of(v) for v in node.inputs)
        text = f"  {results} = {node.op}({operands})"
        attrs = format_node_attrs(node.op, node.attrs)
        if attrs:
            text += f" {attrs}"
        text += " : " + ", ".join(str(v.type) for v in node.outputs)
        if node.name:
            text += f" loc({json.dumps(node.name)})"
        lines.append(text)
    for name, value in zip(graph.output_names, graph.outputs):
        lines.append(f"  output {json.dumps(name)} = {name_of(value)}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def format_node_attrs(op: str, attrs: dict) -> str:
    specs = get_op(op).attrs
    shown = [f"{name} = {format_attr(value)}" for name, value in attrs.items()
             if name not in specs or value != specs[name].default]
    return "{" + ", ".join(shown) + "}" if shown else ""
