"""Graph → one LLVM module with `lowbit_run(inputs, outputs, arena, weights)` calling every kernel,
compiled in-process (JIT) and run with numpy arrays.

With `num_threads` N > 1 a run is a team of N threads (`kernels.parallel`): the calling thread and N − 1
started for the run. A parallel call is split in N shares of the kernel's outputs, a run of serial calls is
one share; threads claim shares as they come, each call starting once the one before has finished. Starting
threads costs tens of µs per run, so a model with less than `PARALLEL_MIN_MACS` multiply-accumulates in
its products is compiled single-threaded whatever N is (`CompiledModel.threads` says what a run uses).
"""
from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from typing import Mapping

import numpy as np
from llvmlite import ir

from lowbit.backends.native import lowerings  # noqa: F401  (fills the lowering table)
from lowbit.backends.native.cache import CacheEntry, cache_key, load_entry, store_entry
from lowbit.backends.native.lowering import BYTE_PTR, Buffer, Call, LowerContext, lower_node
from lowbit.backends.native.memory import layout_weights, plan_arena
from lowbit.backends.native.target import Target
from lowbit.backends.reference import check_feeds
from lowbit.errors import LowbitError
from lowbit.ir import Graph, verify
from lowbit.kernels.copy import copy_kernel
from lowbit.kernels.llvm import FFI, JitModule, emit_object, new_module
from lowbit.kernels.packing import aligned_empty
from lowbit.kernels.parallel import Step, emit_team_entry

RUN = "lowbit_run"
# Below this many multiply-accumulates in a model's products, starting threads for every run (≈ 10-30 µs)
# costs more than sharing the work saves.
PARALLEL_MIN_MACS = 4_000_000
# What kernel selection minimises where it has a choice: run time, or the weights' bytes (sparse layouts
# stored compactly even where the dense kernel would be faster).
OPTIMIZE_FOR = ("speed", "size")


class Program:
    """A lowered graph: kernel calls over planned buffers, the weights blob and the LLVM module."""

    def __init__(self, graph: Graph, target: Target, num_threads: int = 1, optimize: str = "speed") -> None:
        verify(graph)
        self.graph = graph
        self.target = target
        self.num_threads = num_threads
        self.optimize = check_optimize(optimize)
        self.threads = team_size(graph, num_threads)
        self.module = new_module(graph.name, target)
        ctx = LowerContext(self.module, target, graph, self.threads, optimize)
        for index, value in enumerate(graph.inputs):
            ctx.bind(value, Buffer("input", value.type.nbytes, index, value.name))
        outputs = [Buffer("output", v.type.nbytes, i, n) for i, (n, v) in
                   enumerate(zip(graph.output_names, graph.outputs))]
        for buffer, value in zip(outputs, graph.outputs):
            if value.producer is not None and graph.outputs.count(value) == 1:
                ctx.bind(value, buffer)
        for node in graph.nodes:
            lower_node(ctx, node)
        for buffer, value in zip(outputs, graph.outputs):
            source = ctx.buffer(value)
            if source is not buffer:
                kernel = ctx.kernel(("copy", buffer.nbytes), lambda m, name: copy_kernel(m, name, buffer.nbytes))
                ctx.calls.append(Call(kernel.name, [source, buffer], f"output '{buffer.label}'"))
        self.calls: list[Call] = ctx.calls
        self.arena_bytes = plan_arena(self.calls)
        self.weights_bytes = layout_weights(ctx.weights)
        self.weights = np.zeros(max(self.weights_bytes, 1), np.uint8)
        for buffer, data in ctx.weights:
            self.weights[buffer.offset:buffer.offset + buffer.nbytes] = np.frombuffer(data.tobytes(), np.uint8)
        self._emit_run()

    def _emit_run(self) -> None:
        """`lowbit_run(inputs, outputs, arena, weights)`: the team entry (`kernels.parallel.emit_team_entry`)
        over one step per parallel call and per run of serial calls."""
        pointer_array = BYTE_PTR.as_pointer()
        i64 = ir.IntType(64)

        def prologue(builder: ir.IRBuilder, params: list[ir.Value]) -> list[Step]:
            inputs, outputs, arena, weights = params

            def pointer(b: ir.IRBuilder, buffer: Buffer) -> ir.Value:
                if buffer.kind in ("input", "output"):
                    table = inputs if buffer.kind == "input" else outputs
                    return b.load(b.gep(table, [ir.Constant(i64, buffer.index)]))
                base = arena if buffer.kind == "arena" else weights
                return b.gep(base, [ir.Constant(i64, buffer.offset)])

            def serial(group: list[Call]) -> Step:
                def emit(b: ir.IRBuilder, share: ir.Value, shares: ir.Value) -> None:
                    for call in group:
                        b.call(self.module.globals[call.function], [pointer(b, x) for x in call.buffers])
                return Step(False, emit)

            def parallel(call: Call) -> Step:
                def emit(b: ir.IRBuilder, share: ir.Value, shares: ir.Value) -> None:
                    b.call(self.module.globals[call.function], [pointer(b, x) for x in call.buffers] + [share, shares])
                return Step(True, emit)

            return [step for is_serial, group in _runs(self.calls)
                    for step in ([serial(group)] if is_serial else [parallel(call) for call in group])]

        emit_team_entry(self.module, RUN, [pointer_array, pointer_array, BYTE_PTR, BYTE_PTR], self.threads,
                        self.target.arch, prologue)


