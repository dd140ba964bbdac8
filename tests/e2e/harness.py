"""Running a model with lowbit's reference interpreter and with onnxruntime, and comparing them."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort

import lowbit
from lowbit.ir import Graph, parse

RTOL, ATOL = 1e-4, 1e-5
DATA = Path(__file__).parents[1] / "data"


def onnxruntime_session(model: onnx.ModelProto | str | Path, *, optimize: bool = False,
                        threads: int = 0) -> ort.InferenceSession:
    """A CPU session; without `optimize` the graph runs as written (no fusions that reorder math)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # old-style models make it warn once per initializer in graph.input
    options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_onnxruntime(model: onnx.ModelProto | str | Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = onnxruntime_session(model)
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds))))


def assert_close_to_onnxruntime(got: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        assert got[name].dtype == want.dtype, f"output '{name}'"
        np.testing.assert_allclose(got[name], want, rtol=RTOL, atol=ATOL, err_msg=f"output '{name}'")


def assert_text_round_trips(graph: Graph, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
    """The summarised text form prints back unchanged, and the full one reproduces the outputs exactly."""
    text = str(graph)
    assert str(parse(text)) == text
    again = lowbit.run_reference(parse(graph.to_text(full=True)), feeds)
    assert sorted(again) == sorted(outputs)
    for name, array in outputs.items():
        np.testing.assert_array_equal(again[name], array, err_msg=f"output '{name}' after the text round trip")


def check_model(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], *,
                reference_model: onnx.ModelProto | None = None) -> Graph:
    """Import `model`, run it on `feeds`, and check it against onnxruntime running `reference_model`
    (default: the same model) and against its own text round trip. Returns the imported graph."""
    graph = lowbit.import_onnx(model)
    got = lowbit.run_reference(graph, feeds)
    expected = run_onnxruntime(reference_model or model, feeds)
    for name, array in expected.items():
        # A test whose outputs are constant or not finite would compare nothing of interest.
        assert np.isfinite(array).all() and np.ptp(array) > 0, f"degenerate output '{name}' of the test model"
    assert_close_to_onnxruntime(got, expected)
    assert_text_round_trips(graph, feeds, got)
    return graph


def image_feed(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A standard-normal float32 image for the model's first input (old-style models list their
    initializers after it), its shape read from the model."""
    info = model.graph.input[0]
    shape = [d.dim_value for d in info.type.tensor_type.shape.dim]
    return {info.name: rng.standard_normal(shape, dtype=np.float32)}
