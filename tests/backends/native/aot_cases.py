"""Shared by the AOT artifact tests: the models, exporting them, and the C driver (aot_driver.c) that
loads an artifact, runs it on inputs from a file and writes the outputs to a file."""
from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

import lowbit
from lowbit.backends.native.aot import export
from lowbit.errors import UnsupportedOpError
from lowbit.ir import Graph

DATA = Path(__file__).parents[2] / "data"
DRIVER = Path(__file__).with_name("aot_driver.c")
MODELS = {"cnn": "digits_cnn.onnx", "mlp": "mlp.onnx"}


def _images(name: str, split: str, count: int | None = None) -> np.ndarray:
    x = np.load(DATA / f"digits_{split}.npz")["x"][:count]
    return x.reshape(len(x), 784) if name == "mlp" else x


@lru_cache(maxsize=None)
def digits_graph(name: str, quantized: bool, batch: int = 2) -> Graph:
    """The digits CNN or MLP, float or int8 (calibrated on digits_calib.npz), for `batch` images."""
    graph = lowbit.import_onnx(DATA / MODELS[name], batch_size=batch)
    return lowbit.quantize(graph, {"input": _images(name, "calib")}) if quantized else graph


@lru_cache(maxsize=None)
def sparse_mlp(quantized: bool, batch: int) -> Graph:
    """The digits MLP pruned to 90% (magnitude), int8 or float, its weights given sparse layouts."""
    graph = lowbit.prune(digits_graph("mlp", False, batch), "magnitude", sparsity=0.9)
    if quantized:
        graph = lowbit.quantize(graph, {"input": _images("mlp", "calib")})
    return lowbit.optimize(graph, "sparsify")


def digits_feeds(name: str, batch: int = 2, start: int = 0) -> dict[str, np.ndarray]:
    return {"input": _images(name, "test", start + batch)[start:]}


def export_or_skip(graph: Graph, folder: Path, **options) -> Path:
    """Export, skipping the test while an op of the graph has no native lowering yet."""
    try:
        return export(graph, folder, **options)
    except UnsupportedOpError as error:
        pytest.skip(f"not lowered yet: {error}")


def is_exact(graph: Graph) -> bool:
    """Integer graphs (quantized ones included: their float outputs are exact dequantizations)."""
    return any(node.op.startswith("q") or node.op in ("quantize", "requantize") for node in graph.nodes)


def assert_matches(graph: Graph, actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(actual) == set(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.shape == want.shape and got.dtype == want.dtype, name
        if is_exact(graph) or want.dtype.kind != "f":
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            scale = max(1.0, float(np.abs(want).max(initial=0)))
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


def build_driver(cc: str, artifact: Path, executable: Path, static: bool = False) -> Path:
    """aot_driver.c linked with the artifact's model.o or model.so."""
    if (artifact / "model.o").exists():
        code = [str(artifact / "model.o"), *(["-static"] if static else [])]
    else:  # as examples/c/Makefile links it: found again at run time through the rpath
        code = [f"-L{artifact}", "-l:model.so", f"-Wl,-rpath,{artifact.resolve()}"]
    subprocess.run([cc, "-O1", "-std=c99", "-Wall", "-Werror", f"-I{artifact}", "-o", str(executable),
                    str(DRIVER), *code, "-lm", "-pthread"], check=True, capture_output=True)
    return executable


def run_driver(command: list[str], graph: Graph, feeds: dict[str, np.ndarray], folder: Path,
               weights: Path, threads: int = 1) -> dict[str, np.ndarray]:
    """Run `command` (the driver, maybe under qemu) on `feeds`; outputs by name."""
    inputs, outputs = folder / "inputs.bin", folder / "outputs.bin"
    inputs.write_bytes(b"".join(np.ascontiguousarray(feeds[v.name]).tobytes() for v in graph.inputs))
    result = subprocess.run([*command, str(weights), str(inputs), str(outputs), str(threads)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    for value in graph.inputs:
        assert f"input {graph.inputs.index(value)} {value.name} {value.type.dtype} " in result.stdout
    data, results, offset = outputs.read_bytes(), {}, 0
    for name, value in zip(graph.output_names, graph.outputs):
        dtype = value.type.dtype.numpy
        results[name] = np.frombuffer(data, dtype, value.type.size, offset).reshape(value.type.shape)
        offset += value.type.size * dtype.itemsize
    assert offset == len(data)
    return results
