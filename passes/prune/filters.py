"""`prune-filters-l1`: structured pruning of whole conv2d filters by L1 norm (Li et al. 2017, "Pruning
Filters for Efficient ConvNets"), which really shrinks the graph.

For every group of channels that must be pruned together (see `channels`: a conv's output channels,
unified across residual adds with the other convs feeding the same add), the `ratio` fraction of
channels with the smallest summed filter L1 norm goes (at least one channel stays). Then the graph is
rewritten: the source convs lose those filters and bias entries; the next layers lose the matching input
channels (conv2d weights along axis 1; linear and matmul weights along K, expanded through a flatten's
channel-major layout); depthwise convs lose the channels and their `group` shrinks; batch_norm and
instance_norm parameters and per-channel constants of elementwise ops are sliced; reshapes get their new
static shape; every rewritten node's result types are inferred again. Channel groups that reach an op
without a rule, a graph output, or a value that cannot be pruned are left whole, and the summary lists
why. `exclude` keeps a conv's filters (its input channels may still shrink); `overrides`
(`"name:0.5"`) sets a conv's ratio (a group takes the largest of its convs').
"""
from __future__ import annotations

from typing import Any

import numpy as np

from lowbit.ir import Graph, Node, Value, constant_value, get_op
from lowbit.passes.prune.channels import ChannelAnalysis, Channels, describe_reasons, kept_indices
from lowbit.passes.prune.layers import (PruneError, check_fraction, layer_name, log, parse_overrides, record,
                                        record_skipped, split_names)
from lowbit.passes.prune.patterns import lowest, prune_count
from lowbit.passes.registry import register

METHOD = "filters-l1"


@register("prune-filters-l1")
def prune_filters_l1(graph: Graph, *, ratio: float = 0.3, exclude: str = "", overrides: str = "") -> bool:
    """Remove the `ratio` fraction of each conv2d's output channels with the smallest filter L1 norm,
    shrinking the graph (next layers, BatchNorm, depthwise convs, flatten → linear); channels tied by a
    residual add are pruned together or not at all (the summary says why)."""
    ratio = check_fraction(ratio, "prune-filters-l1: ratio")
    names = split_names(exclude)
    ratios = parse_overrides(overrides)

    def prunable(node: Node) -> str | None:
        if any(name in (node.op, node.name, node.inputs[1].name) for name in names):
            return "excluded"
        if any(constant_value(v) is None for v in node.inputs[1:3] if v is not None):
            return "its weight or bias is not a constant"
        if not node.inputs[1].type.dtype.is_float:
            return "not a float convolution"
        return None

    analysis = ChannelAnalysis(graph, prunable)
    known = {n.name for n in analysis.sources.values()} | {n.inputs[1].name for n in analysis.sources.values()}
    unknown = sorted(set(ratios) - known)
    if unknown:
        raise PruneError(f"prune-filters-l1: overrides name unknown conv(s) {unknown}; the group-1 convs are "
                         f"{sorted(n for n in known if n)}")
    keep: dict[int, np.ndarray] = {}
    skipped: dict[str, tuple[str, str]] = {}
    for root, dims in analysis.classes().items():
        sources = [analysis.sources[dim] for dim in dims if dim in analysis.sources]
        reasons = [reason for dim in dims for reason in analysis.reasons.get(dim, ())]
        if not sources:
            continue
        if reasons:
            for node in sources:
                skipped[layer_name(node, node.inputs[1])] = (node.op, describe_reasons(reasons))
            continue
        share = max((ratios[key] for node in sources for key in (node.name, node.inputs[1].name)
                     if key in ratios), default=ratio)
        size = analysis.sizes[root]
        count = min(prune_count(size, share), size - 1)
        if count > 0:
            norms = sum(np.abs(constant_value(node.inputs[1])).reshape(size, -1).sum(axis=1) for node in sources)
            keep[root] = np.flatnonzero(~lowest(norms, count))
    _rewrite(graph, analysis, keep)
    record_skipped(graph, skipped, METHOD)
    graph.remove_unused_constants()
    return bool(keep)


