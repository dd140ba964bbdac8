"""Weight pruning passes: zeros written into the weights of conv2d, linear and matmul by a constant.

`prune-magnitude` (unstructured, by |w|, per layer or with one global threshold), `prune-random` (a
baseline), `prune-nm` (n of every m consecutive weights along K kept) and `prune-block` (whole blocks
of the weight matrix, by L1 norm). Every one takes `exclude` (node names, weight names or op types,
`;`-separated), `overrides` (`"name:0.5;name2:0.7"`, per-layer sparsity; 0 leaves a layer dense) and,
with calibration data, the SparseGPT weight update (`update=auto`: on when calibration is given;
`sparsegpt`; `none`). Calibration comes from `lowbit.prune(..., calibration=...)` or, in pipeline text,
`calibration=path.npz`. With calibration the layers are pruned in dependency order, each measured on
the outputs of the layers already pruned, and the summary also gives each layer's relative output error.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from lowbit.ir import Graph
from lowbit.passes.prune.hessian import calibration_batches, collect_hessians, waves
from lowbit.passes.prune.layers import (PruneError, Selection, WeightLayer, check_fraction, record,
                                        record_skipped, select_layers, sparsity_of)
from lowbit.passes.prune.patterns import Pattern, lowest, prune_count
from lowbit.passes.prune.sparsegpt import BLOCK_SIZE, output_error, sparsegpt
from lowbit.passes.registry import Pass, register

UPDATES = ("auto", "sparsegpt", "none")


@dataclasses.dataclass(frozen=True)
class WeightPruning(Pass):
    """Shared options and driver of the weight pruning passes (not a pass itself)."""

    exclude: str = ""
    overrides: str = ""
    calibration: str = ""
    update: str = "auto"
    damping: float = 0.01

    method: ClassVar[str] = ""

    def pattern(self) -> Pattern:
        return Pattern()

    def fraction(self) -> float:
        """The sparsity of layers without an override."""
        raise NotImplementedError

    def check_options(self) -> None:
        self.fraction()
        if self.update not in UPDATES:
            raise PruneError(f"{self.name}: update must be one of {', '.join(UPDATES)}, not {self.update!r}")
        if not self.damping > 0:
            raise PruneError(f"{self.name}: damping must be positive, got {self.damping}")

    def fractions(self, selection: Selection) -> dict[int, float]:
        """Target sparsity per layer (keyed by id of its node)."""
        return {id(layer.node): selection.value(layer, self.fraction()) for layer in selection.layers}

    def scores(self, layer: WeightLayer, matrix: np.ndarray) -> np.ndarray | None:
        """Fixed saliency per weight, or None to rank by magnitude (|w|, or w²/[H⁻¹]²_jj when updating)."""
        return None

    def run(self, graph: Graph) -> bool:
        return self.prune(graph, self.calibration or None)

    def prune(self, graph: Graph, calibration: Any = None) -> bool:
        """Prune `graph` in place; `calibration` as `lowbit.prune` takes it. Returns whether it changed."""
        self.check_options()
        if self.update == "sparsegpt" and calibration is None:
            raise PruneError(f"{self.name}: update=sparsegpt needs calibration data")
        selection = select_layers(graph, self.exclude, self.overrides)
        fractions = self.fractions(selection)
        pattern = self.pattern()
        skipped = dict(selection.skipped)
        targets = []
        for layer in selection.layers:
            rows, cols = layer.matrix().shape
            reason = pattern.check(rows // layer.groups, cols)
            if reason is None and fractions[id(layer.node)] == 0:
                reason = "sparsity override 0"
            if reason:
                skipped[layer.name] = (layer.node.op, reason)
            else:
                targets.append(layer)
        if calibration is None:
            for layer in targets:
                self._prune_layer(graph, layer, fractions[id(layer.node)], pattern, None)
        else:
            batches = calibration_batches(graph, calibration)
            for wave in waves(graph, targets):
                hessians = collect_hessians(graph, wave, batches)
                for layer in wave:
                    self._prune_layer(graph, layer, fractions[id(layer.node)], pattern,
                                      hessians.get(id(layer.node)))
        record_skipped(graph, skipped, self.method)
        graph.remove_unused_constants()
        return bool(targets)

    def _prune_layer(self, graph: Graph, layer: WeightLayer, fraction: float, pattern: Pattern,
                     hessians: list[np.ndarray] | None) -> None:
        original = layer.matrix().astype(np.float64)
        fixed = self.scores(layer, original)
        update = hessians is not None and self.update != "none"
        if update:
            per_group = pattern.units(original.shape[0] // len(hessians), original.shape[1])
            pruned = np.concatenate([
                self._sparsegpt(rows, hessian, fraction, pattern, None if fixed is None else fixed[part],
                                index * per_group)
                for index, (part, rows, hessian) in enumerate(_groups(original, hessians))])
        else:
            scores = np.abs(original) if fixed is None else fixed
            mask = pattern.select(scores, prune_count(pattern.units(*original.shape), fraction))
            pruned = np.where(mask, 0.0, original)
        layer.set_matrix(graph, pruned)
        entry = {"op": layer.node.op, "method": self.method, **pattern.record(),
                 "sparsity": sparsity_of(layer.data), "params": original.size,
                 "weight_error": _relative(np.sum((pruned - original) ** 2), np.sum(original ** 2)),
                 "update": "sparsegpt" if update else "none"}
        if hessians is not None:
            terms = [output_error(rows, pruned[part], hessian) for part, rows, hessian in _groups(original, hessians)]
            entry["output_error"] = _relative(sum(t[0] for t in terms), sum(t[1] for t in terms))
        record(graph, layer.name, entry)

    def _sparsegpt(self, weight: np.ndarray, hessian: np.ndarray, fraction: float, pattern: Pattern,
                   fixed: np.ndarray | None, offset: int) -> np.ndarray:
        """One group's rows; `offset` counts the units of the groups before, so that rounding happens
        once per layer."""
        rows = weight.shape[0]

        def select(block: np.ndarray, inverse_diagonal: np.ndarray, start: int) -> np.ndarray:
            end = start + block.shape[1]
            scores = block ** 2 / inverse_diagonal ** 2 if fixed is None else fixed[:, start:end]
            # Exact per-layer counts: each run of columns prunes the difference of cumulative counts.
            count = prune_count(offset + pattern.units(rows, end), fraction) \
                - prune_count(offset + pattern.units(rows, start), fraction)
            return pattern.select(scores, count)

        # N:M groups are chosen as the update reaches them; unstructured and block masks once per column
        # block (SparseGPT's adaptive mask selection).
        step = pattern.m if pattern.kind == "nm" else max(pattern.step, BLOCK_SIZE // pattern.step * pattern.step)
        return sparsegpt(weight, hessian, select, step, damping=self.damping)


def _groups(matrix: np.ndarray, hessians: list[np.ndarray]):
    """(row slice, rows, H) per conv group (one group for linear and matmul)."""
    size = matrix.shape[0] // len(hessians)
    for index, hessian in enumerate(hessians):
        part = slice(index * size, (index + 1) * size)
        yield part, matrix[part], hessian


def _relative(error: float, reference: float) -> float:
    return float(np.sqrt(error / reference)) if reference > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class SparsityPruning(WeightPruning):
    """Weight pruning to a `sparsity` (not a pass itself)."""

    sparsity: float = 0.5

    def fraction(self) -> float:
        return check_fraction(self.sparsity, f"{self.name}: sparsity")


@register
@dataclasses.dataclass(frozen=True)
class MagnitudePruning(SparsityPruning):
    """Unstructured pruning by |w|: the `sparsity` fraction of smallest weights of each layer
    (`scope=layer`) or of all layers together (`scope=global`) becomes zero."""

    name: ClassVar[str] = "prune-magnitude"
    method: ClassVar[str] = "magnitude"
    scope: str = "layer"

    def check_options(self) -> None:
        super().check_options()
        if self.scope not in ("layer", "global"):
            raise PruneError(f"{self.name}: scope must be 'layer' or 'global', not {self.scope!r}")

    def fractions(self, selection: Selection) -> dict[int, float]:
        fractions = super().fractions(selection)
        if self.scope == "layer":
            return fractions
        # One threshold over the layers without an override: each layer's share of the smallest weights.
        pooled = [layer for layer in selection.layers if selection.value(layer, -1.0) < 0]
        if not pooled:
            return fractions
        magnitudes = np.concatenate([np.abs(layer.data).reshape(-1) for layer in pooled])
        chosen = lowest(magnitudes, prune_count(magnitudes.size, self.fraction()))
        start = 0
        for layer in pooled:
            size = layer.data.size
            fractions[id(layer.node)] = float(np.count_nonzero(chosen[start:start + size])) / size
            start += size
        return fractions


@register
@dataclasses.dataclass(frozen=True)
class RandomPruning(SparsityPruning):
    """Unstructured pruning of a random `sparsity` fraction of each layer's weights (a baseline)."""

    name: ClassVar[str] = "prune-random"
    method: ClassVar[str] = "random"
    seed: int = 0

    def scores(self, layer: WeightLayer, matrix: np.ndarray) -> np.ndarray:
        # Seeded by layer position so that a layer's mask does not depend on which others are pruned.
        position = layer.node.graph.nodes.index(layer.node)
        return np.random.default_rng([self.seed, position]).random(matrix.shape)


