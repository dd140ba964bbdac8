"""Tensor ops (shapes, indexing, pad, reductions, resize, constants): lowbit against onnxruntime."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import lowbit
from lowbit.errors import InputError, ShapeError, UnsupportedOpError
from lowbit.ir import Graph, TensorType, DType, parse, verify

F32, I64 = TensorProto.FLOAT, TensorProto.INT64
RNG = np.random.default_rng(0)
INT_MAX, INT_MIN = np.iinfo(np.int64).max, np.iinfo(np.int64).min


def const(name: str, values, dtype=I64) -> TensorProto:
    array = np.asarray(values)
    return helper.make_tensor(name, dtype, array.shape, array.reshape(-1).tolist())


def model(nodes, inputs: dict, outputs, opset: int = 17, initializers=()):
    """A model whose inputs are {name: array} (their shapes and dtypes become the input types)."""
    infos = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
             for name, a in inputs.items()]
    outs = [helper.make_empty_tensor_value_info(name) for name in outputs]
    graph = helper.make_graph(nodes, "test", infos, outs, list(initializers))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8 if opset <= 17 else 9
    return proto


def check(proto, inputs: dict, rtol: float = 1e-5, atol: float = 1e-6) -> Graph:
    """Import and run with lowbit; every output must match onnxruntime's. Returns the graph."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in proto.graph.output]
    expected = session.run(names, inputs)
    graph = lowbit.import_onnx(proto)
    assert str(parse(str(graph))) == str(graph)
    actual = lowbit.run_reference(graph, inputs)
    for name, want in zip(names, expected):
        got = actual[name]
        assert got.shape == want.shape, (name, got.shape, want.shape)
        assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)
    return graph


def single(op: str, x: np.ndarray, *, opset: int = 17, extra=(), initializers=(), outputs=("y",),
           atol: float = 1e-6, **attrs):
    """Check one node applied to input `x` (plus constant inputs named in `extra`)."""
    node = helper.make_node(op, ["x", *extra], list(outputs), **attrs)
    return check(model([node], {"x": x}, outputs, opset, initializers), {"x": x}, atol=atol)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# -- shapes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, allowzero", [([0, -1], 0), ([-1], 0), ([2, 0, 4], 0), ([4, 3, 2], 1),
                                              ([6, 1, 4], 0)])
def test_reshape(shape, allowzero):
    opset = 14 if allowzero else 13
    attrs = {"allowzero": allowzero} if allowzero else {}
    single("Reshape", rand(2, 3, 4), opset=opset, extra=["s"], initializers=[const("s", shape)], **attrs)


def test_noop_reshape_is_short_circuited():
    graph = single("Reshape", rand(2, 3), extra=["s"], initializers=[const("s", [2, -1])])
    assert not graph.nodes


@pytest.mark.parametrize("axis", [0, 1, 2, 3, -1, -3])
def test_flatten(axis):
    single("Flatten", rand(2, 3, 4), opset=13, axis=axis)


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("axes", [None, [0], [-1, 0]])
def test_squeeze(opset, axes):
    x = rand(1, 3, 1)
    if axes is None:
        single("Squeeze", x, opset=opset)
    elif opset < 13:
        single("Squeeze", x, opset=opset, axes=axes)
    else:
        single("Squeeze", x, opset=opset, extra=["a"], initializers=[const("a", axes)])


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("axes", [[0], [-1], [0, 3], [-1, 1]])
def test_unsqueeze(opset, axes):
    if opset < 13:
        single("Unsqueeze", rand(2, 3), opset=opset, axes=axes)
    else:
        single("Unsqueeze", rand(2, 3), opset=opset, extra=["a"], initializers=[const("a", axes)])


@pytest.mark.parametrize("perm", [None, [0, 2, 1], [2, 0, 1]])
def test_transpose(perm):
    attrs = {} if perm is None else {"perm": perm}
    single("Transpose", rand(2, 3, 4), **attrs)


@pytest.mark.parametrize("op, mode, shape", [("DepthToSpace", "DCR", (1, 8, 2, 3)),
                                             ("DepthToSpace", "CRD", (2, 8, 2, 3)),
                                             ("SpaceToDepth", None, (1, 2, 4, 6))])
