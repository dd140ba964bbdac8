"""The `lowbit` command line, run as a user would: in a subprocess, checking output and exit status."""
from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.ir import save

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "lowbit" / "examples" / "digits_cnn.onnx"
EXAMPLE_INPUT = ROOT / "lowbit" / "examples" / "digit.npy"


def lowbit_cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 2 and exactly one line on stderr, `lowbit: error: ...`, naming every fragment."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lowbit: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A folder with `tiny.onnx` (y = relu(x + [-2, -1, 0, 1]), x: f32[batch, 4]), its `.lbir` twin and feeds."""
    folder = tmp_path_factory.mktemp("tiny")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    bias = numpy_helper.from_array(np.arange(4, dtype=np.float32) - 2, "bias")
    graph = helper.make_graph([helper.make_node("Add", ["x", "bias"], ["s"], name="add0"),
                               helper.make_node("Relu", ["s"], ["y"], name="relu0")], "tiny", [x], [y], [bias])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "tiny.onnx")
    save(lowbit.import_onnx(folder / "tiny.onnx"), folder / "tiny.lbir")
    np.save(folder / "x.npy", np.ones((1, 4), np.float32))
    np.save(folder / "x3.npy", np.arange(12, dtype=np.float32).reshape(3, 4))
    np.save(folder / "x_int.npy", np.ones((1, 4), np.int64))
    return folder


def test_version():
    result = lowbit_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"lowbit {lowbit.__version__}"


def test_console_script_is_declared():
    scripts = {entry.name: entry.value for entry in metadata.entry_points(group="console_scripts")}
    assert scripts.get("lowbit") == "lowbit.cli:main"


def test_inspect_prints_inputs_outputs_ops_and_parameters(tiny):
    result = lowbit_cli("inspect", tiny / "tiny.onnx")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "x  f32[1,4]" in out and "y  f32[1,4]" in out
    assert "add   1" in out and "relu  1" in out
    assert "parameters: 4 in 1 constants, 16 B" in out
    assert "graph " not in out  # the IR only with --ir


def test_inspect_ir_and_batch_size(tiny):
    result = lowbit_cli("inspect", tiny / "tiny.onnx", "--ir", "--batch-size", "5")
    assert result.returncode == 0, result.stderr
    assert 'graph "tiny" {' in result.stdout
    assert "input %x: f32[5,4]" in result.stdout
    assert 'loc("relu0")' in result.stdout


def test_inspect_full_ir_round_trips(tiny):
    result = lowbit_cli("inspect", tiny / "tiny.lbir", "--ir", "--full")
    assert result.returncode == 0, result.stderr
    text = result.stdout[result.stdout.index("graph "):]
    assert str(lowbit.ir.parse(text)) == str(lowbit.load_graph(tiny / "tiny.lbir"))


def test_run_with_bare_file_and_named_input(tiny):
    for spec in ("x.npy", "x=x.npy"):
        result = lowbit_cli("run", "tiny.onnx", "--input", spec, cwd=tiny)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "output 'y': f32[1,4]  min=0 max=2 mean=0.75  argmax=[3]"


