"""Float32 throughput of the native backend beside numpy (OpenBLAS) and ONNX Runtime, in one process.

    python bench/native_float.py [--rounds 15] [--image 224] [--skip-models] [--statistic min] [--json]

Single thread everywhere: OpenBLAS is limited to one thread before numpy loads, ONNX Runtime gets
one intra-op thread, lowbit runs one thread. Each round times every engine once per case,
interleaved, so drift of the machine hits all of them alike; tables give medians over the rounds (or
the fastest round) and ratios from the same run. GFLOP/s counts 2·M·N·K per product.

* GEMM: a `matmul` graph of two run-time operands (B packed per call) and a `linear` graph with
  constant weights (packed at compile time), against `np.matmul` into a preallocated output.
* conv: ResNet-18's convolution shapes as native conv2d (+bias, relu), against numpy's GEMM of the
  same size on a precomputed im2col matrix (a lower bound for an im2col convolution with BLAS).
* model: ResNet-18 (batch 1) native vs the reference interpreter vs ONNX Runtime.

Not a test: nothing here asserts beyond the results agreeing.
"""
from __future__ import annotations

import os

os.environ["OPENBLAS_NUM_THREADS"] = "1"  # before numpy loads OpenBLAS
os.environ["OMP_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import lowbit  # noqa: E402
from timing import STATISTICS, interleaved  # noqa: E402
from lowbit.ir import DType, Graph, TensorType  # noqa: E402

GEMMS = {"512^3": (512, 512, 512), "1024x256x512": (1024, 256, 512), "128x768x768 (BERT)": (128, 768, 768)}
# ResNet-18 at 224: (channels in, out, kernel, stride, input size)
CONVS = {"conv1 7x7/2": (3, 64, 7, 2, 224), "layer1 3x3": (64, 64, 3, 1, 56), "layer2 3x3": (128, 128, 3, 1, 28),
         "layer2 1x1/2": (64, 128, 1, 2, 56), "layer3 3x3": (256, 256, 3, 1, 14), "layer4 3x3": (512, 512, 3, 1, 7)}
RNG = np.random.default_rng(0)


def _f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)




def _agree(got: np.ndarray, want: np.ndarray, what: str) -> None:
    if not np.allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(want).max()))):
        raise SystemExit(f"{what}: native result differs from numpy by {np.abs(got - want).max()}")


def gemm_cases(rounds: int, statistic: str) -> list[dict]:
    rows = []
    for name, (m, n, k) in GEMMS.items():
        a, b = _f32(m, k), _f32(k, n)
        graph = Graph("matmul")
        graph.set_outputs([("y", graph.add("matmul", graph.add_input("a", TensorType((m, k), DType.f32)),
                                           graph.add_input("b", TensorType((k, n), DType.f32))))])
        runtime = lowbit.compile(graph)
        graph = Graph("linear")
        weights = graph.add_constant(np.ascontiguousarray(b.T))
        graph.set_outputs([("y", graph.add("linear", graph.add_input("a", TensorType((m, k), DType.f32)), weights))])
        constant = lowbit.compile(graph)
        out = np.empty((m, n), np.float32)
        _agree(runtime.run({"a": a, "b": b})["y"], a @ b, name)
        _agree(constant.run({"a": a})["y"], a @ b, name)
        times = interleaved({"numpy": lambda: np.matmul(a, b, out=out),
                         "native matmul": lambda: runtime.run({"a": a, "b": b}),
                         "native linear": lambda: constant.run({"a": a})}, rounds, statistic)
        flops = 2 * m * n * k
        rows.append({"case": name, **{engine: flops / t / 1e9 for engine, t in times.items()}})
    return rows


def _im2col(x: np.ndarray, kernel: int, stride: int, pad: int) -> np.ndarray:
    padded = np.pad(x[0], ((0, 0), (pad, pad), (pad, pad)))
    view = np.lib.stride_tricks.sliding_window_view(padded, (kernel, kernel), axis=(1, 2))[:, ::stride, ::stride]
    c, oh, ow = view.shape[:3]
    return np.ascontiguousarray(view.transpose(0, 3, 4, 1, 2).reshape(c * kernel * kernel, oh * ow))


