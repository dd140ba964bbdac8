"""Throughput of the generated int8 GEMM beside numpy's fp32 matmul (OpenBLAS), in one process.

    python bench/gemm_int8.py [--rounds 30] [--threads 1 2] [--route NAME ...] [--json]

Routes are `gemm_int8`'s by name, and "amx" (`gemm_amx.AmxInt8Gemm`, AMX tiles), timed by default where the
host has AMX.

Each round times every engine once per shape, interleaved, so drift of the machine hits all of them
alike; the table gives medians over the rounds and the ratio to numpy fp32 in the same run. GOP/s counts
a multiply and an add as two operations (2·M·N·K per GEMM). Both engines write into preallocated
outputs, and numpy's OpenBLAS runs with as many threads as the kernel it is compared with. Not a test:
nothing here asserts.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import ctypes
import re

import numpy as np

from lowbit.backends.native import Target
from lowbit.kernels import gemm_amx
from lowbit.kernels.gemm_int8 import Int8Gemm, choose_route

AMX = "amx"  # the tile route's name here

SHAPES = {  # name: (M, N, K)
    "512^3": (512, 512, 512),
    "conv 784x64x288": (784, 64, 288),
    "conv 3136x64x576": (3136, 64, 576),
}


SPIN_PAUSE = 0.2  # seconds: OpenBLAS worker threads spin ~2^28 cycles after a call before sleeping


def _blas_threads() -> "ctypes._CFuncPtr | None":
    """OpenBLAS's set-threads function in this process (numpy bundles it under a prefixed name)."""
    with open("/proc/self/maps") as maps:
        libraries = set(re.findall(r"(/\S*openblas\S*\.so\S*)", maps.read()))
    for path in sorted(libraries):
        library = ctypes.CDLL(path)
        for name in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                     "openblas_set_num_threads"):
            if hasattr(library, name):
                return getattr(library, name)
    return None


def _timed(call, repeats: int) -> float:
    """Seconds per call: the best of a few back-to-back calls (one round's sample)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def engines_for(shape: tuple[int, int, int], routes: list[str], threads: list[int], target: Target,
                rng: np.random.Generator, set_blas_threads) -> dict[str, tuple[object, float | None]]:
    m, n, k = shape
    a8 = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w8 = rng.integers(-128, 128, (k, n), dtype=np.int8)
    a32, w32 = a8.astype(np.float32), w8.astype(np.float32)
    out32, out = np.empty((m, n), np.float32), np.empty((m, n), np.int32)
    engines: dict[str, tuple[object, float | None]] = {}

    def numpy_fp32(count: int) -> None:
        if set_blas_threads is not None:
            set_blas_threads(count)
        np.matmul(a32, w32, out=out32)

    for route in routes:
        weights = w8 if route != "avx2-maddubs" else (w8 >> 1)  # 7-bit weights keep that route exact
        gemm = gemm_amx.AmxInt8Gemm(w8, np.uint8, target) if route == AMX else \
            Int8Gemm(weights, np.uint8, target, route=route)
        gemm.run(a8[:1])  # compile outside the timing
        for count in threads:
            engines[f"{route} x{count}"] = (lambda g=gemm, c=count: g.run(a8, num_threads=c, out=out),
                                            gemm.compile_seconds)
    for count in threads:  # last in each round: OpenBLAS's idle threads keep spinning for a while
        engines[f"numpy fp32 x{count}"] = (lambda c=count: numpy_fp32(c), None)
    return engines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="calls per round (best is kept)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--route", nargs="+", help="routes to time (default: host's best, avx2 routes)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    target = Target.host()
    rng = np.random.default_rng(0)
    routes = args.route or list(dict.fromkeys(
        [AMX] * gemm_amx.available(target) + [choose_route(target, np.zeros((1, 1), np.int8), False).name,
                                              "avx2-maddubs", "avx2-madd16"]))
    set_blas_threads = _blas_threads()
    results = []
    for shape_name, shape in SHAPES.items():
        engines = engines_for(shape, routes, args.threads, target, rng, set_blas_threads)
        samples: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.rounds):
            for name, (call, _) in engines.items():
                samples[name].append(_timed(call, args.repeats))
            if max(args.threads) > 1:
                time.sleep(SPIN_PAUSE)
        ops = 2 * shape[0] * shape[1] * shape[2]
        for name, (_, compile_seconds) in engines.items():
            seconds = statistics.median(samples[name])
            threads = name.rsplit(" x", 1)[1]  # compared with numpy on as many threads
            base = statistics.median(samples[f"numpy fp32 x{threads}"])
            results.append({"shape": shape_name, "engine": name, "ms": seconds * 1e3,
                            "gops": ops / seconds / 1e9, "vs_numpy_fp32": base / seconds,
                            "compile_s": compile_seconds})
    if args.json:
        print(json.dumps({"target": str(target), "rounds": args.rounds, "results": results}, indent=1))
        return
    print(f"target: {target}; medians of {args.rounds} interleaved rounds; 'x numpy' is the ratio to "
          f"numpy fp32 on as many threads{'' if set_blas_threads else ' (OpenBLAS threads not found)'}")
    print(f"{'shape':<18} {'engine':<20} {'ms':>8} {'GOP/s':>8} {'x numpy':>8} {'compile s':>9}")
    for row in results:
        compile_text = f"{row['compile_s']:.3f}" if row["compile_s"] is not None else ""
        print(f"{row['shape']:<18} {row['engine']:<20} {row['ms']:8.3f} {row['gops']:8.1f} "
              f"{row['vs_numpy_fp32']:8.2f} {compile_text:>9}")


if __name__ == "__main__":
    main()
