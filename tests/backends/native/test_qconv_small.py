"""The small-reduction route of qconv2d (`kernels.qconv_small`: Cin/group·kh·kw ≤ 32 on `vpdpbusd`, quads of
taps per pixel lane) bit-exact against the reference for every thread count, on the 512-bit and 256-bit VNNI
targets; the route is checked in the generated IR."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.backends.native import Target
from lowbit.backends.native.compiler import Program
from lowbit.errors import TargetError
from lowbit.ir import DType
from lowbit.kernels import qconv_small
from lowbit.kernels.llvm import check_runs_here
from lowbit.kernels.qconv import ConvShape

sys.path.insert(0, str(Path(__file__).parent))
from test_quantized import activation_type, conv_graph, product_graph  # noqa: E402

TARGETS = ("x86_64-amx", "x86_64-avx512vnni", "x86_64-avxvnni")


def _target(name: str) -> Target:
    target = Target.parse(name)
    try:
        check_runs_here(target)
    except TargetError as error:
        pytest.skip(f"this machine cannot run {name} code: {error}")
    return target


@st.composite
def small_cases(draw) -> dict:
    """Reductions from 1 to 32 (one or several quads, a partial last quad), groups, strides, pads,
    dilations, output rows shorter and longer than a vector and than a gathered chunk."""
    group = draw(st.sampled_from([1, 1, 1, 2, 3]))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    per_group = draw(st.integers(1, max(1, 32 // (kernel[0] * kernel[1]))))
    return dict(batch=draw(st.integers(1, 2)), channels=group * per_group, group=group, kernel=kernel,
                m=group * draw(st.sampled_from([1, 3, 8, 9, 17, 32])),
                size=(draw(st.integers(1, 12)), draw(st.sampled_from([1, 5, 13, 16, 17, 28, 37, 70]))),
                strides=(draw(st.integers(1, 2)), draw(st.integers(1, 3))),
                pads=tuple(draw(st.integers(0, 2)) for _ in range(4)),
                dilations=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
                dtype=draw(st.sampled_from([DType.u8, DType.i8])),
                weights=draw(st.sampled_from(["channel", "tensor", "7bit"])), bias=draw(st.booleans()),
                residual=draw(st.booleans()), out=draw(st.sampled_from([DType.i8, DType.u8, DType.i16])),
                clamp=draw(st.booleans()), target=draw(st.sampled_from(TARGETS)),
                seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=30, deadline=None)
@given(small_cases())
def test_small_reduction_convolutions(case: dict) -> None:
    target = _target(case["target"])
    graph, feeds, size, _ = conv_graph(case)
    kernel, dilations, pads, strides = case["kernel"], case["dilations"], case["pads"], case["strides"]
    shape = ConvShape(case["batch"], case["channels"], *size, case["m"], case["group"], kernel, strides, pads,
                      dilations, case["dtype"], 0)
    if not shape.depthwise:  # the route: vpdpbusd without packed panels (the VNNI GEMM) or tiles (AMX)
        assert qconv_small.applies(target, shape)
        code = str(Program(graph, target).module)
        assert "vpdpbusd" in code and ".pack" not in code and "tdpb" not in code
    want = lowbit.run_reference(graph, feeds)
    for threads in (1, 2, 3):
        got = lowbit.compile(graph, target=target, num_threads=threads).run(feeds)
        np.testing.assert_array_equal(got["y"], want["y"], err_msg=f"{threads} threads")


def test_route_limits() -> None:
    """Reductions up to 32 on VNNI targets only; depthwise convolutions keep their own kernel."""
    def shape(channels: int, kernel: tuple[int, int], group: int = 1, m: int = 8) -> ConvShape:
        return ConvShape(1, channels, 8, 8, m, group, kernel, (1, 1), (0, 0, 0, 0), (1, 1), DType.u8, 0)

    vnni, avx2 = Target.parse("x86_64-avx512vnni"), Target.parse("x86_64-avx2")
    assert qconv_small.applies(vnni, shape(1, (3, 3)))
    assert qconv_small.applies(vnni, shape(2, (4, 4)))  # K = 32
    assert not qconv_small.applies(vnni, shape(4, (3, 3)))  # K = 36
    assert not qconv_small.applies(vnni, shape(8, (3, 3), group=8, m=8))  # depthwise
    assert not qconv_small.applies(avx2, shape(1, (3, 3)))
    assert qconv_small.route_for(Target.parse("x86_64-avxvnni")).lanes == 8


@pytest.mark.parametrize("width,strides", [(130, (1, 1)), (131, (2, 2)), (64, (1, 3))])
def test_rows_wider_than_a_chunk(width: int, strides: tuple[int, int]) -> None:
    """Output rows gathered in several 64-pixel chunks, the last partial, strided along x."""
    target = _target("x86_64-amx")
    rng = np.random.default_rng(width)
    x_type = activation_type(rng, (1, 1, 6, width), DType.i8, False)
    graph, feeds = product_graph("qconv2d", rng, x_type, (24, 1, 5, 5), "channel", True, None, DType.u8, True,
                                 strides=strides, pads=(2, 2, 2, 2), dilations=(1, 1), group=1)
    want = lowbit.run_reference(graph, feeds)
    for threads in (1, 3):
        got = lowbit.compile(graph, target=target, num_threads=threads).run(feeds)
        np.testing.assert_array_equal(got["y"], want["y"], err_msg=f"{threads} threads")