def _runs(calls: list[Call]) -> list[tuple[bool, list[Call]]]:
    """The calls as maximal runs of serial or of parallel calls: (serial, calls)."""
    runs: list[tuple[bool, list[Call]]] = []
    for call in calls:
        if runs and runs[-1][0] == (not call.parallel):
            runs[-1][1].append(call)
        else:
            runs.append((not call.parallel, [call]))
    return runs


def product_macs(graph: Graph) -> int:
    """Multiply-accumulates of the graph's products (convolutions, linear layers, matmuls): the work that
    parallel kernels share."""
    total = 0
    for node in graph.nodes:
        out = node.outputs[0].type
        if node.op in ("conv2d", "qconv2d"):
            total += out.size * math.prod(node.inputs[1].type.shape[1:])
        elif node.op == "conv_transpose2d":
            total += node.inputs[0].type.size * math.prod(node.inputs[1].type.shape[1:])
        elif node.op in ("linear", "qlinear", "dynamic_linear", "matmul", "qmatmul", "dynamic_matmul"):
            total += out.size * node.inputs[0].type.shape[-1]
    return total


def team_size(graph: Graph, num_threads: int) -> int:
    """Threads a run of `graph` uses when compiled for `num_threads`: 1 when its parallel work is too small
    to pay for starting threads (`PARALLEL_MIN_MACS`)."""
    return num_threads if num_threads > 1 and product_macs(graph) >= PARALLEL_MIN_MACS else 1