def test_run_batch_and_save_outputs(tiny, tmp_path):
    out = tmp_path / "result.bin"  # saved exactly where asked, no '.npz' appended
    result = lowbit_cli("run", tiny / "tiny.onnx", "-i", tiny / "x3.npy", "--batch-size", "3", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "f32[3,4]" in result.stdout and "argmax=[3, 3, 3]" in result.stdout
    saved = np.load(out)
    x = np.load(tiny / "x3.npy")
    np.testing.assert_array_equal(saved["y"], np.maximum(x + np.arange(4, dtype=np.float32) - 2, 0))


def test_run_lbir_model(tiny):
    result = lowbit_cli("run", tiny / "tiny.lbir", "--input", tiny / "x.npy")
    assert result.returncode == 0, result.stderr
    assert "output 'y': f32[1,4]" in result.stdout


@pytest.mark.parametrize("args, fragments", [
    (("run", "tiny.onnx", "-i", "x3.npy"), ("input 'x'", "[1, 4]", "[3, 4]", "--batch-size 3")),
    (("run", "tiny.onnx", "-i", "x_int.npy"), ("input 'x'", "f32", "int64")),
    (("run", "tiny.onnx", "-i", "z=x.npy"), ("no input 'z'", "['x']")),
    (("run", "tiny.onnx", "-i", "x=x.npy", "-i", "x.npy"), ("'x'", "more than once")),
    (("run", "tiny.onnx", "-i", "missing.npy"), ("missing.npy", "No such file")),
    (("run", "tiny.onnx", "-i", "tiny.onnx"), ("tiny.onnx", "not a valid .npy file")),
    (("run", "tiny.onnx"), ("--input",)),
    (("run", "tiny.lbir", "-i", "x.npy", "--batch-size", "2"), ("--batch-size", "tiny.lbir")),
    (("inspect", "missing.onnx"), ("missing.onnx", "does not exist")),
    (("inspect", "x.npy"), ("x.npy", "not a valid ONNX model")),
    (("inspect", "tiny.onnx", "--batch-size", "0"), ("--batch-size", "positive")),
    (("inspect", "tiny.onnx", "--full"), ("--full", "--ir")),
    (("frobnicate",), ("frobnicate",)),
    ((), ("COMMAND",)),
])
def test_user_errors_are_one_line_and_exit_2(tiny, args, fragments):
    assert_user_error(lowbit_cli(*args, cwd=tiny), *fragments)


def test_unwritable_output_is_a_user_error(tiny, tmp_path):
    out = tmp_path / "no" / "such" / "dir.npz"
    assert_user_error(lowbit_cli("run", tiny / "tiny.onnx", "-i", tiny / "x.npy", "-o", out), str(out))


def test_bundled_example_inspect():
    result = lowbit_cli("inspect", EXAMPLE)
    assert result.returncode == 0, result.stderr
    assert "input  f32[1,1,28,28]" in result.stdout
    assert "logits  f32[1,10]" in result.stdout
    assert "parameters: 34,826" in result.stdout


def test_bundled_example_run_predicts_the_digit():
    # The sample is the first test image of tests/data/digits_test.npz, a 4.
    assert np.load(EXAMPLE_INPUT).shape == (1, 1, 28, 28)
    result = lowbit_cli("run", EXAMPLE, "--input", EXAMPLE_INPUT)
    assert result.returncode == 0, result.stderr
    assert "output 'logits': f32[1,10]" in result.stdout
    assert "argmax=[4]" in result.stdout


def test_readme_python_example_runs(monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = "\n".join(block.split("```", 1)[0] for block in readme.split("```python\n")[1:])
    monkeypatch.chdir(ROOT)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "[4]" in out and "[[0. 0. 1. 2.]]" in out


def test_opt_runs_a_pipeline_and_saves_lbir(tmp_path):
    out = tmp_path / "opt.lbir"
    result = lowbit_cli("opt", str(EXAMPLE), "-p", "fold-constants,fuse-epilogue,dce", "--timing",
                        "--print-ir-after-change", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "IR after fuse-epilogue" in result.stderr and "pass timing" in result.stderr
    assert "8 -> 6 nodes" in result.stdout
    ran = lowbit_cli("run", str(out), "--input", str(EXAMPLE_INPUT))
    assert ran.returncode == 0 and "argmax=[4]" in ran.stdout


def test_opt_prints_ir_and_rejects_unknown_passes():
    printed = lowbit_cli("opt", str(EXAMPLE))
    assert printed.returncode == 0 and 'activation = "relu"' in printed.stdout
    bad = lowbit_cli("opt", str(EXAMPLE), "-p", "fold-constant")
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("lowbit: error: unknown pass 'fold-constant'; did you mean 'fold-constants'? "
                                  "(`lowbit passes` lists them)")


def test_passes_lists_passes_options_and_pipelines():
    result = lowbit_cli("passes")
    assert result.returncode == 0
    assert "fold-constants{max_elements: int = 16777216}" in result.stdout
    assert "default = cleanup,fuse,dce" in result.stdout


def test_quantize_writes_lbir_and_report(tmp_path):
    data = ROOT / "tests" / "data"
    out = tmp_path / "q.lbir"
    result = lowbit_cli("quantize", str(data / "digits_cnn.onnx"), "--calibration", str(data / "digits_calib.npz"),
                        "--calibration-array", "input=x", "--method", "percentile", "-o", str(out),
                        "--report", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    assert "qconv2d 2" in result.stdout and "SQNR dB" in result.stdout and "/conv1/Conv" in result.stdout
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [row["name"] for row in report["layers"]][0] == "/conv1/Conv"
    assert all(row["sqnr_db"] > 20 for row in report["layers"])
    ran = lowbit_cli("run", str(out), "--input", str(EXAMPLE_INPUT))
    assert ran.returncode == 0 and "argmax=[4]" in ran.stdout


def test_quantize_static_without_calibration_is_a_one_line_error(tmp_path):
    result = lowbit_cli("quantize", str(EXAMPLE), "-o", str(tmp_path / "q.lbir"))
    assert result.returncode == 2
    assert result.stderr.strip() == ("lowbit: error: --calibration CALIB.npz is needed for static quantization "
                                     "and for --report")


def test_prune_with_calibration_prints_the_summary(tmp_path):
    data = ROOT / "tests" / "data"
    out = tmp_path / "pruned.lbir"
    result = lowbit_cli("prune", str(data / "digits_cnn.onnx"), "-m", "magnitude:0.5", "-c",
                        str(data / "digits_calib.npz"), "--calibration-array", "input=x", "--sparsify", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "/conv2/Conv" in result.stdout and "sparsegpt update" in result.stdout and "sparse<" in result.stdout
    ran = lowbit_cli("run", str(out), "--input", str(EXAMPLE_INPUT))
    assert ran.returncode == 0 and "argmax=[4]" in ran.stdout
    bad = lowbit_cli("prune", str(data / "digits_cnn.onnx"), "-m", "bogus:1", "-o", str(out))
    assert bad.returncode == 2 and bad.stderr.startswith("lowbit: error: unknown pruning method 'bogus'")


def test_compile_quantized_and_run_the_artifact_folder(tmp_path):
    """The README's first command: quantize + compile the example, then run the artifact natively."""
    data = ROOT / "tests" / "data"
    folder = tmp_path / "digits_int8"
    built = lowbit_cli("compile", str(EXAMPLE), "--quantize", "int8", "--calibration", str(data / "digits_calib.npz"),
                       "--calibration-array", "input=x", "-o", str(folder))
    assert built.returncode == 0, built.stderr
    assert {p.name for p in folder.iterdir()} >= {"model.so", "model.h", "weights.bin", "manifest.json"}
    ran = lowbit_cli("run", str(folder), "--input", str(EXAMPLE_INPUT))
    assert ran.returncode == 0, ran.stderr
    assert "output 'logits': f32[1,10]" in ran.stdout and "argmax=[4]" in ran.stdout
    bad = lowbit_cli("run", str(folder), "--input", str(EXAMPLE_INPUT), "--batch-size", "2")
    assert bad.returncode == 2 and "shapes of" in bad.stderr


@pytest.mark.parametrize("batch", [1, 64])
def test_compile_pruned_int8_mlp_for_size_is_under_8_percent_of_the_onnx_file(tmp_path, batch):
    """The pruning issue's size target: the 90%-sparse int8 MLP artifact (every file of it) ≤ 8% of the fp32
    ONNX file, with `--optimize-for size`; it still predicts what the reference interpreter predicts."""
    data = ROOT / "tests" / "data"
    with np.load(data / "digits_calib.npz") as calib, np.load(data / "digits_test.npz") as test:
        np.savez(tmp_path / "calib.npz", input=calib["x"][:128].reshape(128, -1))
        sample = test["x"][:batch].reshape(batch, -1)
    np.save(tmp_path / "x.npy", sample)
    folder = tmp_path / "mlp_sparse"
    built = lowbit_cli("compile", str(data / "mlp.onnx"), "--batch-size", str(batch), "--prune", "magnitude:0.9",
                       "--quantize", "int8", "--calibration", str(tmp_path / "calib.npz"), "--optimize-for", "size",
                       "-o", str(folder))
    assert built.returncode == 0, built.stderr
    artifact = sum(path.stat().st_size for path in folder.iterdir())
    assert artifact <= 0.08 * (data / "mlp.onnx").stat().st_size
    ran = lowbit_cli("run", str(folder), "--input", str(tmp_path / "x.npy"))
    reference = lowbit_cli("run", str(data / "mlp.onnx"), "--batch-size", str(batch), "--input",
                           str(tmp_path / "x.npy"))
    assert ran.returncode == 0 and reference.returncode == 0, ran.stderr + reference.stderr
    if batch == 1:  # (the pruned model's accuracy is 94.8%: some of 64 images may go another way)
        assert ran.stdout.split("argmax=")[1] == reference.stdout.split("argmax=")[1]
    else:
        assert "logits': f32[64,10]" in ran.stdout


def test_tune_measures_and_the_cost_model_reads_it(tmp_path):
    """`lowbit tune` fits the sparse/dense cost constants on this machine and writes them where the cost
    model reads them (under XDG_CACHE_HOME); `python -m …sparse_selection` then prints the same ones."""
    import os

    from lowbit.backends.native.sparse_selection import KINDS, Costs

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "LOWBIT_CACHE_DIR": str(tmp_path / "compiled")}
    tuned = subprocess.run([sys.executable, "-m", "lowbit.cli", "tune", "--repeats", "1"], capture_output=True,
                           text=True, env=env, timeout=600)
    assert tuned.returncode == 0, tuned.stderr
    written = json.loads((tmp_path / "lowbit" / "sparse_tuning.json").read_text())
    assert set(written) == set(KINDS)
    for constants in written.values():
        assert set(constants) == set(Costs.__dataclass_fields__)
        assert all(np.isfinite(value) and value > 0 for value in constants.values())
    shown = subprocess.run([sys.executable, "-m", "lowbit.backends.native.sparse_selection"], capture_output=True,
                           text=True, env=env, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == written
