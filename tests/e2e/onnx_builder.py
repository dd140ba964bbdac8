"""A small helper for writing ONNX models by hand with `onnx.helper` and seeded random weights.

The model builders in `model_builders.py` and `zoo_builders.py` use it; they describe networks
layer by layer, and this class keeps names unique and collects nodes and initializers.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# The IR version that came with each old opset (onnx 1.2 → IR 3, 1.3 → IR 3, 1.4 → IR 4); old
# exporters also listed every initializer in graph.input, which IR < 4 requires.
_OLD_IR_VERSION = {7: 3, 8: 3, 9: 4}


class OnnxBuilder:
    """Collects nodes and initializers of one graph; `rng` draws the weights."""

    def __init__(self, name: str, opset: int = 17, seed: int = 0) -> None:
        self.name = name
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self._counts: dict[str, int] = {}

    def fresh(self, prefix: str) -> str:
        count = self._counts.get(prefix, 0)
        self._counts[prefix] = count + 1
        return f"{prefix}_{count}"

    def input(self, name: str, shape: Sequence[int | str], elem_type: int = TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def const(self, array: np.ndarray | float | int | Sequence, prefix: str = "const",
              dtype: np.dtype | type | None = None) -> str:
        """An initializer holding `array` (float64 data becomes float32, Python ints int64)."""
        data = np.asarray(array, dtype=dtype)
        if data.dtype == np.float64:
            data = data.astype(np.float32)
        name = self.fresh(prefix)
        self.initializers.append(numpy_helper.from_array(data, name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], outputs: int | Sequence[str] = 1, **attrs) -> str | list[str]:
        """Append a node; returns its output name (or names when more than one)."""
        if isinstance(outputs, int):
            names = [self.fresh(op_type.lower()) for _ in range(outputs)]
        else:
            names = list(outputs)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.fresh(op_type), **attrs))
        return names[0] if len(names) == 1 else names

    # -- random parameters -------------------------------------------------------------------------
    def he(self, shape: Sequence[int], fan_in: int, prefix: str = "w") -> str:
        """He-normal weights: keep the second moment of activations through ReLU layers."""
        return self.const(self.rng.normal(0.0, np.sqrt(2.0 / fan_in), shape), prefix)

    def uniform(self, shape: Sequence[int], low: float, high: float, prefix: str) -> str:
        return self.const(self.rng.uniform(low, high, shape), prefix)

    def normal(self, shape: Sequence[int], std: float, prefix: str, mean: float = 0.0) -> str:
        return self.const(self.rng.normal(mean, std, shape), prefix)

    # -- layers ------------------------------------------------------------------------------------
    def conv(self, x: str, cin: int, cout: int, kernel: int, stride: int = 1, pad: int | None = None,
             group: int = 1, bias: bool = True) -> str:
        """A square convolution with He-initialised weights; attributes at their defaults are omitted."""
        pad = kernel // 2 if pad is None else pad
        fan_in = cin // group * kernel * kernel
        inputs = [x, self.he([cout, cin // group, kernel, kernel], fan_in, "conv_w")]
        if bias:
            inputs.append(self.normal([cout], 0.05, "conv_b"))
        return self.op("Conv", inputs, kernel_shape=[kernel, kernel],
                       strides=[stride, stride] if stride != 1 else None,
                       pads=[pad] * 4 if pad else None, group=group if group != 1 else None)

    def batch_norm(self, x: str, channels: int, gamma: tuple[float, float] = (0.5, 1.0), **attrs) -> str:
        """Inference batch norm with plausible trained statistics (variance near one, small means)."""
        inputs = [x, self.uniform([channels], *gamma, "bn_scale"), self.normal([channels], 0.1, "bn_bias"),
                  self.normal([channels], 0.1, "bn_mean"), self.uniform([channels], 0.5, 1.5, "bn_var")]
        return self.op("BatchNormalization", inputs, epsilon=1e-5, **attrs)

    def gemm(self, x: str, fan_in: int, fan_out: int, trans_b: bool = True, **attrs) -> str:
        shape = [fan_out, fan_in] if trans_b else [fan_in, fan_out]
        inputs = [x, self.he(shape, fan_in, "fc_w"), self.normal([fan_out], 0.05, "fc_b")]
        return self.op("Gemm", inputs, transB=1 if trans_b else None, **attrs)

    def pool(self, op_type: str, x: str, kernel: int, stride: int = 1, pad: int = 0, **attrs) -> str:
        return self.op(op_type, [x], kernel_shape=[kernel, kernel], strides=[stride, stride] if stride != 1 else None,
                       pads=[pad] * 4 if pad else None, **attrs)

    # -- the model ---------------------------------------------------------------------------------
    def model(self, outputs: Sequence[str], *, old_style: bool = False, check: bool = True) -> onnx.ModelProto:
        """The model with `outputs` as graph outputs (shapes left for the consumer to infer).

        `old_style` writes the model as exporters of opsets 7–9 did: an old IR version and every
        initializer repeated in graph.input.
        """
        inputs = list(self.inputs)
        if old_style:
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.initializers]
        graph = helper.make_graph(self.nodes, self.name, inputs, [onnx.ValueInfoProto(name=n) for n in outputs],
                                  self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  producer_name="lowbit-tests")
        _set_output_types(model)
        if old_style:
            model.ir_version = _OLD_IR_VERSION.get(self.opset, model.ir_version)
        else:
            model.ir_version = min(model.ir_version, 8)  # what onnxruntime and exporters of opset 17 use
        if check:
            onnx.checker.check_model(model, full_check=True)
        return model


def _set_output_types(model: onnx.ModelProto) -> None:
    """Give the graph outputs the types and shapes ONNX's shape inference finds for them."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    known = {info.name: info for info in list(inferred.value_info) + list(inferred.output)}
    for output in model.graph.output:
        if output.name in known and known[output.name].type.HasField("tensor_type"):
            output.type.CopyFrom(known[output.name].type)