def test_depth_space(op, mode, shape):
    attrs = {"mode": mode} if mode else {}
    single(op, rand(*shape), opset=13, blocksize=2, **attrs)


# -- joining, splitting, slicing -------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concat(axis):
    a, b, c = rand(2, 3, 4), rand(2, 3, 4), rand(2, 3, 4)
    node = helper.make_node("Concat", ["a", "b", "c"], ["y"], axis=axis)
    graph = check(model([node], {"a": a, "b": b, "c": c}, ["y"]), {"a": a, "b": b, "c": c})
    assert [n.op for n in graph.nodes] == ["concat"]


@pytest.mark.parametrize("opset, attrs, split, outputs", [
    (11, {"axis": 1}, None, 3),
    (11, {"axis": 1, "split": [1, 2, 3]}, None, 3),
    (13, {"axis": -1}, [3, 1], 2),
    (13, {}, None, 2),
    (18, {"axis": 1, "num_outputs": 4}, None, 4),
])
def test_split(opset, attrs, split, outputs):
    x = rand(2, 6, 4)
    extra, inits = (["s"], [const("s", split)]) if split is not None else ([], [])
    names = [f"y{i}" for i in range(outputs)]
    single("Split", x, opset=opset, extra=extra, initializers=inits, outputs=names, **attrs)


@pytest.mark.parametrize("starts, ends, axes, steps", [
    ([1], [3], None, None),
    ([0, 1], [INT_MAX, -1], [2, 1], None),
    ([-1], [INT_MIN], [1], [-1]),
    ([4, 10], [0, -100], [0, 2], [-2, -3]),
    ([-2, 0], [100, 5], [-1, 0], [1, 2]),
    ([3], [1], [1], [1]),
    ([0, 0], [1, 4], None, [1, 2]),
])
def test_slice(starts, ends, axes, steps):
    names, values = ["s", "e", "a", "p"], [starts, ends, axes, steps]
    extra = [name if v is not None else "" for name, v in zip(names, values)]
    while not extra[-1]:
        extra.pop()
    inits = [const(name, v) for name, v in zip(names, values) if v is not None]
    single("Slice", rand(5, 4, 6), opset=13, extra=extra, initializers=inits)


def test_full_slice_is_short_circuited():
    graph = single("Slice", rand(5, 4), opset=13, extra=["s", "e"],
                   initializers=[const("s", [0, -100]), const("e", [INT_MAX, 4])])
    assert not graph.nodes


def test_slice_opset9_attributes():
    single("Slice", rand(5, 4), opset=9, starts=[1, -3], ends=[INT_MAX, 3], axes=[0, 1])


# -- indexing, broadcasting, padding ---------------------------------------------------------------------
@pytest.mark.parametrize("axis, indices", [(0, [[0, 2], [-1, 1]]), (1, [3, -4]), (1, 2), (-1, [[1]])])
def test_gather_runtime_indices(axis, indices):
    data, idx = rand(3, 4, 5), np.asarray(indices, dtype=np.int64)
    node = helper.make_node("Gather", ["data", "idx"], ["y"], axis=axis)
    check(model([node], {"data": data, "idx": idx}, ["y"]), {"data": data, "idx": idx})


def test_gather_embedding_lookup():
    """BERT's word embedding: a constant table gathered by run-time int64 token ids."""
    table, ids = rand(30, 8), np.asarray([[1, 5, 29, 0]], dtype=np.int64)
    node = helper.make_node("Gather", ["table", "ids"], ["y"])
    proto = model([node], {"ids": ids}, ["y"], initializers=[helper.make_tensor(
        "table", F32, table.shape, table.reshape(-1).tolist())])
    graph = check(proto, {"ids": ids})
    assert [n.op for n in graph.nodes] == ["gather"]


def test_gather_elements():
    data, idx = rand(3, 4), np.asarray([[0, 3, -1], [2, 1, 0], [1, 1, 1]], dtype=np.int64)
    node = helper.make_node("GatherElements", ["data", "idx"], ["y"], axis=1)
    check(model([node], {"data": data, "idx": idx}, ["y"]), {"data": data, "idx": idx})


