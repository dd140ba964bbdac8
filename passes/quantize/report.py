"""Per-layer error of a quantized graph against its float twin: SQNR and largest absolute error of every
node output the two share (matched by node name), on calibration data."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from lowbit.backends.reference import run_reference
from lowbit.ir import Graph, Node
from lowbit.ir.quant_math import dequantize_values
from lowbit.passes.quantize.calibration import BatchedFeeds


@dataclass
class LayerError:
    name: str
    op: str
    float_op: str
    sqnr_db: float
    max_abs_error: float
    signal_rms: float
    integer: bool


def _outputs(graph: Graph, feeds: Mapping[str, np.ndarray]) -> dict[str, tuple[Node, np.ndarray]]:
    seen: dict[str, tuple[Node, np.ndarray]] = {}

    def observe(node: Node, results: list[np.ndarray]) -> None:
        if node.name and len(results) == 1:
            value, array = node.outputs[0], results[0]
            if value.type.quant is not None and value.type.quant.axis is None:
                array = dequantize_values(array, np.float32(value.type.quant.scale[0]),
                                          np.int64(value.type.quant.zero_point[0]))
            if array.dtype.kind == "f":
                seen[node.name] = (node, array.astype(np.float64))

    run_reference(graph, feeds, observe=observe)
    return seen


def layer_errors(float_graph: Graph, quantized: Graph, calibration: Any) -> list[LayerError]:
    """SQNR (dB) and max |error| per named node present in both graphs, in the float graph's order."""
    batches: Iterable = BatchedFeeds(float_graph, calibration) if isinstance(calibration, Mapping) else calibration
    totals: dict[str, list] = {}
    for feeds in batches:
        reference = _outputs(float_graph, feeds)
        approximate = _outputs(quantized, feeds)
        for name, (node, expected) in reference.items():
            if name not in approximate or approximate[name][1].shape != expected.shape:
                continue
            error = approximate[name][1] - expected
            twin = approximate[name][0]
            entry = totals.setdefault(name, [node.op, twin, 0.0, 0.0, 0.0, 0])
            entry[2] += float(np.sum(expected ** 2))
            entry[3] += float(np.sum(error ** 2))
            entry[4] = max(entry[4], float(np.abs(error).max(initial=0.0)))
            entry[5] += expected.size
    result = []
    for name, (float_op, twin, signal, noise, worst, count) in totals.items():
        sqnr = math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)
        result.append(LayerError(name, twin.op, float_op, sqnr, worst, math.sqrt(signal / max(count, 1)),
                                 twin.outputs[0].type.dtype.is_integer))
    return result


def format_table(errors: list[LayerError]) -> str:
    width = max([len(e.name) for e in errors] + [5])
    lines = [f"{'layer':<{width}}  {'op':<16} {'SQNR dB':>8} {'max |err|':>10} {'rms':>10}"]
    for e in errors:
        sqnr = "inf" if math.isinf(e.sqnr_db) else f"{e.sqnr_db:8.2f}"
        lines.append(f"{e.name:<{width}}  {e.op:<16} {sqnr:>8} {e.max_abs_error:10.4g} {e.signal_rms:10.4g}")
    return "\n".join(lines)


def write_report(errors: list[LayerError], directory: str | Path) -> list[Path]:
    """report.json always; report.png when matplotlib is installed (the `report` extra)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / "report.json"]
    rows = [{**asdict(e), "sqnr_db": None if math.isinf(e.sqnr_db) else e.sqnr_db} for e in errors]
    written[0].write_text(json.dumps({"layers": rows}, indent=2))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    figure, axis = plt.subplots(figsize=(max(6, 0.35 * len(errors)), 4))
    values = [60 if math.isinf(e.sqnr_db) else e.sqnr_db for e in errors]
    axis.bar(range(len(errors)), values, color=["tab:blue" if e.integer else "tab:orange" for e in errors])
    axis.set_xticks(range(len(errors)), [e.name for e in errors], rotation=90, fontsize=7)
    axis.set_ylabel("SQNR (dB)")
    axis.set_title("Quantization error per layer (blue: integer result, orange: float)")
    figure.tight_layout()
    figure.savefig(directory / "report.png", dpi=120)
    plt.close(figure)
    written.append(directory / "report.png")
    return written