@register
@dataclasses.dataclass(frozen=True)
class NMPruning(WeightPruning):
    """N:M semi-structured pruning: in every group of `m` consecutive weights along the reduction
    axis K, the `m - n` smallest become zero (2:4 is what sparse tensor cores and kernels take).
    Layers whose K is not a multiple of m are left dense (and listed with the reason)."""

    name: ClassVar[str] = "prune-nm"
    method: ClassVar[str] = "nm"
    n: int = 2
    m: int = 4

    def pattern(self) -> Pattern:
        return Pattern("nm", n=self.n, m=self.m)

    def fraction(self) -> float:
        return 1.0 - self.n / self.m

    def check_options(self) -> None:
        if not 0 < self.n < self.m:
            raise PruneError(f"{self.name}: needs 0 < n < m, got n={self.n}, m={self.m}")
        super().check_options()

    def fractions(self, selection: Selection) -> dict[int, float]:
        for name, value in selection.overrides.items():
            if value != 0:
                raise PruneError(f"{self.name}: an override for an N:M layer can only be 0 (leave '{name}' "
                                 f"dense), got {value}; use exclude to skip layers")
        return super().fractions(selection)


@register
@dataclasses.dataclass(frozen=True)
class BlockPruning(SparsityPruning):
    """Block pruning: the weight matrix [outputs, K] is tiled by `shape` blocks (rows x columns, e.g.
    1x4: four consecutive weights along K of one output) and the `sparsity` fraction of blocks with the
    smallest L1 norm becomes zero. Layers the blocks do not tile are left dense."""

    name: ClassVar[str] = "prune-block"
    method: ClassVar[str] = "block"
    shape: tuple[int, ...] = (1, 4)

    def pattern(self) -> Pattern:
        return Pattern("block", block=(self.shape[0], self.shape[1]))

    def check_options(self) -> None:
        super().check_options()
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise PruneError(f"{self.name}: shape must be two positive sizes like 1x4, got "
                             f"{'x'.join(map(str, self.shape)) or 'nothing'}")