@pytest.mark.parametrize("x_shape, shape", [((3, 1), [2, 1, 4]), ((1, 4), [3, 1]), ((2, 3), [3]), ((2, 3), [1])])
def test_expand(x_shape, shape):
    graph = single("Expand", rand(*x_shape), extra=["s"], initializers=[const("s", shape)])
    assert len(graph.nodes) == (0 if np.broadcast_shapes(x_shape, shape) == x_shape else 1)


def test_tile():
    single("Tile", rand(2, 3), extra=["r"], initializers=[const("r", [2, 3])])


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad_opset10_attributes(mode):
    single("Pad", rand(1, 2, 4, 5), opset=10, mode=mode, pads=[0, 0, 1, 2, 0, 0, 2, 1], value=1.5)


@pytest.mark.parametrize("mode, pads", [(mode, pads) for mode in ("constant", "reflect", "edge")
                                        for pads in ([0, 1, 2, 3], [1, 0, 0, 2])] + [("constant", [-1, 1, 0, -2])])
def test_pad_inputs(mode, pads):
    single("Pad", rand(3, 4), opset=13, mode=mode, extra=["p", "v"],
           initializers=[const("p", pads), helper.make_tensor("v", F32, [], [-2.0])])


def test_pad_axes_opset18_and_wrap_opset19():
    single("Pad", rand(2, 3, 4), opset=18, extra=["p", "", "a"],
           initializers=[const("p", [1, 2, 0, 1]), const("a", [-1, 0])])
    single("Pad", rand(3, 4), opset=19, mode="wrap", extra=["p"], initializers=[const("p", [1, 2, 2, 1])])


def test_pad_integers():
    x = np.arange(12, dtype=np.int64).reshape(3, 4)
    single("Pad", x, opset=13, extra=["p", "v"], initializers=[const("p", [1, 1, 1, 1]), const("v", 7)])


# -- reductions ------------------------------------------------------------------------------------------
REDUCTIONS = ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp"]


@pytest.mark.parametrize("op", REDUCTIONS)
@pytest.mark.parametrize("opset", [11, 13, 18])
@pytest.mark.parametrize("axes, keepdims", [([1], 1), ([-1, 0], 0), (None, 1), (None, 0)])
def test_reductions(op, opset, axes, keepdims):
    x = np.abs(rand(2, 3, 4)) + 0.5 if op == "ReduceLogSum" else rand(2, 3, 4)
    axes_as_input = opset >= (13 if op == "ReduceSum" else 18)
    if axes is None:
        single(op, x, opset=opset, keepdims=keepdims)
    elif axes_as_input:
        single(op, x, opset=opset, keepdims=keepdims, extra=["a"], initializers=[const("a", axes)])
    else:
        single(op, x, opset=opset, keepdims=keepdims, axes=axes)


def test_reduce_sum_f16():
    single("ReduceSum", rand(4, 300).astype(np.float16), opset=13, keepdims=0, atol=1e-2)


def test_reduce_noop_with_empty_axes():
    graph = single("ReduceSum", rand(2, 3), opset=13, noop_with_empty_axes=1)
    assert not graph.nodes


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceProd"])
def test_integer_reductions(op):
    x = RNG.integers(-9, 9, size=(3, 4)).astype(np.int64)
    single(op, x, opset=18, extra=["a"], initializers=[const("a", [1])])


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
@pytest.mark.parametrize("axis, keepdims, last", [(0, 1, 0), (-1, 0, 0), (1, 1, 1)])
def test_arg_reductions(op, axis, keepdims, last):
    x = RNG.integers(0, 3, size=(3, 4, 2)).astype(np.float32)  # many ties
    single(op, x, opset=13, axis=axis, keepdims=keepdims, select_last_index=last)


# -- resizing --------------------------------------------------------------------------------------------
COORDINATES = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn"]


