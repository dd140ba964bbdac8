"""lowbit graph → standard ONNX model (QDQ for the quantized parts)."""
from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

from lowbit.backends.onnx import elementwise, nn, quantized, tensor  # noqa: F401  (fill the exporter table)
from lowbit.backends.onnx.context import ELEMENT_TYPES, ExportContext
from lowbit.backends.onnx.registry import EXPORTERS
from lowbit.errors import LowbitError, UnsupportedOpError, VerificationError
from lowbit.ir import Graph, Value

MIN_OPSET = 13  # per-axis QuantizeLinear, and the input forms of Split, Squeeze and ReduceSum
PROTOBUF_LIMIT = 2 ** 31 - 1  # larger models keep their initializers in an external data file


def to_onnx(graph: Graph, *, opset: int = 17) -> onnx.ModelProto:
    """`graph` as an ONNX model of the default domain at `opset` (13 to the newest the onnx package
    knows), checked with `onnx.checker`."""
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise UnsupportedOpError(f"lowbit exports ONNX opsets {MIN_OPSET} to {newest}, not {opset}")
    ctx = ExportContext(graph, opset)
    for node in graph.nodes:
        export = EXPORTERS.get(node.op)
        if export is None:
            raise UnsupportedOpError(f"{node.describe()}: op '{node.op}' has no ONNX export")
        ctx.node = node
        try:
            export(ctx, node)
        except LowbitError as error:
            if node.describe() in str(error):
                raise
            raise type(error)(f"{node.describe()}: {error}") from None
    ctx.node = None
    outputs = []
    for name, value in zip(graph.output_names, graph.outputs):
        if ctx.name(value) != name:  # a graph input, a constant, or a value that is two outputs
            ctx.emit("Identity", [ctx.name(value)], ctx.fresh(name))
        outputs.append(_value_info(name, value))
    model = helper.make_model(
        helper.make_graph(ctx.nodes, graph.name, [_value_info(ctx.name(v), v) for v in graph.inputs], outputs,
                          ctx.initializers),
        opset_imports=[helper.make_opsetid("", opset)], producer_name="lowbit")
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    _check(model)
    return model


def export_onnx(graph: Graph, path: str | Path, *, opset: int = 17) -> onnx.ModelProto:
    """Write `graph` to `path` as a standard ONNX model (see `to_onnx`); returns the model."""
    model = to_onnx(graph, opset=opset)
    large = model.ByteSize() > PROTOBUF_LIMIT
    onnx.save_model(model, str(path), save_as_external_data=large,
                    location=f"{Path(path).name}.data" if large else None)
    return model


def _value_info(name: str, value: Value) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, ELEMENT_TYPES[value.type.dtype], list(value.type.shape))


def _check(model: onnx.ModelProto) -> None:
    """onnx.checker on models protobuf can hold (the exporter's own bugs would show here)."""
    if model.ByteSize() > PROTOBUF_LIMIT:
        return
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        raise VerificationError(f"the exported ONNX model is invalid: {error}") from None
