"""Time lowbit's reference interpreter on ResNet-18 (224×224, batch 1) beside ONNX Runtime.

The model is the seeded one the end-to-end tests build (`tests/e2e/model_builders.py`). Each engine
runs `--repeat` times after one warm-up run; the table shows the median and the fastest run, and
`--json` writes the same figures to a file.

    python bench/reference_resnet18.py [--repeat 7] [--threads N] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

import lowbit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
from model_builders import resnet18  # noqa: E402  (the test folder is not a package)


def timings(run: Callable[[], object], repeat: int) -> list[float]:
    run()  # warm-up: first-touch allocations, onnxruntime's lazy initialisation
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)

    model = resnet18()
    image = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    start = time.perf_counter()
    graph = lowbit.import_onnx(model)
    import_s = time.perf_counter() - start

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    reference = lambda: lowbit.run_reference(graph, {"input": image})  # noqa: E731
    onnxruntime = lambda: session.run(None, {"input": image})  # noqa: E731
    max_error = float(np.max(np.abs(reference()["logits"] - onnxruntime()[0])))

    rows = {"lowbit reference": timings(reference, args.repeat), "onnxruntime": timings(onnxruntime, args.repeat)}
    medians = {name: statistics.median(times) for name, times in rows.items()}
    print(f"ResNet-18 224x224 batch 1, {args.repeat} runs, {os.cpu_count()} CPUs, "
          f"lowbit import {import_s * 1e3:.0f} ms, max |logit difference| {max_error:.2e}")
    print(f"{'engine':<18} {'median ms':>10} {'min ms':>10} {'vs onnxruntime':>15}")
    for name, times in rows.items():
        ratio = medians[name] / medians["onnxruntime"]
        print(f"{name:<18} {medians[name] * 1e3:>10.1f} {min(times) * 1e3:>10.1f} {ratio:>14.1f}x")
    result = {"model": "resnet18-224", "repeat": args.repeat, "import_s": import_s, "max_abs_error": max_error,
              "median_s": medians, "min_s": {name: min(times) for name, times in rows.items()}}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
