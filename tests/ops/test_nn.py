"""The nn op family: ONNX conv / pool / Gemm / normalisation / softmax models against ONNX Runtime."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.errors import ModelFormatError, ShapeError, UnsupportedOpError
from lowbit.ir import DType, Graph, TensorType

ort = pytest.importorskip("onnxruntime")

RNG = np.random.default_rng(0)
_ONNX_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE,
               np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(np.int32): TensorProto.INT32, np.dtype(np.int8): TensorProto.INT8}


def rand(*shape: int, dtype=np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def model(nodes: list[onnx.NodeProto], inputs: dict[str, np.ndarray], outputs: list[str],
          constants: dict[str, np.ndarray] | None = None, opset: int = 13) -> onnx.ModelProto:
    """A model whose graph inputs have the feeds' shapes and whose `constants` are initializers."""
    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info(name, _ONNX_TYPES[a.dtype], a.shape) for name, a in inputs.items()],
        [helper.make_empty_tensor_value_info(name) for name in outputs],
        [numpy_helper.from_array(a, name) for name, a in (constants or {}).items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 7 if opset < 15 else 8
    return proto


def compare(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], rtol: float = 1e-4, atol: float = 1e-5) -> None:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    expected = dict(zip(names, session.run(names, feeds)))
    got = lowbit.run_reference(lowbit.import_onnx(proto), feeds)
    for name in names:
        assert got[name].shape == expected[name].shape, name
        assert got[name].dtype == expected[name].dtype, name
        np.testing.assert_allclose(got[name], expected[name], rtol=rtol, atol=atol, err_msg=name)


def check_op(op_type: str, inputs: dict[str, np.ndarray], constants: dict[str, np.ndarray] | None = None,
             opset: int = 13, outputs: tuple[str, ...] = ("y",), rtol: float = 1e-4, **attrs) -> None:
    """One ONNX node fed by `inputs` (graph inputs) and `constants` (initializers), in operand order."""
    constants = constants or {}
    node = helper.make_node(op_type, list(inputs) + list(constants), list(outputs), **attrs)
    compare(model([node], inputs, [o for o in outputs if o], constants, opset), inputs, rtol=rtol)


def import_error(op_type: str, inputs: dict[str, np.ndarray], constants: dict[str, np.ndarray] | None = None,
                 opset: int = 13, outputs: tuple[str, ...] = ("y",), **attrs) -> Exception:
    node = helper.make_node(op_type, list(inputs) + list(constants or {}), list(outputs), **attrs)
    with pytest.raises((UnsupportedOpError, ShapeError, ModelFormatError)) as info:
        lowbit.import_onnx(model([node], inputs, [o for o in outputs if o], constants, opset))
    return info.value


# --- Conv --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opset", [7, 11, 22])
@pytest.mark.parametrize("attrs", [
    {},
    {"strides": [2, 2], "pads": [1, 1, 1, 1]},
    {"strides": [2, 1], "pads": [0, 2, 1, 0], "dilations": [2, 1]},
    {"kernel_shape": [3, 3], "dilations": [2, 2], "pads": [2, 2, 2, 2]},
])
def test_conv2d(opset, attrs):
    check_op("Conv", {"x": rand(2, 4, 9, 8)}, {"w": rand(6, 4, 3, 3), "b": rand(6)}, opset, **attrs)


