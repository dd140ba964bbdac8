"""Native data-movement kernels against the reference interpreter: every result bit-exact.

Shapes are random (rank 0–5, sizes including 1, primes and sizes around the vector widths), and so
are element types: the kernels move bytes, so each element size (1, 2, 4, 8) is exercised.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.ir import DType, Graph, TensorType

RNG = np.random.default_rng(11)
DTYPES = st.sampled_from([DType.f32, DType.u8, DType.bool, DType.f16, DType.i16, DType.f64, DType.i64])
SIZES = st.sampled_from([1, 2, 3, 4, 5, 7, 8, 13, 16, 17, 31, 33])
EXAMPLES = settings(max_examples=25, deadline=None)


@st.composite
def shapes(draw, min_rank: int = 0, max_rank: int = 5, limit: int = 3000) -> tuple[int, ...]:
    shape = []
    for _ in range(draw(st.integers(min_rank, max_rank))):
        size = draw(SIZES)
        shape.append(size if int(np.prod(shape + [size])) <= limit else 1)
    return tuple(shape)


def values(shape, dtype: DType) -> np.ndarray:
    if dtype is DType.bool:
        return RNG.integers(0, 2, shape).astype(bool)
    if dtype.is_float:
        return RNG.standard_normal(shape).astype(dtype.numpy)
    return RNG.integers(int(dtype.min), int(dtype.max), shape, endpoint=True).astype(dtype.numpy)


def check(op: str, inputs: list[np.ndarray], **attrs) -> lowbit.ir.Graph:
    """Build `op` on graph inputs holding `inputs`; every result must equal the reference's bit for bit."""
    graph = Graph(op)
    operands = [graph.add_input(f"x{i}", TensorType(a.shape, DType.from_numpy(a.dtype))) for i, a in enumerate(inputs)]
    node = graph.add_node(op, operands, attrs)
    graph.set_outputs([(f"y{i}", v) for i, v in enumerate(node.outputs)])
    feeds = {f"x{i}": a for i, a in enumerate(inputs)}
    got, want = lowbit.compile(graph).run(feeds), lowbit.run_reference(graph, feeds)
    for name in want:
        assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    return graph


@EXAMPLES
@given(shapes(), DTYPES, st.randoms(use_true_random=False))
def test_transpose(shape, dtype, random):
    perm = list(range(len(shape)))
    random.shuffle(perm)
    check("transpose", [values(shape, dtype)], perm=tuple(perm))


@pytest.mark.parametrize("shape,perm", [((37, 50), (1, 0)), ((3, 17, 40), (0, 2, 1)), ((2, 33, 16, 5), (3, 2, 1, 0)),
                                        ((64, 64), (1, 0))])
def test_blocked_transposes(shape, perm):
    """Transposes of the innermost axis run blocked (16×16), with partial blocks at the edges."""
    for dtype in (DType.f32, DType.u8, DType.i64):
        check("transpose", [values(shape, dtype)], perm=perm)


@st.composite
def slices(draw):
    shape = draw(shapes(min_rank=1))
    axes = sorted(draw(st.sets(st.integers(0, len(shape) - 1), min_size=1)))
    starts, ends, steps = [], [], []
    for axis in axes:
        dim = shape[axis]
        step = draw(st.sampled_from([1, 1, 2, 3, -1, -2, -5]))
        if step > 0:
            start, end = sorted(draw(st.lists(st.integers(0, dim), min_size=2, max_size=2)))
        else:
            start, end = draw(st.integers(0, dim - 1)), draw(st.integers(-1, dim - 1))
        starts.append(start), ends.append(end), steps.append(step)
    return shape, tuple(starts), tuple(ends), tuple(axes), tuple(steps)


@EXAMPLES
@given(slices(), DTYPES)
def test_slice(case, dtype):
    shape, starts, ends, axes, steps = case
    check("slice", [values(shape, dtype)], starts=starts, ends=ends, axes=axes, steps=steps)


@EXAMPLES
@given(shapes(min_rank=1), st.data(), DTYPES)
def test_concat_and_split(shape, data, dtype):
    axis = data.draw(st.integers(0, len(shape) - 1))
    sizes = data.draw(st.lists(st.integers(0, 9), min_size=1, max_size=4))
    parts = [values(shape[:axis] + (n,) + shape[axis + 1:], dtype) for n in sizes]
    check("concat", parts, axis=axis)
    check("split", [np.concatenate(parts, axis=axis)], axis=axis, sizes=tuple(sizes))


