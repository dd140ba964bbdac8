"""Calibration: run the float graph on sample data and keep what observers saw of chosen values.

`calibrate` runs the reference interpreter batch by batch (graphs have static shapes, so a batch is
the size the graph was imported with) and feeds each requested value's observer: graph inputs from
the feeds, node results through the interpreter's `observe` hook, constants once from their data.
Memory stays bounded by one batch's intermediate tensors plus the observers' fixed-size state.
"""
from __future__ import annotations

import sys
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.backends.reference import run_reference
from lowbit.errors import InputError
from lowbit.ir import Graph, Node, Value
from lowbit.passes.quantize.observers import CalibrationError, Observer, Range, make_observer

Feeds = Mapping[str, np.ndarray]


class CalibrationWarning(UserWarning):
    """Calibration data was dropped: an incomplete last batch, or values an observer ignores."""


class BatchedFeeds(Sequence):
    """Whole arrays of samples, one per graph input, served as feed dicts of the graph's batch size.

    An input of shape [B, ...] takes an array [N, ...] cut into N // B batches along the first axis
    (all inputs must give the same number of batches; an incomplete last batch is dropped with a
    `CalibrationWarning`); a 0-d input takes a 0-d array fed to every batch. Arrays are cast between
    types of the same kind (float64 data for an f32 input), never between kinds (an integer image for
    a float input is a missing normalisation). `names` maps input names to array names.
    """

    def __init__(self, graph: Graph, arrays: Mapping[str, np.ndarray], *, names: Mapping[str, str] | None = None,
                 source: str = "calibration data") -> None:
        names = dict(names or {})
        inputs = {value.name for value in graph.inputs}
        unknown = sorted(set(names) - inputs)
        if unknown:
            raise InputError(f"{source}: names maps unknown input(s) {unknown}; the graph's inputs are "
                             f"{sorted(inputs)}")
        self.arrays: dict[str, np.ndarray] = {}
        self.batch_sizes: dict[str, int] = {}
        counts: dict[str, int] = {}
        for value in graph.inputs:
            key = names.get(value.name, value.name)
            if key not in arrays:
                raise InputError(f"{source} has no array {key!r} for input '{value.name}' (it has "
                                 f"{sorted(arrays)}); map input names to array names with names={{...}}")
            array = _conform(np.asarray(arrays[key]), value, f"{source}: array {key!r} for input '{value.name}'")
            self.arrays[value.name] = array
            if value.type.rank:
                self.batch_sizes[value.name] = value.type.shape[0]
                counts[value.name] = len(array) // value.type.shape[0]
        self.batches = min(counts.values(), default=1)
        if len(set(counts.values())) > 1:
            raise InputError(f"{source}: inputs give different numbers of batches {counts} "
                             f"(batch sizes {self.batch_sizes})")
        if self.batches == 0:
            raise InputError(f"{source}: fewer samples than one batch ({self.batch_sizes}); calibrate with "
                             f"more data or import the model with a smaller batch_size")
        dropped = {name: len(self.arrays[name]) - self.batches * size for name, size in self.batch_sizes.items()}
        if any(dropped.values()):
            warnings.warn(f"{source}: the last {max(dropped.values())} sample(s) do not fill a batch of "
                          f"{max(self.batch_sizes.values())} and are not used", CalibrationWarning, stacklevel=3)

    def __len__(self) -> int:
        return self.batches

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not -self.batches <= index < self.batches:
            raise IndexError(f"batch {index} of {self.batches}")
        index %= self.batches
        feeds = {}
        for name, array in self.arrays.items():
            size = self.batch_sizes.get(name)
            feeds[name] = array if size is None else array[index * size:(index + 1) * size]
        return feeds


def _conform(array: np.ndarray, value: Value, what: str) -> np.ndarray:
    want = value.type
    if array.dtype.kind != want.dtype.numpy.kind and not {array.dtype.kind, want.dtype.numpy.kind} <= {"i", "u"}:
        raise InputError(f"{what} has dtype {array.dtype}; the input is {want.dtype} ({want.dtype.numpy})")
    if want.rank == 0 and array.shape != ():
        raise InputError(f"{what} has shape {list(array.shape)}; the input is a scalar")
    if want.rank and (array.ndim != want.rank or array.shape[1:] != want.shape[1:]):
        raise InputError(f"{what} has shape {list(array.shape)}; the input takes batches of shape "
                         f"{list(want.shape)}, so it needs [N, {', '.join(map(str, want.shape[1:]))}]")
    return np.ascontiguousarray(array, dtype=want.dtype.numpy)


