"""`lowbit.prune`: a pruned copy of a graph; `parse_prune_spec` reads the command line's METHOD[:ARGS]."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from lowbit.ir import Graph, verify
from lowbit.passes.prune.filters import prune_filters_l1
from lowbit.passes.prune.layers import PruneError, check_fraction, split_names
from lowbit.passes.prune.weights import BlockPruning, MagnitudePruning, NMPruning, RandomPruning, WeightPruning

SPECS = {
    "magnitude": "magnitude:SPARSITY[:layer|global]",
    "random": "random:SPARSITY[:SEED]",
    "nm": "nm:N:M",
    "block": "block:RxC:SPARSITY",
    "filters": "filters:RATIO",
}
# The options of `prune` each method takes (beyond exclude and overrides).
OPTIONS = {
    "magnitude": ("sparsity", "scope", "calibration", "update", "damping"),
    "random": ("sparsity", "seed", "calibration", "update", "damping"),
    "nm": ("n", "m", "calibration", "update", "damping"),
    "block": ("block", "sparsity", "calibration", "update", "damping"),
    "filters": ("ratio",),
}
DEFAULTS = {"sparsity": 0.5, "scope": "layer", "seed": 0, "n": 2, "m": 4, "block": (1, 4), "ratio": 0.3,
            "damping": 0.01}


def parse_prune_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """`"magnitude:0.9"`, `"magnitude:0.9:global"`, `"random:0.5:7"`, `"nm:2:4"`, `"block:1x4:0.8"`,
    `"filters:0.3"` → (method, keyword options of `prune`). A bare method name takes the defaults."""
    method, *args = [part.strip() for part in spec.strip().split(":")]
    if method not in SPECS:
        raise PruneError(f"unknown pruning method {method!r} in {spec!r}; expected one of "
                         f"{', '.join(SPECS.values())}")
    usage = f"pruning spec {spec!r}: expected {SPECS[method]}"
    try:
        return method, _spec_options(method, args, usage)
    except ValueError:
        raise PruneError(f"{usage}; {':'.join(args)!r} holds something that is not a number") from None


def _spec_options(method: str, args: list[str], usage: str) -> dict[str, Any]:
    if len(args) > (1 if method == "filters" else 2) or (method in ("nm", "block") and len(args) == 1):
        raise PruneError(f"{usage} ({len(args)} argument(s) given)")
    if not args:
        return {}
    if method == "filters":
        return {"ratio": check_fraction(args[0], usage)}
    if method == "nm":
        n, m = int(args[0]), int(args[1])
        if not 0 < n < m:
            raise PruneError(f"{usage} with 0 < N < M, got {n}:{m}")
        return {"n": n, "m": m}
    if method == "block":
        rows, sep, cols = args[0].partition("x")
        if not sep or int(rows) < 1 or int(cols) < 1:
            raise PruneError(f"{usage}; the block shape is two positive sizes like 1x4, not {args[0]!r}")
        return {"block": (int(rows), int(cols)), "sparsity": check_fraction(args[1], usage)}
    options: dict[str, Any] = {"sparsity": check_fraction(args[0], usage)}
    if len(args) == 2 and method == "random":
        options["seed"] = int(args[1])
    elif len(args) == 2:
        if args[1] not in ("layer", "global"):
            raise PruneError(f"{usage}; the scope is 'layer' or 'global', not {args[1]!r}")
        options["scope"] = args[1]
    return options


def prune(graph: Graph, method: str = "magnitude", *, sparsity: float | None = None, calibration: Any = None,
          n: int | None = None, m: int | None = None, block: tuple[int, int] | None = None,
          ratio: float | None = None, exclude: str | Iterable[str] = (),
          overrides: str | Mapping[str, float] | None = None, update: bool | str | None = None,
          scope: str | None = None, seed: int | None = None, damping: float | None = None) -> Graph:
    """A pruned copy of `graph` (see docs/pruning.md).

    `method`: "magnitude" (unstructured by |w|; `sparsity`, `scope` "layer" or "global"), "random"
    (`sparsity`, `seed`), "nm" (`n` of every `m` weights along K kept), "block" (`block` = (rows, cols)
    of the weight matrix [outputs, K], `sparsity` of the blocks) or "filters" (`ratio` of each conv's
    filters removed, shrinking the graph); or a spec with its arguments, as on the command line
    ("magnitude:0.9", "nm:2:4", "block:1x4:0.8", "filters:0.3"), whose values come before the keywords'.
    `calibration`: feed dicts, a dict of whole sample arrays, or an .npz path; with it the SparseGPT weight
    update is on (`update=False` turns it off, `update=True` insists on it) and the summary gives each
    layer's output error. `exclude`: node names, weight names or op types left dense. `overrides`:
    per-layer sparsity (or ratio) by node name, `{"fc1": 0.7}` or `"fc1:0.7;fc2:0.5"`.
    The summary is in `result.metadata["pruning"]` (`lowbit.passes.prune.format_summary(result)`).
    """
    name, from_spec = parse_prune_spec(method)
    if name == "filters" and update is False:
        update = None  # filter pruning has no update to turn off
    given = {"sparsity": sparsity, "n": n, "m": m, "block": block, "ratio": ratio, "scope": scope, "seed": seed,
             "damping": damping, "update": update}
    given = {key: value for key, value in given.items() if value is not None}
    misplaced = sorted(set(given) - set(OPTIONS[name]))
    if misplaced:
        raise PruneError(f"option(s) {', '.join(misplaced)} do not apply to {name} pruning; it takes "
                         f"{', '.join(OPTIONS[name])}")
    options = {key: value for key, value in {**DEFAULTS, **given, **from_spec}.items() if key in OPTIONS[name]}
    common = {"exclude": ";".join(split_names(exclude)), "overrides": _overrides_text(overrides)}
    result = graph.copy()
    if name == "filters":
        prune_filters_l1(result, ratio=options["ratio"], **common)
    else:
        _weight_pass(name, options, common).prune(result, calibration)
    verify(result)
    return result


def _weight_pass(name: str, options: dict[str, Any], common: dict[str, str]) -> WeightPruning:
    update = options.pop("update", None)
    common["update"] = {None: "auto", True: "sparsegpt", False: "none"}.get(update, update)
    if name == "block":
        options["shape"] = tuple(options.pop("block"))
    cls = {"magnitude": MagnitudePruning, "random": RandomPruning, "nm": NMPruning, "block": BlockPruning}[name]
    return cls(**common, **options)


def _overrides_text(overrides: str | Mapping[str, float] | None) -> str:
    if not overrides:
        return ""
    if isinstance(overrides, str):
        return overrides
    return ";".join(f"{name}:{value}" for name, value in overrides.items())
