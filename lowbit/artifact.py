"""Load an ahead-of-time artifact (`lowbit compile`, `CompiledModel.export`) into Python through its C
interface (cffi, ABI mode): what runs is exactly what a C program linking model.so would run."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import cffi
import numpy as np

from lowbit.backends.native.aot import LIBRARY, MANIFEST, OBJECT
from lowbit.backends.reference import check_feeds
from lowbit.errors import ArtifactError
from lowbit.ir import DType, Graph, TensorType
from lowbit.kernels.llvm import host_cpu

# The part of model.h that Python calls.
_CDEF = """
typedef struct lowbit_model lowbit_model;
lowbit_model *lowbit_model_load(const char *weights_path, char *err, size_t err_len);
void lowbit_model_free(lowbit_model *m);
int lowbit_model_run(const lowbit_model *m, const void *const *inputs, void *const *outputs);
const char *lowbit_status_string(int status);
int lowbit_model_num_inputs(const lowbit_model *m);
int lowbit_model_num_outputs(const lowbit_model *m);
const char *lowbit_model_input_name(const lowbit_model *m, int i);
const char *lowbit_model_output_name(const lowbit_model *m, int i);
int lowbit_model_input_shape(const lowbit_model *m, int i, int64_t *dims);
int lowbit_model_output_shape(const lowbit_model *m, int i, int64_t *dims);
int lowbit_model_input_dtype(const lowbit_model *m, int i);
int lowbit_model_output_dtype(const lowbit_model *m, int i);
const char *lowbit_dtype_name(int dtype);
"""
_ffi = cffi.FFI()
_ffi.cdef(_CDEF)
ERROR_BYTES = 1024


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: DType


class LoadedModel:
    """A model loaded from an artifact folder; `run(feeds)` works like `CompiledModel.run`.

    Safe to run from several threads at once (each C call allocates its own working memory and
    releases the GIL).
    """

    def __init__(self, folder: Path, manifest: dict, library, handle) -> None:
        self.folder = folder
        self.manifest = manifest
        self._lib = library
        self._handle = handle
        self.inputs = _signature(library, handle, "input")
        self.outputs = _signature(library, handle, "output")
        _check_manifest(folder, manifest, self.inputs, self.outputs)
        self._feeds = Graph("signature")
        for spec in self.inputs:
            self._feeds.add_input(spec.name, TensorType(spec.shape, spec.dtype))

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name for `feeds` by input name (exact shapes and dtypes, else `InputError`)."""
        if self._handle is None:
            raise ArtifactError(f"the model loaded from '{self.folder}' was closed")
        checked = check_feeds(self._feeds, feeds)
        inputs = [np.ascontiguousarray(checked[spec.name]) for spec in self.inputs]
        outputs = [np.empty(spec.shape, spec.dtype.numpy) for spec in self.outputs]
        input_table = _ffi.new("void *[]", [_ffi.from_buffer(a) for a in inputs] or [_ffi.NULL])
        output_table = _ffi.new("void *[]", [_ffi.from_buffer(a) for a in outputs] or [_ffi.NULL])
        status = self._lib.lowbit_model_run(self._handle, input_table, output_table)
        if status != 0:
            message = _ffi.string(self._lib.lowbit_status_string(status)).decode()
            raise ArtifactError(f"running the model in '{self.folder}' failed: {message} (status {status})")
        return {spec.name: array for spec, array in zip(self.outputs, outputs)}

    def close(self) -> None:
        """Free the weights now rather than when the object is collected."""
        if self._handle is not None:
            _ffi.release(self._handle)
            self._handle = None

    def __repr__(self) -> str:
        inputs = ", ".join(f"{s.name}: {s.dtype}{list(s.shape)}" for s in self.inputs)
        return f"LoadedModel('{self.folder}', inputs=[{inputs}], target={self.manifest['target']['name']})"


def load(folder: str | os.PathLike, *, weights: str | os.PathLike | None = None) -> LoadedModel:
    """Load the artifact in `folder` (model.so, weights.bin, manifest.json); `weights` overrides the
    weights file. Raises `ArtifactError` when files are missing, corrupt, mismatched or built for
    another machine."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    library_path = folder / manifest["files"]["code"]
    arch = manifest["target"]["arch"]
    if arch != host_cpu().arch:
        raise ArtifactError(f"the artifact in '{folder}' is for {arch} (target {manifest['target']['name']}); "
                            f"this machine is {host_cpu().arch}")
    if library_path.name == OBJECT:
        raise ArtifactError(f"'{folder}' holds a relocatable object ({OBJECT}) for linking into a program; "
                            f"export with emit='so' to load it from Python")
    if not library_path.is_file():
        raise ArtifactError(f"'{folder}' has no {library_path.name}")
    try:
        library = _ffi.dlopen(str(library_path.resolve()))
    except OSError as error:
        raise ArtifactError(f"cannot load '{library_path}': {error}") from None
    weights_path = Path(weights) if weights is not None else folder / manifest["files"]["weights"]
    err = _ffi.new("char[]", ERROR_BYTES)
    handle = library.lowbit_model_load(os.fsencode(weights_path), err, ERROR_BYTES)
    if handle == _ffi.NULL:
        raise ArtifactError(_ffi.string(err).decode(errors="replace"))
    return LoadedModel(folder, manifest, library, _ffi.gc(handle, library.lowbit_model_free))


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        what = "does not exist" if not folder.exists() else f"has no {MANIFEST}"
        raise ArtifactError(f"'{folder}' is not a lowbit artifact: it {what}")
    try:
        manifest = json.loads(path.read_text())
        manifest["files"]["code"], manifest["files"]["weights"], manifest["target"]["arch"]
    except (ValueError, KeyError, TypeError) as error:
        raise ArtifactError(f"'{path}' is not a valid lowbit manifest ({error})") from None
    if manifest.get("format") != "lowbit-artifact":
        raise ArtifactError(f"'{path}' is not a lowbit manifest")
    if manifest["files"]["code"] not in (LIBRARY, OBJECT):
        raise ArtifactError(f"'{path}' names an unknown code file '{manifest['files']['code']}'")
    return manifest


def _signature(library, handle, kind: str) -> list[TensorSpec]:
    """Inputs or outputs as the library reports them (the truth; the manifest only describes it)."""
    count = getattr(library, f"lowbit_model_num_{kind}s")(handle)
    dims = _ffi.new("int64_t[]", 64)
    specs = []
    for index in range(count):
        name = _ffi.string(getattr(library, f"lowbit_model_{kind}_name")(handle, index)).decode()
        rank = getattr(library, f"lowbit_model_{kind}_shape")(handle, index, _ffi.NULL)
        if rank > len(dims):
            dims = _ffi.new("int64_t[]", rank)
        getattr(library, f"lowbit_model_{kind}_shape")(handle, index, dims)
        dtype = _ffi.string(library.lowbit_dtype_name(getattr(library, f"lowbit_model_{kind}_dtype")(handle, index)))
        specs.append(TensorSpec(name, tuple(int(dims[d]) for d in range(rank)), DType.parse(dtype.decode())))
    return specs


def _check_manifest(folder: Path, manifest: dict, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    for kind, specs in (("inputs", inputs), ("outputs", outputs)):
        described = [(entry.get("name"), tuple(entry.get("shape", ())), entry.get("dtype"))
                     for entry in manifest.get(kind, [])]
        actual = [(spec.name, spec.shape, spec.dtype.value) for spec in specs]
        if described != actual:
            raise ArtifactError(f"'{folder / MANIFEST}' does not describe the library beside it: its {kind} "
                                f"are {described}, the library's are {actual}")
