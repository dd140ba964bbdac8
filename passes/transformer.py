"""Transformer fusions: LayerNorm from its decomposed form, GELU (erf and tanh forms), and
scaled dot-product attention (q·kᵀ·scale + mask → softmax → ·v) into one `attention` op."""
from __future__ import annotations

import math

import numpy as np

from lowbit.ir import Graph, Value, constant_value
from lowbit.passes.registry import register
from lowbit.passes.rewrite import Const, Fusion, Match, Op, PatternNode, Var, apply_patterns


def _last_axis_only(node, rank: int) -> bool:
    return tuple(node.attrs["axes"]) == (rank - 1,) and node.attrs["keepdims"]


def _scalar(value: Value) -> float | None:
    data = constant_value(value)
    return float(data.reshape(-1)[0]) if data is not None and data.size == 1 else None


class LayerNormFusion(Fusion):
    """mean/var over the last axis, (x - mean) / sqrt(var + eps) * gamma + beta → layer_norm."""

    name = "fuse-layernorm"

    def patterns(self) -> list[PatternNode]:
        x = Var("x")
        centered = Op("sub", x, Op("reduce_mean", x, name="mean"), name="centered")
        forms = []
        for square in (Op("pow", centered, Const("two", value=2.0)), Op("mul", centered, centered)):
            variance = Op("reduce_mean", square, name="variance")
            normalized = Op("div", centered, Op("sqrt", Op("add", variance, Const("eps"))))
            forms.append(Op("add", Op("mul", normalized, Const("gamma")), Const("beta")))
            forms.append(Op("mul", normalized, Const("gamma")))
        return forms

    def check(self, graph: Graph, match: Match) -> str | None:
        rank = match["x"].type.rank
        for name in ("mean", "variance"):
            if not _last_axis_only(match[name].producer, rank):
                return f"the {name} is not taken over the last axis alone with keepdims"
        if _scalar(match["eps"]) is None:
            return "epsilon is not a scalar constant"
        width = match["x"].type.shape[-1]
        for name in ("gamma", "beta"):
            if name in match.values and match[name].type.size not in (1, width):
                return f"{name} of shape {list(match[name].type.shape)} is not per-feature"
        return None

    def rewrite(self, graph: Graph, match: Match) -> Value:
        x = match["x"]
        width = x.type.shape[-1]
        root = match.nodes[0]

        def per_feature(name: str, fill: float) -> Value:
            data = match.const(name) if name in match.values else np.asarray(fill, x.type.dtype.numpy)
            return graph.add_constant(np.broadcast_to(data.reshape(-1) if data.size > 1 else data, (width,)),
                                      f"{root.name or 'layer_norm'}.{name}")

        return graph.add_node("layer_norm", [x, per_feature("gamma", 1.0), per_feature("beta", 0.0)],
                              {"axis": -1, "epsilon": _scalar(match["eps"])}, name=root.name, before=root).output


class GeluFusion(Fusion):
    """x·0.5·(1 + erf(x/√2)) → gelu, and x·0.5·(1 + tanh(√(2/π)·(x + 0.044715·x³))) → gelu{approximate=tanh}."""

    name = "fuse-gelu"

    def patterns(self) -> list[PatternNode]:
        x = Var("x")
        erf_inner = [Op("div", x, Const("c", value=math.sqrt(2))), Op("mul", x, Const("c", value=1 / math.sqrt(2)))]
        cubes = [Op("pow", x, Const("three", value=3.0)), Op("mul", Op("mul", x, x), x), Op("mul", x, Op("mul", x, x))]
        brackets = [Op("add", Op("erf", inner, name="erf"), Const("one", value=1.0)) for inner in erf_inner]
        for cube in cubes:
            polynomial = Op("add", x, Op("mul", cube, Const("k", value=0.044715)))
            brackets.append(Op("add", Op("tanh", Op("mul", polynomial, Const("c", value=math.sqrt(2 / math.pi))),
                                         name="tanh"), Const("one", value=1.0)))
        forms = []
        for bracket in brackets:
            forms += [Op("mul", Op("mul", x, Const("half", value=0.5)), bracket),
                      Op("mul", Op("mul", x, bracket), Const("half", value=0.5)),
                      Op("mul", x, Op("mul", bracket, Const("half", value=0.5)))]
        return forms

    def rewrite(self, graph: Graph, match: Match) -> Value:
        root = match.nodes[0]
        approximate = "tanh" if "tanh" in match.values else "none"
        return graph.add_node("gelu", [match["x"]], {"approximate": approximate}, name=root.name,
                              before=root).output


