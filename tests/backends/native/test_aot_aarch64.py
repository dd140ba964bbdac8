"""AArch64 artifacts, cross-compiled and run under qemu-aarch64: the C driver linked statically with
model.o (and once dynamically with model.so), outputs compared bit for bit with the reference
interpreter. Skipped unless qemu-aarch64 and aarch64-linux-gnu-gcc are installed
(apt-get install qemu-user gcc-aarch64-linux-gnu)."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # aot_cases
sys.path.insert(0, str(Path(__file__).parents[2] / "e2e"))  # model_builders

import lowbit
from aot_cases import (assert_matches, build_driver, digits_feeds, digits_graph, export_or_skip, run_driver,
                       sparse_mlp)
from lowbit.errors import ShapeError
from lowbit.ir import Graph

QEMU, GCC = shutil.which("qemu-aarch64"), shutil.which("aarch64-linux-gnu-gcc")
SYSROOT = "/usr/aarch64-linux-gnu"
pytestmark = pytest.mark.skipif(not (QEMU and GCC), reason="needs qemu-aarch64 and aarch64-linux-gnu-gcc")
TARGETS = ["aarch64", "aarch64-dotprod"]


def qemu(*options: str) -> list[str]:
    return [QEMU, "-L", SYSROOT, *options]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """`build(key, graph, target, emit)` → (artifact folder, driver), made once per key."""
    root = tmp_path_factory.mktemp("aarch64")
    made: dict = {}

    def make(key: str, graph: Graph, target: str, emit: str = "obj") -> tuple[Path, Path]:
        if key not in made:
            folder = export_or_skip(graph, root / key, target=target, emit=emit)
            made[key] = folder, build_driver(GCC, folder, folder / "driver", static=emit == "obj")
        return made[key]

    return make


def check_under_qemu(build, key: str, graph: Graph, target: str, feeds: dict, tmp_path: Path,
                     cpu: tuple[str, ...] = ()) -> None:
    folder, driver = build(key, graph, target)
    outputs = run_driver([*qemu(*cpu), str(driver)], graph, feeds, tmp_path, folder / "weights.bin")
    assert_matches(graph, outputs, lowbit.run_reference(graph, feeds))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name, quantized", [("cnn", True), ("mlp", True), ("cnn", False)],
                         ids=["cnn-int8", "mlp-int8", "cnn-f32"])
def test_digits_under_qemu(build, target, name, quantized, tmp_path) -> None:
    graph = digits_graph(name, quantized)
    check_under_qemu(build, f"{name}-{quantized}-{target}", graph, target, digits_feeds(name, start=4), tmp_path)


def test_neon_build_runs_on_cortex_a53_and_dotprod_build_needs_sdot(build, tmp_path) -> None:
    """A core without dotprod (cortex-a53) runs the NEON-only build and dies on the first sdot of the
    dotprod build: the int8 kernels really use the instruction."""
    graph = digits_graph("cnn", True)
    feeds = digits_feeds("cnn")
    check_under_qemu(build, "cnn-True-aarch64", graph, "aarch64", feeds, tmp_path, cpu=("-cpu", "cortex-a53"))
    folder, driver = build("cnn-True-aarch64-dotprod", graph, "aarch64-dotprod")
    (tmp_path / "in.bin").write_bytes(feeds["input"].tobytes())
    result = subprocess.run([*qemu("-cpu", "cortex-a53"), str(driver), str(folder / "weights.bin"),
                             str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGILL, result.stderr


def test_shared_library_under_qemu(build, tmp_path) -> None:
    graph = digits_graph("mlp", False)
    folder, driver = build("mlp-so", graph, "aarch64-dotprod", emit="so")
    feeds = digits_feeds("mlp")
    outputs = run_driver([*qemu(), str(driver)], graph, feeds, tmp_path, folder / "weights.bin", threads=3)
    assert_matches(graph, outputs, lowbit.run_reference(graph, feeds))


# -- present-day networks (tests/e2e/model_builders.py), int8 -----------------------------------------
@lru_cache(maxsize=None)
def _quantized_net(kind: str, image: int) -> Graph | ShapeError:
    import model_builders

    graph = lowbit.import_onnx(getattr(model_builders, kind)(image=image))
    images = np.random.default_rng(3).normal(size=(4, 3, image, image)).astype(np.float32)
    try:
        return lowbit.quantize(graph, {"input": images})
    except ShapeError as error:
        return error


def quantized_net(kind: str, image: int) -> Graph:
    graph = _quantized_net(kind, image)
    if isinstance(graph, ShapeError):  # a quantizer bug, not the artifact's: seen, and passes once fixed
        pytest.xfail(f"lowbit.quantize fails on {kind}: {graph}")
    return graph


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", ["resnet18", "mobilenet_v2"])
def test_networks_under_qemu(build, kind, target, tmp_path) -> None:
    graph = quantized_net(kind, 32)
    feeds = {"input": np.random.default_rng(4).normal(size=(1, 3, 32, 32)).astype(np.float32)}
    check_under_qemu(build, f"{kind}-{target}", graph, target, feeds, tmp_path)


# -- sparse kernels ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("quantized", [True, False], ids=["int8", "f32"])
@pytest.mark.parametrize("batch", [1, 2])
def test_sparse_kernels_under_qemu(build, target, quantized, batch, tmp_path, monkeypatch) -> None:
    """Every layer through the sparse kernels (one row: the gathering one): AArch64's int8 routes are
    `sdot` over quads (dotprod) and portable int16 pairs (NEON only)."""
    from lowbit.backends.native import sparse_selection

    monkeypatch.setattr(sparse_selection, "prefer_sparse", lambda *args: True)
    monkeypatch.setattr(sparse_selection, "prefer_gemv", lambda *args: True)
    graph = sparse_mlp(quantized, batch)
    assert any(v.type.layout is not None for v in graph.constants)
    check_under_qemu(build, f"sparse-mlp-{quantized}-{batch}-{target}", graph, target,
                     digits_feeds("mlp", batch=batch, start=8), tmp_path)