@pytest.mark.parametrize("group, channels, out", [(2, 4, 6), (4, 4, 4), (8, 8, 16)])
def test_grouped_and_depthwise_conv(group, channels, out):
    check_op("Conv", {"x": rand(1, channels, 7, 7)}, {"w": rand(out, channels // group, 3, 3)},
             group=group, pads=[1, 1, 1, 1], strides=[2, 2])


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID", "NOTSET"])
@pytest.mark.parametrize("strides", [[1, 1], [2, 3]])
def test_conv_auto_pad(auto_pad, strides):
    check_op("Conv", {"x": rand(1, 2, 8, 7)}, {"w": rand(3, 2, 4, 3)}, auto_pad=auto_pad, strides=strides)


def test_conv_weight_computed_at_run_time():
    check_op("Conv", {"x": rand(1, 2, 5, 5), "w": rand(3, 2, 3, 3)}, pads=[1, 1, 1, 1])


@pytest.mark.parametrize("attrs", [{}, {"strides": [2], "pads": [1, 2]}, {"auto_pad": "SAME_UPPER", "strides": [2]},
                                   {"group": 2}])
def test_conv1d(attrs):
    check_op("Conv", {"x": rand(2, 4, 11)}, {"w": rand(6, 4 // attrs.get("group", 1), 3), "b": rand(6)}, **attrs)


def test_conv_float64_matches_float32_onnxruntime():
    x, w = rand(1, 2, 6, 6), rand(3, 2, 3, 3)
    node = helper.make_node("Conv", ["x", "w"], ["y"])
    got = lowbit.run_reference(lowbit.import_onnx(model([node], {"x": x.astype(np.float64)}, ["y"],
                                                        {"w": w.astype(np.float64)})), {"x": x.astype(np.float64)})
    session = ort.InferenceSession(model([node], {"x": x}, ["y"], {"w": w}).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    assert got["y"].dtype == np.float64
    np.testing.assert_allclose(got["y"], session.run(None, {"x": x})[0], rtol=1e-4, atol=1e-5)


def half(*shape: int) -> np.ndarray:
    return rand(*shape).astype(np.float16)


@pytest.mark.parametrize("op_type, inputs, constants, attrs", [
    ("Conv", {"x": half(1, 4, 6, 6)}, {"w": half(3, 4, 3, 3), "b": half(3)}, {"pads": [1, 1, 1, 1]}),
    ("ConvTranspose", {"x": half(1, 4, 3, 3)}, {"w": half(4, 2, 3, 3)}, {"strides": [2, 2]}),
    ("MaxPool", {"x": half(1, 4, 6, 6)}, {}, {"kernel_shape": [2, 2]}),
    ("AveragePool", {"x": half(1, 4, 6, 6)}, {}, {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
    ("Gemm", {"a": half(3, 7)}, {"b": half(2, 7), "c": half(2)}, {"transB": 1}),
    ("MatMul", {"a": half(2, 3, 7)}, {"b": half(7, 2)}, {}),
    ("Softmax", {"x": half(3, 7)}, {}, {}),
    ("LayerNormalization", {"x": half(3, 7)}, {"scale": half(7)}, {}),
])
def test_float16_widens_and_rounds_once(op_type, inputs, constants, attrs):
    check_op(op_type, inputs, constants, opset=17, rtol=2e-3, **attrs)


def test_batch_norm_opset15_parameters_of_another_type():
    x, params = half(1, 3, 2, 2), bn_params(3)
    node = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"])
    got = lowbit.run_reference(lowbit.import_onnx(model([node], {"x": x}, ["y"], params, opset=15)), {"x": x})["y"]
    view = {k: v.reshape(1, 3, 1, 1) for k, v in params.items()}
    want = (x - view["mean"]) / np.sqrt(view["var"] + 1e-5) * view["scale"] + view["bias"]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


def test_conv3d_is_unsupported():
    error = import_error("Conv", {"x": rand(1, 2, 4, 4, 4)}, {"w": rand(3, 2, 1, 1, 1)})
    assert isinstance(error, UnsupportedOpError) and "3-D Conv" in str(error)


def test_conv_channel_mismatch_says_so():
    error = import_error("Conv", {"x": rand(1, 3, 5, 5)}, {"w": rand(4, 2, 3, 3)})
    assert isinstance(error, ShapeError) and "input channels 3" in str(error) and "conv2d" in str(error)


def test_conv_kernel_larger_than_input():
    error = import_error("Conv", {"x": rand(1, 2, 2, 5)}, {"w": rand(4, 2, 3, 3)})
    assert isinstance(error, ShapeError) and "window spans 3 along H" in str(error)


def test_conv_bad_auto_pad_and_kernel_shape():
    assert "auto_pad='SAME'" in str(import_error("Conv", {"x": rand(1, 2, 5, 5)}, {"w": rand(4, 2, 3, 3)},
                                                 auto_pad="SAME"))
    assert "kernel_shape [2, 2]" in str(import_error("Conv", {"x": rand(1, 2, 5, 5)}, {"w": rand(4, 2, 3, 3)},
                                                     kernel_shape=[2, 2]))


# --- ConvTranspose -----------------------------------------------------------------------------------

@pytest.mark.parametrize("attrs", [
    {},
    {"strides": [2, 2]},
    {"strides": [2, 3], "pads": [1, 0, 2, 1], "output_padding": [1, 2]},
    {"strides": [2, 2], "dilations": [2, 1], "pads": [3, 1, 3, 1]},
    {"strides": [2, 2], "output_shape": [10, 9]},
    {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
    {"strides": [2, 2], "auto_pad": "SAME_LOWER"},
    {"strides": [3, 2], "auto_pad": "SAME_UPPER", "output_shape": [13, 8]},
    {"auto_pad": "VALID", "strides": [2, 2]},
])
def test_conv_transpose2d(attrs):
    check_op("ConvTranspose", {"x": rand(2, 4, 5, 4)}, {"w": rand(4, 3, 3, 3), "b": rand(3)}, **attrs)


def test_conv_transpose_output_shape_too_large():
    error = import_error("ConvTranspose", {"x": rand(1, 4, 5, 4)}, {"w": rand(4, 3, 3, 3)}, strides=[2, 2],
                         output_shape=[12, 12])
    assert isinstance(error, ModelFormatError) and "output_shape [12, 12] exceeds" in str(error)


def test_grouped_conv_transpose():
    check_op("ConvTranspose", {"x": rand(1, 4, 5, 5)}, {"w": rand(4, 3, 2, 3), "b": rand(6)}, group=2,
             strides=[2, 2], pads=[0, 1, 1, 0])


def test_conv_transpose1d():
    check_op("ConvTranspose", {"x": rand(1, 4, 7)}, {"w": rand(4, 2, 3)}, strides=[2], output_padding=[1])


# --- MatMul and Gemm ---------------------------------------------------------------------------------

@pytest.mark.parametrize("a, b", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((4,), (4, 5)), ((2, 3, 4), (4,)),
                                  ((4,), (4,)), ((2, 1, 3, 4), (5, 4, 6)), ((3, 4), (2, 4, 2))])
def test_matmul(a, b):
    check_op("MatMul", {"a": rand(*a), "b": rand(*b)})


def test_matmul_int32_and_constant_operand():
    check_op("MatMul", {"a": RNG.integers(-9, 9, (3, 4)).astype(np.int32)},
             {"b": RNG.integers(-9, 9, (4, 2)).astype(np.int32)})


def test_matmul_inner_mismatch():
    error = import_error("MatMul", {"a": rand(2, 3), "b": rand(4, 5)})
    assert isinstance(error, ShapeError) and "inner dimensions" in str(error) and "[2, 3] @ [4, 5]" in str(error)


@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5), (1,), (), (3, 5), (3, 1)])
@pytest.mark.parametrize("trans_a, trans_b", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_gemm_constant_weight(c_shape, trans_a, trans_b):
    constants = {"b": rand(*((5, 4) if trans_b else (4, 5)))}
    if c_shape is not None:
        constants["c"] = rand(*c_shape)
    check_op("Gemm", {"a": rand(*((4, 3) if trans_a else (3, 4)))}, constants, opset=11,
             alpha=0.5, beta=2.0, transA=trans_a, transB=trans_b)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_run_time_weight_and_bias(trans_b):
    check_op("Gemm", {"a": rand(3, 4), "b": rand(*((5, 4) if trans_b else (4, 5))), "c": rand(3, 1)}, opset=7,
             alpha=1.5, beta=0.25, transB=trans_b)


def test_gemm_becomes_linear_with_folded_weight():
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], transB=1, alpha=2.0)
    graph = lowbit.import_onnx(model([node], {"a": rand(2, 4)}, ["y"], {"b": rand(3, 4), "c": rand(3)}, opset=9))
    assert [n.op for n in graph.nodes] == ["linear"]


def test_gemm7_legacy_broadcast_attribute_is_accepted():
    a, b, c = rand(2, 4), rand(4, 3), rand(3)
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], broadcast=1)
    graph = lowbit.import_onnx(model([node], {"a": a}, ["y"], {"b": b, "c": c}, opset=7))
    np.testing.assert_allclose(lowbit.run_reference(graph, {"a": a})["y"], a @ b + c, rtol=1e-5, atol=1e-6)


def test_linear_shape_errors():
    graph = Graph()
    x = graph.add_input("x", TensorType((2, 4), DType.f32))
    with pytest.raises(ShapeError, match=r"input of shape \[2, 4\] does not fit weight \[3, 5\]"):
        graph.add("linear", x, graph.add_constant(rand(3, 5)))
    with pytest.raises(ShapeError, match=r"bias must have shape \[3\]"):
        graph.add("linear", x, graph.add_constant(rand(3, 4)), graph.add_constant(rand(4)))


# --- pooling -----------------------------------------------------------------------------------------

POOL_CASES = [
    ({"kernel_shape": [2, 2]}, 7),  # no strides attribute: stride 1
    ({"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, 7),
    ({"kernel_shape": [3, 2], "strides": [2, 2], "ceil_mode": 1}, 10),
    ({"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 1, 1], "ceil_mode": 1}, 11),
    ({"kernel_shape": [2, 2], "strides": [3, 3], "pads": [1, 1, 1, 1], "ceil_mode": 1}, 11),
    ({"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}, 11),
    ({"kernel_shape": [2, 3], "strides": [2, 2], "auto_pad": "SAME_LOWER"}, 11),
    ({"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "VALID"}, 11),
]


@pytest.mark.parametrize("attrs, opset", POOL_CASES)
def test_max_pool(attrs, opset):
    check_op("MaxPool", {"x": rand(2, 3, 9, 8)}, opset=opset, **attrs)


@pytest.mark.parametrize("attrs, opset", POOL_CASES)
@pytest.mark.parametrize("count_include_pad", [0, 1])
def test_avg_pool(attrs, opset, count_include_pad):
    check_op("AveragePool", {"x": rand(2, 3, 9, 8)}, opset=opset, count_include_pad=count_include_pad, **attrs)


def test_dilated_pools():
    check_op("MaxPool", {"x": rand(1, 2, 9, 9)}, opset=12, kernel_shape=[2, 3], dilations=[2, 2], pads=[1, 1, 1, 1])
    check_op("AveragePool", {"x": rand(1, 2, 9, 9)}, opset=19, kernel_shape=[2, 2], dilations=[2, 1],
             strides=[2, 2])


def test_int8_max_pool():
    check_op("MaxPool", {"x": RNG.integers(-128, 127, (1, 2, 5, 5)).astype(np.int8)}, opset=12,
             kernel_shape=[2, 2], pads=[1, 1, 0, 0])


@pytest.mark.parametrize("op_type", ["MaxPool", "AveragePool"])
def test_pool1d(op_type):
    check_op(op_type, {"x": rand(2, 3, 10)}, kernel_shape=[3], strides=[2], pads=[1, 1])


def test_max_pool_indices_are_unsupported():
    error = import_error("MaxPool", {"x": rand(1, 1, 4, 4)}, opset=12, outputs=("y", "indices"), kernel_shape=[2, 2])
    assert isinstance(error, UnsupportedOpError) and "Indices" in str(error)


def test_pool_window_larger_than_input():
    error = import_error("MaxPool", {"x": rand(1, 1, 4, 4)}, kernel_shape=[2, 6])
    assert isinstance(error, ShapeError) and "window spans 6 along W" in str(error)


@pytest.mark.parametrize("op_type", ["GlobalAveragePool", "GlobalMaxPool"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (2, 3, 7)])
def test_global_pools(op_type, shape):
    check_op(op_type, {"x": rand(*shape)})


# --- normalisation -----------------------------------------------------------------------------------

def bn_params(channels: int) -> dict[str, np.ndarray]:
    return {"scale": rand(channels), "bias": rand(channels), "mean": rand(channels),
            "var": RNG.uniform(0.5, 2, channels).astype(np.float32)}


@pytest.mark.parametrize("opset, attrs", [(7, {"spatial": 1, "epsilon": 1e-3}), (9, {}), (14, {"momentum": 0.8}),
                                          (15, {"training_mode": 0})])
def test_batch_norm(opset, attrs):
    check_op("BatchNormalization", {"x": rand(2, 3, 4, 5)}, bn_params(3), opset=opset, **attrs)


def test_batch_norm_2d_input():
    check_op("BatchNormalization", {"x": rand(4, 3)}, bn_params(3), opset=9)


def test_batch_norm_legacy_attributes_are_accepted():
    x, params = rand(1, 3, 2, 2), bn_params(3)
    node = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], spatial=1,
                            consumed_inputs=[0, 0, 0, 1, 1], is_test=1)
    got = lowbit.run_reference(lowbit.import_onnx(model([node], {"x": x}, ["y"], params, opset=7)), {"x": x})["y"]
    view = {k: v.reshape(1, 3, 1, 1) for k, v in params.items()}
    want = (x - view["mean"]) / np.sqrt(view["var"] + 1e-5) * view["scale"] + view["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opset, attrs, outputs, message", [
    (15, {"training_mode": 1}, ("y",), "training_mode=1"),
    (9, {}, ("y", "mean_out", "var_out"), "training"),
    (7, {"spatial": 0}, ("y",), "spatial=0"),
])
def test_batch_norm_training_forms_are_unsupported(opset, attrs, outputs, message):
    error = import_error("BatchNormalization", {"x": rand(1, 3, 2, 2)}, bn_params(3), opset=opset,
                         outputs=outputs, **attrs)
    assert isinstance(error, UnsupportedOpError) and message in str(error)


def test_batch_norm_parameter_shape_error():
    params = bn_params(3)
    params["var"] = np.ones(4, np.float32)
    error = import_error("BatchNormalization", {"x": rand(1, 3, 2, 2)}, params)
    assert isinstance(error, ShapeError) and "var must have shape [3]" in str(error)


def test_instance_norm():
    check_op("InstanceNormalization", {"x": rand(2, 3, 5, 4)}, {"scale": rand(3), "bias": rand(3)}, epsilon=1e-3)


@pytest.mark.parametrize("axis, with_bias", [(-1, True), (1, True), (2, False)])
def test_layer_norm(axis, with_bias):
    shape = (2, 3, 4, 5)
    constants = {"scale": rand(*shape[axis:])}
    if with_bias:
        constants["bias"] = rand(*shape[axis:])
    check_op("LayerNormalization", {"x": rand(*shape) * 3 + 1}, constants, opset=17, axis=axis, epsilon=1e-4)


def test_layer_norm_extra_outputs_are_unsupported():
    error = import_error("LayerNormalization", {"x": rand(2, 4)}, {"scale": rand(4)}, opset=17,
                         outputs=("y", "mean"))
    assert isinstance(error, UnsupportedOpError) and "Mean/InvStdDev" in str(error)


def test_layer_norm_scale_shape_error():
    error = import_error("LayerNormalization", {"x": rand(2, 4)}, {"scale": rand(3)}, opset=17)
    assert isinstance(error, ShapeError) and "scale of shape [3]" in str(error)


@pytest.mark.parametrize("size", [1, 3, 5])
def test_lrn(size):
    check_op("LRN", {"x": rand(2, 7, 3, 3)}, size=size, alpha=0.001, beta=0.75, bias=2.0)


def test_lrn_even_size_follows_onnx_window():
    """ONNX Runtime only takes odd sizes; ONNX sums channels [c - (size-1)//2, c + ceil((size-1)/2)]."""
    x = rand(1, 6, 2, 2)
    node = helper.make_node("LRN", ["x"], ["y"], size=4, alpha=0.01, beta=0.5, bias=1.5)
    got = lowbit.run_reference(lowbit.import_onnx(model([node], {"x": x}, ["y"])), {"x": x})["y"]
    sums = np.stack([np.square(x[:, max(0, c - 1):c + 3]).sum(axis=1) for c in range(6)], axis=1)
    np.testing.assert_allclose(got, x / (1.5 + 0.01 / 4 * sums) ** 0.5, rtol=1e-5, atol=1e-6)


def test_lrn_defaults_and_old_opset():
    check_op("LRN", {"x": rand(1, 5, 2, 2)}, opset=7, size=5)


# --- softmax -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("op_type", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("opset, shape, attrs", [
    (7, (3, 10), {}),
    (11, (2, 3, 4, 5), {}),  # flattened to [2, 60]
    (11, (2, 3, 4, 5), {"axis": 2}),
    (11, (2, 10, 1, 1), {}),  # SqueezeNet's output: one non-unit trailing axis
    (11, (2, 3, 4), {"axis": -1}),
    (13, (2, 3, 4, 5), {"axis": 1}),
    (13, (2, 3, 4), {}),
])
def test_softmax(op_type, opset, shape, attrs):
    check_op(op_type, {"x": rand(*shape) * 10}, opset=opset, **attrs)


def test_softmax_is_stable_for_large_inputs():
    check_op("Softmax", {"x": np.array([[1000.0, 1001.0, 999.0]], np.float32)})


def test_softmax_axis_error():
    error = import_error("Softmax", {"x": rand(2, 3)}, axis=2)
    assert isinstance(error, ShapeError) and "axis 2 is out of range" in str(error)


# --- the model zoo's CNN families -------------------------------------------------------------------
# onnx ships them at opset 9 with every weight a constant 0.02, so activations grow to 1e30 and the final
# softmax is flat: every output of an nn-family node is compared instead, relative to its largest value.

ZOO = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
# The three with 100M-parameter classifiers take seconds each and run with the slow suite.
ZOO_MODELS = ["squeezenet", "resnet50", "shufflenet", "inception_v1", "inception_v2", "densenet121",
              *(pytest.param(name, marks=pytest.mark.slow) for name in ("bvlc_alexnet", "zfnet512", "vgg19"))]
NN_ONNX_OPS = {"Conv", "BatchNormalization", "MaxPool", "AveragePool", "GlobalAveragePool", "Gemm", "LRN",
               "Softmax"}


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_model_zoo_light_models(name):
    path = ZOO / f"light_{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} is not shipped with this onnx version")
    proto = onnx.load(str(path))
    probes = [n.output[0] for n in proto.graph.node if n.op_type in NN_ONNX_OPS]
    proto.graph.output.extend(helper.make_empty_tensor_value_info(o) for o in probes
                              if o not in {v.name for v in proto.graph.output})
    graph = lowbit.import_onnx(proto)
    feeds = {v.name: rand(*v.type.shape) for v in graph.inputs}
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = lowbit.run_reference(graph, feeds)
    for probe, expected in zip(probes, session.run(probes, feeds)):
        finite = np.isfinite(expected)
        scale = np.abs(expected[finite]).max(initial=0.0)
        error = np.abs(got[probe][finite] - expected[finite]).max(initial=0.0)
        assert error <= 1e-4 * scale + 1e-5, f"{probe}: error {error} against values up to {scale}"


def resnet18() -> onnx.ModelProto:
    """ResNet-18 (torchvision layout, batch norm folded into conv biases) with random weights, opset 13."""
    nodes, constants = [], {}

    def conv(x: str, name: str, cin: int, cout: int, k: int, stride: int, relu: bool = True) -> str:
        scale = np.sqrt(2 / (cin * k * k))  # He initialisation keeps activations of order 1
        constants[f"{name}.w"] = (RNG.standard_normal((cout, cin, k, k)) * scale).astype(np.float32)
        constants[f"{name}.b"] = (RNG.standard_normal(cout) * 0.1).astype(np.float32)
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], strides=[stride] * 2,
                                      pads=[k // 2] * 4))
        if relu:
            nodes.append(helper.make_node("Relu", [name], [f"{name}.relu"]))
            return f"{name}.relu"
        return name

    x = conv("input", "stem", 3, 64, 7, 2)
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x, cin = "pool", 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage and not block else 1
            name = f"s{stage}b{block}"
            y = conv(conv(x, f"{name}.c1", cin, cout, 3, stride), f"{name}.c2", cout, cout, 3, 1, relu=False)
            shortcut = conv(x, f"{name}.down", cin, cout, 1, stride, relu=False) if stride != 1 or cin != cout else x
            nodes.append(helper.make_node("Add", [y, shortcut], [f"{name}.sum"]))
            nodes.append(helper.make_node("Relu", [f"{name}.sum"], [f"{name}.out"]))
            x, cin = f"{name}.out", cout
    constants["fc.w"] = (RNG.standard_normal((1000, 512)) * 0.03).astype(np.float32)
    constants["fc.b"] = np.zeros(1000, np.float32)
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], transB=1),
              helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]
    return model(nodes, {"input": np.zeros((1, 3, 224, 224), np.float32)}, ["logits"], constants)


def test_resnet18_matches_onnxruntime_in_seconds():
    proto = resnet18()
    graph = lowbit.import_onnx(proto)
    feeds = {"input": rand(1, 3, 224, 224)}
    start = time.perf_counter()
    got = lowbit.run_reference(graph, feeds)["logits"]
    elapsed = time.perf_counter() - start
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(["logits"], feeds)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
    assert elapsed < 15, f"ResNet-18 took {elapsed:.1f} s in the reference interpreter"


def test_ir_shape_rules_name_the_problem():
    graph = Graph()
    x = graph.add_input("x", TensorType((1, 4, 8, 8), DType.f32))
    w = graph.add_constant(rand(4, 4, 3, 3))
    with pytest.raises(ShapeError, match=r"attribute 'strides' must be 2 ints >= 1, got \[2\]"):
        graph.add("conv2d", x, w, strides=[2])
    with pytest.raises(ShapeError, match=r"pads \[3, 0, 3, 0\] leave no output along H"):
        graph.add("conv_transpose2d", graph.add_input("small", TensorType((1, 4, 1, 4), DType.f32)), w,
                  pads=[3, 0, 3, 0])
    with pytest.raises(ShapeError, match="must be a float tensor"):
        graph.add("avg_pool2d", graph.add_input("ints", TensorType((1, 1, 4, 4), DType.i32)), kernel=[2, 2])
    with pytest.raises(ShapeError, match=r"input x must have rank 4, got shape \[4, 8, 8\]"):
        graph.add("max_pool2d", graph.add_input("rank3", TensorType((4, 8, 8), DType.f32)), kernel=[2, 2])
