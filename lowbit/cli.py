"""The `lowbit` command line: inspect a model, run it with the reference interpreter, run passes.

User errors (any `LowbitError`, unreadable files, bad arguments) print one line,
`lowbit: error: ...`, to stderr and exit with status 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

import lowbit
from lowbit.backends.native.target import NAMED_TARGETS
from lowbit.errors import InputError, LowbitError
from lowbit.ir import Graph, TensorType, Value

USAGE_ERROR = 2
ARGMAX_ROWS = 10


class CliError(Exception):
    """A user error found by the CLI itself (bad --input spec, unreadable .npy file)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints usage and error on two)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USAGE_ERROR, f"lowbit: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lowbit", description="lowbit: a model-compression compiler for ONNX models.")
    parser.add_argument("--version", action="version", version=f"lowbit {lowbit.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def add_model(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("model", metavar="MODEL", help="an ONNX model (.onnx) or a lowbit IR text file (.lbir)"
                                                        " (for run also an artifact folder from lowbit compile)")
        sub.add_argument("--batch-size", type=_positive_int, metavar="N",
                         help="bind a symbolic batch dimension of an ONNX model to N (default 1)")

    def add_calibration(sub: argparse.ArgumentParser, purpose: str) -> None:
        sub.add_argument("--calibration", "-c", metavar="CALIB.npz", help=purpose)
        sub.add_argument("--calibration-array", action="append", default=[], metavar="INPUT=ARRAY",
                         help="read input INPUT from the .npz array ARRAY (when the names differ)")

    inspect = commands.add_parser("inspect", help="print inputs, outputs, op counts and parameters",
                                  description="Print a model's inputs, outputs, op histogram and parameter size.")
    add_model(inspect)
    inspect.add_argument("--ir", action="store_true", help="also print the IR text form")
    inspect.add_argument("--full", action="store_true",
                         help="with --ir, write every weight in full (the text then round-trips as .lbir)")
    inspect.set_defaults(handler=cmd_inspect)

    run = commands.add_parser("run", help="run a model with the reference interpreter, or a compiled artifact",
                              description="Run a model with the reference (numpy) interpreter, or an artifact "
                                          "folder written by `lowbit compile` with its native code.")
    add_model(run)
    run.add_argument("--input", "-i", action="append", required=True, metavar="[NAME=]FILE.npy",
                     help="feed for input NAME (repeat per input); NAME= may be left out for a one-input model")
    run.add_argument("--output", "-o", metavar="OUT.npz", help="save all outputs, keyed by name, to OUT.npz")
    run.set_defaults(handler=cmd_run)

    opt = commands.add_parser("opt", help="run a pipeline of passes and print or save the IR",
                              description="Run passes over a model; print the IR, or save it as .lbir with -o.")
    add_model(opt)
    opt.add_argument("--pipeline", "-p", default="default",
                     help="passes, e.g. 'fold-constants,fuse-epilogue' or 'prune-nm{n=2,m=4}' (default: default)")
    opt.add_argument("--print-ir-after-all", action="store_true", help="print the IR after every pass (stderr)")
    opt.add_argument("--print-ir-after-change", action="store_true",
                     help="print the IR after each pass that changed it (stderr)")
    opt.add_argument("--timing", action="store_true", help="print each pass's time (stderr)")
    opt.add_argument("--output", "-o", metavar="OUT.lbir", help="save the result with all weights as IR text")
    opt.set_defaults(handler=cmd_opt)

    quantize = commands.add_parser("quantize", help="post-training quantization to int8 (or int16/int4)",
                                   description="Quantize a model with calibration data; save the result as .lbir.")
    add_model(quantize)
    add_calibration(quantize, "one array per input name, samples along the first axis (static mode)")
    quantize.add_argument("--mode", choices=("static", "dynamic", "weight_only"), default="static")
    quantize.add_argument("--method", choices=("minmax", "percentile", "entropy", "mse"), default="minmax",
                          help="calibration observer (default minmax)")
    quantize.add_argument("--percentile", type=float, help="the percentile of --method percentile (99.99)")
    quantize.add_argument("--weights", choices=("int8", "int7", "int4", "uint4"), default="int8")
    quantize.add_argument("--activations", choices=("int8", "uint8", "int16"), default="int8")
    quantize.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor, not per channel")
    quantize.add_argument("--exclude", action="append", default=[], metavar="NODE_OR_OP",
                          help="keep this node (by name) or op type in float (repeatable)")
    quantize.add_argument("--output", "-o", metavar="OUT.lbir", required=True, help="where to save the result")
    quantize.add_argument("--report", metavar="DIR",
                          help="write per-layer SQNR and max error (report.json, report.png) to DIR")
    quantize.set_defaults(handler=cmd_quantize)

    prune = commands.add_parser("prune", help="prune weights (magnitude, random, N:M, block) or conv filters",
                                description="Prune a model (with the SparseGPT weight update when calibration data "
                                            "is given); save it as .lbir.")
    add_model(prune)
    prune.add_argument("--method", "-m", action="append", required=True, metavar="SPEC",
                       help="magnitude:SPARSITY[:layer|global], random:SPARSITY[:SEED], nm:N:M, block:RxC:SPARSITY "
                            "or filters:RATIO (repeat to apply several in order)")
    add_calibration(prune, "one array per input name; turns on the weight update")
    prune.add_argument("--no-update", action="store_true",
                       help="with --calibration: no weight update (errors still reported)")
    prune.add_argument("--exclude", action="append", default=[], metavar="NODE_OR_OP", help="leave dense (repeatable)")
    prune.add_argument("--override", action="append", default=[], metavar="NODE=SPARSITY",
                       help="per-layer sparsity or ratio; 0 = dense")
    prune.add_argument("--sparsify", action="store_true", help="then mark sparse weights with sparse layouts")
    prune.add_argument("--output", "-o", metavar="OUT.lbir", required=True)
    prune.set_defaults(handler=cmd_prune)

    compile_ = commands.add_parser("compile", help="compile a model ahead of time to a C library and weights file",
                                   description="Compile a model for a target into an artifact folder: model.so (or "
                                               "model.o), model.h (the C interface), weights.bin, manifest.json.")
    add_model(compile_)
    compile_.add_argument("--output", "-o", metavar="DIR", required=True,
                          help="the artifact folder (created if needed; its files are replaced)")
    compile_.add_argument("--target", "-t", default="host", choices=["host", *NAMED_TARGETS], metavar="TARGET",
                          help=f"host (default: this machine) or one of {', '.join(NAMED_TARGETS)}")
    compile_.add_argument("--emit", choices=("so", "obj"), default="so",
                          help="a shared library (default) or a relocatable object to link into a program")
    compile_.add_argument("--pipeline", "-p", help="passes to run first (default: the default pipeline)")
    compile_.add_argument("--prune", action="append", default=[], metavar="SPEC",
                          help="prune first, e.g. magnitude:0.9 or nm:2:4 (repeatable; see lowbit prune)")
    compile_.add_argument("--quantize", choices=("int8", "int7", "dynamic"),
                          help="quantize after pruning: static int8 (int7: 7-bit weights) or dynamic")
    add_calibration(compile_, "calibration data for --quantize (static) and for the pruning update")
    compile_.add_argument("--threads", type=_positive_int, default=1, metavar="N",
                          help="threads per run (default 1): convolutions and matrix products split their outputs")
    compile_.add_argument("--optimize-for", choices=("speed", "size"), default="speed",
                          help="speed (default) or size: sparse weights always stored in their most compact "
                               "sparse packing")
    compile_.set_defaults(handler=cmd_compile)

    tune = commands.add_parser("tune", help="measure this machine's sparse vs dense kernel costs",
                               description="Time generated sparse and dense linear layers and write the fitted "
                                           "cost constants (used to choose sparse kernels) to the user cache.")
    tune.add_argument("--repeats", type=_positive_int, default=30, help="timed calls per measurement")
    tune.set_defaults(handler=cmd_tune)

    passes = commands.add_parser("passes", help="list the registered passes and named pipelines",
                                 description="List every registered pass with its options, and the named pipelines.")
    passes.set_defaults(handler=cmd_passes)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (LowbitError, CliError) as error:
        return _fail(str(error))
    except BrokenPipeError:
        # The reader of our output went away (`lowbit passes | head`): nothing left to say.
        sys.stderr.close()
        return 0
    except OSError as error:
        # Files named on the command line that cannot be read or written.
        return _fail(f"'{error.filename}': {error.strerror}" if error.filename else str(error))
    return 0


