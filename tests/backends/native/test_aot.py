"""Ahead-of-time artifacts on this machine: export, load from Python (cffi) and from a C program, compare
with the reference interpreter; corrupt or mismatched weights are refused with a message, never a crash."""
from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import cffi
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # aot_cases: shared with the AArch64 tests

import lowbit
from aot_cases import DATA, MODELS, assert_matches, build_driver, digits_feeds, digits_graph, run_driver, sparse_mlp
from lowbit.artifact import load
from lowbit.backends.native.aot import Toolchain, export
from lowbit.backends.native.target import Target
from lowbit.errors import ArtifactError, InputError, LowbitError, UnsupportedOpError
from lowbit.kernels.llvm import runs_here

CC = shutil.which("cc")
pytestmark = pytest.mark.skipif(CC is None, reason="needs a C compiler (cc)")

CASES = [("cnn", False), ("mlp", False), ("cnn", True), ("mlp", True)]
IDS = ["cnn-f32", "mlp-f32", "cnn-int8", "mlp-int8"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict:
    """Each case exported once (as model.so), or the reason it cannot be yet."""
    root = tmp_path_factory.mktemp("aot")
    made = {}
    for name, quantized in CASES:
        graph = digits_graph(name, quantized)
        try:
            made[name, quantized] = (graph, export(graph, root / f"{name}-{quantized}"))
        except UnsupportedOpError as error:
            made[name, quantized] = (graph, error)
    return made


def artifact(artifacts: dict, name: str, quantized: bool):
    graph, folder = artifacts[name, quantized]
    if isinstance(folder, Exception):
        pytest.skip(f"not lowered yet: {folder}")
    return graph, folder


@pytest.mark.parametrize("name, quantized", CASES, ids=IDS)
def test_python_load_matches_reference(artifacts, name, quantized) -> None:
    graph, folder = artifact(artifacts, name, quantized)
    model = load(folder)
    assert model.input_names == ["input"] and model.output_names == ["logits"]
    for start in (0, 10):
        feeds = digits_feeds(name, start=start)
        assert_matches(graph, model.run(feeds), lowbit.run_reference(graph, feeds))


@pytest.mark.parametrize("name, quantized", CASES, ids=IDS)
def test_c_driver_matches_reference(artifacts, name, quantized, tmp_path) -> None:
    graph, folder = artifact(artifacts, name, quantized)
    driver = build_driver(CC, folder, tmp_path / "driver")
    feeds = digits_feeds(name, start=20)
    outputs = run_driver([str(driver)], graph, feeds, tmp_path, folder / "weights.bin", threads=4)
    assert_matches(graph, outputs, lowbit.run_reference(graph, feeds))


@pytest.mark.skipif(not runs_here(Target.named("x86_64-avx2")), reason="runs AVX2 code on this machine")
@pytest.mark.parametrize("quantized", [True, False], ids=["int8", "f32"])
def test_sparse_artifact_for_avx2_from_c(quantized, tmp_path, monkeypatch) -> None:
    """The 90%-sparse MLP's artifact for x86_64-avx2, every layer on a sparse kernel (int8: the int16-pair
    route, parity-paired for unstructured weights), run by the C driver: as exact as the reference."""
    from lowbit.backends.native import sparse_selection

    monkeypatch.setattr(sparse_selection, "prefer_sparse", lambda *args: True)
    graph = sparse_mlp(quantized, 2)
    folder = export(graph, tmp_path / "artifact", target="x86_64-avx2")
    driver = build_driver(CC, folder, tmp_path / "driver")
    feeds = digits_feeds("mlp", start=30)
    outputs = run_driver([str(driver)], graph, feeds, tmp_path, folder / "weights.bin", threads=2)
    assert_matches(graph, outputs, lowbit.run_reference(graph, feeds))


def test_object_links_into_a_program(tmp_path) -> None:
    """emit='obj': one relocatable object whose only global definitions are the C interface."""
    graph = digits_graph("cnn", False)
    folder = export(lowbit.compile(graph), tmp_path / "obj", emit="obj")
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.h", "model.o", "weights.bin"]
    symbols = subprocess.run(["nm", "--defined-only", "-g", str(folder / "model.o")], capture_output=True,
                             text=True, check=True).stdout.split()
    names = symbols[2::3]
    assert "lowbit_run" not in names and all(n.startswith(("lowbit_model_", "lowbit_dtype_name",
                                                           "lowbit_status_string")) for n in names)
    driver = build_driver(CC, folder, tmp_path / "driver")
    feeds = digits_feeds("cnn")
    assert_matches(graph, run_driver([str(driver)], graph, feeds, tmp_path, folder / "weights.bin"),
                   lowbit.run_reference(graph, feeds))
    # Exporting again as a library replaces the object.
    export(graph, folder)
    assert not (folder / "model.o").exists() and (folder / "model.so").exists()


def test_manifest_and_weights_file(artifacts) -> None:
    graph, folder = artifact(artifacts, "cnn", False)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["inputs"] == [{"name": "input", "shape": [2, 1, 28, 28], "dtype": "f32", "quant": None}]
    assert manifest["outputs"][0]["name"] == "logits"
    assert manifest["target"]["name"] == "host" and manifest["lowbit_version"]
    data = (folder / "weights.bin").read_bytes()
    magic, version, header, size, crc, _, arena = struct.unpack_from("<8sIIQIIQ", data)
    assert (magic, version, header) == (b"LOWBITWT", 1, 64)
    assert size == len(data) - 64 == manifest["weights"]["bytes"]
    assert f"{zlib.crc32(data[64:]):08x}" == manifest["weights"]["crc32"] == f"{crc:08x}"
    assert arena == manifest["arena_bytes"] > 0


def test_header_compiles_as_c_and_cpp(artifacts, tmp_path) -> None:
    _, folder = artifact(artifacts, "cnn", False)
    source = tmp_path / "use.c"
    source.write_text('#include "model.h"\nint main(void) { return LOWBIT_MODEL_NUM_INPUTS - 1; }\n')
    subprocess.run([CC, "-std=c99", "-pedantic", "-Wall", "-Werror", f"-I{folder}", "-fsyntax-only",
                    str(source)], check=True)
    cxx = shutil.which("c++")
    if cxx:
        subprocess.run([cxx, "-Wall", "-Werror", f"-I{folder}", "-fsyntax-only", "-x", "c++", str(source)],
                       check=True)


def test_concurrent_runs_from_threads(artifacts) -> None:
    graph, folder = artifact(artifacts, "cnn", False)
    model = load(folder)
    feeds = [digits_feeds("cnn", start=2 * i) for i in range(8)]
    expected = [model.run(f) for f in feeds]
    failures = []

    def work(offset: int) -> None:
        for step in range(20):
            index = (offset + step) % len(feeds)
            result = model.run(feeds[index])
            if not np.array_equal(result["logits"], expected[index]["logits"]):
                failures.append(index)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


def test_feeds_are_checked(artifacts) -> None:
    _, folder = artifact(artifacts, "mlp", False)
    model = load(folder)
    x = digits_feeds("mlp")["input"]
    with pytest.raises(InputError, match="missing"):
        model.run({})
    with pytest.raises(InputError, match="unknown input"):
        model.run({"input": x, "image": x})
    with pytest.raises(InputError, match=r"expects shape \[2, 784\]"):
        model.run({"input": x[:1]})
    with pytest.raises(InputError, match="expects dtype f32"):
        model.run({"input": x.astype(np.float64)})
    # Strided feeds are made contiguous, not misread.
    wide = np.repeat(x, 2, axis=1)[:, ::2]
    np.testing.assert_array_equal(model.run({"input": wide})["logits"], model.run({"input": x})["logits"])


# -- bad artifacts ---------------------------------------------------------------------------------
def _patched(data: bytes, offset: int, replacement: bytes) -> bytes:
    return data[:offset] + replacement + data[offset + len(replacement):]


def _flip(data: bytes, offset: int) -> bytes:
    return _patched(data, offset, bytes([data[offset] ^ 0x5A]))


CORRUPTIONS = {
    "truncated": (lambda d, other: d[:-100], "is truncated: .* expected"),
    "header only": (lambda d, other: d[:30], "is truncated"),
    "empty": (lambda d, other: b"", "is truncated"),
    "flipped weight": (lambda d, other: _flip(d, 64 + len(d) // 2), "is corrupt: the CRC-32 of its weights"),
    "last byte": (lambda d, other: _flip(d, len(d) - 1), "is corrupt: the CRC-32"),
    "trailing data": (lambda d, other: d + b"\0", "is corrupt: it has data after"),
    "magic": (lambda d, other: _patched(d, 0, b"NOTLOWBT"), r"not a lowbit weights file \(bad magic"),
    "version": (lambda d, other: _patched(d, 8, struct.pack("<I", 99)), "format version 99; this model reads version 1"),
    "header length": (lambda d, other: _patched(d, 12, struct.pack("<I", 3)), "invalid header length 3"),
    "length field": (lambda d, other: _patched(d, 16, struct.pack("<Q", 2**62)), "belongs to another model"),
    "checksum field": (lambda d, other: _flip(d, 24), "belongs to another model"),
    "other model": (lambda d, other: other, "belongs to another model"),
}


@pytest.fixture(scope="module")
def bad_weights(artifacts, tmp_path_factory) -> dict:
    _, folder = artifact(artifacts, "cnn", False)
    _, other = artifact(artifacts, "mlp", False)
    data, other_data = (folder / "weights.bin").read_bytes(), (other / "weights.bin").read_bytes()
    root = tmp_path_factory.mktemp("bad")
    files = {}
    for case, (corrupt, _) in CORRUPTIONS.items():
        files[case] = root / f"{case.replace(' ', '_')}.bin"
        files[case].write_bytes(corrupt(data, other_data))
    return files


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_bad_weights_rejected_from_python(artifacts, bad_weights, case) -> None:
    _, folder = artifact(artifacts, "cnn", False)
    with pytest.raises(ArtifactError, match=CORRUPTIONS[case][1]):
        load(folder, weights=bad_weights[case])


def test_bad_weights_rejected_from_c(artifacts, bad_weights, tmp_path) -> None:
    graph, folder = artifact(artifacts, "cnn", False)
    driver = build_driver(CC, folder, tmp_path / "driver")
    inputs = tmp_path / "in.bin"
    inputs.write_bytes(digits_feeds("cnn")["input"].tobytes())
    for case, path in [*bad_weights.items(), ("missing", tmp_path / "missing.bin")]:
        result = subprocess.run([str(driver), str(path), str(inputs), str(tmp_path / "out.bin")],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 3, (case, result.returncode, result.stderr)  # no signal, no crash
        pattern = CORRUPTIONS[case][1] if case in CORRUPTIONS else "cannot open weights file .*No such file"
        assert result.stderr.startswith("load failed: ") and re.search(pattern, result.stderr), case


def test_load_from_memory(artifacts) -> None:
    _, folder = artifact(artifacts, "cnn", False)
    ffi = cffi.FFI()
    ffi.cdef("void *lowbit_model_load_memory(const void *data, size_t size, char *err, size_t err_len);"
             "void lowbit_model_free(void *m);")
    library = ffi.dlopen(str(folder / "model.so"))
    data = (folder / "weights.bin").read_bytes()
    err = ffi.new("char[]", 256)
    model = library.lowbit_model_load_memory(data, len(data), err, 256)
    assert model != ffi.NULL
    library.lowbit_model_free(model)
    for bad, message in [(data[:-1], b"truncated"), (_flip(data, 100), b"corrupt"), (data[:10], b"truncated")]:
        assert library.lowbit_model_load_memory(bad, len(bad), err, 256) == ffi.NULL
        assert message in ffi.string(err)


def test_load_errors(artifacts, tmp_path) -> None:
    _, folder = artifact(artifacts, "mlp", False)
    with pytest.raises(ArtifactError, match="does not exist"):
        load(tmp_path / "nowhere")
    with pytest.raises(ArtifactError, match="has no manifest.json"):
        load(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["inputs"][0]["shape"] = [1, 784]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="does not describe the library"):
        load(copy)
    (copy / "model.so").unlink()
    with pytest.raises(ArtifactError, match="has no model.so"):
        load(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not a valid lowbit manifest"):
        load(copy)


def test_foreign_target_is_refused(tmp_path) -> None:
    """An AArch64 artifact loads nowhere but on AArch64; without its cross compiler, export says which."""
    if Target.host().arch == "aarch64":
        pytest.skip("this machine is AArch64")
    graph = digits_graph("mlp", False)
    try:
        Toolchain.for_target(Target.named("aarch64"))
    except ArtifactError as error:
        assert "gcc-aarch64-linux-gnu" in str(error)
        pytest.skip("no AArch64 cross compiler")
    folder = export(graph, tmp_path / "arm", target="aarch64")
    with pytest.raises(ArtifactError, match="is for aarch64"):
        load(folder)


def test_bad_arguments(tmp_path) -> None:
    graph = digits_graph("mlp", False)
    with pytest.raises(LowbitError, match="emit must be"):
        export(graph, tmp_path, emit="dll")
    with pytest.raises(LowbitError, match="unknown target"):
        export(graph, tmp_path, target="sparc")
    with pytest.raises(LowbitError, match="takes a Graph"):
        export("model.onnx", tmp_path)


@pytest.mark.parametrize("name, limit", [("mlp", 0.26), ("cnn", 0.35)])
def test_int8_weights_are_about_a_quarter_of_fp32(artifacts, name, limit) -> None:
    """weights.bin of the int8 model against the fp32 ONNX file (the CNN's small layers pay for
    padding to the vector width and int32 biases)."""
    _, folder = artifact(artifacts, name, True)
    onnx_bytes = (DATA / MODELS[name]).stat().st_size
    assert (folder / "weights.bin").stat().st_size <= limit * onnx_bytes