def conv_cases(rounds: int, statistic: str) -> list[dict]:
    rows = []
    for name, (cin, cout, kernel, stride, size) in CONVS.items():
        x, w, bias = _f32(1, cin, size, size), _f32(cout, cin, kernel, kernel) * 0.1, _f32(cout)
        pad = kernel // 2
        graph = Graph("conv")
        y = graph.add("conv2d", graph.add_input("x", TensorType(x.shape, DType.f32)), graph.add_constant(w),
                      graph.add_constant(bias), strides=(stride, stride), pads=(pad,) * 4, activation="relu")
        graph.set_outputs([("y", y)])
        native = lowbit.compile(graph)
        _agree(native.run({"x": x})["y"], lowbit.run_reference(graph, {"x": x})["y"], name)
        cols, weights = _im2col(x, kernel, stride, pad), w.reshape(cout, -1)
        out = np.empty((cout, cols.shape[1]), np.float32)
        times = interleaved({"numpy GEMM": lambda: np.matmul(weights, cols, out=out),
                         "native conv": lambda: native.run({"x": x})}, rounds, statistic)
        flops = 2 * cout * weights.shape[1] * cols.shape[1]
        rows.append({"case": f"{name} ({cout}x{cols.shape[1]}x{weights.shape[1]})",
                     **{engine: flops / t / 1e9 for engine, t in times.items()}})
    return rows


def model_cases(rounds: int, statistic: str, image: int) -> list[dict]:
    import onnxruntime as ort

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))
    from model_builders import resnet18

    model = resnet18(image=image)
    graph = lowbit.optimize(lowbit.import_onnx(model))
    start = time.perf_counter()
    native = lowbit.compile(graph)
    compile_seconds = time.perf_counter() - start
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {"input": _f32(1, 3, image, image)}
    want = session.run(None, feeds)[0]
    _agree(native.run(feeds)["logits"], want, "resnet18")
    times = interleaved({"onnxruntime": lambda: session.run(None, feeds),
                     "native": lambda: native.run(feeds),
                     "reference": lambda: lowbit.run_reference(graph, feeds)}, rounds, statistic)
    return [{"case": f"resnet18 {image}x{image} (ms)", **{engine: t * 1e3 for engine, t in times.items()},
             "native / onnxruntime": times["native"] / times["onnxruntime"], "compile s": compile_seconds}]


def _table(title: str, rows: list[dict], base: str | None) -> None:
    print(f"\n{title}")
    engines = [key for key in rows[0] if key != "case"]
    widths = [max(12, len(engine) + 2) for engine in engines]
    print(f"{'case':34}" + "".join(f"{engine:>{width}}" for engine, width in zip(engines, widths))
          + (f"{'ratio':>10}" if base else ""))
    for row in rows:
        line = f"{row['case']:34}" + "".join(f"{row[engine]:{width}.2f}" for engine, width in zip(engines, widths))
        if base:
            best = max(row[e] for e in engines if e.startswith("native"))
            line += f"{best / row[base]:10.2f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--statistic", choices=sorted(STATISTICS), default="median")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {"gemm GFLOP/s": gemm_cases(args.rounds, args.statistic),
               "conv GFLOP/s": conv_cases(args.rounds, args.statistic)}
    if not args.skip_models:
        results["model"] = model_cases(args.rounds, args.statistic, args.image)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    _table("GEMM, GFLOP/s (ratio: best native / numpy)", results["gemm GFLOP/s"], "numpy")
    _table("conv, GFLOP/s (ratio: native / numpy GEMM alone)", results["conv GFLOP/s"], "numpy GEMM")
    if "model" in results:
        _table("model latency, single thread", results["model"], None)


if __name__ == "__main__":
    main()