@EXAMPLES
@given(shapes(max_rank=4, limit=400), st.data(), DTYPES)
def test_expand_and_tile(shape, data, dtype):
    target = list(data.draw(st.lists(SIZES, max_size=2))) + \
        [d if d != 1 else data.draw(SIZES) for d in shape]
    source = tuple(d if data.draw(st.booleans()) else 1 for d in shape)
    check("expand", [values(source, dtype)], shape=tuple(target))
    repeats = tuple(data.draw(st.integers(0, 3)) for _ in shape)
    check("tile", [values(shape, dtype)], repeats=repeats)


@EXAMPLES
@given(shapes(min_rank=1, max_rank=4, limit=500), st.data(), DTYPES,
       st.sampled_from(["constant", "reflect", "edge", "wrap"]))
def test_pad(shape, data, dtype, mode):
    pads_before, pads_after = [], []
    for dim in shape:
        # crop first (negative pads), then pad within what the mode allows on the cropped axis
        crop = [data.draw(st.integers(0, (dim - 1) // 2)) for _ in range(2)]
        length = dim - sum(crop)
        most = length - 1 if mode == "reflect" else 2 * length + 3
        grow = [data.draw(st.integers(0, max(most, 0))) for _ in range(2)]
        pads_before.append(-crop[0] if crop[0] and data.draw(st.booleans()) else grow[0])
        pads_after.append(-crop[1] if crop[1] and data.draw(st.booleans()) else grow[1])
    check("pad", [values(shape, dtype)], pads=tuple(pads_before + pads_after), mode=mode, value=2.5)


@EXAMPLES
@given(shapes(min_rank=1, max_rank=4, limit=500), shapes(max_rank=2, limit=40), st.data(), DTYPES,
       st.sampled_from([np.int32, np.int64]))
def test_gather(shape, index_shape, data, dtype, index_type):
    axis = data.draw(st.integers(0, len(shape) - 1))
    indices = RNG.integers(-shape[axis], shape[axis], index_shape).astype(index_type)
    check("gather", [values(shape, dtype), indices], axis=axis)


@EXAMPLES
@given(shapes(min_rank=1, max_rank=4, limit=500), st.data(), DTYPES, st.sampled_from([np.int32, np.int64]))
def test_gather_elements(shape, data, dtype, index_type):
    axis = data.draw(st.integers(0, len(shape) - 1))
    index_shape = list(shape)
    index_shape[axis] = data.draw(SIZES)
    indices = RNG.integers(-shape[axis], shape[axis], index_shape).astype(index_type)
    check("gather_elements", [values(shape, dtype), indices], axis=axis)


def test_out_of_range_indices_give_zeros():
    """The reference raises; native code has no error channel, so such rows read as zeros (never
    outside the data)."""
    data = np.arange(1, 13, dtype=np.float32).reshape(4, 3)
    for op, indices, expected in [
        ("gather", np.array([1, 4, -5, -1], np.int64), [[4, 5, 6], [0, 0, 0], [0, 0, 0], [10, 11, 12]]),
        ("gather_elements", np.array([[0, 9, -1]], np.int32), [[1, 0, 12]]),
    ]:
        graph = Graph(op)
        node = graph.add_node(op, [graph.add_input("d", TensorType((4, 3), DType.f32)),
                                   graph.add_input("i", TensorType(indices.shape, DType.from_numpy(indices.dtype)))])
        graph.set_outputs([("y", node.outputs[0])])
        got = lowbit.compile(graph).run({"d": data, "i": indices})["y"]
        np.testing.assert_array_equal(got, np.array(expected, np.float32))


def test_unchanged_bytes_are_views():
    """An identity transpose, a full slice or a one-piece concat between two nodes costs no call."""
    graph = Graph("views")
    x = graph.add_input("x", TensorType((4, 1, 6), DType.f32))
    y = graph.add("neg", x)
    y = graph.add("transpose", y, perm=(1, 0, 2))  # moves only a size-1 axis
    y = graph.add("slice", y, starts=(0,), ends=(4,), axes=(1,), steps=(1,))
    y = graph.add("concat", y, axis=0)
    graph.set_outputs([("y", graph.add("neg", y))])
    model = lowbit.compile(graph)
    assert len(model.program.calls) == 2
    feeds = {"x": values((4, 1, 6), DType.f32)}
    np.testing.assert_array_equal(model.run(feeds)["y"], lowbit.run_reference(graph, feeds)["y"])

