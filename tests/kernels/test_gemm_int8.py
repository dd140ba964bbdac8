"""The generated int8 GEMM: bit-exact against numpy int64 on every route this machine runs, and the
right instructions in the assembly of the routes it cannot run."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_cases import reference_gemm, runnable_target
from lowbit.backends.native import Target
from lowbit.errors import ShapeError, TargetError
from lowbit.kernels.gemm_int8 import Int8Gemm, choose_route, remainder_blocks
from lowbit.kernels.packing import row_sums, zero_point_offset

# (target, route) pairs; those this machine cannot run are skipped
RUN_CASES = [
    ("host", "avx512-vnni"), ("host", "avx-vnni"), ("host", "avx2-maddubs"), ("host", "avx2-madd16"),
    ("host", "neon-dotprod"), ("host", "widen"),
    ("x86_64-avx2", "avx2-maddubs"), ("x86_64-avx2", "avx2-madd16"), ("x86_64-avxvnni", "avx-vnni"),
    ("x86_64-avx512vnni", "avx512-vnni"),
]
SIZES = st.one_of(st.integers(1, 70), st.sampled_from([1, 2, 3, 5, 7, 13, 17, 31, 37, 61, 67]))
LARGE_K = st.sampled_from([1000, 1031, 2053])
INT_RANGES = {np.uint8: (0, 255), np.int8: (-128, 127)}


def values(rng: np.random.Generator, shape: tuple[int, ...], low: int, high: int, dtype,
           extreme: bool) -> np.ndarray:
    """Random values in [low, high]; `extreme` draws only the two ends (where saturation would show)."""
    if extreme:
        return rng.choice(np.array([low, high], dtype=dtype), size=shape)
    return rng.integers(low, high + 1, size=shape, dtype=dtype)


@st.composite
def problems(draw, saturating: bool) -> dict:
    """A GEMM problem; for a `saturating` route the data satisfy its exactness condition."""
    m, n = draw(SIZES), draw(SIZES)
    k = draw(st.one_of(SIZES, SIZES, LARGE_K))
    a_dtype = draw(st.sampled_from([np.uint8, np.int8]))
    guarantee = draw(st.booleans())
    seven_bit_weights = draw(st.booleans()) or (saturating and not guarantee)
    extreme = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a_low, a_high = (0, 127) if guarantee else INT_RANGES[a_dtype]
    w_low, w_high = (-64, 63) if seven_bit_weights else (-128, 127)
    offset = rng.integers(-2**20, 2**20, size=n) if draw(st.booleans()) else None
    return dict(a=values(rng, (m, k), a_low, a_high, a_dtype, extreme),
                w=values(rng, (k, n), w_low, w_high, np.int8, extreme),
                a_dtype=a_dtype, guarantee=guarantee, offset=offset)


@pytest.mark.parametrize("target_name,route", RUN_CASES)
def test_bit_exact(target_name: str, route: str) -> None:
    target = runnable_target(target_name, route)

    @settings(max_examples=8, deadline=None)
    @given(problems(saturating=route == "avx2-maddubs"))
    def check(problem: dict) -> None:
        gemm = Int8Gemm(problem["w"], problem["a_dtype"], target, guarantee_7bit=problem["guarantee"],
                        offset=problem["offset"], route=route)
        assert gemm.route == route
        result = gemm.run(problem["a"])
        assert result.dtype == np.int32
        np.testing.assert_array_equal(result, reference_gemm(problem["a"], problem["w"], problem["offset"]))

    check()


@settings(max_examples=10, deadline=None)
@given(mr=st.integers(1, 8), nv=st.integers(1, 4), m=SIZES, n=st.integers(1, 150), k=SIZES,
       a_dtype=st.sampled_from([np.uint8, np.int8]), seed=st.integers(0, 2**32 - 1))
def test_any_tile_shape_is_exact(mr: int, nv: int, m: int, n: int, k: int, a_dtype, seed: int) -> None:
    """Every register tile (remainder row blocks, edge panels) on the host's default route."""
    rng = np.random.default_rng(seed)
    a = rng.integers(*INT_RANGES[a_dtype], size=(m, k), endpoint=True, dtype=a_dtype)
    w = rng.integers(-128, 127, size=(k, n), endpoint=True, dtype=np.int8)
    gemm = Int8Gemm(w, a_dtype, Target.host(), tile=(mr, nv))
    np.testing.assert_array_equal(gemm.run(a), reference_gemm(a, w))