def _fail(message: str) -> int:
    print(f"lowbit: error: {' '.join(message.split())}", file=sys.stderr)
    return USAGE_ERROR


def cmd_opt(args: argparse.Namespace) -> None:
    from lowbit.passes import PassManager

    graph = load_model(args)
    print_ir = "all" if args.print_ir_after_all else ("changed" if args.print_ir_after_change else None)
    manager = PassManager(args.pipeline, print_ir=print_ir, timing=args.timing, stream=sys.stderr)
    before = len(graph.nodes)
    manager.run(graph)
    if args.output:
        lowbit.ir.save(graph, args.output)
        print(f"wrote {args.output}: {before} -> {len(graph.nodes)} nodes")
    else:
        sys.stdout.write(str(graph))


def cmd_quantize(args: argparse.Namespace) -> None:
    from lowbit.passes.quantize import format_table, layer_errors, write_report
    from lowbit.passes.quantize.quantizer import prepare

    graph = load_model(args)
    calibration = _calibration(args, graph)
    if calibration is None and (args.mode == "static" or args.report):
        raise CliError("--calibration CALIB.npz is needed for static quantization and for --report")
    options = {"percentile": args.percentile} if args.percentile is not None else {}
    quantized = lowbit.quantize(graph, calibration, mode=args.mode, method=args.method, weights=args.weights,
                                activations=args.activations, per_channel=not args.per_tensor,
                                exclude=args.exclude, **options)
    lowbit.ir.save(quantized, args.output)
    counts = ", ".join(f"{op} {n}" for op, n in quantized.op_histogram().items())
    print(f"wrote {args.output}: {counts}")
    print(f"weights: {_format_bytes(graph.parameter_bytes())} -> {_format_bytes(quantized.parameter_bytes())}")
    if args.report:
        errors = layer_errors(prepare(graph), quantized, calibration)
        print(format_table(errors))
        for path in write_report(errors, args.report):
            print(f"wrote {path}")


