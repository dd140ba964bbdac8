"""Native float32 convolutions (conv2d with its fused epilogue, conv_transpose2d) against the reference.

Covers kernel sizes 1/3/5/7, strides, dilations, asymmetric pads, groups and depthwise convolutions,
every fused activation with and without residual, and output sizes that exercise every pixel-group
shape of the im2col packing (whole panels, one row per group, tails). Tolerances as in
test_gemm_f32. Ends with ResNet-18 (64×64) compiled whole.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.backends.native import Target
from lowbit.ir import DType, Graph, TensorType
from lowbit.kernels import conv, gemm_f32
from lowbit.kernels.llvm import emit_assembly, new_module

sys.path.insert(0, str(Path(__file__).parent))  # float_cases: shared with the conv tests
from float_cases import HOST, TARGETS, check  # noqa: E402

# The host, and AVX2's narrower vectors and smaller tile where the host can run them.
RNG = np.random.default_rng(5)
ACTIVATIONS = [("none", ()), ("relu", ()), ("clip", (0.0, 6.0)), ("leaky_relu", (0.2,)), ("sigmoid", ()),
               ("hard_swish", ())]


def f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)



@st.composite
def convolutions(draw):
    kernel = draw(st.sampled_from([1, 3, 5, 7]))
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    group = {"dense": 1, "grouped": draw(st.sampled_from([2, 3])), "depthwise": draw(st.sampled_from([1, 4, 5]))}[kind]
    c_per_group = 1 if kind == "depthwise" else draw(st.sampled_from([1, 2, 3, 8]))
    m_per_group = 1 if kind == "depthwise" else draw(st.sampled_from([1, 5, 13, 16]))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pads = tuple(draw(st.integers(0, kernel // 2 + 1)) for _ in range(4))
    reach = [d * (kernel - 1) + 1 for d in dilation]
    size = (draw(st.integers(max(1, reach[0] - pads[0] - pads[2]), 30)),
            draw(st.integers(max(1, reach[1] - pads[1] - pads[3]), 40)))
    return dict(kernel=kernel, group=group, c=c_per_group * group, m=m_per_group * group, stride=stride,
                dilation=dilation, pads=pads, size=size, batch=draw(st.sampled_from([1, 2])))


@settings(max_examples=30, deadline=None)
@given(shape=convolutions(), bias=st.booleans(), residual=st.booleans(), activation=st.sampled_from(ACTIVATIONS),
       target=TARGETS)
def test_conv2d(shape, bias, residual, activation, target):
    x = f32(shape["batch"], shape["c"], *shape["size"])
    graph = Graph("conv")
    x_value = graph.add_input("x", TensorType(x.shape, DType.f32))
    w = graph.add_constant(f32(shape["m"], shape["c"] // shape["group"], shape["kernel"], shape["kernel"]))
    b = graph.add_constant(f32(shape["m"])) if bias else None
    attrs = dict(strides=shape["stride"], dilations=shape["dilation"], pads=shape["pads"], group=shape["group"])
    feeds = {"x": x}
    r = None
    if residual:
        out_shape = graph.add("conv2d", x_value, w, **attrs).type.shape
        feeds["r"] = f32(*out_shape)
        r = graph.add_input("r", TensorType(out_shape, DType.f32))
    name, params = activation
    graph.set_outputs([("y", graph.add("conv2d", x_value, w, b, r, activation=name, activation_params=params,
                                       **attrs))])
    graph.eliminate_dead_code()
    check(graph, feeds, target)


@pytest.mark.parametrize("size", [(7, 7), (14, 14), (56, 56), (13, 17), (3, 100), (41, 31)])
def test_pixel_groups_cover_every_output(size):
    """Whole-panel groups, one-row groups, several-row groups and tails, with the residual offsets."""
    x, r = f32(1, 8, *size), f32(1, 24, *size)
    graph = Graph("sizes")
    x_value, r_value = (graph.add_input(n, TensorType(a.shape, DType.f32)) for n, a in (("x", x), ("r", r)))
    y = graph.add("conv2d", x_value, graph.add_constant(f32(24, 8, 3, 3)), graph.add_constant(f32(24)), r_value,
                  pads=(1, 1, 1, 1), activation="relu")
    graph.set_outputs([("y", y)])
    check(graph, {"x": x, "r": r})


@pytest.mark.parametrize("target", ["host", "x86_64-avx2", "aarch64"])
def test_pixel_groups_partition_the_output(target):
    """Every output pixel lands in exactly one panel column, in order."""
    tile = gemm_f32.default_tile(Target.parse(target))
    for oh, ow in [(1, 1), (7, 7), (14, 14), (56, 56), (112, 112), (3, 100), (41, 31), (5, 2 * tile.width + 3)]:
        covered = []
        for groups in conv.pixel_groups(oh, ow, tile):
            if groups is None:
                continue
            for g in range(groups.count):
                for (first, width), pieces in zip(groups.panels, groups.pieces):
                    assert width <= tile.width and sum(p[2] for p in pieces) == width
                    for dy, ox, count, column in pieces:
                        row = groups.first_row + g * groups.rows + dy
                        covered += [row * ow + ox + i for i in range(count)]
                        assert row * ow + ox == (groups.first_row + g * groups.rows) * ow + first + column
        assert covered == list(range(oh * ow))


@settings(max_examples=20, deadline=None)
@given(kernel=st.sampled_from([1, 2, 3, 4, 5]), stride=st.integers(1, 3), dilation=st.integers(1, 2),
       pad=st.integers(0, 2), output_padding=st.integers(0, 2), group=st.sampled_from([1, 2, 4]),
       m_per_group=st.sampled_from([1, 3]), size=st.integers(1, 9), bias=st.booleans(), target=TARGETS)
def test_conv_transpose2d(kernel, stride, dilation, pad, output_padding, group, m_per_group, size, bias, target):
    output_padding = min(output_padding, max(stride, dilation) - 1)
    pad = min(pad, (dilation * (kernel - 1) + stride * (size - 1)) // 2)  # at least one output pixel
    x = f32(1, 4, size, size + 1)
    graph = Graph("transpose")
    y = graph.add("conv_transpose2d", graph.add_input("x", TensorType(x.shape, DType.f32)),
                  graph.add_constant(f32(4, m_per_group, kernel, kernel)),
                  graph.add_constant(f32(m_per_group * group)) if bias else None,
                  strides=(stride, stride), pads=(pad, 0, pad, pad), dilations=(dilation, dilation),
                  output_padding=(output_padding, 0), group=group)
    graph.set_outputs([("y", y)])
    check(graph, {"x": x}, target)


def test_run_time_weights():
    """Weights that are graph inputs (ONNX node tests): packed at run time along a compile-time table."""
    x, w, wt, wd = f32(2, 4, 9, 11), f32(6, 2, 3, 3), f32(4, 3, 3, 2), f32(4, 1, 3, 3)
    graph = Graph("runtime")
    x_value, w_value, wt_value, wd_value = (graph.add_input(name, TensorType(a.shape, DType.f32))
                                            for name, a in (("x", x), ("w", w), ("wt", wt), ("wd", wd)))
    graph.set_outputs([("y", graph.add("conv2d", x_value, w_value, pads=(1, 1, 1, 1), group=2)),
                       ("t", graph.add("conv_transpose2d", x_value, wt_value, strides=(2, 1), group=2)),
                       ("d", graph.add("conv2d", x_value, wd_value, group=4, activation="relu"))])
    check(graph, {"x": x, "w": w, "wt": wt, "wd": wd})


def test_resnet18():
    """ResNet-18 at 64×64, optimised (batch norm folded, epilogues fused) and compiled whole."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "e2e"))
    from model_builders import resnet18

    graph = lowbit.optimize(lowbit.import_onnx(resnet18(image=64)))
    assert {node.op for node in graph.nodes} >= {"conv2d", "linear"}
    x = f32(1, 3, 64, 64)
    check(graph, {"input": x})