def test_threads_strided_rows_and_out() -> None:
    rng = np.random.default_rng(1)
    w = rng.integers(-128, 128, size=(67, 45), dtype=np.int8)
    wide = rng.integers(-128, 128, size=(37, 100), dtype=np.int8)
    a = wide[:, 5:72]  # rows with gaps between them
    for a_dtype, data in ((np.int8, a), (np.uint8, a.view(np.uint8))):
        gemm = Int8Gemm(w, a_dtype, Target.host())
        expected = reference_gemm(data, w)
        for threads in (1, 2, 3, 64):
            np.testing.assert_array_equal(gemm.run(data, num_threads=threads), expected)
        out = np.empty((37, 45), np.int32)
        assert gemm.run(data, out=out) is out
        np.testing.assert_array_equal(out, expected)
        assert gemm.run(data[:0]).shape == (0, 45)
        np.testing.assert_array_equal(gemm.run(data[::-1]), expected[::-1])


def test_zero_points_fold_into_the_offset() -> None:
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, size=(9, 31), dtype=np.uint8)
    w = rng.integers(-128, 128, size=(31, 12), dtype=np.int8)
    za, zb, bias = 131, rng.integers(-5, 5, size=12), rng.integers(-1000, 1000, size=12)
    gemm = Int8Gemm(w, np.uint8, Target.host(), offset=zero_point_offset(w, za, zb, bias))
    result = gemm.run(a) - zb * row_sums(a)[:, None]
    expected = (a.astype(np.int64) - za) @ (w.astype(np.int64) - zb) + bias
    np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize("target_name,data,expected", [
    ("x86_64-avx2", "full", "avx2-madd16"),
    ("x86_64-avx2", "7bit", "avx2-maddubs"),
    ("x86_64-avx2", "guarantee", "avx2-maddubs"),
    ("x86_64-avxvnni", "full", "avx-vnni"),
    ("x86_64-avx512vnni", "full", "avx512-vnni"),
    ("aarch64", "full", "widen"),
    ("aarch64-dotprod", "full", "neon-dotprod"),
])
def test_route_choice(target_name: str, data: str, expected: str) -> None:
    w = np.array([[-128, 127], [-128, 127]], np.int8) if data != "7bit" else np.array([[-64, 63]], np.int8)
    assert choose_route(Target.parse(target_name), w, guarantee_7bit=data == "guarantee").name == expected


def test_maddubs_pair_check_is_exact_at_the_border() -> None:
    """255·(a + b) must stay ≤ 32767 for every pair of consecutive weights of one sign."""
    target = Target.parse("x86_64-avx2")
    fits = np.array([[64], [64]], np.int8)  # 255·128 = 32640
    over = np.array([[65], [64]], np.int8)  # 255·129 = 32895
    split = np.array([[0], [65], [64], [0]], np.int8)  # different pairs: fine
    assert choose_route(target, fits, False).name == "avx2-maddubs"
    assert choose_route(target, over, False).name == "avx2-madd16"
    assert choose_route(target, split, False).name == "avx2-maddubs"
    with pytest.raises(TargetError, match="saturate"):
        Int8Gemm(over, np.uint8, target, route="avx2-maddubs")


@pytest.mark.parametrize("target_name", ["host", "x86_64-avx2"])
def test_automatic_route_is_exact_where_vpmaddubsw_would_saturate(target_name: str) -> None:
    target = runnable_target(target_name, "widen")
    rng = np.random.default_rng(4)
    w = rng.choice(np.array([-128, 127], np.int8), size=(64, 24))
    for a_dtype, extreme in ((np.uint8, 255), (np.int8, -128), (np.int8, 127)):
        a = np.full((5, 64), extreme, a_dtype)
        np.testing.assert_array_equal(Int8Gemm(w, a_dtype, target).run(a), reference_gemm(a, w))


