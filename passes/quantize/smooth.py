"""SmoothQuant (Xiao et al. 2023) for the linear layers a LayerNorm feeds.

Transformer LayerNorm outputs carry a few outlier channels (tens of times the others) that ruin a
per-tensor int8 scale, while the weights reading them are tame. For each input channel j of the
linear layers that read one LayerNorm output,

    s_j = max|x_j|^α / max|w_j|^(1−α)

(max over calibration data, resp. over the output channels of every such weight), then the
LayerNorm's scale and bias are divided by s and each weight's column j multiplied by s: the product
is unchanged in exact arithmetic, and the activation's channels are evened out at the weights'
expense (α = 0.5 splits the difficulty equally). When the LayerNorm output has other readers (the
residual of a later layer), they keep the original LayerNorm and the linear layers get a smoothed copy.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from lowbit.ir import Graph, Node, Value, constant_value
from lowbit.passes.quantize.calibration import calibrate

# Factors beyond this range would only come from channels that are (nearly) always zero.
LIMITS = (1e-4, 1e4)


def smoothing_groups(graph: Graph, eligible: Callable[[Node], bool]) -> list[tuple[Node, list[Node]]]:
    """LayerNorms over the last axis with constant scale (and bias), each with the eligible linear
    layers that take its output as their input x."""
    groups = []
    for node in graph.nodes:
        if node.op != "layer_norm" or constant_value(node.inputs[1]) is None:
            continue
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        rank, channels = node.outputs[0].type.rank, node.outputs[0].type.shape[-1]
        if bias is not None and constant_value(bias) is None or node.attrs["axis"] not in (-1, rank - 1):
            continue
        if any(constant_value(v).size != channels for v in node.inputs[1:] if v is not None):
            continue
        linears = list({id(user): user for user, index in node.outputs[0].uses if index == 0 and eligible(user)}
                       .values())
        if linears:
            groups.append((node, linears))
    return groups


def smoothing_factors(x_absmax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """s_j = max|x_j|^α / max|w_j|^(1−α) (weights [N, K], j along K); 1 where either maximum is 0."""
    w_absmax = np.max([np.abs(w).max(axis=0) for w in weights], axis=0).astype(np.float64)
    x_absmax = np.asarray(x_absmax, np.float64)
    valid = (x_absmax > 0) & (w_absmax > 0)
    factors = np.ones_like(x_absmax)
    factors[valid] = x_absmax[valid] ** alpha / w_absmax[valid] ** (1.0 - alpha)
    return np.clip(factors, *LIMITS)


def smooth_layer_norms(graph: Graph, calibration: Any, alpha: float, eligible: Callable[[Node], bool], *,
                       progress: bool = True) -> int:
    """Smooth every LayerNorm → linear group of `graph` in place, with per-channel ranges of the
    LayerNorm outputs observed on `calibration`; returns the number of groups smoothed."""
    groups = smoothing_groups(graph, eligible)
    if not groups:
        return 0
    ranges = calibrate(graph, calibration, [], method="minmax", per_channel_axes={ln.outputs[0]: -1 for ln, _ in groups},
                       progress=progress)
    for norm, linears in groups:
        low, high = ranges[norm.outputs[0]]
        factors = smoothing_factors(np.maximum(np.abs(low), np.abs(high)),
                                    [constant_value(linear.inputs[1]) for linear in linears], alpha)
        _apply(graph, norm, linears, factors)
    return len(groups)


def _scaled(graph: Graph, value: Value, factors: np.ndarray, name: str) -> Value:
    data = constant_value(value)
    return graph.add_constant((data * factors).astype(data.dtype), name)


def _apply(graph: Graph, norm: Node, linears: list[Node], factors: np.ndarray) -> None:
    name = norm.name or "layer_norm"
    params = [_scaled(graph, v, 1.0 / factors, f"{name}.{role}.smoothed") if v is not None else None
              for v, role in zip(norm.inputs[1:], ("scale", "bias"))]
    readers = {id(linear) for linear in linears}
    if all(id(user) in readers and index == 0 for user, index in norm.outputs[0].uses) \
            and not graph.is_output(norm.outputs[0]):
        for index, value in enumerate(params, start=1):
            if value is not None:
                norm.set_input(index, value)
        smoothed = norm.outputs[0]
    else:
        inputs = [norm.inputs[0], *params][:len(norm.inputs)]
        smoothed = graph.add_node("layer_norm", inputs, norm.attrs, name=f"{name}.smoothed", after=norm).output
    for linear in linears:
        weight = _scaled(graph, linear.inputs[1], factors[None, :], f"{linear.name or 'linear'}.weight.smoothed")
        linear.set_input(1, weight)
        linear.set_input(0, smoothed)