IMPLICIT_CASES = [((1, 16, 30, 30), (20, 16, 3, 3), (1, 1, 1, 1), 1, 1),
                  ((2, 6, 17, 40), (10, 3, 3, 5), (1, 2, 0, 2), 1, 2),
                  ((1, 4, 12, 100), (30, 4, 5, 5), (4, 4, 4, 4), 2, 1),
                  ((1, 3, 12, 50), (5, 3, 1, 3), (0, 0, 0, 0), 1, 1)]


@pytest.mark.parametrize("target", ["host"] + (["x86_64-avx2"] if HOST.arch == "x86_64" and HOST.has("avx2", "fma")
                                               else []))
@pytest.mark.parametrize("x_shape, w_shape, pads, dilation, group", IMPLICIT_CASES)
def test_implicit_gemm(x_shape, w_shape, pads, dilation, group, target):
    """Stride-1 convolutions whose GEMM reads the plane in place: the input itself through load masks
    (AVX-512), or a padded copy on virtual columns (two-row stores)."""
    spec_target = Target.parse(target)
    tile = gemm_f32.choose_tile(spec_target, w_shape[0] // group, 1 << 16)
    spec = conv.conv2d_spec(x_shape, w_shape, (1, 1), pads, (dilation,) * 2, group, tile, gemm_f32.Epilogue(),
                            "avx512f" in spec_target.features)
    assert spec.route in ("in_place", "implicit")
    x = f32(*x_shape)
    graph = Graph("implicit")
    x_value = graph.add_input("x", TensorType(x.shape, DType.f32))
    w, b = graph.add_constant(f32(*w_shape)), graph.add_constant(f32(w_shape[0]))
    attrs = dict(pads=pads, dilations=(dilation,) * 2, group=group)
    r = f32(*graph.add("conv2d", x_value, w, **attrs).type.shape)
    y = graph.add("conv2d", x_value, w, b, graph.add_input("r", TensorType(r.shape, DType.f32)),
                  activation="relu", **attrs)
    graph.set_outputs([("y", y)])
    graph.eliminate_dead_code()
    check(graph, {"x": x, "r": r}, target)


@pytest.mark.parametrize("x_shape, w_shape, stride, group, bias", [
    ((1, 24, 7, 7), (32, 24, 3, 3), 1, 1, True),
    ((2, 16, 4, 4), (40, 16, 3, 3), 2, 1, False),
    ((1, 32, 3, 3), (64, 16, 3, 3), 1, 2, True),
    ((1, 16, 5, 5), (32, 16, 1, 1), 1, 1, True),
])
def test_transposed_gemm(x_shape, w_shape, stride, group, bias):
    """Small outputs: the GEMM runs with pixels as rows and channels in the vectors, stored transposed
    (bias per column, residual and output scattered); constant and run-time weights."""
    tile = gemm_f32.choose_tile(Target.host(), w_shape[0] // group, 1 << 16)
    assert conv.conv2d_spec(x_shape, w_shape, (stride,) * 2, (1, 1, 1, 1), (1, 1), group, tile,
                            gemm_f32.Epilogue()).route == "transposed"
    x, w = f32(*x_shape), f32(*w_shape)
    graph = Graph("transposed")
    x_value, w_value = (graph.add_input(n, TensorType(a.shape, DType.f32)) for n, a in (("x", x), ("w", w)))
    attrs = dict(strides=(stride,) * 2, pads=(1, 1, 1, 1), group=group)
    r = f32(*graph.add("conv2d", x_value, w_value, **attrs).type.shape)
    r_value = graph.add_input("r", TensorType(r.shape, DType.f32))
    b = graph.add_constant(f32(w_shape[0])) if bias else None
    graph.set_outputs([("y", graph.add("conv2d", x_value, graph.add_constant(w), b, r_value, activation="relu",
                                       **attrs)),
                       ("z", graph.add("conv2d", x_value, w_value, b, **attrs))])
    graph.eliminate_dead_code()
    check(graph, {"x": x, "w": w, "r": r})


@pytest.mark.parametrize("name", ["x86_64-avx2", "aarch64"])
def test_conv_generates_for_other_targets(name):
    """Every convolution route (im2col panels, implicit, transposed, depthwise) is target-generic:
    AArch64 compiles (not run here) to NEON FMAs."""
    target = Target.named(name)
    module = new_module("conv", target)
    routes = set()
    for i, (x_shape, w_shape, stride, group) in enumerate([((1, 4, 9, 11), (8, 4, 3, 3), 2, 1),
                                                           ((1, 4, 20, 40), (8, 4, 3, 3), 1, 1),
                                                           ((1, 16, 3, 3), (32, 16, 3, 3), 1, 1),
                                                           ((1, 4, 9, 11), (4, 1, 3, 3), 1, 4)]):
        tile = gemm_f32.choose_tile(target, w_shape[0] // group, 1 << 16)
        spec = conv.conv2d_spec(x_shape, w_shape, (stride, stride), (1, 1, 1, 1), (1, 1), group, tile,
                                gemm_f32.Epilogue(bias="row", residual=True, activation="relu"))
        routes.add(spec.route)
        conv.emit_conv(module, spec, f"conv{i}").linkage = "external"
    assembly = emit_assembly(module, target)
    assert ("fmla\tv" if target.arch == "aarch64" else "vfmadd231ps\t%ymm") in assembly
    assert routes >= {"depthwise", "implicit", "im2col"}