@pytest.mark.parametrize("target_name,route,present,absent", [
    ("x86_64-avx512vnni", "avx512-vnni", [r"vpdpbusd\s.*zmm"], []),
    ("x86_64-avxvnni", "avx-vnni", [r"\{vex\}\s*vpdpbusd\s.*ymm"], ["zmm"]),
    ("x86_64-avx2", "avx2-maddubs", [r"vpmaddubsw\s.*ymm", r"vpmaddwd"], ["zmm", "vpdpbusd"]),
    ("x86_64-avx2", "avx2-madd16", [r"vpmaddwd\s.*ymm"], ["vpmaddubsw", "zmm"]),
    ("aarch64-dotprod", "neon-dotprod", [r"\ssdot\s"], []),
    ("aarch64", "widen", [r"\ssmlal2?\s"], ["sdot"]),
])
@pytest.mark.parametrize("a_dtype", [np.uint8, np.int8])
def test_assembly_uses_the_route(target_name: str, route: str, present: list[str], absent: list[str],
                                 a_dtype) -> None:
    import re

    w = np.random.default_rng(3).integers(-64, 64, size=(37, 45), dtype=np.int8)
    gemm = Int8Gemm(w, a_dtype, Target.parse(target_name), route=route)
    assembly = gemm.assembly()
    for pattern in present:
        assert re.search(pattern, assembly), pattern
    for pattern in absent:
        assert not re.search(pattern, assembly), pattern
    assert gemm.object_code()[:4] == b"\x7fELF"


def test_foreign_target_compiles_but_does_not_run() -> None:
    w = np.ones((4, 4), np.int8)
    foreign = "aarch64-dotprod" if Target.host().arch == "x86_64" else "x86_64-avx2"
    gemm = Int8Gemm(w, np.int8, Target.parse(foreign))
    with pytest.raises(TargetError, match="cannot run on this machine"):
        gemm.run(np.ones((1, 4), np.int8))


def test_bad_inputs_raise_lowbit_errors() -> None:
    host = Target.host()
    w = np.ones((5, 3), np.int8)
    for weights in (np.ones((5, 3), np.int16), np.ones(5, np.int8), np.ones((0, 3), np.int8), [[1]]):
        with pytest.raises(ShapeError, match="weights"):
            Int8Gemm(weights, np.uint8, host)
    for a_dtype in (np.float32, np.int16, "i4"):
        with pytest.raises(ShapeError, match="u8 or i8"):
            Int8Gemm(w, a_dtype, host)
    with pytest.raises(ShapeError, match="offset"):
        Int8Gemm(w, np.uint8, host, offset=np.zeros(4, np.int32))
    with pytest.raises(TargetError, match="unknown int8 GEMM route 'fast'"):
        Int8Gemm(w, np.uint8, host, route="fast")
    with pytest.raises(TargetError, match="needs features"):
        Int8Gemm(w, np.uint8, Target.parse("aarch64"), route="neon-dotprod")
    with pytest.raises(ShapeError, match="exceed int32"):
        Int8Gemm(np.full((70000, 1), 127, np.int8), np.uint8, host)
    gemm = Int8Gemm(w, np.uint8, host)
    for a in (np.ones((2, 5), np.int8), np.ones((2, 4), np.uint8), np.ones(5, np.uint8),
              np.ones((2, 5), np.float64), [[1] * 5]):
        with pytest.raises(ShapeError, match="activations"):
            gemm.run(a)
    with pytest.raises(ShapeError, match="out must be"):
        gemm.run(np.ones((2, 5), np.uint8), out=np.empty((2, 3), np.int64))


def test_remainder_blocks_cover_every_remainder() -> None:
    for mr in range(1, 17):
        blocks = remainder_blocks(mr)
        for rest in range(mr):
            assert sum(b for b in blocks if rest & b) == rest
