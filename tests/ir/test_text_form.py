"""The text form: print → parse → print is the identity, for hand-written and generated graphs."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.errors import ParseError
from lowbit.ir import DType, Graph, QuantParams, SparseLayout, TensorType, parse, verify

names = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=8)
FLOAT_TYPES = [DType.f32, DType.f16, DType.f64]
INT_TYPES = [DType.i64, DType.i32, DType.i16, DType.i8, DType.u8, DType.u16, DType.i4, DType.u4]


@st.composite
def constant_arrays(draw):
    dtype = draw(st.sampled_from(FLOAT_TYPES + INT_TYPES + [DType.bool]))
    shape = tuple(draw(st.lists(st.integers(1, 5), max_size=3)))
    if draw(st.booleans()):
        shape = (draw(st.integers(17, 40)),)  # larger than the inline limit
    size = int(np.prod(shape))
    if dtype.is_float:
        values = draw(st.lists(st.floats(width=dtype.bits if dtype.bits < 64 else 64, allow_nan=True),
                               min_size=size, max_size=size))
    elif dtype is DType.bool:
        values = draw(st.lists(st.booleans(), min_size=size, max_size=size))
    else:
        values = draw(st.lists(st.integers(int(dtype.min), int(dtype.max)), min_size=size, max_size=size))
    array = np.array(values, dtype=dtype.numpy).reshape(shape)
    quant = layout = None
    if dtype in (DType.i8, DType.u8, DType.i4, DType.u4) and shape and draw(st.booleans()):
        channels = shape[0]
        scales = tuple(float(np.float32(s)) for s in draw(
            st.lists(st.floats(0.0009765625, 10, width=32), min_size=channels, max_size=channels)))
        points = tuple(draw(st.lists(st.integers(-8, 7), min_size=channels, max_size=channels)))
        quant = QuantParams(scales, points, axis=0, bits=dtype.bits, signed=dtype.is_signed)
    if len(shape) == 2 and draw(st.booleans()):
        layout = draw(st.sampled_from([SparseLayout("csr"), SparseLayout("bsr", (1, 4)), SparseLayout("nm", n=2, m=4)]))
    return dtype, array, quant, layout


UNARY = ["neg", "abs", "relu", "sigmoid", "tanh", "exp", "sqrt", "hard_swish"]
BINARY = ["add", "sub", "mul", "div", "maximum", "minimum"]


@st.composite
def graphs(draw):
    graph = Graph(draw(names))
    if draw(st.booleans()):
        graph.metadata = draw(st.dictionaries(st.text(max_size=5), st.one_of(
            st.integers(-5, 5), st.text(max_size=5), st.lists(st.integers(0, 3), max_size=3)), max_size=3))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    input_names = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    pool = [graph.add_input(name, TensorType(shape, DType.f32)) for name in input_names]
    for _ in range(draw(st.integers(0, 4))):
        dtype, array, quant, layout = draw(constant_arrays())
        name = draw(st.one_of(st.none(), names, st.just("w")))
        graph.add_constant(array, name, TensorType(array.shape, dtype, quant, layout))
    pool.append(graph.add_constant(np.asarray(draw(st.floats(-3, 3, width=32)), np.float32), "scalar"))
    for index in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["unary", "binary", "leaky", "clip", "compare"]))
        node_name = draw(st.one_of(st.none(), names))
        a = draw(st.sampled_from(pool))
        if kind == "unary":
            result = graph.add(draw(st.sampled_from(UNARY)), a, name=node_name)
        elif kind == "binary":
            result = graph.add(draw(st.sampled_from(BINARY)), a, draw(st.sampled_from(pool)), name=node_name)
        elif kind == "leaky":
            result = graph.add("leaky_relu", a, alpha=draw(st.floats(0, 1)), name=node_name)
        elif kind == "clip":
            result = graph.add("clip", a, min=draw(st.floats(-6, 0)), max=draw(st.floats(0, 6)), name=node_name)
        else:
            mask = graph.add("less", a, draw(st.sampled_from(pool)))
            result = graph.add("where", mask, a, draw(st.sampled_from(pool)), name=node_name)
        if result.type.shape == shape:
            pool.append(result)
    output_names = draw(st.lists(names, min_size=1, max_size=2, unique=True))
    graph.set_outputs([(name, draw(st.sampled_from(pool))) for name in output_names])
    verify(graph)
    return graph


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_print_parse_print_is_identity(graph):
    text = str(graph)
    parsed = parse(text)
    verify(parsed)
    assert str(parsed) == text


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_full_form_round_trips_weights_and_results(graph):
    text = graph.to_text(full=True)
    parsed = parse(text)
    assert parsed.to_text(full=True) == text
    for original, twin in zip(graph.constants, parsed.constants):
        assert twin.type == original.type
        assert same_bits(twin.data, original.data)
    feeds = {v.name: np.linspace(-2, 2, v.type.size, dtype=np.float32).reshape(v.type.shape) for v in graph.inputs}
    expected = lowbit.run_reference(graph, feeds)
    actual = lowbit.run_reference(parsed, feeds)
    for name in graph.output_names:
        assert same_bits(actual[name], expected[name])


def test_large_constants_print_as_a_summary_that_reparses():
    graph = Graph("summary")
    weights = graph.add_constant(np.arange(100, dtype=np.float32).reshape(10, 10), "weights")
    x = graph.add_input("x", TensorType((10, 10), DType.f32))
    graph.set_outputs([("y", graph.add("add", x, weights))])
    text = str(graph)
    assert "elided<" in text and "min=0.0 max=99.0" in text and "99.0," not in text
    parsed = parse(text)
    assert str(parsed) == text
    with pytest.raises(lowbit.InputError, match="elided"):
        lowbit.run_reference(parsed, {"x": np.zeros((10, 10), np.float32)})


def test_hand_written_text_with_comments_and_defaults():
    text = """
    # a comment
    graph "hand" {
      input %x: f32[4]
      @six = const f32[] dense<6.0>
      %a = clip(%x) {min = 0.0, max = 6.0} : f32[4]   # ReLU6
      %b = minimum(%a, @six) : f32[4]
      output "y" = %b
    }
    """
    graph = parse(text)
    verify(graph)
    assert graph.nodes[0].attrs == {"min": 0.0, "max": 6.0}
    result = lowbit.run_reference(graph, {"x": np.array([-1, 2, 7, 3], np.float32)})["y"]
    np.testing.assert_array_equal(result, [0, 2, 6, 3])
    assert str(parse(str(graph))) == str(graph)


def test_quantized_and_sparse_types_print_and_parse():
    quant = QuantParams((0.5, 0.25), (0, -3), axis=0, bits=4)
    layout = SparseLayout("bsr", (1, 4))
    graph = Graph("q")
    graph.add_constant(np.zeros((2, 8), np.int8), "w", TensorType((2, 8), DType.i4, quant, layout))
    x = graph.add_input("x", TensorType((1,), DType.f32))
    graph.set_outputs([("y", x)])
    text = str(graph)
    assert "i4[2,8] quant<axis=0, bits=4, scale=[0.5, 0.25], zp=[0, -3]> sparse<bsr, block=[1, 4]>" in text
    parsed = parse(text)
    assert parsed.constants[0].type == graph.constants[0].type


@pytest.mark.parametrize("text, message", [
    ('graph "g" {\n  output "y" = %nope\n}', "line 2, column 16: '%nope' is used before it is defined"),
    ('graph "g" {\n  input %x: f99[1]\n}', "unknown element type 'f99'"),
    ('graph "g" {\n  input %x: f32[2]\n  %0 = frobnicate(%x) : f32[2]\n}', "op 'frobnicate' is not registered"),
    ('graph "g" {\n  input %x: f32[2]\n  %0 = relu(%x) {alpha = 1.0} : f32[2]\n}', "op 'relu' has no attribute 'alpha'"),
    ('graph "g" {\n  @c = const f32[3] dense<[1.0, 2.0]>\n}', "constant data has shape [2], its type says f32[3]"),
    ('graph "g" {\n  input %x: f32[2]\n', "unexpected end of text"),
])
def test_parse_errors_name_line_and_problem(text, message):
    with pytest.raises(ParseError) as error:
        parse(text)
    assert message in str(error.value)


def test_load_and_save_round_trip(tmp_path):
    graph = Graph("saved")
    x = graph.add_input("x", TensorType((20,), DType.f32))
    w = graph.add_constant(np.random.default_rng(0).standard_normal(20).astype(np.float32), "w")
    graph.set_outputs([("y", graph.add("mul", x, w))])
    path = tmp_path / "g.lbir"
    lowbit.ir.save(graph, path)
    loaded = lowbit.ir.load(path)
    assert same_bits(loaded.constants[0].data, w.data)
    with pytest.raises(ParseError, match="cannot read IR file"):
        lowbit.ir.load(tmp_path / "missing.lbir")
