"""The AMX route of the integer products inside models: qconv2d (direct and im2col), qlinear, and whole
quantized networks, bit-exact against the reference where this machine has AMX (and for every thread
count); the route is checked in the generated IR."""
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
from lowbit.kernels import gemm_amx
from lowbit.kernels.qconv_amx import AmxConv
from lowbit.kernels.qconv_small import MAX_REDUCTION
from lowbit.kernels.llvm import check_runs_here
from lowbit.kernels.qconv import ConvShape

sys.path.insert(0, str(Path(__file__).parent))  # test_quantized: the product graphs and digits models
sys.path.insert(0, str(Path(__file__).resolve().parents[1].parent / "e2e"))  # the e2e model builders
from model_builders import resnet18  # noqa: E402
from test_quantized import DATA, _quantized, activation_type, conv_graph, product_graph  # noqa: E402

AMX = "x86_64-amx"


@pytest.fixture(scope="module")
def amx() -> Target:
    target = Target.parse(AMX)
    try:
        check_runs_here(target)  # also asks the OS for tile state
    except TargetError as error:
        pytest.skip(f"this machine cannot run AMX code: {error}")
    return target


def uses_amx(graph, target: Target) -> bool:
    return "llvm.x86.tdpb" in str(Program(graph, target).module)


def check_threads(graph, feeds: dict, target: Target, threads: tuple[int, ...] = (1, 2)) -> None:
    """Every thread count's results bit-identical to the reference."""
    want = lowbit.run_reference(graph, feeds)
    for count in threads:
        got = lowbit.compile(graph, target=target, num_threads=count).run(feeds)
        for name, value in want.items():
            np.testing.assert_array_equal(got[name], value, err_msg=f"{name}, {count} threads")


def _shape(case: dict) -> ConvShape:
    (h, w), (kh, kw) = case["size"], case["kernel"]
    return ConvShape(case["batch"], case["channels"], h, w, case["m"], case["group"], (kh, kw), case["strides"],
                     case["pads"], case["dilations"], case["dtype"], 0)


@st.composite
def conv_cases(draw) -> dict:
    """Convolutions big enough for tiles: ≥ 16 output channels per group and ≥ 16 pixels; input channel
    counts around and at 64 (the direct form), multiples of 4 (gathered), small ones and groups (im2col)."""
    group = draw(st.sampled_from([1, 1, 1, 2]))
    per_group = draw(st.one_of(st.sampled_from([12, 32, 52, 61, 64, 128]), st.integers(1, 20)))
    m = group * draw(st.sampled_from([16, 17, 31, 32, 33, 48, 64]))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    size = (draw(st.integers(4, 20)), draw(st.sampled_from([13, 14, 16, 17, 28, 31, 33])))
    return dict(batch=draw(st.integers(1, 2)), channels=group * per_group, size=size, m=m, group=group,
                kernel=kernel, strides=(draw(st.integers(1, 2)), draw(st.sampled_from([1, 1, 2]))),
                pads=tuple(draw(st.integers(0, 2)) for _ in range(4)),
                dilations=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
                dtype=draw(st.sampled_from([DType.u8, DType.i8])), weights=draw(st.sampled_from(
                    ["channel", "tensor", "asymmetric", "7bit"])), bias=draw(st.booleans()),
                residual=draw(st.booleans()), out=draw(st.sampled_from([DType.i8, DType.u8, DType.i16])),
                clamp=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=25, deadline=None)
@given(conv_cases())
def test_qconv2d_on_tiles(amx: Target, case: dict) -> None:
    graph, feeds, _, out = conv_graph(case)
    kernel = case["kernel"]
    reduction = case["channels"] // case["group"] * kernel[0] * kernel[1]  # (tiny ones take qconv_small)
    if out[0] * out[1] >= gemm_amx.MIN_SIDE and case["weights"] != "asymmetric" and reduction > MAX_REDUCTION:
        assert uses_amx(graph, amx)  # (asymmetric weights may not centre into int8)
    check_threads(graph, feeds, amx)


@pytest.mark.parametrize("width", [7, 14, 16, 17, 33])
@pytest.mark.parametrize("channels", [32, 64])
def test_direct_rows_around_a_tile(amx: Target, width: int, channels: int) -> None:
    """Output rows shorter than, exactly, and just over one 16-pixel tile (two rows per block when narrow),
    a padded right edge; both forms."""
    rng = np.random.default_rng(width)
    x_type = activation_type(rng, (1, channels, 5, width), DType.u8, False)
    graph, feeds = product_graph("qconv2d", rng, x_type, (48, channels, 3, 3), "channel", True, None, DType.i8, True,
                                 strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1), group=1)
    assert uses_amx(graph, amx)
    check_threads(graph, feeds, amx, (1, 3))


