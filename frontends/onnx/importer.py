"""ONNX model → lowbit IR."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from lowbit.errors import LowbitError, ModelFormatError, ShapeError, UnsupportedOpError
from lowbit.frontends.onnx import elementwise, nn, quantized, tensor  # noqa: F401  (fill the converter table)
from lowbit.frontends.onnx.context import ConvertContext, FoldFn, OnnxNode
from lowbit.frontends.onnx.dtypes import element_type
from lowbit.frontends.onnx.registry import CONVERTERS
from lowbit.ir import Graph, TensorType, Value

MIN_OPSET = 7
DEFAULT_DOMAINS = ("", "ai.onnx")

def load_model(model: str | Path | bytes | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """The model proto (external data loaded) and a label naming where it came from."""
    if isinstance(model, onnx.ModelProto):
        return model, "ONNX model"
    if isinstance(model, bytes):
        label = "ONNX model bytes"
        try:
            return onnx.load_model_from_string(model), label
        except Exception as error:  # protobuf raises its own DecodeError types
            raise ModelFormatError(f"{label}: not a valid ONNX model ({error})") from None
    path = Path(model)
    label = f"'{path}'"
    if not path.is_file():
        raise ModelFormatError(f"model file {label} does not exist")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise ModelFormatError(f"{label} is not a valid ONNX model ({type(error).__name__}: {error})") from None
    if not proto.graph.node and not proto.graph.output:
        raise ModelFormatError(f"{label} is not an ONNX model: it has no graph")
    try:
        onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
    except Exception as error:  # onnx raises OSError, ValueError or its checker's ValidationError here
        raise ModelFormatError(f"{label}: cannot load external data ({error})") from None
    return proto, label


def import_model(model: str | Path | bytes | onnx.ModelProto, *, batch_size: int | None = None,
                 dims: Mapping[str, int] | None = None, constant_inputs: Mapping[str, np.ndarray] | None = None,
                 fold: FoldFn | None = None) -> Graph:
    """Convert an ONNX model to lowbit IR with static shapes.

    The first dimension of an input, when symbolic or unknown, is the batch and is bound to
    `batch_size` (default 1); other symbolic dimensions are bound by `dims` (symbol → size).
    `constant_inputs` binds graph inputs to known data, turning them into constants.
    `fold` evaluates nodes whose operands are all constant, so shape-computing subgraphs vanish.
    """
    proto, label = load_model(model)
    try:
        return _Importer(proto, label, batch_size, dict(dims or {}), dict(constant_inputs or {}), fold).run()
    except LowbitError as error:
        if label != "ONNX model" and label not in str(error):
            raise type(error)(f"{label}: {error}") from None
        raise


class _Importer:
    def __init__(self, proto: onnx.ModelProto, label: str, batch_size: int | None, dims: dict[str, int],
                 constant_inputs: dict[str, np.ndarray], fold: FoldFn | None) -> None:
        self.proto = proto
        self.label = label
        self.batch_size = 1 if batch_size is None else int(batch_size)
        if self.batch_size < 1:
            raise ShapeError(f"batch_size must be at least 1, got {batch_size}")
        self.dims = dims
        self.constant_inputs = constant_inputs
        self.opset = self._default_opset()
        self.graph = Graph(proto.graph.name or "main")
        self.context = ConvertContext(self.graph, self.opset, fold)
        self.values: dict[str, Value] = {}
        self.bound_symbols: dict[str, int] = {}

    def _default_opset(self) -> int:
        versions = [o.version for o in self.proto.opset_import if o.domain in DEFAULT_DOMAINS]
        if not versions:
            return 1 if not self.proto.opset_import else MIN_OPSET
        opset = max(versions)
        if opset < MIN_OPSET:
            raise UnsupportedOpError(f"opset {opset} is older than the oldest lowbit imports ({MIN_OPSET})")
        return opset

    def run(self) -> Graph:
        graph_proto = self.proto.graph
        initializer_names = {t.name for t in graph_proto.initializer}
        for tensor in graph_proto.initializer:
            data = self._tensor_data(tensor)  # typed by the initializer: int4 is stored in int8 arrays
            dtype = element_type(tensor.data_type, f"initializer '{tensor.name}'")
            self.values[tensor.name] = self.graph.add_constant(data, tensor.name, TensorType(data.shape, dtype))
        for info in graph_proto.input:
            if info.name in initializer_names:
                continue
            if info.name in self.constant_inputs:
                data = np.asarray(self.constant_inputs[info.name])
                dtype = element_type(info.type.tensor_type.elem_type, f"graph input '{info.name}'")
                # The declared type where the data is its storage (int4 data comes in int8 arrays).
                typed = TensorType(data.shape, dtype) if data.dtype == dtype.numpy else None
                self.values[info.name] = self.graph.add_constant(data, info.name, typed)
                continue
            self.values[info.name] = self.graph.add_input(info.name, self._input_type(info))
        for node_proto in self._topological(graph_proto):
            self._convert(node_proto)
        outputs = []
        for info in graph_proto.output:
            if info.name not in self.values:
                raise ModelFormatError(f"graph output '{info.name}' is not produced by any node")
            outputs.append((info.name, self.values[info.name]))
        self.graph.set_outputs(outputs)
        self.graph.eliminate_dead_code()
        self.graph.metadata = self._metadata()
        return self.graph

    def _metadata(self) -> dict:
        metadata: dict = {"source": "onnx", "opset": self.opset}
        if self.proto.producer_name:
            metadata["producer"] = self.proto.producer_name
        if self.bound_symbols:
            metadata["dims"] = dict(sorted(self.bound_symbols.items()))
            metadata["batch_size"] = self.batch_size
        return metadata

    def _tensor_data(self, tensor: onnx.TensorProto) -> np.ndarray:
        where = f"initializer '{tensor.name}'"
        dtype = element_type(tensor.data_type, where)
        try:
            array = numpy_helper.to_array(tensor)
        except Exception as error:
            raise ModelFormatError(f"{where} cannot be read ({error})") from None
        return np.asarray(array).astype(dtype.numpy)

    def _input_type(self, info: onnx.ValueInfoProto) -> TensorType:
        where = f"graph input '{info.name}'"
        if not info.type.HasField("tensor_type"):
            raise UnsupportedOpError(f"{where} is not a tensor")
        tensor_type = info.type.tensor_type
        dtype = element_type(tensor_type.elem_type, where)
        if not tensor_type.HasField("shape"):
            raise ShapeError(f"{where} has no shape; lowbit needs static shapes")
        shape = []
        for axis, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value >= 0:  # a set 0 is an empty axis, not unknown
                shape.append(dim.dim_value)
                continue
            symbol = dim.dim_param if dim.HasField("dim_param") else ""
            if symbol and symbol in self.dims:
                size = int(self.dims[symbol])
            elif axis == 0:
                size = self.batch_size
            else:
                raise ShapeError(f"{where}: dimension {axis} ('{symbol or '?'}') is symbolic; bind it with "
                                 f"dims={{'{symbol or 'name'}': size}}")
            self.bound_symbols[symbol or f"{info.name}.{axis}"] = size
            shape.append(size)
        return TensorType(tuple(shape), dtype)

    def _topological(self, graph_proto: onnx.GraphProto) -> list[onnx.NodeProto]:
        """Nodes in an order where producers come first (ONNX requires it; some exporters break it)."""
        available = set(self.values) | {""}
        pending = list(graph_proto.node)
        ordered: list[onnx.NodeProto] = []
        while pending:
            remaining = []
            for node in pending:
                if all(name in available for name in node.input):
                    ordered.append(node)
                    available.update(node.output)
                else:
                    remaining.append(node)
            if len(remaining) == len(pending):
                node = remaining[0]
                missing = [n for n in node.input if n not in available]
                raise ModelFormatError(
                    f"node '{node.name or node.output[0] if node.output else node.op_type}' ({node.op_type}) uses "
                    f"{missing}, which no node produces and which are neither graph inputs nor initializers")
            pending = remaining
        return ordered

    def _convert(self, node_proto: onnx.NodeProto) -> None:
        inputs = []
        for name in node_proto.input:
            if name and name not in self.values:
                raise ModelFormatError(f"node '{node_proto.name}' ({node_proto.op_type}) uses '{name}', an "
                                       f"optional output its producer does not provide")
            inputs.append(self.values[name] if name else None)
        node = OnnxNode(node_proto, inputs, self.opset)
        default_domain = node_proto.domain in DEFAULT_DOMAINS
        convert = CONVERTERS.get(node.op_type if default_domain else f"{node_proto.domain}.{node.op_type}")
        if convert is None and not default_domain:
            raise UnsupportedOpError(f"{node.describe()}: op '{node.op_type}' of domain '{node_proto.domain}' is "
                                     f"not supported; lowbit imports the default ONNX domain and a few "
                                     f"com.microsoft quantized ops")
        if convert is None:
            nearest = _nearest_supported(node.op_type)
            hint = f"; nearest supported: {nearest}" if nearest else ""
            raise UnsupportedOpError(f"op type '{node.op_type}' ({node.describe()}) is not supported{hint}")
        self.context.node = node
        try:
            result = convert(self.context, node)
        except LowbitError as error:
            if node.name in str(error):
                raise
            raise type(error)(f"{node.describe()}: {error}") from None
        results = [result] if isinstance(result, Value) else list(result)
        for index, name in enumerate(node_proto.output):
            if not name:
                continue
            if index >= len(results) or results[index] is None:
                if index < len(results):
                    continue
                raise UnsupportedOpError(f"{node.describe()}: output {index} ('{name}') is not supported")
            self.values[name] = results[index]


def _nearest_supported(op_type: str) -> str | None:
    """The supported op type spelled most like `op_type`, else the longest one it contains
    (SoftmaxCrossEntropyLoss → Softmax), so the error suggests something to try."""
    close = difflib.get_close_matches(op_type, sorted(CONVERTERS), n=1, cutoff=0.5)
    contained = sorted((name for name in CONVERTERS if name in op_type), key=lambda name: (-len(name), name))
    return (close or contained or [None])[0]
