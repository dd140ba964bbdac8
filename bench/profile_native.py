"""Per-node time of a graph compiled by lowbit's native backend: where a model's milliseconds go.

    python bench/profile_native.py [--model minilm | PATH.lbir | PATH.onnx] [--mode static|dynamic|fp32]
                                   [--sequence 128] [--batch 1] [--runs 50] [--top 25] [--json PATH]

The graph is lowered exactly as `lowbit.compile` lowers it (`Program`: the same kernel calls, buffers and
memory plan). Beside the module's `lowbit_run`, this tool emits `lowbit_profile`, which makes the same
calls in the same order and reads the CPU's cycle counter (`llvm.readcyclecounter`, the TSC on x86)
before the first call and after each one. Every kernel therefore runs on the real data, in the real cache
state, with no per-call Python overhead; the cycle counts are converted to seconds by the counter's
rate against `time.perf_counter` over 50 ms. Arena and weights are 64-byte aligned, as in `lowbit.compile`. A node's time is the sum of its kernel calls (a reshape lowers to none); the
copies of values into output slots are listed as "(output copy)". Each call's time is the median over
`--runs` runs.

Tables: time by op type (ms, % of the total, node count), then the slowest nodes with GOP/s for the
products (qlinear, qmatmul, linear, matmul, conv: 2·M·N·K per product). `--model minilm` imports
all-MiniLM-L6-v2 (bench/models.py) at `--sequence` and quantizes it as latency.py does (static: the 32
calibration sentences of quantization_accuracy.py, the quantizer's defaults); a `.lbir` file is profiled
as it is; an `.onnx` file is imported and quantized on random inputs (uniform in [0, 1), integers 0).
Single thread. Not a test: nothing asserts.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lowbit  # noqa: E402
from lowbit.backends.native.compiler import Program  # noqa: E402
from lowbit.backends.native.lowering import BYTE_PTR, Buffer  # noqa: E402
from lowbit.backends.native.target import Target  # noqa: E402
from lowbit.ir import Graph, Node  # noqa: E402
from lowbit.kernels.llvm import I32, I64, JitModule, emit_object  # noqa: E402
from lowbit.kernels.packing import aligned_empty  # noqa: E402

PROFILE = "lowbit_profile"
CYCLES = "lowbit_profile_cycles"  # the cycle counter alone: its rate against time.perf_counter
PRODUCTS = ("qlinear", "qmatmul", "linear", "matmul", "qconv2d", "conv2d", "dynamic_linear", "dynamic_matmul")
Feeds = dict[str, np.ndarray]


def _emit_profile(program: Program) -> int:
    """Add `lowbit_profile(inputs, outputs, arena, weights, i64 *stamps)` to the program's module: every call
    of `lowbit_run`, with the cycle counter stored before the first (stamps[0]) and after call i
    (stamps[i + 1]). Kernels that split work by thread get (thread 0, threads 1). Returns the call count."""
    module = program.module
    pointer_array = BYTE_PTR.as_pointer()
    function = ir.Function(module, ir.FunctionType(ir.VoidType(), [pointer_array, pointer_array, BYTE_PTR, BYTE_PTR,
                                                                    I64.as_pointer()]), PROFILE)
    inputs, outputs, arena, weights, stamps = function.args
    builder = ir.IRBuilder(function.append_basic_block("entry"))
    counter = ir.Function(module, ir.FunctionType(I64, []), "llvm.readcyclecounter")

    def pointer(buffer: Buffer) -> ir.Value:
        if buffer.kind in ("input", "output"):
            table = inputs if buffer.kind == "input" else outputs
            return builder.load(builder.gep(table, [ir.Constant(I64, buffer.index)]))
        base = arena if buffer.kind == "arena" else weights
        return builder.gep(base, [ir.Constant(I64, buffer.offset)])

    def stamp(index: int) -> None:
        builder.store(builder.call(counter, []), builder.gep(stamps, [ir.Constant(I64, index)]))

    clock = ir.Function(module, ir.FunctionType(I64, []), CYCLES)
    clock_builder = ir.IRBuilder(clock.append_basic_block("entry"))
    clock_builder.ret(clock_builder.call(counter, []))
    stamp(0)
    for index, call in enumerate(program.calls):
        kernel = module.globals[call.function]
        args = [pointer(b) for b in call.buffers]
        args += [ir.Constant(I32, value) for value in (0, 1)][:len(kernel.args) - len(args)]
        builder.call(kernel, args)
        stamp(index + 1)
    builder.ret_void()
    return len(program.calls)


class Profiler:
    """A graph lowered once, with `lowbit_profile` beside `lowbit_run`."""

    def __init__(self, graph: Graph, target: Target | None = None) -> None:
        self.graph = graph
        self.target = target or Target.host()
        self.program = Program(graph, self.target)
        self.count = _emit_profile(self.program)
        self._jit = JitModule.from_object(emit_object(self.program.module, self.target), self.target)
        self._profile = self._jit.function(PROFILE, None, *[ctypes.c_void_p] * 5)
        self._cycles = self._jit.function(CYCLES, ctypes.c_int64)
        # 64-byte aligned like CompiledModel's: AMX tile loads are much slower from unaligned panels
        self.arena = aligned_empty(max(self.program.arena_bytes, 1))
        self.weights = aligned_empty(self.program.weights.size)
        self.weights[:] = self.program.weights

    def seconds_per_cycle(self) -> float:
        """The cycle counter's period, from its advance over 50 ms of time.perf_counter."""
        start_time, start_cycles = time.perf_counter(), self._cycles()
        while time.perf_counter() - start_time < 0.05:
            pass
        return (time.perf_counter() - start_time) / (self._cycles() - start_cycles)

    def _tables(self, feeds: Feeds):
        inputs = [np.ascontiguousarray(feeds[v.name]) for v in self.graph.inputs]
        outputs = [np.empty(v.type.shape, v.type.dtype.numpy) for v in self.graph.outputs]
        keep = inputs + outputs
        input_table = (ctypes.c_void_p * max(len(inputs), 1))(*[a.ctypes.data for a in inputs])
        output_table = (ctypes.c_void_p * max(len(outputs), 1))(*[a.ctypes.data for a in outputs])
        return keep, input_table, output_table

    def cycles(self, feeds: Feeds, runs: int) -> tuple[np.ndarray, float]:
        """Per-call cycle counts of every run ([runs, calls]) and seconds per cycle."""
        keep, input_table, output_table = self._tables(feeds)
        stamps = np.zeros(self.count + 1, np.int64)
        rows = []
        for run in range(runs + 1):  # the first run warms caches and pages, untimed
            self._profile(ctypes.addressof(input_table), ctypes.addressof(output_table), self.arena.ctypes.data,
                          self.weights.ctypes.data, stamps.ctypes.data)
            if run:
                rows.append(np.diff(stamps))
        del keep
        return np.array(rows), self.seconds_per_cycle()