class CompiledModel:
    """A graph compiled to native code for this machine; `run(feeds)` returns outputs by name."""

    def __init__(self, graph: Graph, target: Target, num_threads: int = 1, cache: bool = True,
                 optimize: str = "speed") -> None:
        start = time.perf_counter()
        self.graph = graph
        self.target = target
        self.num_threads = num_threads
        self.optimize = check_optimize(optimize)
        self.threads = team_size(graph, num_threads)  # what a run uses (see `team_size`)
        self._program: Program | None = None
        key = cache_key(graph, target, self.threads, optimize) if cache else None
        entry = load_entry(key) if key else None
        self.from_cache = entry is not None
        if entry is None:
            verify(graph)
            program = self.program
            entry = CacheEntry(emit_object(program.module, target),
                               program.weights[:program.weights_bytes].tobytes(), program.arena_bytes)
            if key:
                store_entry(key, entry)
        self.arena_bytes = entry.arena_bytes
        self.weights = aligned_empty(max(len(entry.weights), 1))  # kernels may assume 64-byte aligned panels
        self.weights[:len(entry.weights)] = np.frombuffer(entry.weights, np.uint8)
        self._jit = JitModule.from_object(entry.code, target, Target.host())
        # cffi calls cost ≈ 1 µs against ≈ 8 µs for ctypes: it matters for small models run one sample at a time.
        self._run = self._jit.cffi_function(RUN, "void(*)(void **, void **, void *, void *)")
        self._weights_pointer = FFI.from_buffer(self.weights)
        self._signature = [(v.name, v.type.shape, v.type.dtype.numpy) for v in graph.inputs]
        self._results = [(v.type.shape, v.type.dtype.numpy) for v in graph.outputs]
        self.compile_seconds = time.perf_counter() - start
        self._local = threading.local()

    @property
    def program(self) -> Program:
        """The lowered graph (kernel calls, memory plan, LLVM module); rebuilt on demand after a cache hit."""
        if self._program is None:
            self._program = Program(self.graph, self.target, self.num_threads, self.optimize)
        return self._program

    @property
    def peak_bytes(self) -> int:
        """Bytes of the arena that holds every intermediate value (inputs, outputs, weights apart)."""
        return self.arena_bytes

    def export(self, out: str | os.PathLike, *, target: str | Target | None = None, emit: str = "so",
               num_threads: int | None = None, optimize: str | None = None) -> Path:
        """Write this model as an ahead-of-time artifact folder: model.so (emit="obj": model.o), model.h,
        weights.bin, manifest.json; for this model's target, threads and optimisation goal unless
        `target` / `num_threads` / `optimize` name others."""
        from lowbit.backends.native.aot import export  # aot builds on this module

        return export(self, out, target=target, emit=emit, num_threads=num_threads, optimize=optimize)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = self._exact_feeds(feeds)
        if inputs is None:  # something to convert or to complain about: the reference's checks say what
            checked = check_feeds(self.graph, feeds)
            inputs = [np.ascontiguousarray(checked[v.name]) for v in self.graph.inputs]
        outputs = [np.empty(shape, dtype) for shape, dtype in self._results]
        slots = getattr(self._local, "slots", None)
        if slots is None:  # one arena and pointer table per calling thread keeps concurrent runs apart
            slots = self._local.slots = _RunSlots(self.arena_bytes, len(inputs), len(outputs))
        # from_buffer is the cheapest way to a numpy array's address (≈ 0.3 µs; `.ctypes.data` ≈ 1.2 µs).
        for index, array in enumerate(inputs):
            slots.inputs[index] = FFI.from_buffer(array)
        for index, array in enumerate(outputs):
            slots.outputs[index] = FFI.from_buffer(array)
        self._run(slots.inputs, slots.outputs, slots.arena, self._weights_pointer)
        return dict(zip(self.graph.output_names, outputs))

    def _exact_feeds(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray] | None:
        """The feeds in input order when each is already a C-contiguous array of the exact shape and dtype."""
        if len(feeds) != len(self._signature):
            return None
        arrays = []
        for name, shape, dtype in self._signature:
            array = feeds.get(name)
            if (type(array) is not np.ndarray or array.shape != shape or array.dtype != dtype
                    or not array.flags.c_contiguous):
                return None
            arrays.append(array)
        return arrays


class _RunSlots:
    """A calling thread's arena and the pointer tables the generated `lowbit_run` reads."""

    def __init__(self, arena_bytes: int, inputs: int, outputs: int) -> None:
        self.arena_memory = aligned_empty(max(arena_bytes, 1))  # the memory plan aligns buffers to 64 bytes
        self.arena = FFI.from_buffer(self.arena_memory)
        self.inputs = FFI.new("void *[]", max(inputs, 1))
        self.outputs = FFI.new("void *[]", max(outputs, 1))


def check_optimize(optimize: str) -> str:
    if optimize not in OPTIMIZE_FOR:
        raise LowbitError(f"optimize must be one of {', '.join(OPTIMIZE_FOR)}, got {optimize!r}")
    return optimize


def compile_graph(graph: Graph, target: str | Target = "host", num_threads: int = 1,
                  cache: bool = True, optimize: str = "speed") -> CompiledModel:
    if isinstance(target, str):
        target = Target.parse(target)
    if num_threads < 1:
        raise LowbitError(f"num_threads must be at least 1, got {num_threads}")
    return CompiledModel(graph, target, num_threads, cache, optimize)
