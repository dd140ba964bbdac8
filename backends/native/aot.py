"""Ahead-of-time artifacts: a compiled model as files a C program (or `lowbit.load`) uses without lowbit.

`export(model, OUT, target=..., emit="so"|"obj")` writes
- `model.so` (or the relocatable `model.o`): the generated code and the C runtime
  (`runtime/lowbit_runtime.c`) compiled for the target; depends on libc, libm and (a model compiled
  for more than one thread) POSIX threads only;
- `model.h`: the C interface (`runtime/lowbit_model.h` with this model's signature filled in);
- `weights.bin`: a 64-byte header (magic, format version, header length, weights length, CRC-32,
  arena size) and the weights blob; the runtime verifies all of it at load;
- `manifest.json`: signature with quantization parameters, target, lowbit version, checksum, sizes.

Host targets are built with `cc`, others with the cross compiler of their architecture.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from lowbit.backends.native.compiler import CompiledModel, Program
from lowbit.backends.native.target import Target
from lowbit.errors import ArtifactError, LowbitError
from lowbit.ir import Graph, Value
from lowbit.kernels.llvm import emit_linkable_object, host_cpu

RUNTIME = Path(__file__).parent / "runtime"
HEADER_TEMPLATE = RUNTIME / "lowbit_model.h"
RUNTIME_SOURCE = RUNTIME / "lowbit_runtime.c"

LIBRARY, OBJECT, HEADER, WEIGHTS, MANIFEST = "model.so", "model.o", "model.h", "weights.bin", "manifest.json"
WEIGHTS_MAGIC = b"LOWBITWT"
WEIGHTS_FORMAT_VERSION = 1
WEIGHTS_HEADER_BYTES = 64
ARTIFACT_FORMAT_VERSION = 1

# The numbering of `lowbit_dtype` in lowbit_model.h.
C_DTYPES = {"f32": 1, "f64": 2, "f16": 3, "i64": 4, "i32": 5, "i16": 6, "i8": 7, "u64": 8, "u32": 9,
            "u16": 10, "u8": 11, "bool": 12, "i4": 13, "u4": 14}

# Cross compilers by architecture, and the Debian packages that install them.
CROSS_PREFIX = {"aarch64": "aarch64-linux-gnu-", "x86_64": "x86_64-linux-gnu-"}
CROSS_PACKAGE = {"aarch64": "gcc-aarch64-linux-gnu", "x86_64": "gcc-x86-64-linux-gnu"}
C_FLAGS = ("-std=c99", "-O2", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra")

Exportable = Union[Graph, Program, CompiledModel]


@dataclass(frozen=True)
class Toolchain:
    """The C compiler and objcopy that build artifacts for one architecture."""

    cc: str
    objcopy: str

    @staticmethod
    def for_target(target: Target) -> "Toolchain":
        if target.arch == host_cpu().arch:
            prefix, package = "", "gcc"
        elif target.arch in CROSS_PREFIX:
            prefix, package = CROSS_PREFIX[target.arch], CROSS_PACKAGE[target.arch]
        else:
            raise ArtifactError(f"no C toolchain is known for architecture {target.arch} (target {target.name})")
        cc = shutil.which(f"{prefix}gcc") if prefix else (shutil.which("cc") or shutil.which("gcc"))
        objcopy = shutil.which(f"{prefix}objcopy")
        if cc is None or objcopy is None:
            missing = f"{prefix}gcc" if cc is None else f"{prefix}objcopy"
            raise ArtifactError(f"building an artifact for target {target.name} needs {missing}, which is not "
                                f"installed (Debian/Ubuntu: apt-get install {package})")
        return Toolchain(cc, objcopy)

    def build(self, program: Program, folder: Path, emit: str, exports: list[str]) -> Path:
        """Compile the generated code and the runtime in `folder` (which holds model.h and the
        description the runtime includes) and link them; returns the library or object."""
        kernels, runtime = folder / "kernels.o", folder / "runtime.o"
        kernels.write_bytes(emit_linkable_object(program.module, program.target))
        _run(self.cc, *C_FLAGS, f"-I{folder}", "-c", str(RUNTIME_SOURCE), "-o", str(runtime))
        if emit == "so":
            (folder / "exports.map").write_text("{ global: %s; local: *; };\n" % "; ".join(exports))
            _run(self.cc, "-shared", "-o", str(folder / LIBRARY), str(kernels), str(runtime),
                 f"-Wl,--version-script={folder / 'exports.map'}", "-Wl,-z,noexecstack", "-Wl,-z,noseparate-code",
                 "-lm", "-pthread",
                 "-s")  # no static symbol table: only the C interface is looked up (dynamically)
            return folder / LIBRARY
        _run(self.cc, "-r", "-nostdlib", "-o", str(folder / "combined.o"), str(kernels), str(runtime))
        # Only the C interface stays global, so the object links beside other code (`lowbit_run` and
        # the kernels become local symbols).
        _run(self.objcopy, *(f"--keep-global-symbol={name}" for name in exports), str(folder / "combined.o"),
             str(folder / OBJECT))
        return folder / OBJECT


def _run(*args: str) -> None:
    result = subprocess.run(list(args), capture_output=True, text=True)
    if result.returncode != 0:
        raise ArtifactError(f"building the artifact failed: {' '.join(args)}\n{result.stderr.strip()}")


def export(model: Exportable, out: str | os.PathLike, *, target: str | Target | None = None,
           emit: str = "so", num_threads: int | None = None, optimize: str | None = None) -> Path:
    """Write the artifact of `model` (a graph, `Program` or `CompiledModel`) for `target` to folder `out`.

    `target`, `num_threads` and `optimize` ("speed" or "size") default to the model's own (a graph: the
    host, 1, "speed"); other values lower the graph again. `emit="so"` writes a shared library,
    `"obj"` a relocatable object to link into a program (with -lm -pthread). Returns `out`.
    """
    if emit not in ("so", "obj"):
        raise LowbitError(f"emit must be 'so' or 'obj', got '{emit}'")
    if num_threads is not None and num_threads < 1:
        raise LowbitError(f"num_threads must be at least 1, got {num_threads}")
    program = _program(model, target, num_threads, optimize)
    toolchain = Toolchain.for_target(program.target)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    blob = program.weights[:program.weights_bytes].tobytes()
    checksum = zlib.crc32(blob)
    header = HEADER_TEMPLATE.read_text()
    exports = re.findall(r"^LOWBIT_API\b[^(]*?\b(\w+)\(", header, re.MULTILINE)
    header = header.replace("@MODEL_DESCRIPTION@", _describe(program)).replace("@MODEL_MACROS@",
                                                                              _macros(program))
    # Built next to `out` and renamed into place: a process that has the old library mapped keeps it.
    with tempfile.TemporaryDirectory(prefix=".build-", dir=out) as folder:
        build = Path(folder)
        (build / HEADER).write_text(header)
        (build / "lowbit_model_desc.inc").write_text(_description_source(program, checksum))
        code = toolchain.build(program, build, emit, exports).name
        (build / WEIGHTS).write_bytes(_weights_file(blob, checksum, program.arena_bytes))
        manifest = _manifest(program, code, checksum)
        (build / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for name in (code, HEADER, WEIGHTS, MANIFEST):
            os.replace(build / name, out / name)
    stale = out / (LIBRARY if code == OBJECT else OBJECT)
    stale.unlink(missing_ok=True)
    return out


def _program(model: Exportable, target: str | Target | None, num_threads: int | None,
             optimize: str | None) -> Program:
    if isinstance(model, CompiledModel):
        graph, program = model.graph, model.program
    elif isinstance(model, Program):
        graph, program = model.graph, model
    elif isinstance(model, Graph):
        graph, program = model, None
    else:
        raise LowbitError(f"export takes a Graph, Program or CompiledModel, got {type(model).__name__}")
    if isinstance(target, str):
        target = Target.parse(target)
    target = target or (program.target if program is not None else Target.host())
    num_threads = num_threads or (program.num_threads if program is not None else 1)
    optimize = optimize or (program.optimize if program is not None else "speed")
    if program is not None and (program.target, program.num_threads, program.optimize) == \
            (target, num_threads, optimize):
        return program
    return Program(graph, target, num_threads, optimize)


def _weights_file(blob: bytes, checksum: int, arena_bytes: int) -> bytes:
    header = struct.pack("<8sIIQIIQ", WEIGHTS_MAGIC, WEIGHTS_FORMAT_VERSION, WEIGHTS_HEADER_BYTES,
                         len(blob), checksum, 0, arena_bytes)
    return header.ljust(WEIGHTS_HEADER_BYTES, b"\0") + blob


# -- the model's signature, for C and for the manifest --------------------------------------------------
def _signature(program: Program) -> dict[str, list[tuple[str, Value]]]:
    """(name, value) of the inputs and of the outputs, in slot order."""
    graph = program.graph
    return {"input": [(v.name, v) for v in graph.inputs],
            "output": list(zip(graph.output_names, graph.outputs))}


def _storage_bytes(value: Value) -> int:
    """Bytes of the numpy array that holds the tensor (sub-byte types take a byte per element)."""
    return value.type.size * value.type.dtype.numpy.itemsize


def _c_string(text: str) -> str:
    """A C string literal of `text`'s UTF-8 bytes (anything but plain characters as octal escapes)."""
    return '"' + "".join(chr(b) if chr(b).isalnum() or chr(b) in "_.:/- " else f"\\{b:03o}"
                         for b in text.encode()) + '"'


