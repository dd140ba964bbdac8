"""Errors a user can cause: each raises its specific lowbit error, and the message names the problem."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.errors import (InputError, LowbitError, ModelFormatError, ParseError, ShapeError, UnsupportedOpError,
                           VerificationError)
from lowbit.frontends.onnx.registry import CONVERTERS
from lowbit.ir import DType, Graph, TensorType, parse, verify

DIGITS = Path(__file__).resolve().parent / "data" / "digits_cnn.onnx"
F32x4 = TensorType((1, 4), DType.f32)


def onnx_model(nodes, initializers=(), opset: int = 17) -> onnx.ModelProto:
    """A model with input x: f32[1,4] and output y: f32[1,4] around `nodes`."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph(nodes, "g", [x], [y], list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def relu_neg_graph() -> Graph:
    """y = neg(relu(a)) with a: f32[1,4], built by hand."""
    graph = Graph()
    a = graph.add_input("a", F32x4)
    graph.set_outputs([("y", graph.add("neg", graph.add("relu", a, name="r0"), name="n0"))])
    return graph


def test_every_error_is_a_lowbit_error():
    for error in (InputError, ModelFormatError, ParseError, ShapeError, UnsupportedOpError, VerificationError):
        assert issubclass(error, LowbitError)


# -- model files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.999])
def test_truncated_onnx_file(tmp_path, fraction):
    data = DIGITS.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(ModelFormatError, match="truncated.onnx.*not a valid ONNX model"):
        lowbit.import_onnx(path)


@pytest.mark.parametrize("content", ["hello, this is not a model\n", ""])
def test_file_that_is_not_onnx(tmp_path, content):
    path = tmp_path / "notes.onnx"
    path.write_text(content)
    with pytest.raises(ModelFormatError, match="notes.onnx.*not (a valid )?(an )?ONNX model"):
        lowbit.import_onnx(path)


def test_onnx_bytes_that_are_not_onnx():
    with pytest.raises(ModelFormatError, match="not a valid ONNX model"):
        lowbit.import_onnx(b"\xff\xfe garbage")


def test_missing_model_file(tmp_path):
    path = tmp_path / "absent.onnx"
    with pytest.raises(ModelFormatError, match="absent.onnx.*does not exist"):
        lowbit.import_onnx(path)
    with pytest.raises(ModelFormatError, match="absent.onnx.*does not exist"):
        lowbit.load_graph(path)


def test_missing_ir_file(tmp_path):
    with pytest.raises(ParseError, match="absent.lbir"):
        lowbit.load_graph(tmp_path / "absent.lbir")


def test_missing_initializer_names_node_and_value(tmp_path):
    model = onnx_model([helper.make_node("Add", ["x", "bias"], ["y"], name="add0")])
    with pytest.raises(ModelFormatError, match=r"node 'add0' \(Add\) uses \['bias'\]"):
        lowbit.import_onnx(model)
    path = tmp_path / "no_bias.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelFormatError, match="no_bias.onnx.*'add0'.*bias"):
        lowbit.import_onnx(path)


def test_graph_output_nobody_produces():
    model = onnx_model([helper.make_node("Relu", ["x"], ["z"], name="relu0")])
    with pytest.raises(ModelFormatError, match="graph output 'y' is not produced"):
        lowbit.import_onnx(model)


# -- IR text ----------------------------------------------------------------------------------------
def test_ir_text_using_an_undefined_value():
    text = 'graph "g" {\n  input %x: f32[1,4]\n  %0 = relu(%z) : f32[1,4]\n  output "y" = %0\n}\n'
    with pytest.raises(ParseError, match=r"line 3, column 13: '%z' is used before it is defined"):
        parse(text)


def test_ir_text_output_of_an_undefined_value():
    with pytest.raises(ParseError, match="line 3, column 16: '%q'"):
        parse('graph "g" {\n  input %x: f32[1,4]\n  output "y" = %q\n}\n')


def test_ir_file_errors_name_the_file(tmp_path):
    path = tmp_path / "broken.lbir"
    path.write_text('graph "g" {\n  input %x: f32[1,4]\n  output "y" = %q\n}\n')
    with pytest.raises(ParseError, match="broken.lbir: line 3"):
        lowbit.load_graph(path)


# -- types ------------------------------------------------------------------------------------------
def test_type_mismatch_in_onnx_model_names_node():
    bias = numpy_helper.from_array(np.ones(4, np.int64), "bias")
    model = onnx_model([helper.make_node("Add", ["x", "bias"], ["y"], name="add0")], [bias])
    with pytest.raises(ShapeError, match=r"node 'add0'.*f32.*i64"):
        lowbit.import_onnx(model)


