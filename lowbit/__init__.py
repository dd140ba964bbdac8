"""lowbit: a model-compression compiler (ONNX import, quantization, pruning, fusion, int8 kernels)."""
from lowbit import errors
from lowbit.api import compile, export_onnx, import_onnx, load, load_graph, optimize, prune, quantize, run_reference
from lowbit.errors import (ArtifactError, InputError, LowbitError, ModelFormatError, ParseError, ShapeError,
                           UnsupportedOpError, VerificationError)
from lowbit.ir import Graph

__version__ = "0.1.0"

__all__ = [
    "compile", "export_onnx", "import_onnx", "load", "load_graph", "optimize", "prune", "quantize", "run_reference", "Graph", "errors",
    "LowbitError", "ModelFormatError", "UnsupportedOpError", "ShapeError", "InputError",
    "VerificationError", "ParseError", "ArtifactError", "Target",
]


def __getattr__(name: str):
    # Target lives with the native backend, which loads LLVM: imported when first asked for
    if name == "Target":
        from lowbit.backends.native.target import Target

        return Target
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