def resize(x, *, opset=13, scales=None, sizes=None, **attrs):
    """Resize with either scales or sizes; opset 11 spells absent roi and scales as empty tensors."""
    extra = ["r", "s", "z"] if opset < 13 else ["", "s" if scales is not None else "", "z"]
    inits = [helper.make_tensor("r", F32, [0], [])] if opset < 13 else []
    if scales is not None or opset < 13:
        inits.append(helper.make_tensor("s", F32, [len(scales or [])], scales or []))
    if sizes is not None:
        inits.append(const("z", sizes))
    else:
        extra.pop()
    return single("Resize", x, opset=opset, extra=extra, initializers=inits, **attrs)


@pytest.mark.parametrize("coordinates", COORDINATES)
@pytest.mark.parametrize("nearest", ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"])
@pytest.mark.parametrize("scales", [[1, 1, 2, 3], [1, 1, 0.5, 0.75], [1, 1, 1.5, 2.5]])
def test_resize_nearest(coordinates, nearest, scales):
    resize(rand(1, 2, 4, 6), scales=scales, mode="nearest", coordinate_transformation_mode=coordinates,
           nearest_mode=nearest)


@pytest.mark.parametrize("coordinates", COORDINATES[:4])
@pytest.mark.parametrize("sizes", [[1, 2, 8, 12], [1, 2, 3, 5], [1, 2, 7, 4], [1, 2, 1, 1]])
def test_resize_linear_sizes(coordinates, sizes):
    resize(rand(1, 2, 4, 6), sizes=sizes, mode="linear", coordinate_transformation_mode=coordinates)


@pytest.mark.parametrize("coordinates", COORDINATES[:4])
@pytest.mark.parametrize("scales", [[1, 1, 2, 2], [1, 1, 0.6, 1.7]])
def test_resize_linear_scales(coordinates, scales):
    resize(rand(1, 2, 5, 6), scales=scales, mode="linear", coordinate_transformation_mode=coordinates)


@pytest.mark.parametrize("exclude_outside", [0, 1])
@pytest.mark.parametrize("coordinates", ["half_pixel", "align_corners", "asymmetric"])
def test_resize_cubic(exclude_outside, coordinates):
    resize(rand(1, 1, 5, 6), scales=[1, 1, 1.6, 0.8], mode="cubic", exclude_outside=exclude_outside,
           coordinate_transformation_mode=coordinates, cubic_coeff_a=-0.5, atol=1e-5)


def test_resize_opset11_empty_roi_and_scales():
    resize(rand(1, 2, 3, 4), opset=11, sizes=[1, 2, 6, 7], mode="linear")
    resize(rand(1, 2, 3, 4), opset=11, scales=[1, 1, 2, 2], mode="nearest")


@pytest.mark.parametrize("opset", [18, 19])
def test_resize_axes_and_aspect_ratio(opset):
    x = rand(1, 2, 4, 6)
    for policy in ("stretch", "not_larger", "not_smaller"):
        single("Resize", x, opset=opset, extra=["", "", "z"], initializers=[const("z", [7, 9])], axes=[2, 3],
               mode="linear", keep_aspect_ratio_policy=policy)
    if opset == 19:
        resize(x, opset=19, scales=[1, 1, 1.5, 0.5], mode="linear", coordinate_transformation_mode="half_pixel_symmetric")


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_opset10_and_upsample(mode):
    x = rand(1, 2, 3, 4)
    scales = helper.make_tensor("s", F32, [4], [1, 1, 2, 1.5])
    single("Resize", x, opset=10, mode=mode, extra=["s"], initializers=[scales])
    single("Upsample", x, opset=9, mode=mode, extra=["s"], initializers=[scales])
    single("Upsample", x, opset=7, mode=mode, scales=[1.0, 1.0, 2.0, 3.0])


def test_resize_nearest_integers():
    resize(RNG.integers(0, 255, size=(1, 1, 3, 4)).astype(np.uint8), scales=[1, 1, 2.5, 0.5])


def test_resize_identity_is_short_circuited():
    assert not resize(rand(1, 1, 2, 2), scales=[1, 1, 1, 1]).nodes


# -- constants and folded shape computations -------------------------------------------------------------
@pytest.mark.parametrize("start, end", [(None, None), (1, None), (-2, None), (0, -1), (-10, 10)])
def test_shape(start, end):
    attrs = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    graph = single("Shape", rand(2, 3, 4), opset=15, **attrs)
    assert not graph.nodes


def test_size_constant_range_constant_of_shape():
    x = rand(2, 3)
    nodes = [
        helper.make_node("Size", ["x"], ["size"]),
        helper.make_node("Constant", [], ["c1"], value=helper.make_tensor("v", F32, [2], [1.5, 2.5])),
        helper.make_node("Constant", [], ["c2"], value_ints=[4, 5]),
        helper.make_node("Constant", [], ["c3"], value_float=0.25),
        helper.make_node("Range", ["r0", "r1", "r2"], ["range"]),
        helper.make_node("Range", ["f0", "f1", "f2"], ["frange"]),
        helper.make_node("ConstantOfShape", ["c2"], ["filled"], value=helper.make_tensor("v", I64, [1], [7])),
        helper.make_node("ConstantOfShape", ["c2"], ["zeros"]),
    ]
    inits = [const("r0", 10), const("r1", 1), const("r2", -3), helper.make_tensor("f0", F32, [], [0.5]),
             helper.make_tensor("f1", F32, [], [2.0]), helper.make_tensor("f2", F32, [], [0.25])]
    outputs = ["size", "c1", "c2", "c3", "range", "frange", "filled", "zeros"]
    graph = check(model(nodes, {"x": x}, outputs, opset=13, initializers=inits), {"x": x})
    assert not graph.nodes


def test_exporter_shape_chains_fold_to_constants():
    """The shape subgraphs torch exports around view/expand leave only the data ops behind."""
    x, bias = rand(2, 3, 4), rand(1, 4)
    nodes = [
        # x.view(x.size(0), -1): Shape → Gather → Unsqueeze → Concat → Reshape
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        # Shape → Slice → Concat
        helper.make_node("Shape", ["flat"], ["fshape"]),
        helper.make_node("Slice", ["fshape", "zero1", "one1"], ["head"]),
        helper.make_node("Concat", ["head", "three1", "four1"], ["target2"], axis=0),
        helper.make_node("Reshape", ["flat", "target2"], ["back"]),
        # bias.expand(shape): ConstantOfShape → Mul → Equal → Where → Expand
        helper.make_node("Shape", ["back"], ["bshape"]),
        helper.make_node("ConstantOfShape", ["three"], ["ones"], value=helper.make_tensor("v", I64, [1], [1])),
        helper.make_node("Mul", ["ones", "minus1s"], ["neg"]),
        helper.make_node("Equal", ["bshape", "neg"], ["is_neg"]),
        helper.make_node("Where", ["is_neg", "ones", "bshape"], ["eshape"]),
        helper.make_node("Expand", ["bias", "eshape"], ["bias_e"]),
        helper.make_node("Add", ["back", "bias_e"], ["y"]),
    ]
    inits = [const("zero", 0), const("axes0", [0]), const("minus1", [-1]), const("zero1", [0]), const("one1", [1]),
             const("three1", [3]), const("four1", [4]), const("three", [3]), const("minus1s", -1),
             helper.make_tensor("bias", F32, [1, 4], bias.reshape(-1).tolist())]
    graph = check(model(nodes, {"x": x}, ["y"], opset=13, initializers=inits), {"x": x})
    assert [n.op for n in graph.nodes] == ["reshape", "reshape", "add"]
    assert all(c.type.dtype is not DType.i64 for c in graph.constants)


# -- the IR ops directly ---------------------------------------------------------------------------------
def test_text_form_round_trip_of_multi_result_and_normalised_slice():
    graph = Graph()
    x = graph.add_input("x", TensorType((4, 6), DType.f32))
    parts = graph.add_node("split", [x], {"axis": 1, "sizes": (2, 4)}).outputs
    back = graph.add("slice", parts[1], starts=(3,), ends=(-1,), axes=(1,), steps=(-1,))
    graph.set_outputs([("a", parts[0]), ("b", back)])
    verify(graph)
    again = parse(str(graph))
    assert str(again) == str(graph)
    data = rand(4, 6)
    result = lowbit.run_reference(again, {"x": data})
    np.testing.assert_array_equal(result["b"], data[:, 2:][:, ::-1])


@pytest.mark.parametrize("op, attrs, message", [
    ("reshape", {"shape": (5,)}, "cannot reshape"),
    ("reshape", {"shape": (-1, 6)}, "fully static"),
    ("transpose", {"perm": (0, 0)}, "not a permutation"),
    ("slice", {"starts": (-1,), "ends": (2,), "axes": (0,), "steps": (1,)}, "not normalised"),
    ("pad", {"pads": (0, 4, 0, 4), "mode": "reflect"}, "reflect padding"),
    ("reduce_sum", {"axes": (1, 0)}, "increasing"),
    ("resize", {"sizes": (4, 6), "scales": (2.0, 2.0), "mode": "bicubic"}, "mode"),
])
def test_inference_rejects_bad_attributes(op, attrs, message):
    graph = Graph()
    x = graph.add_input("x", TensorType((2, 3), DType.f32))
    with pytest.raises(ShapeError, match=message):
        graph.add(op, x, **attrs)


# -- errors ----------------------------------------------------------------------------------------------
def test_runtime_shape_operand_is_unsupported():
    x, s = rand(2, 3), np.asarray([3, 2], dtype=np.int64)
    proto = model([helper.make_node("Reshape", ["x", "s"], ["y"], name="r")], {"x": x, "s": s}, ["y"])
    with pytest.raises(UnsupportedOpError, match=r"node 'r'.*Reshape's shape must be a constant"):
        lowbit.import_onnx(proto)


@pytest.mark.parametrize("op, x, extra, inits, attrs, error, message", [
    ("Reshape", (2, 3), ["s"], [const("s", [4, -1])], {}, ShapeError, "cannot reshape"),
    ("Reshape", (2, 3), ["s"], [const("s", [-1, -1])], {}, ShapeError, "at most one -1"),
    ("Squeeze", (2, 3), ["a"], [const("a", [0])], {}, ShapeError, "not all have size 1"),
    ("Transpose", (2, 3), [], [], {"perm": [0, 0]}, ShapeError, "not a permutation"),
    ("Gather", (2, 3), ["i"], [const("i", [0])], {"axis": 2}, ShapeError, "out of range"),
    ("Pad", (2, 3), ["p"], [const("p", [0, 3, 0, 3])], {"mode": "reflect"}, ShapeError, "reflect"),
    ("Expand", (2, 3), ["s"], [const("s", [4, 1])], {}, ShapeError, "do not broadcast"),
    ("Resize", (1, 1, 2, 2), ["r", "s"], [helper.make_tensor("r", F32, [8], [0] * 4 + [1] * 4),
                                          helper.make_tensor("s", F32, [4], [1, 1, 2, 2])],
     {"coordinate_transformation_mode": "tf_crop_and_resize"}, UnsupportedOpError, "tf_crop_and_resize"),
    ("Constant", None, [], [], {"value_string": "hi"}, UnsupportedOpError, "value_string"),
])
def test_conversion_errors(op, x, extra, inits, attrs, error, message):
    inputs = {"x": rand(*x)} if x else {}
    node = helper.make_node(op, (["x"] if x else []) + extra, ["y"], name="bad", **attrs)
    with pytest.raises(error, match=message) as raised:
        lowbit.import_onnx(model([node], inputs, ["y"], opset=13, initializers=inits))
    assert "'bad'" in str(raised.value)


def test_range_needs_constant_inputs():
    limit = np.asarray(5, dtype=np.int64)
    proto = model([helper.make_node("Range", ["a", "limit", "b"], ["y"])], {"limit": limit}, ["y"], opset=13,
                  initializers=[const("a", 0), const("b", 1)])
    with pytest.raises(UnsupportedOpError, match="Range's limit must be a constant"):
        lowbit.import_onnx(proto)


def test_gather_index_out_of_range_at_run_time():
    data, idx = rand(3, 2), np.asarray([3], dtype=np.int64)
    graph = lowbit.import_onnx(model([helper.make_node("Gather", ["data", "idx"], ["y"])],
                                     {"data": data, "idx": idx}, ["y"]))
    with pytest.raises(InputError, match="out of bounds"):
        lowbit.run_reference(graph, {"data": data, "idx": idx})