def product_ops(node: Node) -> int | None:
    """Multiply-adds × 2 of a product node, None for other ops."""
    if node.op not in PRODUCTS:
        return None
    a, y = node.inputs[0].type.shape, node.outputs[0].type.shape
    if node.op in ("qconv2d", "conv2d"):
        w = node.inputs[1].type.shape
        return 2 * math.prod(y) * math.prod(w[1:])
    return 2 * math.prod(y) * a[-1]


def node_times(profiler: Profiler, per_call: np.ndarray) -> list[dict]:
    """One row per node (in graph order) with its calls' summed median seconds, plus output copies."""
    by_label: dict[str, float] = collections.defaultdict(float)
    calls_of: dict[str, int] = collections.Counter()
    for call, seconds in zip(profiler.program.calls, per_call):
        by_label[call.node] += float(seconds)
        calls_of[call.node] += 1
    rows = []
    for node in profiler.graph.nodes:
        label = node.describe()
        if label not in by_label:
            rows.append({"node": node.name or node.op, "op": node.op, "ms": 0.0, "calls": 0, "gops": None})
            continue
        seconds = by_label.pop(label)
        ops = product_ops(node)
        rows.append({"node": node.name or node.op, "op": node.op, "ms": seconds * 1e3, "calls": calls_of[label],
                     "gops": ops / seconds / 1e9 if ops and seconds > 0 else None,
                     "shape": list(node.outputs[0].type.shape), "dtype": str(node.outputs[0].type.dtype)})
    for label, seconds in by_label.items():  # calls not made for a graph node: copies into output slots
        rows.append({"node": label, "op": "(output copy)", "ms": seconds * 1e3, "calls": calls_of[label],
                     "gops": None})
    return rows


def profile(graph: Graph, feeds: Feeds, runs: int) -> dict:
    profiler = Profiler(graph)
    cycles, seconds_per_cycle = profiler.cycles(feeds, runs)
    per_call = np.median(cycles, axis=0) * seconds_per_cycle
    totals = cycles.sum(axis=1) * seconds_per_cycle
    rows = node_times(profiler, per_call)
    return {"total ms": statistics.median(totals) * 1e3, "calls": profiler.count, "nodes": rows,
            "ghz": 1e-9 / seconds_per_cycle}


