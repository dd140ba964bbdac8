"""Native elementwise and data-movement kernels beside numpy, in one process.

    python bench/native_elementwise.py [--rounds 20] [--json]

Every case is a one-node graph compiled with `lowbit.compile`; its time includes `run`'s Python
overhead (feeds checked, outputs allocated: a few µs), so sizes are large enough for that not to
matter. numpy does the same work with its own fastest spelling (ufuncs with `out=` where it has them).
Rounds interleave the engines; the table shows medians and the speed-up over numpy. Not a test.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from typing import Callable

import numpy as np

import lowbit
from lowbit.ir import DType, Graph, TensorType

RNG = np.random.default_rng(0)


def _erf(x: np.ndarray) -> np.ndarray:
    try:
        from scipy.special import erf
        return erf(x)
    except ImportError:  # numpy has no erf; this fallback is slow and only keeps the table complete
        return np.frompyfunc(math.erf, 1, 1)(x).astype(x.dtype)


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + _erf(x * np.float32(math.sqrt(0.5))))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def unary(op: str, shape, numpy_fn, dtype=DType.f32, **attrs):
    return op, [shape], [dtype], attrs, numpy_fn


CASES = [
    # name, op, operand shapes, dtypes, attrs, numpy
    ("add 1M", "add", [(1 << 20,), (1 << 20,)], [DType.f32] * 2, {}, lambda a, b: np.add(a, b)),
    ("add bias [4096,256]+[256]", "add", [(4096, 256), (256,)], [DType.f32] * 2, {}, lambda a, b: a + b),
    ("mul col [4096,256]*[4096,1]", "mul", [(4096, 256), (4096, 1)], [DType.f32] * 2, {}, lambda a, b: a * b),
    ("add i8 1M", "add", [(1 << 20,), (1 << 20,)], [DType.i8] * 2, {}, lambda a, b: a + b),
    ("div i32 256K", "div", [(1 << 18,), (1 << 18,)], [DType.i32] * 2, {},
     lambda a, b: np.where(b == 0, 0, np.trunc(a / np.where(b == 0, 1, b))).astype(np.int32)),
    ("relu 1M", *unary("relu", (1 << 20,), lambda x: np.maximum(x, 0))),
    ("exp 1M", *unary("exp", (1 << 20,), np.exp)),
    ("log 1M", *unary("log", (1 << 20,), np.log)),
    ("tanh 1M", *unary("tanh", (1 << 20,), np.tanh)),
    ("sigmoid 1M", *unary("sigmoid", (1 << 20,), _sigmoid)),
    ("erf 1M", *unary("erf", (1 << 20,), _erf)),
    ("gelu 1M", *unary("gelu", (1 << 20,), _gelu)),
    ("sin 256K (libm)", *unary("sin", (1 << 18,), np.sin)),
    ("cast f32->i8 1M", "cast", [(1 << 20,)], [DType.f32], {"to": DType.i8}, lambda x: x.astype(np.int8)),
    ("transpose bert [8,128,12,64]->(0,2,1,3)", "transpose", [(8, 128, 12, 64)], [DType.f32],
     {"perm": (0, 2, 1, 3)}, lambda x: np.ascontiguousarray(x.transpose(0, 2, 1, 3))),
    ("transpose [1024,1024]", "transpose", [(1024, 1024)], [DType.f32], {"perm": (1, 0)},
     lambda x: np.ascontiguousarray(x.T)),
    ("transpose nchw->nhwc [8,64,56,56]", "transpose", [(8, 64, 56, 56)], [DType.f32], {"perm": (0, 2, 3, 1)},
     lambda x: np.ascontiguousarray(x.transpose(0, 2, 3, 1))),
    ("slice ::-1 [1024,1024]", "slice", [(1024, 1024)], [DType.f32],
     {"starts": (1023,), "ends": (-1,), "axes": (1,), "steps": (-1,)}, lambda x: np.ascontiguousarray(x[:, ::-1])),
    ("concat axis1 2x[256,64,256]", "concat", [(256, 64, 256), (256, 64, 256)], [DType.f32] * 2, {"axis": 1},
     lambda a, b: np.concatenate([a, b], axis=1)),
    ("pad 1 [8,64,56,56]", "pad", [(8, 64, 56, 56)], [DType.f32], {"pads": (0, 0, 1, 1, 0, 0, 1, 1)},
     lambda x: np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))),
    ("pad reflect 3 [8,64,56,56]", "pad", [(8, 64, 56, 56)], [DType.f32],
     {"pads": (0, 0, 3, 3, 0, 0, 3, 3), "mode": "reflect"},
     lambda x: np.pad(x, ((0, 0), (0, 0), (3, 3), (3, 3)), mode="reflect")),
    ("expand [1,256]->[4096,256]", "expand", [(1, 256)], [DType.f32], {"shape": (4096, 256)},
     lambda x: np.ascontiguousarray(np.broadcast_to(x, (4096, 256)))),
    ("gather embedding [30522,768] x 1024", "gather", [(30522, 768), (8, 128)], [DType.f32, DType.i64], {"axis": 0},
     lambda d, i: np.take(d, i, axis=0)),
]


def feeds_for(shapes, dtypes) -> dict[str, np.ndarray]:
    feeds = {}
    for index, (shape, dtype) in enumerate(zip(shapes, dtypes)):
        if dtype is DType.i64:  # gather indices
            feeds[f"x{index}"] = RNG.integers(0, shapes[0][0], shape).astype(np.int64)
        elif dtype.is_float:
            feeds[f"x{index}"] = (RNG.standard_normal(shape) * 2).astype(dtype.numpy)
            if index == 0 and len(shapes) == 1:
                feeds[f"x{index}"] = np.abs(feeds[f"x{index}"]) + np.float32(0.1)  # log's domain
        else:
            feeds[f"x{index}"] = RNG.integers(-100, 100, shape).astype(dtype.numpy)
    return feeds


def best_of(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    prepared = []
    for name, op, shapes, dtypes, attrs, numpy_fn in CASES:
        graph = Graph(op)
        inputs = [graph.add_input(f"x{i}", TensorType(s, d)) for i, (s, d) in enumerate(zip(shapes, dtypes))]
        graph.set_outputs([("y", graph.add(op, *inputs, **attrs))])
        model = lowbit.compile(graph)
        feeds = feeds_for(shapes, dtypes)
        operands = [feeds[f"x{i}"] for i in range(len(shapes))]
        prepared.append((name, model, feeds, numpy_fn, operands))
    samples = {name: ([], []) for name, *_ in prepared}
    with np.errstate(all="ignore"):
        for _ in range(args.rounds):
            for name, model, feeds, numpy_fn, operands in prepared:
                samples[name][0].append(best_of(lambda: model.run(feeds), 3))
                samples[name][1].append(best_of(lambda: numpy_fn(*operands), 3))
    rows = []
    for name, (native, reference) in samples.items():
        native_ms, numpy_ms = statistics.median(native) * 1e3, statistics.median(reference) * 1e3
        rows.append({"case": name, "lowbit_ms": round(native_ms, 4), "numpy_ms": round(numpy_ms, 4),
                     "speedup": round(numpy_ms / native_ms, 2)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'case':44s} {'lowbit ms':>10s} {'numpy ms':>10s} {'speed-up':>9s}")
    for row in rows:
        print(f"{row['case']:44s} {row['lowbit_ms']:10.3f} {row['numpy_ms']:10.3f} {row['speedup']:8.2f}x")


if __name__ == "__main__":
    main()
