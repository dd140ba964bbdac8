"""Shared pieces of the kernel tests: which (target, route) pairs this machine can run, and the oracle."""
from __future__ import annotations

import numpy as np
import pytest

from lowbit.backends.native import Target
from lowbit.errors import TargetError
from lowbit.kernels.gemm_int8 import ROUTE_NAMES
from lowbit.kernels.llvm import check_runs_here


def runnable_target(target_name: str, route: str) -> Target:
    """The target, or a skip when this machine cannot run `route` compiled for it."""
    target = Target.parse(target_name)
    if not ROUTE_NAMES[route].available(target):
        pytest.skip(f"target {target_name} has no {route} route")
    try:
        check_runs_here(target)
    except TargetError as error:
        pytest.skip(str(error))
    return target


def reference_gemm(a: np.ndarray, w: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """The exact product in int64 (the kernels must match it bit for bit)."""
    product = a.astype(np.int64) @ w.astype(np.int64)
    return product if offset is None else product + offset