def test_type_mismatch_in_hand_built_graph_names_node():
    graph = Graph()
    a = graph.add_input("a", F32x4)
    b = graph.add_input("b", TensorType((1, 4), DType.i64))
    with pytest.raises(ShapeError, match=r"node 'bad_add' \(add\).*f32.*i64"):
        graph.add("add", a, b, name="bad_add")


def test_shapes_that_do_not_broadcast_name_node():
    graph = Graph()
    a = graph.add_input("a", F32x4)
    b = graph.add_input("b", TensorType((3,), DType.f32))
    with pytest.raises(ShapeError, match=r"node 'bad_mul' \(mul\).*\[1, 4\].*\[3\]"):
        graph.add("mul", a, b, name="bad_mul")


# -- unsupported ops --------------------------------------------------------------------------------
@pytest.mark.parametrize("op_type, suggestion", [("Relu6", "Relu"), ("SoftmaxCrossEntropyLoss", "Softmax")])
def test_unsupported_op_names_op_node_opset_and_nearest(op_type, suggestion):
    if op_type in CONVERTERS:
        pytest.skip(f"{op_type} is supported now")
    model = onnx_model([helper.make_node(op_type, ["x"], ["y"], name="act0")], opset=13)
    with pytest.raises(UnsupportedOpError) as info:
        lowbit.import_onnx(model)
    message = str(info.value)
    assert f"op type '{op_type}'" in message
    assert "node 'act0'" in message and "opset 13" in message
    nearest = message.rsplit("nearest supported: ", 1)[1]
    assert nearest in CONVERTERS and suggestion in nearest


def test_unsupported_domain_names_it():
    node = helper.make_node("FusedGemm", ["x"], ["y"], name="fg0", domain="com.microsoft")
    with pytest.raises(UnsupportedOpError, match="node 'fg0'.*domain 'com.microsoft'"):
        lowbit.import_onnx(onnx_model([node]))


# -- feeds to the reference interpreter and to a compiled model -----------------------------------------
@pytest.mark.parametrize("feeds, pattern", [
    ({"b": np.ones((1, 4), np.float32)}, r"unknown input name\(s\) \['b'\].*\['a'\]"),
    ({"a": np.ones((1, 4), np.float32), "b": np.ones((1, 4), np.float32)}, r"unknown input name\(s\) \['b'\]"),
    ({}, r"missing feed\(s\) for input\(s\) \['a'\]"),
    ({"a": np.ones((2, 4), np.float32)}, r"input 'a' expects shape \[1, 4\], got \[2, 4\]"),
    ({"a": np.ones(4, np.float32)}, r"input 'a' expects shape \[1, 4\], got \[4\]"),
    ({"a": np.ones((1, 4), np.float64)}, r"input 'a' expects dtype f32.*got float64"),
    ({"a": [[1, 2, 3, 4]]}, r"input 'a' expects dtype f32.*got int64"),
])
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_wrong_feeds(feeds, pattern, backend):
    graph = relu_neg_graph()
    run = lowbit.compile(graph).run if backend == "native" else functools.partial(lowbit.run_reference, graph)
    with pytest.raises(InputError, match=pattern):
        run(feeds)


# -- the verifier -----------------------------------------------------------------------------------
def test_verifier_catches_use_before_definition():
    graph = relu_neg_graph()
    graph.nodes.reverse()
    with pytest.raises(VerificationError, match=r"node 'n0' \(neg\) at position 0: operand 0 is not defined"):
        verify(graph)


def test_verifier_catches_wrong_result_type():
    graph = relu_neg_graph()
    graph.nodes[1].outputs[0].type = TensorType((2, 4), DType.f32)
    with pytest.raises(VerificationError, match=r"node 'n0' \(neg\).*f32\[2,4\].*f32\[1,4\]"):
        verify(graph)


def test_verifier_catches_broken_use_list():
    graph = relu_neg_graph()
    relu = graph.nodes[0].output
    relu.uses.clear()
    with pytest.raises(VerificationError, match="use list"):
        verify(graph)


def test_verifier_catches_undefined_graph_output():
    graph = relu_neg_graph()
    stray = Graph().add_input("stray", F32x4)
    graph.outputs[0] = stray
    with pytest.raises(VerificationError, match="graph output 'y' is not defined"):
        verify(graph)
