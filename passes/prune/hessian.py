"""Second moments of layer inputs on calibration data, H = XᵀX / rows, the Hessian of a layer's squared
output error with respect to one row of its weight.

X holds one row per output position: the input's last axis for linear and matmul(x, W), the
transposed operand for matmul(W, x), and the im2col'd windows (columns ordered C/group, kH, kW, as the
weight matrix of `layers`) for conv2d, one H per group. Calibration runs the reference interpreter;
its `observe` hook hands over each layer's input as it is computed.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from lowbit.backends.reference import run_reference
from lowbit.ir import Graph, Node, Value
from lowbit.passes.prune.layers import WeightLayer
from lowbit.passes.quantize.calibration import BatchedFeeds, load_calibration_npz

Hessians = dict[int, list[np.ndarray]]
CHUNK_ROWS = 8192


def calibration_batches(graph: Graph, calibration: Any) -> Sequence[Mapping[str, np.ndarray]]:
    """Feed dicts from an .npz path, a dict of whole sample arrays, or an iterable of feed dicts
    (kept as a list: sequential pruning runs the data more than once)."""
    if isinstance(calibration, (str, Path)):
        return load_calibration_npz(calibration, graph)
    if isinstance(calibration, Mapping):
        return BatchedFeeds(graph, calibration)
    return calibration if isinstance(calibration, Sequence) else list(calibration)


def layer_input(layer: WeightLayer) -> Value:
    node = layer.node
    return node.inputs[1 - layer.index] if node.op == "matmul" else node.inputs[0]


def input_rows(layer: WeightLayer, x: np.ndarray) -> list[np.ndarray]:
    """The layer's input as matrices [positions, K], one per group."""
    node = layer.node
    if node.op == "conv2d":
        return im2col(x, layer.weight.type.shape[2:], node.attrs)
    if node.op == "matmul" and not layer.transposed:
        x = np.swapaxes(x, -1, -2)
    return [x.reshape(-1, x.shape[-1])]


def im2col(x: np.ndarray, kernel: Sequence[int], attrs: Mapping[str, Any]) -> list[np.ndarray]:
    """Every window of x [N, C, H, W] as rows [N·OH·OW, C/group·kH·kW], one matrix per group."""
    top, left, bottom, right = attrs["pads"]
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    (sh, sw), (dh, dw), group = attrs["strides"], attrs["dilations"], attrs["group"]
    spans = (dh * (kernel[0] - 1) + 1, dw * (kernel[1] - 1) + 1)
    windows = sliding_window_view(padded, spans, axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    n, c, oh, ow, kh, kw = windows.shape
    rows = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, group, c // group * kh * kw)
    return [rows[:, g] for g in range(group)]


def collect_hessians(graph: Graph, layers: Iterable[WeightLayer],
                     batches: Iterable[Mapping[str, np.ndarray]]) -> Hessians:
    """H per group of each layer (keyed by id of its node), over all batches."""
    by_value: dict[int, list[WeightLayer]] = {}
    sums: dict[int, list[np.ndarray]] = {}
    counts: dict[int, int] = {}
    for layer in layers:
        by_value.setdefault(id(layer_input(layer)), []).append(layer)
        sums[id(layer.node)] = []
        counts[id(layer.node)] = 0

    def add(value: Value, array: np.ndarray) -> None:
        for layer in by_value.get(id(value), ()):
            groups = input_rows(layer, array)
            key = id(layer.node)
            if not sums[key]:
                sums[key] = [np.zeros((g.shape[1], g.shape[1])) for g in groups]
            for total, rows in zip(sums[key], groups):
                # float64 sums, converted a chunk at a time (im2col of a large batch has many rows).
                for start in range(0, len(rows), CHUNK_ROWS):
                    chunk = rows[start:start + CHUNK_ROWS].astype(np.float64)
                    total += chunk.T @ chunk
            counts[key] += groups[0].shape[0]

    def observe(node: Node, results: list[np.ndarray]) -> None:
        for value, array in zip(node.outputs, results):
            add(value, array)

    for feeds in batches:
        for value in graph.inputs:
            add(value, np.asarray(feeds[value.name]))
        run_reference(graph, feeds, observe=observe)
    return {key: [total / max(counts[key], 1) for total in totals] for key, totals in sums.items() if totals}


def waves(graph: Graph, layers: Sequence[WeightLayer]) -> list[list[WeightLayer]]:
    """`layers` in groups such that every layer comes after all the layers that feed it (so its
    Hessian can be measured on the outputs of already pruned layers); independent layers share a group."""
    by_node = {id(layer.node): layer for layer in layers}
    level: dict[int, int] = {}
    grouped: dict[int, list[WeightLayer]] = {}
    for node in graph.nodes:
        depth = max((level.get(id(v), 0) for v in node.inputs if v is not None), default=0)
        layer = by_node.get(id(node))
        if layer is not None:
            grouped.setdefault(depth, []).append(layer)
            depth += 1
        for value in node.outputs:
            level[id(value)] = depth
    return [grouped[depth] for depth in sorted(grouped)]