def load_calibration_npz(path: str | Path, graph: Graph, *, batch_size: int | None = None,
                         names: Mapping[str, str] | None = None) -> BatchedFeeds:
    """Batches of feeds for `graph` from an .npz file holding one array of samples per input name.

    `names` maps input names to array names where they differ (other arrays, e.g. labels, are
    ignored). `batch_size`, when given, must be the batch the graph was imported with (shapes are
    static: import with `lowbit.import_onnx(path, batch_size=N)` to calibrate with batches of N).
    """
    path = Path(path)
    if batch_size is not None:
        for value in graph.inputs:
            if value.type.rank and value.type.shape[0] != batch_size:
                raise InputError(f"input '{value.name}' has batch dimension {value.type.shape[0]}, not "
                                 f"batch_size={batch_size}; import the model with batch_size={batch_size}")
    if not path.exists():
        raise InputError(f"calibration file '{path}' does not exist")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, Mapping):
            raise InputError(f"calibration file '{path}' holds a single array, not an .npz of named arrays")
        with archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise InputError(f"calibration file '{path}' is not a readable .npz file: {error}") from None
    return BatchedFeeds(graph, arrays, names=names, source=f"calibration file '{path}'")


def calibrate(graph: Graph, calibration: Iterable[Feeds] | Feeds, values: Iterable[Value] | None = None, *,
              method: str = "minmax", per_channel_axes: Mapping[Value, int] | None = None,
              progress: bool = True, **observer_options: Any) -> dict[Value, Range]:
    """Ranges of `values` over calibration data, as the `method` observer (see `observers`) gives them.

    `calibration` is an iterable of feed dicts of the graph's input shapes, or one dict of whole
    sample arrays (split into batches by `BatchedFeeds`). `values` defaults to every float graph
    input and float node result; constants may be listed too (observed once). `per_channel_axes`
    gives an axis for values observed per channel (it adds them to `values`). Observer options
    (`percentile=99.99`, `ignore_below=None`, ...) pass through to `make_observer`. A progress bar
    goes to stderr unless `progress=False` (tqdm's when installed, else a one-line counter).
    """
    axes = dict(per_channel_axes or {})
    targets = _targets(graph, values, axes)
    observers = {id(v): make_observer(method, axis=axes.get(v), **observer_options) for v in targets}
    for value in targets:
        if value.is_constant:
            if not isinstance(value.data, np.ndarray):
                raise CalibrationError(f"constant {_describe(value)} has no data (an elided text form)")
            observers[id(value)].update(value.data)
    inputs = [v for v in graph.inputs if id(v) in observers]

    def observe(node: Node, results: list[np.ndarray]) -> None:
        for value, array in zip(node.outputs, results):
            observer = observers.get(id(value))
            if observer is not None:
                observer.update(array)

    batches = BatchedFeeds(graph, calibration) if isinstance(calibration, Mapping) else calibration
    seen = 0
    for feeds in _progress(batches, progress):
        run_reference(graph, feeds, observe=observe)
        for value in inputs:
            observers[id(value)].update(feeds[value.name])
        seen += 1
    if not seen:
        raise CalibrationError("calibration data holds no batches")
    _warn_ignored(targets, observers)
    return {value: observers[id(value)].range() for value in targets}


def _targets(graph: Graph, values: Iterable[Value] | None, axes: Mapping[Value, int]) -> list[Value]:
    results = [value for node in graph.nodes for value in node.outputs]
    if values is None:
        values = [v for v in graph.inputs + results if v.type.dtype.is_float]
    members = {id(v) for v in graph.inputs + graph.constants + results}
    targets: dict[int, Value] = {}
    for value in [*values, *axes]:
        if id(value) not in members:
            raise CalibrationError(f"{_describe(value)} is not a value of graph '{graph.name}'")
        targets.setdefault(id(value), value)
    return list(targets.values())


def _describe(value: Value) -> str:
    if value.name:
        return f"value '{value.name}'"
    return f"the result of {value.producer.describe()}" if value.producer else "an unnamed value"


def _warn_ignored(targets: list[Value], observers: Mapping[int, Observer]) -> None:
    ignored = [(value, observers[id(value)]) for value in targets if observers[id(value)].ignored]
    if not ignored:
        return
    total = sum(observer.ignored for _, observer in ignored)
    listed = ", ".join(_describe(value) for value, _ in ignored[:5]) + (", ..." if len(ignored) > 5 else "")
    warnings.warn(f"calibration ignored {total} value(s) that were not finite or below "
                  f"{ignored[0][1].ignore_below} (attention-mask constants?) in {len(ignored)} tensor(s): "
                  f"{listed}; their ranges cover the other values", CalibrationWarning, stacklevel=3)


def _progress(batches: Iterable[Feeds], enabled: bool) -> Iterator[Feeds]:
    if not enabled:
        yield from batches
        return
    total = len(batches) if isinstance(batches, Sized) else None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(batches, total=total, desc="calibrating", unit="batch")
        return
    done = 0
    for feeds in batches:
        yield feeds
        done += 1
        sys.stderr.write(f"\rcalibrating: batch {done}" + (f"/{total}" if total is not None else ""))
        sys.stderr.flush()
    if done:
        sys.stderr.write("\n")
