"""Lowering a graph to kernel calls: the per-op lowering table and the context lowerings work with.

A lowering `fn(ctx, node)` generates (or reuses) kernel functions in the model's LLVM module and
records calls to them on symbolic buffers; the memory plan later gives every buffer its place.
Kernel functions take only `i8*` buffer pointers: shapes, strides and parameters are baked in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable

import numpy as np
from llvmlite import ir

from lowbit.errors import UnsupportedOpError
from lowbit.ir import Graph, Node, Value, constant_value
from lowbit.ir.tables import OpTable
from lowbit.kernels.parallel import thread_stride

Lowering = Callable[["LowerContext", Node], None]
LOWERINGS: OpTable[Lowering] = OpTable("native lowering")
lowering = LOWERINGS.register

BYTE_PTR = ir.IntType(8).as_pointer()


@dataclass(eq=False)
class Buffer:
    """A symbolic memory region. `kind`: input / output (slot `index`), weights, or arena (value/scratch)."""

    kind: str
    nbytes: int
    index: int = -1
    label: str = ""
    offset: int = -1  # weights: offset in the blob; arena: assigned by the memory plan


@dataclass
class Call:
    """A kernel call; a `parallel` one runs on every thread of the team with (thread, threads) appended."""

    function: str
    buffers: list[Buffer]
    node: str
    parallel: bool = False


@dataclass
class LowerContext:
    """What a lowering sees: the module, the target, and the buffers of the node it lowers."""

    module: ir.Module
    target: object
    graph: Graph
    num_threads: int = 1  # threads a run uses: per-thread scratch holds this many parts
    optimize: str = "speed"  # or "size": where kernels offer a choice, the one with the fewest weight bytes
    calls: list[Call] = field(default_factory=list)
    weights: list[tuple[Buffer, np.ndarray]] = field(default_factory=list)
    # Keyed by the values themselves (identity), not id(): a value a lowering makes up (float_width's
    # float32 stand-ins) stays alive with its entry, so its id never passes to another value.
    _buffers: dict[Value, Buffer] = field(default_factory=dict)
    _aliases: dict[Value, Value] = field(default_factory=dict)
    _functions: dict[Hashable, ir.Function] = field(default_factory=dict)
    _constants: dict[Hashable, Buffer] = field(default_factory=dict)
    _node: Node | None = None

    # -- buffers ----------------------------------------------------------------------------------
    def buffer(self, value: Value) -> Buffer:
        """Where `value` lives: an input or output slot, the weights blob (constants) or the arena."""
        key = self._aliases.get(value, value)
        if key in self._buffers:
            return self._buffers[key]
        data = constant_value(value)
        if data is not None:
            return self.constant(data, value.name or "constant", key=value)
        buffer = Buffer("arena", value.type.nbytes if value.type.dtype.bits >= 8 else value.type.size,
                        label=value.name or "")
        self._buffers[key] = buffer
        return buffer

    def bind(self, value: Value, buffer: Buffer) -> None:
        self._buffers[value] = buffer

    def operand(self, index: int) -> Buffer:
        return self.buffer(self._node.inputs[index])

    def result(self, index: int = 0) -> Buffer:
        return self.buffer(self._node.outputs[index])

    def constant(self, array: np.ndarray, label: str = "weights", key: Hashable | None = None) -> Buffer:
        """A read-only buffer holding `array` (e.g. weights packed at compile time) in the weights blob."""
        if key is not None and key in self._constants:
            return self._constants[key]
        data = np.ascontiguousarray(array)
        buffer = Buffer("weights", data.nbytes, label=label)
        self.weights.append((buffer, data))
        if key is not None:
            self._constants[key] = buffer
        return buffer

    def scratch(self, nbytes: int, label: str = "scratch", per_thread: bool = False) -> Buffer:
        """Temporary memory that lives only during the current node's calls. `per_thread`: nbytes for each
        thread of a parallel kernel, `kernels.parallel.thread_stride(nbytes)` bytes apart."""
        if per_thread:
            return Buffer("arena", thread_stride(nbytes) * self.num_threads, label=label)
        return Buffer("arena", max(int(nbytes), 1), label=label)

    def alias(self, result: Value, operand: Value) -> None:
        """`result` shares `operand`'s memory (a reshape): no call, no copy."""
        self._aliases[result] = self._aliases.get(operand, operand)

    # -- functions and calls ----------------------------------------------------------------------
    def kernel(self, key: Hashable, build: Callable[[ir.Module, str], ir.Function]) -> ir.Function:
        """The kernel for `key`, generated once per model by `build(module, unique_name)`."""
        if key not in self._functions:
            name = f"k{len(self._functions)}_{self._node.op if self._node else 'kernel'}"
            self._functions[key] = build(self.module, name)
        return self._functions[key]

    def call(self, function: ir.Function, buffers: list[Buffer], parallel: bool = False) -> None:
        """Record a call of `function` on `buffers`; `parallel`: the kernel takes (thread, threads) after
        them and every thread runs its share (`kernels.parallel`)."""
        expected = len(function.args) - (2 if parallel else 0)
        if expected != len(buffers):
            raise ValueError(f"kernel {function.name} takes {expected} buffers, got {len(buffers)}")
        self.calls.append(Call(function.name, list(buffers), self._node.describe() if self._node else "",
                               parallel))


def lower_node(ctx: LowerContext, node: Node) -> None:
    lower = LOWERINGS.get(node.op)
    if lower is None:
        raise UnsupportedOpError(f"{node.describe()}: the native backend has no kernel for op '{node.op}' yet")
    ctx._node = node
    lower(ctx, node)
    ctx._node = None