def test_all_convolution_forms_are_exercised() -> None:
    """The direct form needs stride 1 along x, one group, ~64 channels and rows of mostly whole tiles."""
    base = dict(batch=1, size=(8, 28), kernel=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1),
                dtype=DType.u8, m=32, group=1)
    assert AmxConv(_shape({**base, "channels": 64})).direct
    assert AmxConv(_shape({**base, "channels": 61})).direct
    assert not AmxConv(_shape({**base, "channels": 32})).direct  # half of each K step would be padding
    assert not AmxConv(_shape({**base, "channels": 64, "strides": (1, 2)})).direct
    assert not AmxConv(_shape({**base, "channels": 64, "size": (8, 7)})).direct  # 7 of 16 pixels per tile
    # off the direct form, channel quads gathered into panels where that needs no more K steps than im2col
    assert AmxConv(_shape({**base, "channels": 32})).gathered
    assert AmxConv(_shape({**base, "channels": 64, "strides": (1, 2)})).gathered
    assert AmxConv(_shape({**base, "channels": 64, "size": (8, 7)})).gathered
    assert not AmxConv(_shape({**base, "channels": 64})).gathered  # direct
    assert not AmxConv(_shape({**base, "channels": 3, "kernel": (7, 7)})).gathered  # 196 K bytes, not 147
    assert not AmxConv(_shape({**base, "channels": 30})).gathered  # 30 is no whole number of quads
    # else kx quads of byte windows where strides are narrow and that needs no more K steps than im2col
    stem = {**base, "channels": 3, "kernel": (7, 7), "strides": (2, 2)}
    assert AmxConv(_shape(stem)).windowed  # 3·7·8 = 168 K bytes: 3 steps, as 147
    assert not AmxConv(_shape({**stem, "strides": (2, 5)})).windowed  # 16 windows 5 apart pass 64 bytes
    assert not AmxConv(_shape({**base, "channels": 30})).windowed  # 30·3·4 = 360 K bytes: 6 steps, not 5


@pytest.mark.parametrize("channels,kernel,strides,dilations,width", [
    (3, (7, 7), (2, 2), (1, 1), 45),  # a stem
    (5, (3, 5), (1, 3), (1, 1), 40),
    (5, (3, 3), (2, 1), (2, 2), 33),
])
def test_windowed_panels(amx: Target, channels: int, kernel: tuple, strides: tuple, dilations: tuple,
                         width: int) -> None:
    rng = np.random.default_rng(width)
    x_type = activation_type(rng, (1, channels, 23, width), DType.i8, False)
    graph, feeds = product_graph("qconv2d", rng, x_type, (40, channels) + kernel, "channel", True, None, DType.u8,
                                 True, strides=strides, pads=(3, 2, 1, 3), dilations=dilations, group=1)
    node = graph.nodes[0]
    shape = ConvShape(1, channels, 23, width, 40, 1, kernel, strides, (3, 2, 1, 3), dilations, DType.i8, 0)
    assert AmxConv(shape).windowed and uses_amx(graph, amx), node
    check_threads(graph, feeds, amx, (1, 3))


@st.composite
def linear_cases(draw) -> dict:
    return dict(rows=draw(st.sampled_from([16, 17, 31, 40, 64, 97])), k=draw(st.sampled_from([1, 7, 64, 100, 1031])),
                n=draw(st.sampled_from([16, 17, 33, 64, 70])), dtype=draw(st.sampled_from([DType.u8, DType.i8])),
                weights=draw(st.sampled_from(["channel", "tensor", "asymmetric", "7bit"])), bias=draw(st.booleans()),
                residual=draw(st.booleans()), out=draw(st.sampled_from([DType.i8, DType.u8, DType.i32])),
                clamp=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=15, deadline=None)
@given(linear_cases())
def test_qlinear_on_tiles(amx: Target, case: dict) -> None:
    rng = np.random.default_rng(case["seed"])
    x_type = activation_type(rng, (case["rows"], case["k"]), case["dtype"], False)
    graph, feeds = product_graph("qlinear", rng, x_type, (case["n"], case["k"]), case["weights"], case["bias"],
                                 (case["rows"], case["n"]) if case["residual"] else None, case["out"], case["clamp"])
    if case["weights"] != "asymmetric":  # (centred asymmetric weights may leave int8)
        assert uses_amx(graph, amx)
    check_threads(graph, feeds, amx)


def test_digits_models_on_tiles(amx: Target) -> None:
    with np.load(DATA / "digits_calib.npz") as calib, np.load(DATA / "digits_test.npz") as test:
        calibration, images = calib["x"].astype(np.float32), test["x"][:64].astype(np.float32)
    for path, shape in (("digits_cnn.onnx", (-1, 1, 28, 28)), ("mlp.onnx", (-1, 784))):
        graph = _quantized(path, 64, calibration[:64].reshape(shape))
        assert uses_amx(graph, amx), path
        check_threads(graph, {graph.inputs[0].name: images.reshape(shape)}, amx)


def test_resnet_style_network_on_tiles(amx: Target) -> None:
    """A narrow ResNet-18 (residual blocks, strided and 1x1 shortcut convolutions, 64-channel stages that take
    the direct form) quantized to int8."""
    graph = lowbit.import_onnx(resnet18(image=64, width=64, classes=10), batch_size=1)
    images = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    quantized = lowbit.quantize(graph, {graph.inputs[0].name: images[:1]}, progress=False)
    program = Program(quantized, amx)
    assert "llvm.x86.tdpb" in str(program.module)
    check_threads(quantized, {graph.inputs[0].name: images[1:]}, amx)
