"""Fused epilogues of conv2d and linear: y = activation(op(x) + bias + residual).

The producing op carries them as an optional `residual` operand (same shape as the result) and the
attributes `activation` (one of ACTIVATIONS) and `activation_params` (clip: [min, max];
leaky_relu: [alpha]; none for the others).
"""
from __future__ import annotations

from lowbit.ir.registry import Attr, InferContext
from lowbit.ir.types import TensorType

ACTIVATIONS = {"none": 0, "relu": 0, "clip": 2, "leaky_relu": 1, "sigmoid": 0, "hard_swish": 0}

EPILOGUE_ATTRS = {
    "activation": Attr("str", "none", "fused activation: " + ", ".join(ACTIVATIONS)),
    "activation_params": Attr("floats", (), "clip: [min, max]; leaky_relu: [alpha]"),
}


def check_epilogue(ctx: InferContext, residual_index: int, result: TensorType) -> None:
    """Fail unless the activation is known with the right parameters and the residual fits the result."""
    activation, params = ctx.attrs["activation"], ctx.attrs["activation_params"]
    if activation not in ACTIVATIONS:
        ctx.fail(f"unknown fused activation '{activation}'; expected one of {sorted(ACTIVATIONS)}")
    if len(params) != ACTIVATIONS[activation]:
        ctx.fail(f"activation '{activation}' takes {ACTIVATIONS[activation]} parameters, got {list(params)}")
    if ctx.has(residual_index):
        residual = ctx.type(residual_index)
        if (residual.shape, residual.dtype) != (result.shape, result.dtype):
            ctx.fail(f"residual {residual.dtype}{list(residual.shape)} must match the result {result}")


def activation_attrs(activation: str, params: tuple[float, ...]) -> dict:
    """The attributes of the standalone activation op that `activation` with `params` stands for."""
    if activation == "clip":
        return {"min": params[0], "max": params[1]}
    if activation == "leaky_relu":
        return {"alpha": params[0]}
    return {}