def _calibration(args: argparse.Namespace, graph: Graph):
    """Batches of calibration feeds from --calibration (and --calibration-array), or None."""
    from lowbit.passes.quantize import load_calibration_npz

    if not args.calibration:
        return None
    names = {}
    for spec in args.calibration_array:
        key, sep, array = spec.partition("=")
        if not sep:
            raise CliError(f"--calibration-array needs INPUT=ARRAY, got '{spec}'")
        names[key] = array
    return load_calibration_npz(args.calibration, graph, names=names)


def cmd_prune(args: argparse.Namespace) -> None:
    from lowbit.passes.prune import format_summary, parse_prune_spec

    for spec in args.method:
        parse_prune_spec(spec)  # bad specs fail before any work
    graph = load_model(args)
    calibration = _calibration(args, graph)
    overrides = {}
    for item in args.override:
        name, sep, value = item.rpartition("=")
        if not sep:
            raise CliError(f"--override needs NODE=SPARSITY, got '{item}'")
        overrides[name] = value
    pruned = graph
    for spec in args.method:
        pruned = lowbit.prune(pruned, spec, calibration=calibration, update=False if args.no_update else None,
                              exclude=args.exclude, overrides=overrides or None)
    if args.sparsify:
        pruned = lowbit.optimize(pruned, "sparsify")
    lowbit.ir.save(pruned, args.output)
    print(format_summary(pruned))
    print(f"wrote {args.output}: weights {_format_bytes(graph.parameter_bytes())} -> "
          f"{_format_bytes(pruned.parameter_bytes())}")


