"""The pruning summary: one row per layer from `graph.metadata["pruning"]`, as data or as a table."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit.ir import Graph
from lowbit.passes.prune.layers import PRUNABLE_OPS, WEIGHT_OPERAND, weight_layer


@dataclass
class LayerSummary:
    """What pruning did to one layer. `sparsity` is the fraction of zero weights; the errors are
    relative (‖W − Ŵ‖/‖W‖, and ‖(W − Ŵ)X‖/‖WX‖ on calibration inputs X when calibration was given)."""

    name: str
    op: str
    method: str
    pattern: str
    sparsity: float | None
    params: int | None
    weight_error: float | None
    output_error: float | None
    note: str


def pruning_summary(graph: Graph) -> list[LayerSummary]:
    """Rows for every layer with a pruning record, in graph order."""
    records = dict(graph.metadata.get("pruning", {}))
    order = [node.name for node in graph.nodes if node.name in records]
    rows = []
    for name in order + [name for name in records if name not in order]:
        entry = records[name]
        notes = []
        if "channels" in entry:
            notes.append("filters {1}→{0}".format(*entry["channels"]))
        if "inputs" in entry:
            notes.append("inputs {1}→{0}".format(*entry["inputs"]))
        if entry.get("pattern") == "nm":
            notes.append(f"{entry['n']}:{entry['m']}")
        if entry.get("pattern") == "block":
            notes.append("block {}x{}".format(*entry["block"]))
        if entry.get("update") == "sparsegpt":
            notes.append("sparsegpt update")
        if "layout" in entry:
            notes.append(entry["layout"])
        if "skipped" in entry:
            notes.append("left as is: " + entry["skipped"])
        rows.append(LayerSummary(name, entry.get("op", "?"), entry.get("method", "-"), entry.get("pattern", "-"),
                                 entry.get("sparsity"), entry.get("params"), entry.get("weight_error"),
                                 entry.get("output_error"), "; ".join(notes)))
    return rows


def weight_sparsity(graph: Graph) -> tuple[int, int]:
    """(zero weights, weights) over every conv2d / linear / matmul-by-constant weight of `graph`."""
    zeros = total = 0
    for node in graph.nodes:
        layer = weight_layer(node, (*PRUNABLE_OPS, *WEIGHT_OPERAND), float_only=False)
        if layer is not None and layer.data is not None:
            zeros += int(np.count_nonzero(layer.data == 0))
            total += layer.data.size
    return zeros, total


def format_summary(graph: Graph) -> str:
    """The summary as a text table, with the total weight sparsity last."""
    rows = pruning_summary(graph)
    width = max([len(row.name) for row in rows] + [5])
    lines = [f"{'layer':<{width}}  {'op':<8} {'method':<10} {'pattern':<12} {'sparsity':>8} {'params':>9} "
             f"{'w err':>7} {'out err':>7}  note"]
    for row in rows:
        lines.append(f"{row.name:<{width}}  {row.op:<8} {row.method:<10} {row.pattern:<12} "
                     f"{_cell(row.sparsity, 8, '.1%')} {_cell(row.params, 9, 'd')} {_cell(row.weight_error, 7, '.4f')} "
                     f"{_cell(row.output_error, 7, '.4f')}  {row.note}".rstrip())
    zeros, total = weight_sparsity(graph)
    lines.append(f"total: {zeros} of {total} weights are zero ({zeros / max(total, 1):.1%})")
    return "\n".join(lines)


def _cell(value: float | int | None, width: int, spec: str) -> str:
    return "-".rjust(width) if value is None else format(value, f"{width}{spec}")