def _description_source(program: Program, checksum: int) -> str:
    """`lowbit_model_desc.inc`: the tables and constants lowbit_runtime.c is compiled with."""
    lines = [f"#define WEIGHTS_BYTES ((uint64_t){program.weights_bytes}u)",
             f"#define WEIGHTS_CRC32 ((uint32_t)0x{checksum:08x}u)",
             f"#define ARENA_BYTES ((uint64_t){program.arena_bytes}u)",
             f"#define USES_AMX {int(program.target.has('amx-tile'))}"]  # the runtime asks for tile state
    for kind, entries in _signature(program).items():
        rows = []
        for index, (name, value) in enumerate(entries):
            dims = ", ".join(str(d) for d in value.type.shape) or "0"
            lines.append(f"static const int64_t {kind}_shape_{index}[] = {{{dims}}};")
            rows.append(f"    {{{_c_string(name)}, {value.type.rank}, {kind}_shape_{index}, "
                        f"(lowbit_dtype){C_DTYPES[value.type.dtype.value]}, {_storage_bytes(value)}u}},")
        table = kind.upper() + "S"
        lines.append(f"#define NUM_{table} {len(entries)}")
        lines += [f"static const tensor_desc {table}[] = {{", *(rows or ["    {0, 0, 0, (lowbit_dtype)0, 0},"]), "};"]
    return "\n".join(lines) + "\n"


