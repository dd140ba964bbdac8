"""Sparse × dense linear layers: lowbit's sparse kernels against its own dense ones (int8 and float32) for
a 512×512 weight at M = 64 and M = 1, unstructured and 1×4-block sparsity; and the 90%-sparse int8 digits
MLP end to end against ONNX Runtime fp32 at batch 1 and 64 (the cost model's choice, all layers sparse,
all dense), with the sizes of the default (cost model) and the all-sparse artifacts. Times include a
call's fixed cost from Python, given on its own ("empty call"); the layer rows also give the kernels'
speed-up without it (an empty call's time, in the same interleaved rounds, taken from both).

    python bench/sparse.py [--rounds 30] [--layers-only] [--kinds int8,f32] [--target host|x86_64-avx2|…]

`--target` compiles for a named target (e.g. x86_64-avx2, the class of machine without VNNI or AMX that
the pruning issue's speed target was written for; its code runs here too); ONNX Runtime always uses this
machine's best instructions.
The artifact sizes include one exported with `optimize="size"` (`lowbit compile --optimize-for size`).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

import lowbit
from lowbit.backends.native.sparse_selection import forced_sparse, layer_graph, random_sparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def layers(rounds: int, kind: str, target: str = "host") -> list[str]:
    """Rows compare the kernels themselves: every layer with a layout goes sparse here. "Kernels'
    speed-up" leaves out the fixed cost of a call from Python: a 1×1 layer's time in the same rounds is
    subtracted from both."""
    rng = np.random.default_rng(0)
    lines = [f"| M | pattern | sparsity | dense {kind} µs | sparse {kind} µs | speed-up | kernels' speed-up |",
             "|---|---|---|---|---|---|---|"]
    empty_graph, empty_feeds = layer_graph(kind, np.ones((1, 1), np.float32), 1, False)
    empty = lowbit.compile(empty_graph, target)
    for rows in (64, 1):
        for block in ((1, 1), (1, 4)):
            for sparsity in (0.5, 0.7, 0.9, 0.95):
                matrix = random_sparse(rng, 512, 512, sparsity, block)
                dense_graph, feeds = layer_graph(kind, matrix, rows, False)
                sparse_graph, _ = layer_graph(kind, matrix, rows, True)
                sparse_graph.nodes[0].inputs[1].type = _with_block(sparse_graph.nodes[0].inputs[1].type, block)
                dense = lowbit.compile(dense_graph, target)
                with forced_sparse():
                    sparse = lowbit.compile(sparse_graph, target)
                np.testing.assert_allclose(dense.run(feeds)["y"], sparse.run(feeds)["y"], rtol=1e-4, atol=1e-3)
                times = interleaved({"dense": lambda: dense.run(feeds), "sparse": lambda: sparse.run(feeds),
                                     "empty": lambda: empty.run(empty_feeds)}, rounds)
                name = "unstructured" if block == (1, 1) else f"{block[0]}×{block[1]} blocks"
                kernels = (times["dense"] - times["empty"]) / (times["sparse"] - times["empty"])
                lines.append(f"| {rows} | {name} | {sparsity:.0%} | {1e6 * times['dense']:.1f} | "
                             f"{1e6 * times['sparse']:.1f} | {times['dense'] / times['sparse']:.2f}× | {kernels:.2f}× |")
    return lines


def _with_block(t, block):
    from lowbit.ir import TensorType
    from lowbit.ir.types import SparseLayout
    return TensorType(t.shape, t.dtype, t.quant, SparseLayout("csr") if block == (1, 1) else SparseLayout("bsr", block))


def mlp(rounds: int, target: str = "host") -> list[str]:
    import onnxruntime as ort

    from lowbit.backends.native import aot
    calibration = np.load(DATA / "digits_calib.npz")["x"].reshape(-1, 784).astype(np.float32)
    onnx_path = DATA / "mlp.onnx"
    lines = ["| batch | ORT fp32 µs | lowbit int8, cost model's choice µs | lowbit int8, all sparse µs | "
             "lowbit int8, all dense µs |", "|---|---|---|---|---|"]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    sizes = []
    for batch in (1, 64):
        graph = lowbit.import_onnx(str(onnx_path), batch_size=batch)
        graph = lowbit.prune(graph, "magnitude", sparsity=0.9)
        graph = lowbit.quantize(graph, {"input": calibration[:batch * max(1, len(calibration) // batch)]})
        dense = lowbit.compile(graph, target)
        graph = lowbit.optimize(graph, "sparsify")
        chosen = lowbit.compile(graph, target)
        with forced_sparse():
            sparse = lowbit.compile(graph, target)
        x = calibration[:batch]
        times = interleaved({"ort": lambda: session.run(None, {"input": x}), "chosen": lambda: chosen.run({"input": x}),
                             "sparse": lambda: sparse.run({"input": x}), "dense": lambda: dense.run({"input": x})},
                            rounds)
        lines.append(f"| {batch} | {1e6 * times['ort']:.1f} | " + " | ".join(
            f"{1e6 * times[name]:.1f} ({times['ort'] / times[name]:.2f}×)" for name in ("chosen", "sparse", "dense"))
            + " |")
        for name, forced, goal in (("default (cost model)", contextlib.nullcontext, "speed"),
                                   ("all-sparse", forced_sparse, "speed"),
                                   ("optimize for size", contextlib.nullcontext, "size")):
            with tempfile.TemporaryDirectory() as folder, forced():
                aot.export(graph, folder, target=target, optimize=goal)
                sizes.append((batch, name, sorted((p.name, p.stat().st_size) for p in Path(folder).rglob("*")
                                                  if p.is_file())))
    lines.append("")
    onnx_bytes = onnx_path.stat().st_size
    for batch, name, files in sizes:
        total = sum(size for _, size in files)
        lines.append(f"{name} artifact, batch {batch}: {total} bytes = {100 * total / onnx_bytes:.1f}% of mlp.onnx "
                     f"({onnx_bytes} bytes): " + ", ".join(f"{n} {s}" for n, s in files))
    return lines


def empty_call(rounds: int) -> str:
    graph, feeds = layer_graph("int8", np.ones((1, 1), np.float32), 1, False)
    model = lowbit.compile(graph)
    return f"empty call (a 1×1 qlinear): {1e6 * interleaved({'x': lambda: model.run(feeds)}, rounds)['x']:.1f} µs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--layers-only", action="store_true")
    parser.add_argument("--kinds", default="int8,f32")
    parser.add_argument("--target", default="host", help="lowbit's target (default: this machine)")
    args = parser.parse_args()
    os.environ["LOWBIT_CACHE_DIR"] = "off"  # decisions follow the cost model of this run
    print(empty_call(args.rounds), "\n")
    for kind in args.kinds.split(","):
        print("\n".join(layers(args.rounds, kind, args.target)))
        print()
    if not args.layers_only:
        print("\n".join(mlp(args.rounds, args.target)))


if __name__ == "__main__":
    main()
