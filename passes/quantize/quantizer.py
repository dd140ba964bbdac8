"""Post-training quantization, stage one: decide what runs in integers, calibrate, and insert
quantize/dequantize pairs (simulated quantization, which the reference interpreter runs to predict
accuracy). `realize.py` then turns DQ → op → Q into integer ops.

Which ops run in integers:
- conv2d and linear with a constant weight (and an activation that is a clamp: none, relu, clip;
  other fused activations are split off first and stay float), and matmul of two run-time operands
  (the attention products) — always, unless excluded;
- data movement (reshape, transpose, slice, gather's data, expand, tile, identity) and max pooling,
  when their operand is already quantized: their result shares the operand's parameters;
- add, mul, concat, average pooling, when all their operands are quantized run-time values.
Everything else is a float island with `dequantize` / `quantize` at its borders. In particular the
attention mask is never quantized: the add of the mask meets a float value (the scaled scores).

Wide values (`wide_outputs`, on by default): a value that never enters an integer product gets a
16-bit type while every product operand stays 8-bit. Those are the results of conv2d / linear / matmul
(and add, mul, concat) read only by float ops (a LayerNorm, a softmax, a graph output): the integer
GEMM is unchanged, only its requantization target is wider, so the dequantize that follows loses almost nothing (transformer
residual sums carry outlier channels a hundred times their neighbours). Likewise a value read only as
the fused residual of a linear / conv2d, a term added after the product.

SmoothQuant (`smooth`, see `smooth.py`) first moves activation outliers from LayerNorm outputs into
the weights of the linear layers that read them, before the main calibration.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

from lowbit.errors import LowbitError
from lowbit.ir import DType, Graph, Node, QuantParams, TensorType, Value, constant_value
from lowbit.ir.ops.epilogue import activation_attrs
from lowbit.ir.quant_math import quantize_values
from lowbit.passes.manager import PassManager
from lowbit.passes.quantize.calibration import calibrate
from lowbit.passes.quantize.observers import choose_qparams, quant_limits
from lowbit.passes.quantize.smooth import smooth_layer_norms

HEAVY = ("conv2d", "linear", "matmul")
SHARING = ("reshape", "transpose", "slice", "gather", "expand", "tile", "identity", "max_pool2d")
LIGHT = ("add", "mul", "concat", "avg_pool2d", "global_avg_pool")
CLAMPS = ("none", "relu", "clip")
ACTIVATION_TYPES = {"int8": DType.i8, "uint8": DType.u8, "int16": DType.i16}
WEIGHT_TYPES = {"int8": (DType.i8, 8), "int7": (DType.i8, 7), "int4": (DType.i4, 4), "uint4": (DType.u4, 4)}
MODES = ("static", "dynamic", "weight_only")
# Integer ops that requantize their result, so that it can take any integer type.
REQUANTIZING = HEAVY + ("add", "mul", "concat")
# The graph quantization starts from: folded and fused, but with attention left as its matmuls so
# that the two products can run in integers.
PREPARE = "cleanup,fold-batchnorm,fuse-linear,fuse-layernorm,fuse-gelu,fuse-epilogue,dce"


class QuantizationError(LowbitError):
    """Options that do not fit together, or a graph the quantizer cannot handle."""


@dataclass(frozen=True)
class QuantizeOptions:
    mode: str = "static"
    weights: str = "int8"
    activations: str = "int8"
    per_channel: bool = True
    symmetric_weights: bool = True
    symmetric_activations: bool = False
    method: str = "minmax"
    group_size: int = 32
    exclude: tuple[str, ...] = ()
    wide_outputs: bool = True
    smooth: float | None = 0.5
    observer_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise QuantizationError(f"mode must be one of {MODES}, got '{self.mode}'")
        if self.weights not in WEIGHT_TYPES:
            raise QuantizationError(f"weights must be one of {sorted(WEIGHT_TYPES)}, got '{self.weights}'")
        if self.activations not in ACTIVATION_TYPES:
            raise QuantizationError(f"activations must be one of {sorted(ACTIVATION_TYPES)}, "
                                    f"got '{self.activations}'")
        if WEIGHT_TYPES[self.weights][1] == 4 and self.mode != "weight_only":
            raise QuantizationError("4-bit weights are weight-only (mode='weight_only'): integer ops take "
                                    "8-bit weights")
        if self.smooth is not None and not 0.0 <= self.smooth <= 1.0:
            raise QuantizationError(f"smooth must be None or an alpha in [0, 1], got {self.smooth}")

    @property
    def activation_type(self) -> DType:
        return ACTIVATION_TYPES[self.activations]


def prepare(graph: Graph) -> Graph:
    """A folded, fused copy of `graph` whose fused non-clamp activations are split off again."""
    prepared = graph.copy()
    PassManager(PREPARE).run(prepared)
    for node in prepared.iter_nodes():
        if node.op in ("conv2d", "linear") and node.attrs["activation"] not in CLAMPS:
            attrs = dict(node.attrs, activation="none", activation_params=())
            core = prepared.add_node(node.op, node.inputs, attrs, name=node.name, before=node)
            act = prepared.add_node(node.attrs["activation"], [core.output],
                                    activation_attrs(node.attrs["activation"], node.attrs["activation_params"]),
                                    name=f"{node.name or node.op}.activation", before=node)
            prepared.replace_all_uses_with(node.output, act.output)
            prepared.erase(node)
    return prepared


def _excluded(node: Node, exclude: Iterable[str]) -> bool:
    return node.op in exclude or (node.name is not None and node.name in exclude)


def _constant_product(node: Node) -> bool:
    """A conv2d / linear the integer ops can take: constant weight, a clamp as its activation."""
    return constant_value(node.inputs[1]) is not None and node.attrs["activation"] in CLAMPS


def _quantizable_linear(node: Node, options: QuantizeOptions) -> bool:
    return node.op == "linear" and not _excluded(node, options.exclude) and _constant_product(node)


def plan(graph: Graph, options: QuantizeOptions) -> tuple[list[Node], dict[int, Value]]:
    """The nodes that will run in integers, and for every quantized value the value whose parameters it
    shares (itself when it has its own)."""
    owner: dict[int, Value] = {}
    quantized: list[Node] = []
    for node in graph.nodes:
        if _excluded(node, options.exclude) or any(v is not None and not v.type.dtype.is_float
                                                    for v in node.outputs):
            continue
        runtime = [v for v in node.inputs if v is not None and constant_value(v) is None]
        if node.op in HEAVY:
            if node.op == "matmul" and len(runtime) != 2:
                continue
            if node.op != "matmul" and not _constant_product(node):
                continue
            for value in runtime:
                owner.setdefault(id(value), value)
        elif node.op in SHARING:
            if id(node.inputs[0]) not in owner or any(id(v) not in owner for v in runtime[:1]):
                continue
            quantized.append(node)
            for value in node.outputs:
                owner[id(value)] = owner[id(node.inputs[0])]
            continue
        elif node.op in LIGHT:
            if not runtime or len(runtime) != len([v for v in node.inputs if v is not None]) \
                    or any(id(v) not in owner for v in runtime):
                continue
        else:
            continue
        quantized.append(node)
        for value in node.outputs:
            owner[id(value)] = value
    return quantized, owner


def wide_values(graph: Graph, quantized: list[Node], owner: dict[int, Value]) -> set[int]:
    """The quantized values that never enter an integer product: results of requantizing integer ops
    read only by float ops or as graph outputs, and values read only as a fused residual (operand 3)."""
    integer = {id(node) for node in quantized}
    wide = set()
    for value in {id(v): v for v in owner.values()}.values():
        uses = value.uses
        if value.producer is not None and value.producer.op in REQUANTIZING and id(value.producer) in integer \
                and all(id(user) not in integer for user, _ in uses):
            wide.add(id(value))
        elif uses and not graph.is_output(value) and all(
                user.op in ("conv2d", "linear") and index == 3 and id(user) in integer for user, index in uses):
            wide.add(id(value))
    return wide


def activation_params(ranges: Mapping[Value, tuple], owners: Iterable[Value],
                      options: QuantizeOptions, wide: set[int] = frozenset()) -> dict[int, QuantParams]:
    params = {}
    for value in owners:
        dtype = DType.i16 if id(value) in wide else options.activation_type
        low, high = ranges[value]
        scale, zero_point = choose_qparams(low, high, dtype=dtype, symmetric=options.symmetric_activations)
        params[id(value)] = QuantParams((float(scale),), (int(zero_point),), bits=dtype.bits,
                                        signed=dtype.is_signed)
    return params


def quantize_weight(data: np.ndarray, options: QuantizeOptions, axis: int = 0,
                    group_axis: int | None = None) -> tuple[np.ndarray, TensorType]:
    """Integer weights and their type: symmetric (or asymmetric) per output channel or per tensor,
    or per group along `group_axis` for 4-bit weight-only quantization."""
    dtype, bits = WEIGHT_TYPES[options.weights]
    qmin, qmax = quant_limits(dtype, bits)
    wide = data.astype(np.float64)
    if bits == 4 and group_axis is not None and data.shape[group_axis] % options.group_size == 0:
        blocks = np.moveaxis(wide, group_axis, -1).reshape(*np.moveaxis(wide, group_axis, -1).shape[:-1], -1,
                                                         options.group_size)
        low, high = blocks.min(axis=-1), blocks.max(axis=-1)
        low, high = np.moveaxis(low, -1, group_axis), np.moveaxis(high, -1, group_axis)
        quant_axis, group = group_axis, options.group_size
    elif options.per_channel and data.ndim > 1:
        reduce = tuple(i for i in range(data.ndim) if i != axis)
        low, high = wide.min(axis=reduce), wide.max(axis=reduce)
        quant_axis, group = axis, None
    else:
        low, high = np.asarray(wide.min()), np.asarray(wide.max())
        quant_axis, group = None, None
    scale, zero_point = choose_qparams(low, high, dtype=dtype, symmetric=options.symmetric_weights, bits=bits)
    params = QuantParams(tuple(scale.reshape(-1)), tuple(zero_point.reshape(-1)), quant_axis, group, bits,
                         dtype.is_signed)
    values = quantize_values(data, params.scale_array(data.shape), params.zero_point_array(data.shape), qmin, qmax)
    return values.astype(dtype.numpy), TensorType(data.shape, dtype, params)


def _fake_quantize(graph: Graph, value: Value, params: QuantParams, anchor: Node | None) -> Value:
    """Insert quantize → dequantize after `value` and route every other use through the dequantize."""
    dtype = DType.i8 if params.signed and params.bits <= 8 else (
        DType.u8 if params.bits <= 8 else (DType.i16 if params.signed else DType.u16))
    attrs = {"dtype": dtype, "scale": params.scale, "zero_point": params.zero_point, "bits": params.bits}
    name = (value.producer.name if value.producer else value.name) or "q"
    if anchor is None:
        quantize = graph.make_node("quantize", [value], attrs, name=f"{name}.quantize")
        dequantize = graph.make_node("dequantize", [quantize.output], name=f"{name}.dequantize")
        first = graph.nodes[0] if graph.nodes else None
        for node in (quantize, dequantize):
            if first is None:
                node.graph = graph
                graph.nodes.append(node)
            else:
                graph.insert_before(first, node)
    else:
        quantize = graph.add_node("quantize", [value], attrs, name=f"{name}.quantize", after=anchor)
        dequantize = graph.add_node("dequantize", [quantize.output], name=f"{name}.dequantize", after=quantize)
    for node, index in list(value.uses):
        if node is not quantize:
            node.set_input(index, dequantize.output)
    graph.outputs = [dequantize.output if v is value else v for v in graph.outputs]
    return dequantize.output


def _weight_axes(node: Node) -> tuple[int, int | None]:
    """Output-channel axis of the weight operand, and the reduction axis (for per-group scales)."""
    return 0, (1 if node.op == "linear" else None)


def simulate(graph: Graph, quantized: list[Node], owner: dict[int, Value], params: dict[int, QuantParams],
             options: QuantizeOptions) -> None:
    """Insert the quantize/dequantize pairs (in place): on every quantized run-time value, and on the
    weights and biases of conv2d and linear."""
    done: set[int] = set()
    values = [v for v in graph.inputs] + [v for node in graph.nodes for v in node.outputs]
    for value in values:
        if id(value) in owner and id(value) not in done:
            done.add(id(value))
            _fake_quantize(graph, value, params[id(owner[id(value)])], value.producer)
    for node in quantized:
        if node.op not in ("conv2d", "linear"):
            continue
        _quantize_weight_and_bias(graph, node, options)


def _quantize_weight_and_bias(graph: Graph, node: Node, options: QuantizeOptions) -> None:
    axis, group_axis = _weight_axes(node)
    data, weight_type = quantize_weight(constant_value(node.inputs[1]), options, axis, group_axis)
    weight = graph.add_constant(data, f"{node.name or node.op}.weight_q", weight_type)
    node.set_input(1, graph.add_node("dequantize", [weight], name=f"{node.name or node.op}.weight",
                                     before=node).output)
    bias = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if bias is None or options.mode != "static":
        return
    x_params = node.inputs[0].producer.inputs[0].type.quant  # the dequantize's operand: the quantized x
    w_params = weight_type.quant
    scale = (np.float32(x_params.scale[0]) * np.asarray(w_params.scale, np.float32)).astype(np.float32)
    if scale.size == 1:
        scale = np.broadcast_to(scale, bias.shape)
    bias_params = QuantParams(tuple(scale), (0,) * bias.size, 0, None, 32, True)
    info = np.iinfo(np.int32)
    values = quantize_values(bias, scale, np.zeros(bias.shape, np.int64), info.min, info.max).astype(np.int32)
    bias_q = graph.add_constant(values, f"{node.name or node.op}.bias_q", TensorType(bias.shape, DType.i32,
                                                                                    bias_params))
    node.set_input(2, graph.add_node("dequantize", [bias_q], name=f"{node.name or node.op}.bias",
                                     before=node).output)


def quantize_weights_only(graph: Graph, options: QuantizeOptions) -> None:
    for node in list(graph.nodes):
        if node.op in ("conv2d", "linear") and constant_value(node.inputs[1]) is not None \
                and not _excluded(node, options.exclude):
            _quantize_weight_and_bias(graph, node, options)


def quantize_dynamic(graph: Graph, options: QuantizeOptions) -> None:
    """linear with constant weights → dynamic_linear (its fused residual and activation split off as float
    ops); matmul of two run-time operands → dynamic_matmul. Activation ranges are found at run time."""
    for node in list(graph.nodes):
        if _excluded(node, options.exclude):
            continue
        if node.op == "linear" and constant_value(node.inputs[1]) is not None:
            name = node.name or node.op
            data, weight_type = quantize_weight(constant_value(node.inputs[1]), options)
            weight = graph.add_constant(data, f"{name}.weight_q", weight_type)
            operands = [node.inputs[0], weight] + ([node.inputs[2]] if len(node.inputs) > 2 else [])
            result = graph.add_node("dynamic_linear", operands, name=name, before=node).output
            if len(node.inputs) > 3 and node.inputs[3] is not None:
                result = graph.add_node("add", [result, node.inputs[3]], name=f"{name}.residual", before=node).output
            if node.attrs["activation"] != "none":
                result = graph.add_node(node.attrs["activation"], [result],
                                        activation_attrs(node.attrs["activation"], node.attrs["activation_params"]),
                                        name=f"{name}.activation", before=node).output
        elif node.op == "matmul" and all(constant_value(v) is None for v in node.inputs) \
                and min(v.type.rank for v in node.inputs) >= 2:
            result = graph.add_node("dynamic_matmul", node.inputs, name=node.name, before=node).output
        else:
            continue
        graph.replace_all_uses_with(node.outputs[0], result)
        graph.erase(node)


def simulated_quantization(graph: Graph, calibration, options: QuantizeOptions, *,
                           progress: bool = True) -> Graph:
    """The prepared graph with quantize/dequantize pairs inserted (stage one)."""
    prepared = prepare(graph)
    if options.mode in ("weight_only", "dynamic"):
        (quantize_weights_only if options.mode == "weight_only" else quantize_dynamic)(prepared, options)
        prepared.eliminate_dead_code()
        return prepared
    if calibration is None:
        raise QuantizationError("static quantization needs calibration data")
    if options.smooth is not None:
        smooth_layer_norms(prepared, calibration, options.smooth, lambda node: _quantizable_linear(node, options),
                           progress=progress)
    quantized, owner = plan(prepared, options)
    owners = {id(v): v for v in owner.values()}.values()
    ranges = calibrate(prepared, calibration, list(owners), method=options.method, progress=progress,
                       **options.observer_options)
    wide = wide_values(prepared, quantized, owner) if options.wide_outputs else set()
    params = activation_params(ranges, owners, options, wide)
    simulate(prepared, quantized, owner, params, options)
    prepared.eliminate_dead_code()
    return prepared