class AttentionFusion(Fusion):
    """softmax(q @ kᵀ (/ or ·) scale (+ mask)) @ v → attention(q, kᵀ, v, mask){scale}; also the form
    torch's exporter writes for scaled_dot_product_attention, (q·√s) @ (kᵀ·√s), scaling both sides,
    and its guard that replaces NaN probabilities by 0 before the product with v."""

    name = "fuse-attention"

    def patterns(self) -> list[PatternNode]:
        scaled = []
        # The scaled operands first: the plain form would match too, leaving both muls outside.
        for q, k_t in ((Op("mul", Var("q"), Const("q_factor")), Op("mul", Var("k_t"), Const("k_factor"))),
                       (Var("q"), Var("k_t"))):
            scores = Op("matmul", q, k_t, name="scores")
            scaled += [Op("div", scores, Const("divisor")), Op("mul", scores, Const("factor")), scores]
        forms = []
        for logits in scaled:
            for masked in (Op("add", logits, Var("mask")), logits):
                probs = Op("softmax", masked, name="probs")
                # torch's sdpa export zeroes NaN probabilities (fully masked rows) before @ v.
                is_nan = Op("logical_not", Op("equal", probs, probs))
                forms.append(Op("matmul", Op("where", is_nan, Const("zero", value=0.0), probs, name="guarded"),
                                Var("v")))
                forms.append(Op("matmul", probs, Var("v")))
        return forms

    def check(self, graph: Graph, match: Match) -> str | None:
        probs = match["probs"].producer
        if probs.attrs["axis"] not in (-1, match["probs"].type.rank - 1):
            return "softmax is not over the last axis"
        for name in ("divisor", "factor", "q_factor", "k_factor"):
            if name in match.values and _scalar(match[name]) is None:
                return f"the scale ({name}) is not a scalar constant"
        if "mask" in match.values and match["mask"] is match["scores"]:
            return "the mask is the scores themselves"
        return None

    def rewrite(self, graph: Graph, match: Match) -> Value:
        scale = 1.0
        if "divisor" in match.values:
            scale = 1.0 / _scalar(match["divisor"])
        elif "factor" in match.values:
            scale = _scalar(match["factor"])
        if "q_factor" in match.values:
            scale *= _scalar(match["q_factor"]) * _scalar(match["k_factor"])
        root = match.nodes[0]
        operands = [match["q"], match["k_t"], match["v"], match.values.get("mask")]
        attrs = {"scale": scale, "zero_nan_probs": "guarded" in match.values}
        return graph.add_node("attention", operands, attrs, name=root.name, before=root).output


@register("fuse-layernorm")
def fuse_layernorm(graph: Graph) -> bool:
    """Fuse the decomposed LayerNorm (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add)."""
    return apply_patterns(graph, [LayerNormFusion()])


@register("fuse-gelu")
def fuse_gelu(graph: Graph) -> bool:
    """Fuse GELU written with Erf or with the tanh approximation into one gelu op."""
    return apply_patterns(graph, [GeluFusion()])


@register("fuse-attention")
def fuse_attention(graph: Graph) -> bool:
    """Fuse scaled dot-product attention (MatMul, scale, mask Add, Softmax, MatMul) into one op."""
    return apply_patterns(graph, [AttentionFusion()])
