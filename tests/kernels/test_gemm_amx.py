"""The AMX int8 GEMM: bit-exact against numpy int64 where this machine has AMX, `tdpb*d` in the assembly
for the AMX target everywhere."""
from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_cases import reference_gemm
from lowbit.backends.native import Target
from lowbit.errors import ShapeError, TargetError
from lowbit.kernels import gemm_amx
from lowbit.kernels.gemm_amx import AmxInt8Gemm, tile_config
from lowbit.kernels.llvm import check_runs_here

SIZES = st.one_of(st.integers(1, 70), st.sampled_from([1, 2, 3, 5, 7, 13, 17, 31, 32, 33, 37, 61, 67, 97]))
DEPTHS = st.one_of(SIZES, st.sampled_from([64, 128, 1000, 1031, 2053]))


@pytest.fixture(scope="module")
def host() -> Target:
    target = Target.host()
    if not gemm_amx.available(target):
        pytest.skip("this machine has no AMX (amx-tile, amx-int8)")
    try:
        check_runs_here(target)  # also asks the OS for tile state
    except TargetError as error:
        pytest.skip(str(error))
    return target


@st.composite
def problems(draw) -> dict:
    m, n, k = draw(SIZES), draw(SIZES), draw(DEPTHS)
    dtype = draw(st.sampled_from([np.uint8, np.int8]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    info = np.iinfo(dtype)
    if draw(st.booleans()):  # only the extremes: where a saturating or sign-confused product would show
        a = rng.choice(np.array([info.min, info.max], dtype), (m, k))
        w = rng.choice(np.array([-128, 127], np.int8), (k, n))
    else:
        a = rng.integers(info.min, info.max + 1, (m, k), dtype=dtype)
        w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    offset = rng.integers(-2**20, 2**20, n) if draw(st.booleans()) else None
    return dict(a=a, w=w, offset=offset, threads=draw(st.sampled_from([1, 1, 2, 3])))


@settings(max_examples=40, deadline=None)
@given(problems())
def test_amx_gemm_is_exact(host: Target, problem: dict) -> None:
    a, w, offset = problem["a"], problem["w"], problem["offset"]
    gemm = AmxInt8Gemm(w, a.dtype, host, offset=offset)
    np.testing.assert_array_equal(gemm.run(a, num_threads=problem["threads"]), reference_gemm(a, w, offset))


def test_rows_with_gaps_and_every_row_count(host: Target) -> None:
    """One compiled GEMM for every M (M is a run-time argument): each remainder configuration, and rows read
    through a pitch wider than K."""
    rng = np.random.default_rng(1)
    w = rng.integers(-128, 128, (192, 40), dtype=np.int8)
    gemm = AmxInt8Gemm(w, np.int8, host)
    wide = rng.integers(-128, 128, (70, 256), dtype=np.int8)
    for m in range(0, 70):
        a = wide[:m, :192]  # row pitch 256 bytes
        np.testing.assert_array_equal(gemm.run(a), reference_gemm(a, w), err_msg=f"m={m}")


def test_tile_instructions_in_the_assembly() -> None:
    """The AMX target's code configures tiles and multiplies with the instruction of the operands' signs."""
    target = Target.parse("x86_64-amx")
    w = np.ones((100, 20), np.int8)
    for dtype, instruction in ((np.uint8, "tdpbusd"), (np.int8, "tdpbssd")):
        assembly = AmxInt8Gemm(w, dtype, target).assembly()
        for pattern in (r"\sldtilecfg\s", rf"\s{instruction}\s+%tmm", r"\stileloadd\s", r"\stilestored\s",
                        r"\stilerelease"):
            assert re.search(pattern, assembly), (dtype, pattern)


def test_tile_config_layout() -> None:
    """LDTILECFG's bytes: palette 1, 64-byte rows for every used tile, rows per row tile."""
    config = tile_config((16, 5))
    assert len(config) == 64 and config[0] == 1
    colsb = np.frombuffer(config[16:32], np.uint16)
    rows = np.frombuffer(config[48:56], np.uint8)
    assert colsb.tolist() == [64] * 8
    assert rows.tolist() == [16, 16, 5, 5, 16, 5, 16, 16]  # C(0, ·), C(1, ·), A0, A1, B0, B1


def test_targets_without_amx_are_refused() -> None:
    with pytest.raises(TargetError, match="amx-tile"):
        AmxInt8Gemm(np.ones((4, 4), np.int8), np.uint8, Target.parse("x86_64-avx512vnni"))
    assert not gemm_amx.worth(Target.parse("x86_64-avx512vnni"), 512, 512)
    assert gemm_amx.worth(Target.parse("x86_64-amx"), 512, 512)
    assert not gemm_amx.worth(Target.parse("x86_64-amx"), 1, 1000)  # batch-1 rows: VNNI wastes nothing


def test_bad_operands() -> None:
    target = Target.parse("x86_64-amx")
    with pytest.raises(ShapeError, match="int8 array"):
        AmxInt8Gemm(np.ones((4, 4), np.int16), np.uint8, target)
    with pytest.raises(ShapeError, match="u8 or i8"):
        AmxInt8Gemm(np.ones((4, 4), np.int8), np.int16, target)
    with pytest.raises(ShapeError, match="exceed int32"):
        AmxInt8Gemm(np.full((70000, 1), -128, np.int8), np.uint8, target)
