"""Pruning accuracy: top-1 of the digits CNN and MLP pruned by lowbit, with and without the SparseGPT
weight update, alone and followed by int8 quantization.

    python bench/pruning_accuracy.py [--models cnn mlp] [--sparsities 0.5 0.6 0.7 0.8 0.9 0.95]
                                     [--json bench/results/pruning_accuracy.json]

Calibration is digits_calib.npz (200 training images: the update's Hessians and the int8 ranges);
accuracy is on digits_test.npz (500 images), run by the reference interpreter. Rows: the unstructured
magnitude curve over `--sparsities`, 2:4, 1x4 blocks at 50%, random 50% (a baseline), filter pruning
of the CNN (no update: it removes channels), and 50% / 2:4 followed by `lowbit.quantize` (static int8,
per-channel); "update" is SparseGPT on the calibration data, "plain" is the mask alone. Not a test:
nothing here asserts.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

import lowbit
from lowbit.passes.prune import prune, weight_sparsity

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
MODELS = {"cnn": ("digits_cnn.onnx", (1, 28, 28)), "mlp": ("mlp.onnx", (784,))}
BATCH = 100


def accuracy(graph: lowbit.Graph, x: np.ndarray, y: np.ndarray) -> float:
    predictions = [lowbit.run_reference(graph, {"input": x[i:i + BATCH]})["logits"].argmax(1)
                   for i in range(0, len(x), BATCH)]
    return float((np.concatenate(predictions) == y).mean())


def rows_for(model: str, sparsities: list[float]) -> list[dict]:
    file, shape = MODELS[model]
    graph = lowbit.import_onnx(DATA / file, batch_size=BATCH)
    test = np.load(DATA / "digits_test.npz")
    x, y = test["x"].reshape((-1,) + shape), test["y"]
    calibration = {"input": np.load(DATA / "digits_calib.npz")["x"].reshape((-1,) + shape)}
    rows = []

    def measure(spec: str, update: bool | None, int8: bool = False) -> None:
        start = time.perf_counter()
        options = {} if spec.startswith("filters") else {"calibration": calibration if update else None}
        pruned = graph if spec == "none" else prune(graph, spec, **options)
        seconds = time.perf_counter() - start
        result = lowbit.quantize(pruned, calibration, progress=False) if int8 else pruned
        zeros, total = weight_sparsity(pruned)
        rows.append({"model": model, "method": spec, "update": update, "int8": int8,
                     "weight_sparsity": zeros / total, "params": pruned.parameter_count(),
                     "accuracy": accuracy(result, x, y), "prune_s": seconds})
        print(_format_row(rows[-1]), flush=True)

    measure("none", None)
    measure("none", None, int8=True)
    for sparsity in sparsities:
        for update in (False, True):
            measure(f"magnitude:{sparsity:g}", update)
    for spec in ("nm:2:4", "block:1x4:0.5", "random:0.5"):
        for update in (False, True):
            measure(spec, update)
    if "conv2d" in graph.op_histogram():
        for ratio in (0.25, 0.5):
            measure(f"filters:{ratio:g}", None)
    for spec in ("magnitude:0.5", "nm:2:4"):
        for update in (False, True):
            measure(spec, update, int8=True)
    return rows


def _format_row(row: dict) -> str:
    update = {None: "-", False: "plain", True: "update"}[row["update"]]
    return (f"{row['model']:<4} {row['method']:<16} {update:<7} {'int8' if row['int8'] else 'fp32':<5} "
            f"{row['weight_sparsity']:8.1%} {row['params']:>8} {row['accuracy']:9.1%} {row['prune_s']:8.2f}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    parser.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results"
                        / "pruning_accuracy.json")
    args = parser.parse_args(argv)
    print(f"{'model':<4} {'method':<16} {'weights':<7} {'type':<5} {'sparsity':>8} {'params':>8} "
          f"{'accuracy':>9} {'prune s':>8}")
    rows = [row for model in args.models for row in rows_for(model, args.sparsities)]
    report = {"machine": platform.platform(), "numpy": np.__version__, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
