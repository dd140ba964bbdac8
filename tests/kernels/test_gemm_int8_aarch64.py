"""The AArch64 routes run under qemu-aarch64: objects from `Int8Gemm.object_code()` linked with a C driver
by aarch64-linux-gnu-gcc. Skipped unless both tools are installed (apt-get install qemu-user
gcc-aarch64-linux-gnu)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kernel_cases import reference_gemm
from lowbit.backends.native import Target
from lowbit.kernels.gemm_int8 import Int8Gemm

QEMU, GCC = shutil.which("qemu-aarch64"), shutil.which("aarch64-linux-gnu-gcc")
pytestmark = pytest.mark.skipif(not (QEMU and GCC), reason="needs qemu-aarch64 and aarch64-linux-gnu-gcc")

# (target, a dtype, M, N, K, with offset)
CASES = [
    ("aarch64-dotprod", np.uint8, 37, 45, 67, True),
    ("aarch64-dotprod", np.int8, 9, 13, 64, False),
    ("aarch64-dotprod", np.int8, 1, 70, 1031, True),
    ("aarch64", np.uint8, 37, 45, 67, True),
    ("aarch64", np.int8, 16, 12, 5, False),
]

DRIVER = """
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
typedef void (*gemm_fn)(const uint8_t *, int64_t, int64_t, uint8_t *, const uint8_t *, const int32_t *,
                        int32_t *, int64_t);
%(cases)s
int main(int argc, char **argv) {
    int only = argc > 1 ? atoi(argv[1]) : -1, failed = 0;
%(calls)s
    return failed;
}
"""
CASE = """
void gemm%(i)d(const uint8_t *, int64_t, int64_t, uint8_t *, const uint8_t *, const int32_t *, int32_t *, int64_t);
static const uint8_t a%(i)d[] = {%(a)s};
static const uint8_t b%(i)d[] __attribute__((aligned(64))) = {%(b)s};
static const int32_t offset%(i)d[] __attribute__((aligned(64))) = {%(offset)s};
static const int32_t expected%(i)d[] = {%(expected)s};
static uint8_t scratch%(i)d[%(scratch)d] __attribute__((aligned(64)));
static int32_t c%(i)d[%(mn)d];
"""
CALL = """
    if (only < 0 || only == %(i)d) {
        gemm%(i)d(a%(i)d, %(k)d, %(m)d, scratch%(i)d, b%(i)d, %(offset_arg)s, c%(i)d, %(n)d);
        int wrong = 0;
        for (int j = 0; j < %(mn)d; j++) wrong += c%(i)d[j] != expected%(i)d[j];
        printf("case %(i)d: %%d wrong\\n", wrong);
        failed |= wrong != 0;
    }
"""


def _c_list(values: np.ndarray) -> str:
    return ",".join(str(int(v)) for v in values.ravel()) or "0"


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> tuple[Path, list]:
    """One static AArch64 executable holding every case; argv[1] picks one."""
    folder = tmp_path_factory.mktemp("aarch64")
    rng = np.random.default_rng(5)
    cases, calls, objects, kernels = [], [], [], []
    for i, (target_name, a_dtype, m, n, k, with_offset) in enumerate(CASES):
        info = np.iinfo(a_dtype)
        a = rng.integers(info.min, info.max, size=(m, k), endpoint=True, dtype=a_dtype)
        w = rng.integers(-128, 127, size=(k, n), endpoint=True, dtype=np.int8)
        offset = rng.integers(-2**20, 2**20, size=n) if with_offset else None
        gemm = Int8Gemm(w, a_dtype, Target.parse(target_name), offset=offset, name=f"gemm{i}")
        kernels.append(gemm)
        (folder / f"gemm{i}.o").write_bytes(gemm.object_code())
        objects.append(str(folder / f"gemm{i}.o"))
        plan = gemm.plan
        fields = dict(i=i, m=m, n=n, k=k, mn=m * n, a=_c_list(a.view(np.uint8)),
                      b=_c_list(plan.weights.data), expected=_c_list(reference_gemm(a, w, offset)),
                      offset=_c_list(plan.offset if plan.offset is not None else np.zeros(1)),
                      offset_arg=f"offset{i}" if plan.offset is not None else "0",
                      scratch=max(1, m * plan.packed_row_bytes))
        cases.append(CASE % fields)
        calls.append(CALL % fields)
    source = folder / "driver.c"
    source.write_text(DRIVER % dict(cases="".join(cases), calls="".join(calls)))
    executable = folder / "gemm_test"
    subprocess.run([GCC, "-O1", "-static", "-o", str(executable), str(source), *objects], check=True)
    return executable, kernels


def test_routes_are_exact_under_qemu(program) -> None:
    executable, kernels = program
    assert [gemm.route for gemm in kernels] == ["neon-dotprod"] * 3 + ["widen"] * 2
    result = subprocess.run([QEMU, str(executable)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": 0 wrong") == len(CASES)


def test_sdot_really_runs(program) -> None:
    """A core without dotprod (cortex-a53) dies on the first sdot: the route uses the instruction."""
    executable, _ = program
    plain = subprocess.run([QEMU, "-cpu", "cortex-a53", str(executable), "3"], capture_output=True,
                           timeout=60)
    assert plain.returncode == 0
    dotprod = subprocess.run([QEMU, "-cpu", "cortex-a53", str(executable), "0"], capture_output=True,
                             timeout=60)
    assert dotprod.returncode != 0