def _rewrite(graph: Graph, analysis: ChannelAnalysis, keep: dict[int, np.ndarray]) -> None:
    """Rebuild, in order, every node that reads or produces pruned channels."""

    def kept(value: Value | None) -> np.ndarray | None:
        channels = analysis.layout.get(id(value)) if value is not None else None
        return kept_indices(analysis, channels, keep) if channels is not None else None

    for node in graph.iter_nodes():
        inputs = [kept(v) for v in node.inputs]
        output = kept(node.outputs[0])
        if output is None and all(k is None for k in inputs):
            continue
        operands, attrs = list(node.inputs), dict(node.attrs)
        entry = _shrink(graph, node, operands, attrs, inputs, output, analysis.layout.get(id(node.outputs[0])))
        rebuilt = graph.add_node(node.op, operands, attrs, name=node.name, before=node)
        for old, new in zip(node.outputs, rebuilt.outputs):
            new.name = old.name
            if id(old) in analysis.layout:
                analysis.layout[id(new)] = analysis.layout[id(old)]
            graph.replace_all_uses_with(old, new)
        graph.erase(node)
        if entry:
            record(graph, layer_name(rebuilt, rebuilt.inputs[1] if len(rebuilt.inputs) > 1 else None), entry)


def _shrink(graph: Graph, node: Node, operands: list, attrs: dict, inputs: list, output: np.ndarray | None,
            out_channels: Channels | None) -> dict[str, Any]:
    """Slice `node`'s constant operands and fix its attributes for the surviving channels; returns what
    to record for the layer (nothing for nodes that are not layers)."""

    def take(index: int, indices: np.ndarray, axis: int) -> None:
        data = constant_value(operands[index])
        operands[index] = graph.add_constant(np.take(data, indices, axis=axis), operands[index].name)

    entry: dict[str, Any] = {}
    if node.op == "conv2d":
        weight_shape = node.inputs[1].type.shape
        if output is not None:
            take(1, output, 0)
            if len(operands) > 2 and operands[2] is not None:
                take(2, output, 0)
            entry = {"op": "conv2d", "method": METHOD, "pattern": "channel",
                     "channels": [len(output), weight_shape[0]]}
        if inputs[0] is not None:
            if attrs["group"] == 1:
                take(1, inputs[0], 1)
                entry.update({"op": "conv2d", "method": METHOD, "inputs": [len(inputs[0]), weight_shape[1]]})
            else:
                attrs["group"] = len(inputs[0])
        if entry:
            entry["params"] = constant_value(operands[1]).size
    elif node.op in ("linear", "matmul") and inputs[0] is not None:
        axis = 1 if node.op == "linear" else 0
        take(1, inputs[0], axis)
        entry = {"op": node.op, "method": METHOD, "inputs": [len(inputs[0]), node.inputs[1].type.shape[axis]],
                 "params": constant_value(operands[1]).size}
    elif node.op in ("batch_norm", "instance_norm"):
        for index in range(1, len(operands)):
            if operands[index] is not None:
                take(index, inputs[0], 0)
    elif node.op == "reshape":
        shape = list(attrs["shape"])
        shape[out_channels.axis] = len(output)
        attrs["shape"] = tuple(shape)
    elif output is not None and "elementwise" in get_op(node.op).traits:
        # Elementwise ops: constants that span the channel axis lose the pruned channels.
        rank = node.outputs[0].type.rank
        for index, value in enumerate(operands):
            data = constant_value(value)
            local = out_channels.axis - (rank - value.type.rank) if value is not None else -1
            if data is not None and local >= 0 and data.shape[local] > 1:
                take(index, output, local)
    if entry:
        log.info("%s: %s now %s", METHOD, layer_name(node), entry)
    return entry