def op_table(result: dict) -> list[dict]:
    groups: dict[str, dict] = {}
    for row in result["nodes"]:
        group = groups.setdefault(row["op"], {"op": row["op"], "ms": 0.0, "nodes": 0, "ops": 0})
        group["ms"] += row["ms"]
        group["nodes"] += 1
        if row["gops"]:
            group["ops"] += row["gops"] * row["ms"] * 1e6
    return sorted(groups.values(), key=lambda g: -g["ms"])


def print_tables(result: dict, top: int) -> None:
    total = sum(row["ms"] for row in result["nodes"])
    print(f"total {result['total ms']:.3f} ms per run (median; sum of per-call medians {total:.3f} ms), "
          f"{result['calls']} kernel calls, cycle counter {result['ghz']:.2f} GHz")
    print(f"\n{'op':<18}{'nodes':>6}{'ms':>10}{'%':>7}{'GOP/s':>9}")
    for group in op_table(result):
        gops = f"{group['ops'] / group['ms'] / 1e6:9.1f}" if group["ops"] else f"{'':>9}"
        print(f"{group['op']:<18}{group['nodes']:>6}{group['ms']:10.3f}{100 * group['ms'] / total:7.1f}{gops}")
    print(f"\ntop {top} nodes")
    print(f"{'ms':>8}{'%':>6}{'GOP/s':>8}  {'op':<14}{'result':<24}node")
    for row in sorted(result["nodes"], key=lambda r: -r["ms"])[:top]:
        gops = f"{row['gops']:8.1f}" if row["gops"] else f"{'':>8}"
        result_type = f"{row.get('dtype', '')}{row.get('shape', '')}"
        print(f"{row['ms']:8.3f}{100 * row['ms'] / total:6.1f}{gops}  {row['op']:<14}{result_type:<24}{row['node']}")


def minilm(mode: str, sequence: int, batch: int) -> tuple[Graph, Feeds]:
    """all-MiniLM-L6-v2 at (batch, sequence), quantized as latency.py does; feeds: calibration sentences."""
    import onnx

    import models
    from native_int8 import _with_batch
    from quantization_accuracy import CALIBRATION_SENTENCES

    model = _with_batch(onnx.load(models.minilm_onnx()), batch)
    graph = lowbit.import_onnx(model, batch_size=batch, dims={"sequence": sequence})
    tokens = models.minilm_tokens(CALIBRATION_SENTENCES, sequence)
    usable = len(CALIBRATION_SENTENCES) // batch * batch
    calibration = {k: v[:usable] if usable else np.resize(v, (batch, sequence)) for k, v in tokens.items()}
    feeds = {k: np.ascontiguousarray(np.resize(v, (batch, sequence))) for k, v in tokens.items()}
    if mode == "fp32":
        return lowbit.optimize(graph), feeds
    if mode == "dynamic":
        return lowbit.quantize(graph, mode="dynamic", progress=False), feeds
    return lowbit.quantize(graph, calibration, progress=False), feeds


def random_feeds(graph: Graph, rng: np.random.Generator) -> Feeds:
    feeds = {}
    for value in graph.inputs:
        dtype = value.type.dtype.numpy
        data = rng.random(value.type.shape) if np.issubdtype(dtype, np.floating) else np.zeros(value.type.shape)
        feeds[value.name] = data.astype(dtype)
    return feeds


def load(args) -> tuple[Graph, Feeds]:
    if args.model == "minilm":
        return minilm(args.mode, args.sequence, args.batch)
    path = Path(args.model)
    rng = np.random.default_rng(0)
    if path.suffix == ".lbir":
        graph = lowbit.ir.load(path)
        return graph, random_feeds(graph, rng)
    graph = lowbit.import_onnx(path, batch_size=args.batch)
    feeds = random_feeds(graph, rng)
    if args.mode == "fp32":
        return lowbit.optimize(graph), feeds
    if args.mode == "dynamic":
        return lowbit.quantize(graph, mode="dynamic", progress=False), feeds
    return lowbit.quantize(graph, feeds, progress=False), feeds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", help="minilm, or a .lbir / .onnx file")
    parser.add_argument("--mode", choices=("static", "dynamic", "fp32"), default="static")
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    graph, feeds = load(args)
    result = profile(graph, feeds, args.runs)
    print_tables(result, args.top)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**result, "ops": op_table(result)}, indent=1))
    return result


if __name__ == "__main__":
    main()