def cmd_compile(args: argparse.Namespace) -> None:
    from lowbit.backends.native.aot import export
    from lowbit.passes.prune import parse_prune_spec

    for spec in args.prune:
        parse_prune_spec(spec)  # bad specs fail before any work
    if args.quantize in ("int8", "int7") and not args.calibration:
        raise CliError(f"--quantize {args.quantize} needs --calibration CALIB.npz")
    graph = load_model(args)
    calibration = _calibration(args, graph)
    graph = lowbit.optimize(graph, args.pipeline or "default")
    for spec in args.prune:
        graph = lowbit.prune(graph, spec, calibration=calibration)
    if args.quantize:
        graph = lowbit.quantize(graph, calibration, mode="dynamic" if args.quantize == "dynamic" else "static",
                                weights="int7" if args.quantize == "int7" else "int8")
    if args.prune:  # record the sparse layouts (of the final weights): kernel selection reads them
        graph = lowbit.optimize(graph, "sparsify")
    folder = export(graph, args.output, target=args.target, emit=args.emit, num_threads=args.threads,
                    optimize=args.optimize_for)
    manifest = json.loads((folder / "manifest.json").read_text())
    files = ", ".join(f"{name} ({_format_bytes((folder / name).stat().st_size)})"
                      for name in (*manifest["files"].values(), "manifest.json"))
    target = manifest["target"]
    print(f"wrote {folder}: {files}")
    print(f"target {target['name']} ({target['triple']}, {target['cpu']}); "
          f"{manifest['arena_bytes']:,} bytes of working memory per run")


def cmd_tune(args: argparse.Namespace) -> None:
    from lowbit.backends.native.sparse_selection import tune, tuning_path

    print(json.dumps(tune(args.repeats), indent=2))
    print(f"written to {tuning_path()}")


def cmd_passes(args: argparse.Namespace) -> None:
    from lowbit.passes import PIPELINES, registered_passes

    for name, cls in registered_passes().items():
        options = ", ".join(f"{key}: {getattr(kind, '__name__', kind)} = {default}"
                            for key, (kind, default) in cls.options().items())
        print(f"{name}{'{' + options + '}' if options else ''}")
        print(f"    {cls.summary()}")
    print("\nnamed pipelines:")
    for name, text in sorted(PIPELINES.items()):
        print(f"  {name} = {text}")


def load_model(args: argparse.Namespace) -> Graph:
    if args.batch_size is not None and Path(args.model).suffix == ".lbir":
        raise CliError(f"--batch-size applies to ONNX models; the shapes of '{args.model}' are fixed")
    return lowbit.load_graph(args.model, batch_size=args.batch_size)


# -- inspect ---------------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> None:
    if args.full and not args.ir:
        raise CliError("--full only applies together with --ir")
    graph = load_model(args)
    print(f"model: {args.model}")
    if graph.metadata:
        print("metadata: " + ", ".join(f"{key}={value}" for key, value in graph.metadata.items()))
    print("inputs:")
    _print_values([(v.name, v) for v in graph.inputs])
    print("outputs:")
    _print_values(list(zip(graph.output_names, graph.outputs)))
    histogram = graph.op_histogram()
    print(f"ops: {len(graph.nodes)} nodes")
    width = max((len(op) for op in histogram), default=0)
    for op, count in histogram.items():
        print(f"  {op:<{width}}  {count}")
    print(f"parameters: {graph.parameter_count():,} in {len(graph.constants)} constants, "
          f"{_format_bytes(graph.parameter_bytes())}")
    if args.ir:
        print()
        print(graph.to_text(full=args.full), end="")


