"""`lowbit.quantize`: post-training quantization of a float graph."""
from __future__ import annotations

from typing import Any, Iterable

from lowbit.ir import Graph, verify
from lowbit.passes.quantize.quantizer import QuantizeOptions, simulated_quantization
from lowbit.passes.quantize.realize import realize


def quantize(graph: Graph, calibration: Any = None, *, mode: str = "static", weights: str = "int8",
             activations: str = "int8", per_channel: bool = True, symmetric_weights: bool = True,
             symmetric_activations: bool = False, method: str = "minmax", exclude: Iterable[str] = (),
             group_size: int = 32, wide_outputs: bool = True, smooth: float | None = 0.5,
             simulate_only: bool = False, progress: bool = True,
             **observer_options: Any) -> Graph:
    """A quantized copy of `graph`.

    `calibration`: an iterable of feed dicts, or a dict of whole arrays cut into the graph's batch size.
    `mode`: "static" (int8 activations and weights, integer ops), "dynamic" (int8 weights; activation
    scales found at run time for linear layers and matmuls: `dynamic_linear`, `dynamic_matmul`; no
    calibration needed) or "weight_only" (int8 or 4-bit weights dequantized before float ops). `weights`: "int8", "int7" (7-bit weights, so that x86
    `vpmaddubsw` can never saturate), "int4"/"uint4" (weight-only, per group of `group_size`).
    `activations`: "int8", "uint8" or "int16". `method`: the calibration observer (minmax,
    percentile, entropy, mse; `observer_options` go to it, e.g. percentile=99.99). `exclude`: node
    names or op types kept in float. `wide_outputs`: results of conv2d / linear / matmul read only by
    float ops (LayerNorm, softmax, graph outputs), and values read only as a fused residual, get
    16-bit types (products keep 8-bit operands); False keeps every activation 8-bit. `smooth`:
    SmoothQuant's alpha for linear layers fed by a LayerNorm (moves activation outliers into the
    weights before calibration), None to turn it off. `simulate_only` stops after inserting quantize/dequantize pairs
    (what the reference interpreter runs to predict accuracy) instead of realizing integer ops.
    """
    options = QuantizeOptions(mode=mode, weights=weights, activations=activations, per_channel=per_channel,
                              symmetric_weights=symmetric_weights, symmetric_activations=symmetric_activations,
                              method=method, group_size=group_size, exclude=tuple(exclude),
                              wide_outputs=wide_outputs, smooth=smooth,
                              observer_options=dict(observer_options))
    result = simulated_quantization(graph, calibration, options, progress=progress)
    if not simulate_only and mode == "static":
        realize(result)
    verify(result)
    return result
