"""The public API: the functions a user of lowbit calls."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from lowbit.backends.reference import evaluate_node
from lowbit.backends.reference import run_reference as _run_reference
from lowbit.errors import ModelFormatError
from lowbit.frontends.onnx import import_model
from lowbit.ir import Graph, verify
from lowbit.ir import load as load_ir


def import_onnx(model, *, batch_size: int | None = None, dims: Mapping[str, int] | None = None,
                constant_inputs: Mapping[str, np.ndarray] | None = None, realize: bool = True) -> Graph:
    """Import an ONNX model (path, bytes or `onnx.ModelProto`) into a verified lowbit graph.

    Shapes become static: a symbolic or unknown first dimension of an input is the batch, bound to
    `batch_size` (default 1, recorded in `graph.metadata`); other symbolic dimensions are bound by
    `dims`. Subgraphs that compute shapes are folded into constants by the reference interpreter.
    A model quantized by another tool (QuantizeLinear/DequantizeLinear pairs, QLinearConv, …) becomes
    lowbit's integer ops (`qconv2d`, `qlinear`, …); `realize=False` keeps the quantize/dequantize form,
    which computes exactly what ONNX Runtime computes for the QDQ model.
    """
    graph = import_model(model, batch_size=batch_size, dims=dims, constant_inputs=constant_inputs,
                         fold=evaluate_node)
    verify(graph)
    if realize and any(node.op in ("quantize", "dequantize") for node in graph.nodes):
        from lowbit.passes import PassManager

        PassManager("remove-noops,fuse-epilogue,realize-quantization,dce").run(graph)
    return graph


def load_graph(source, *, batch_size: int | None = None, dims: Mapping[str, int] | None = None) -> Graph:
    """A graph from a `.lbir` text file, an ONNX file, or a graph given as is."""
    if isinstance(source, Graph):
        return source
    path = Path(source)
    if path.suffix == ".lbir":
        graph = load_ir(path)
        verify(graph)
        return graph
    if not path.exists():
        raise ModelFormatError(f"model file '{path}' does not exist")
    return import_onnx(path, batch_size=batch_size, dims=dims)


def optimize(graph: Graph, pipeline: str = "default", *, verify_each: bool = True) -> Graph:
    """A copy of `graph` transformed by `pipeline` (pass names, options in braces, or a named pipeline)."""
    from lowbit.passes import PassManager

    result = graph.copy()
    PassManager(pipeline, verify=verify_each).run(result)
    return result


def quantize(graph: Graph, calibration=None, **options) -> Graph:
    """Post-training quantization (see `lowbit.passes.quantize.quantize` for every option)."""
    from lowbit.passes.quantize import quantize as _quantize

    return _quantize(graph, calibration, **options)


def export_onnx(graph: Graph, path, *, opset: int = 17):
    """Write `graph` as a standard ONNX model (opset 13 to the newest the onnx package knows): float ops as
    their ONNX counterparts, quantized parts in the QDQ form that ONNX Runtime fuses into integer kernels.
    Returns the onnx.ModelProto."""
    from lowbit.backends.onnx import export_onnx as _export_onnx

    return _export_onnx(graph, path, opset=opset)


def prune(graph: Graph, method: str = "magnitude", *, calibration=None, **options) -> Graph:
    """A pruned copy of `graph` (see `lowbit.passes.prune.prune` and docs/pruning.md)."""
    from lowbit.passes.prune import prune as _prune

    return _prune(graph, method, calibration=calibration, **options)


def compile(graph: Graph, target: str = "host", num_threads: int = 1, optimize: str = "speed"):
    """Compile `graph` to native code for `target` (`"host"`, or a name such as `"x86_64-avx2"`);
    the result's `.run(feeds)` returns outputs by name, like `run_reference`.

    `num_threads` > 1 runs each call on that many threads: the calling one and threads started for the
    call, sharing the outputs of convolutions and matrix products; results are bit-identical for every
    thread count. A model with little such work stays on one thread, as starting threads would not pay
    (`lowbit.backends.native.compiler.PARALLEL_MIN_MACS`); the result's `.threads` says what a run uses.
    Calls from several Python threads at once are safe (each has its own working memory).

    `optimize="size"` makes kernel selection minimise the weights' bytes instead of time: every weight
    with a sparse layout (see `sparsify`) is stored in the most compact sparse packing and runs on the
    sparse kernels even where the dense ones would be faster."""
    from lowbit.backends.native.compiler import compile_graph

    return compile_graph(graph, target, num_threads, optimize=optimize)


def load(folder, *, weights=None):
    """Load an ahead-of-time artifact folder (written by `lowbit compile` or `CompiledModel.export`) through
    its C interface; the result's `.run(feeds)` returns outputs by name, like `CompiledModel.run`.
    `weights` overrides the folder's weights.bin. Raises `ArtifactError` for missing, corrupt or
    mismatched files and for artifacts built for another machine."""
    from lowbit.artifact import load as load_artifact

    return load_artifact(folder, weights=weights)


def run_reference(graph: Graph, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run `graph` with the reference interpreter; feeds and results are keyed by the model's names."""
    return _run_reference(graph, feeds)
