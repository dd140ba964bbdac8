"""int8 latency of the native backend beside ONNX Runtime (fp32 and its own int8), in one process.

    python bench/native_int8.py [--rounds 15] [--image 224] [--skip-resnet] [--json]

Models: the trained digits CNN and MLP of tests/data at batch 1 and 64, and ResNet-18 (tests/e2e's
builder, random weights) at batch 1. Engines:

* lowbit int8: `lowbit.quantize` (static, per-channel int8 weights, int8 activations, min-max on the
  calibration set) then `lowbit.compile`;
* lowbit fp32: `lowbit.optimize` then `lowbit.compile` of the float model;
* ort fp32: ONNX Runtime on the float model;
* ort s8s8 / ort u8s8: ONNX Runtime on its own `quantize_static` QDQ model (per-channel weights, min-max)
  with int8 resp. uint8 activations and int8 weights, calibrated on the same data.

Single thread everywhere (ONNX Runtime: intra_op_num_threads = inter_op_num_threads = 1). Each round
times every engine once per case, interleaved, so drift of the machine hits all of them alike; tables
give medians over the rounds (ms) and ratios to lowbit int8 from the same run. For the digits models
the top-1 accuracy on tests/data/digits_test.npz is printed too. Not a test: nothing here asserts
beyond lowbit int8 equalling the reference interpreter.
"""
from __future__ import annotations

import os

os.environ["OPENBLAS_NUM_THREADS"] = "1"  # before numpy loads OpenBLAS
os.environ["OMP_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402

import lowbit  # noqa: E402
from timing import interleaved  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
RNG = np.random.default_rng(0)


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _ort_int8(model: onnx.ModelProto, name: str, calibration: np.ndarray, batch: int,
             activations: str) -> onnx.ModelProto:
    """ONNX Runtime's own static QDQ quantization of `model` (per-channel int8 weights, min-max), calibrated
    in batches of `batch`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{name: calibration[i:i + batch]}
                                 for i in range(0, len(calibration) - batch + 1, batch)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
        onnx.save(model, source)
        quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8 if activations == "s8" else QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
        return onnx.load(target)


def _with_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """`model` with its inputs' and outputs' first dimension fixed to `batch`."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].ClearField("dim_param")
        value.type.tensor_type.shape.dim[0].dim_value = batch
    return model


def model_case(label: str, model: onnx.ModelProto, batch: int, calibration: np.ndarray, feeds_x: np.ndarray,
               rounds: int, test: tuple[np.ndarray, np.ndarray] | None) -> dict:
    """Time every engine on `model` at `batch`; `test` (x, y) adds top-1 accuracies."""
    model = _with_batch(model, batch)
    graph = lowbit.import_onnx(model, batch_size=batch)
    name = graph.inputs[0].name
    start = time.perf_counter()
    quantized = lowbit.quantize(graph, {name: calibration}, progress=False)
    quantize_seconds = time.perf_counter() - start
    start = time.perf_counter()
    int8 = lowbit.compile(quantized)
    compile_seconds = time.perf_counter() - start
    fp32 = lowbit.compile(lowbit.optimize(graph))
    sessions = {"ort fp32": _session(model)}
    for activations in ("s8", "u8"):
        sessions[f"ort {activations}s8"] = _session(_ort_int8(model, name, calibration, batch, activations))
    x = feeds_x[:batch]
    feeds = {name: x}
    got = int8.run(feeds)
    want = lowbit.run_reference(quantized, feeds)
    for key in want:
        if not np.array_equal(got[key], want[key]):
            raise SystemExit(f"{label}: lowbit int8 differs from the reference interpreter in '{key}'")
    engines = {"lowbit int8": lambda: int8.run(feeds), "lowbit fp32": lambda: fp32.run(feeds)}
    engines.update({engine: (lambda s=session: s.run(None, feeds)) for engine, session in sessions.items()})
    times = interleaved(engines, rounds)
    row = {"case": label, **{engine: seconds * 1e3 for engine, seconds in times.items()},
           "quantize s": quantize_seconds, "compile s": compile_seconds}
    if test is not None:
        row["accuracy"] = _accuracies(test, batch, name, int8, fp32, sessions)
    return row


def _accuracies(test: tuple[np.ndarray, np.ndarray], batch: int, name: str, int8, fp32, sessions) -> dict:
    x, y = test
    usable = len(x) // batch * batch
    runs = {"lowbit int8": lambda f: next(iter(int8.run(f).values())),
            "lowbit fp32": lambda f: next(iter(fp32.run(f).values())),
            **{engine: (lambda f, s=session: s.run(None, f)[0]) for engine, session in sessions.items()}}
    result = {}
    for engine, run in runs.items():
        logits = np.concatenate([run({name: x[i:i + batch]}) for i in range(0, usable, batch)])
        result[engine] = float((logits.argmax(axis=1) == y[:usable]).mean())
    return result


def digits_cases(rounds: int) -> list[dict]:
    with np.load(DATA / "digits_calib.npz") as data:
        calibration = data["x"].astype(np.float32)
    with np.load(DATA / "digits_test.npz") as data:
        test_x, test_y = data["x"].astype(np.float32), data["y"]
    rows = []
    for label, path, flat in (("digits CNN", "digits_cnn.onnx", False), ("MLP", "mlp.onnx", True)):
        model = onnx.load(DATA / path)
        shape = (-1, 784) if flat else (-1, 1, 28, 28)
        for batch in (1, 64):
            rows.append(model_case(f"{label} b{batch}", model, batch, calibration[:64].reshape(shape),
                                   test_x.reshape(shape), rounds, (test_x.reshape(shape), test_y)))
    return rows


def resnet_case(rounds: int, image: int) -> dict:
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    from model_builders import resnet18

    model = resnet18(image=image)
    calibration = RNG.standard_normal((8, 3, image, image)).astype(np.float32)
    x = RNG.standard_normal((1, 3, image, image)).astype(np.float32)
    return model_case(f"ResNet-18 {image} b1", model, 1, calibration, x, rounds, None)


ENGINES = ("lowbit int8", "lowbit fp32", "ort fp32", "ort s8s8", "ort u8s8")


def _table(rows: list[dict]) -> None:
    print("\nlatency, ms, single thread (median of interleaved rounds); x: engine / lowbit int8")
    print(f"{'case':18}" + "".join(f"{engine:>12}" for engine in ENGINES) + "".join(
        f"{'x ' + engine:>15}" for engine in ENGINES[1:]) + f"{'compile s':>11}")
    for row in rows:
        print(f"{row['case']:18}" + "".join(f"{row[engine]:12.3f}" for engine in ENGINES) + "".join(
            f"{row[engine] / row['lowbit int8']:15.2f}" for engine in ENGINES[1:]) + f"{row['compile s']:11.2f}")
    accuracy = [row for row in rows if "accuracy" in row]
    if accuracy:
        print("\ntop-1 accuracy on digits_test.npz")
        print(f"{'case':18}" + "".join(f"{engine:>12}" for engine in ENGINES))
        for row in accuracy:
            print(f"{row['case']:18}" + "".join(f"{row['accuracy'][engine]:12.3f}" for engine in ENGINES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = digits_cases(args.rounds)
    if not args.skip_resnet:
        rows.append(resnet_case(args.rounds, args.image))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    _table(rows)


if __name__ == "__main__":
    main()