def _comment_safe(text: str) -> str:
    return text.replace("*/", "* /")


def _describe(program: Program) -> str:
    """The model-specific part of model.h's opening comment."""
    target = program.target
    lines = [f" * Model '{_comment_safe(program.graph.name)}' for target {target.name} ({target.triple}, "
             f"{target.cpu}); lowbit {_lowbit_version()}.", " *"]
    signature = _signature(program)
    width = max((len(name) for entries in signature.values() for name, _ in entries), default=0)
    for kind, entries in signature.items():
        for index, (name, value) in enumerate(entries):
            shape = "[" + ", ".join(str(d) for d in value.type.shape) + "]"
            lines.append(f" *   {kind:<6} {index}  {_comment_safe(name):<{width}}  {value.type.dtype} {shape}")
    lines.append(f" *   working memory per run: {program.arena_bytes} bytes; weights: {program.weights_bytes} bytes")
    lines.append(f" *   threads per run: {program.threads} (compiled for {program.num_threads})")
    return "\n".join(lines)


def _macros(program: Program) -> str:
    """Compile-time sizes for callers that allocate statically."""
    lines = [f"#define LOWBIT_MODEL_NUM_INPUTS {len(program.graph.inputs)}",
             f"#define LOWBIT_MODEL_NUM_OUTPUTS {len(program.graph.outputs)}",
             f"#define LOWBIT_MODEL_ARENA_BYTES {program.arena_bytes}",
             f"#define LOWBIT_MODEL_THREADS {program.threads}"]
    for kind, entries in _signature(program).items():
        for index, (_, value) in enumerate(entries):
            lines.append(f"#define LOWBIT_MODEL_{kind.upper()}{index}_BYTES {_storage_bytes(value)}")
    return "/* This model's sizes (the same as the lowbit_model_* queries give). */\n" + "\n".join(lines)


def _lowbit_version() -> str:
    try:
        return importlib.metadata.version("lowbit")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _tensor_entry(name: str, value: Value) -> dict:
    quant = value.type.quant
    entry = {"name": name, "shape": list(value.type.shape), "dtype": value.type.dtype.value, "quant": None}
    if quant is not None:
        entry["quant"] = {"scale": list(quant.scale), "zero_point": list(quant.zero_point), "axis": quant.axis,
                          "group_size": quant.group_size, "bits": quant.bits, "signed": quant.signed}
    return entry


def _manifest(program: Program, code: str, checksum: int) -> dict:
    target = program.target
    signature = _signature(program)
    return {
        "format": "lowbit-artifact",
        "format_version": ARTIFACT_FORMAT_VERSION,
        "lowbit_version": _lowbit_version(),
        "model": program.graph.name,
        "target": {"name": target.name, "triple": target.triple, "arch": target.arch, "cpu": target.cpu,
                   "features": sorted(target.features)},
        "files": {"code": code, "header": HEADER, "weights": WEIGHTS},
        "weights": {"format_version": WEIGHTS_FORMAT_VERSION, "header_bytes": WEIGHTS_HEADER_BYTES,
                    "bytes": program.weights_bytes, "crc32": f"{checksum:08x}"},
        "arena_bytes": program.arena_bytes,
        "num_threads": program.num_threads,
        "optimize": program.optimize,
        "threads": program.threads,
        "inputs": [_tensor_entry(name, value) for name, value in signature["input"]],
        "outputs": [_tensor_entry(name, value) for name, value in signature["output"]],
    }
