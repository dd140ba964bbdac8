"""Node counts before and after `lowbit.optimize` (default pipeline) on the test models, with pass timing.

    python bench/optimize_counts.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import lowbit  # noqa: E402
from model_builders import bert_encoder, mobilenet_v2, resnet18  # noqa: E402

MODELS = {
    "resnet18-224": lambda: resnet18(image=224),
    "mobilenetv2-224": lambda: mobilenet_v2(image=224),
    "bert-2layer (exporter-style)": lambda: bert_encoder(seq=32, exporter_style=True),
    "digits_cnn": lambda: str(ROOT / "tests" / "data" / "digits_cnn.onnx"),
    "mlp": lambda: str(ROOT / "tests" / "data" / "mlp.onnx"),
}


def histogram_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{op} {n}" for op, n in counts.items())


def main() -> None:
    for name, build in MODELS.items():
        graph = lowbit.import_onnx(build())
        start = time.perf_counter()
        optimized = lowbit.optimize(graph)
        seconds = time.perf_counter() - start
        print(f"{name}: {len(graph.nodes)} → {len(optimized.nodes)} nodes ({seconds * 1000:.0f} ms)")
        print(f"  before: {histogram_text(graph.op_histogram())}")
        print(f"  after:  {histogram_text(optimized.op_histogram())}")


if __name__ == "__main__":
    main()