def _print_values(named: list[tuple[str, Value]]) -> None:
    width = max((len(name) for name, _ in named), default=0)
    for name, value in named:
        print(f"  {name:<{width}}  {value.type}")


def _format_bytes(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    size = count / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


# -- run -------------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> None:
    if Path(args.model).is_dir():  # an artifact folder from `lowbit compile`: its native code runs
        if args.batch_size is not None:
            raise CliError(f"--batch-size applies to ONNX models; the shapes of '{args.model}' are fixed")
        artifact = lowbit.load(args.model)
        signature = Graph("artifact")
        for spec in artifact.inputs:
            signature.add_input(spec.name, TensorType(spec.shape, spec.dtype))
        results = artifact.run(_read_feeds(signature, args.input))
        types = [(spec.name, TensorType(spec.shape, spec.dtype)) for spec in artifact.outputs]
    else:
        graph = load_model(args)
        feeds = _read_feeds(graph, args.input)
        try:
            results = lowbit.run_reference(graph, feeds)
        except InputError as error:
            raise InputError(f"{error}{_batch_hint(graph, feeds)}") from None
        types = [(name, value.type) for name, value in zip(graph.output_names, graph.outputs)]
    for name, type in types:
        print(_summary(name, type, results[name]))
    if args.output:
        # Through a file object, since np.savez would append '.npz' to a path that lacks it.
        with open(args.output, "wb") as file:
            np.savez(file, **results)
        print(f"saved {len(results)} output(s) to {args.output}")


def _read_feeds(graph: Graph, specs: list[str]) -> dict[str, np.ndarray]:
    """Feeds from `NAME=FILE.npy` specs; a bare `FILE.npy` feeds the only input of a one-input model."""
    names = [v.name for v in graph.inputs]
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        # Split at '=' only when the prefix names an input, so file paths may contain '='.
        name, sep, path = spec.partition("=")
        if sep and name not in names and not Path(spec).exists():
            raise CliError(f"--input '{spec}': the model has no input '{name}'; its inputs are {names}")
        if not sep or name not in names:
            if len(names) != 1:
                raise CliError(f"--input '{spec}': give NAME=FILE.npy, where NAME is one of the model's "
                               f"inputs {names}")
            name, path = names[0], spec
        if name in feeds:
            raise CliError(f"input '{name}' is given more than once")
        feeds[name] = _read_array(path)
    return feeds


def _read_array(path: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError:
        # numpy's own message talks about pickles, which says nothing useful here.
        raise CliError(f"'{path}' is not a valid .npy file") from None
    if not isinstance(array, np.ndarray):
        raise CliError(f"'{path}' holds several arrays (.npz); give one .npy file per input")
    return array


def _batch_hint(graph: Graph, feeds: dict[str, np.ndarray]) -> str:
    """A hint when a feed differs from its input only in the first (batch) dimension."""
    for value in graph.inputs:
        if value.name not in feeds:
            continue
        shape, want = feeds[value.name].shape, value.type.shape
        if shape and want and shape[0] != want[0] and shape[1:] == want[1:]:
            return f"; for a batch of {shape[0]} pass --batch-size {shape[0]}"
    return ""


def _summary(name: str, type: TensorType, array: np.ndarray) -> str:
    text = f"output '{name}': {type}"
    if array.size and array.dtype.kind in "fiub":
        values = array.astype(np.float64)
        text += f"  min={values.min():.6g} max={values.max():.6g} mean={values.mean():.6g}"
        if array.ndim == 2 and array.dtype.kind == "f":
            argmax = array.argmax(axis=1).tolist()
            more = ", ..." if len(argmax) > ARGMAX_ROWS else ""
            text += f"  argmax=[{', '.join(map(str, argmax[:ARGMAX_ROWS]))}{more}]"
    return text


if __name__ == "__main__":
    sys.exit(main())
