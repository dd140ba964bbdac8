"""Which channels travel together: the analysis behind filter pruning.

Every group-1 conv2d's output channels form a *dimension* (a set of channels one filter each). The
analysis follows each dimension forward through the graph and records, for every value, where the
dimension's channels lie: an axis and a list of segments (dimension, unit), laid end to end along the
axis, channel c of a segment occupying `unit` consecutive indices (unit > 1 after a flatten: channel c
of a [N, C, H, W] tensor flattened to [N, C·H·W] is the features c·H·W ... c·H·W + H·W − 1).

- Adds, multiplies and other elementwise ops between two such values (a residual connection), and a
  conv's fused residual operand, *unify* their dimensions: their channels must be pruned together.
- A depthwise conv carries its input's dimension to its output (channel c → outputs c·k ... c·k + k − 1).
- A concat along the channel axis puts its operands' segments end to end.
- Ops that mix channels (a grouped conv, softmax or a reduction over channels, LRN, a graph output, an
  op without a rule here) *block* the dimensions that reach them, with a reason; a unification with a
  value whose channels cannot be pruned (a graph input, an excluded conv) blocks too.
Filter pruning then removes channels of every unblocked dimension class and rewrites what touches them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from lowbit.ir import Graph, Node, Value, constant_value, get_op

Segment = tuple[int, int]


@dataclass(frozen=True)
class Channels:
    """Where dimensions' channels lie in a value: along `axis`, `segments` (dimension, unit) end to end."""

    axis: int
    segments: tuple[Segment, ...]


class ChannelAnalysis:
    """Dimensions (with union-find classes), their source convs and blocking reasons, and each value's
    `Channels`. `prunable(node)` says why a group-1 conv cannot be a source, or None."""

    def __init__(self, graph: Graph, prunable: Callable[[Node], str | None]) -> None:
        self.graph = graph
        self.prunable = prunable
        self.sizes: list[int] = []
        self.parent: list[int] = []
        self.sources: dict[int, Node] = {}
        self.reasons: dict[int, list[str]] = {}
        self.layout: dict[int, Channels] = {}
        for node in graph.nodes:
            self._visit(node)
        for name, value in zip(graph.output_names, graph.outputs):
            self._block(self.layout.get(id(value)), f"its channels reach the graph output '{name}'")

    # -- dimensions ---------------------------------------------------------------------------------
    def new_dim(self, size: int, source: Node | None = None, reason: str | None = None) -> int:
        dim = len(self.sizes)
        self.sizes.append(size)
        self.parent.append(dim)
        if source is not None:
            self.sources[dim] = source
        if reason:
            self.reasons[dim] = [reason]
        return dim

    def find(self, dim: int) -> int:
        while self.parent[dim] != dim:
            self.parent[dim] = self.parent[self.parent[dim]]
            dim = self.parent[dim]
        return dim

    def classes(self) -> dict[int, list[int]]:
        grouped: dict[int, list[int]] = {}
        for dim in range(len(self.sizes)):
            grouped.setdefault(self.find(dim), []).append(dim)
        return grouped

    def _block(self, channels: Channels | None, reason: str) -> None:
        for dim, _ in channels.segments if channels is not None else ():
            self.reasons.setdefault(dim, []).append(reason)

    def _unify(self, a: Channels, b: Channels, reason: str) -> None:
        same = a.axis == b.axis and len(a.segments) == len(b.segments) and all(
            ua == ub and self.sizes[da] == self.sizes[db] for (da, ua), (db, ub) in zip(a.segments, b.segments))
        if not same:
            self._block(a, reason)
            self._block(b, reason)
            return
        for (da, _), (db, _) in zip(a.segments, b.segments):
            self.parent[self.find(da)] = self.find(db)

    # -- propagation --------------------------------------------------------------------------------
    def _visit(self, node: Node) -> None:
        structured = [v for v in node.inputs if v is not None and id(v) in self.layout]
        rule = _RULES.get(node.op)
        if rule is None and "elementwise" in get_op(node.op).traits:
            rule = ChannelAnalysis._elementwise
        if node.op == "conv2d":
            out = self._conv(node)
        elif not structured:
            return
        elif rule is None:
            for value in structured:
                self._block(self.layout[id(value)],
                            f"{node.describe()} has no channel rule (it may mix or reorder channels)")
            return
        else:
            out = rule(self, node, self.layout[id(structured[0])])
        if out is not None:
            self.layout[id(node.outputs[0])] = out

    def _conv(self, node: Node) -> Channels | None:
        x = self.layout.get(id(node.inputs[0]))
        channels, group = node.inputs[0].type.shape[1], node.attrs["group"]
        filters = node.outputs[0].type.shape[1]
        out = None
        if group == 1:
            out = Channels(1, ((self.new_dim(filters, node, self.prunable(node)), 1),))
            self._consume(node, x, 1)
        elif group == channels and x is not None:
            multiplier = filters // channels
            out = Channels(1, tuple((dim, unit * multiplier) for dim, unit in x.segments))
            why = self.prunable(node) or (None if x.axis == 1 else "it takes them along another axis")
            if why:
                self._block(x, f"they feed depthwise {node.describe()}, which cannot change ({why})")
        else:
            self._block(x, f"they feed grouped {node.describe()} (group={group})")
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            self._join(out, node.inputs[3], f"{node.describe()} adds it as its residual")
        return out

    def _consume(self, node: Node, channels: Channels | None, axis: int) -> None:
        """`node` reduces over `channels` along `axis` with a constant weight it can shrink."""
        weight = node.inputs[1]
        if channels is not None and (channels.axis != axis or constant_value(weight) is None):
            self._block(channels, f"{node.describe()} consumes them along another axis or with a "
                                  f"non-constant weight")

    def _join(self, channels: Channels | None, value: Value, reason: str) -> None:
        """`value` is combined channel by channel with a value carrying `channels` (or nothing prunable)."""
        other = self.layout.get(id(value))
        if channels is None or other is None:
            self._block(channels or other, f"{reason}, and the other side's channels cannot be pruned")
        else:
            self._unify(channels, other, reason)

    def _linear(self, node: Node, _: Channels) -> None:
        self._consume(node, self.layout.get(id(node.inputs[0])), node.inputs[0].type.rank - 1)
        for value in node.inputs[1:]:
            self._block(self.layout.get(id(value)) if value is not None else None,
                        f"{node.describe()} uses them as a weight, bias or residual")

    def _matmul(self, node: Node, _: Channels) -> None:
        a, b = (self.layout.get(id(v)) for v in node.inputs)
        if a is not None and b is None and constant_value(node.inputs[1]) is not None \
                and node.inputs[1].type.rank == 2:
            self._consume(node, a, node.inputs[0].type.rank - 1)
            return
        self._block(a, f"{node.describe()} multiplies them by a run-time matrix")
        self._block(b, f"{node.describe()} multiplies by them")

    def _per_channel(self, node: Node, x: Channels) -> Channels | None:
        """batch_norm / instance_norm: constant parameters per channel along axis 1."""
        if x.axis != 1 or any(constant_value(v) is None for v in node.inputs[1:] if v is not None):
            self._block(x, f"{node.describe()} has run-time parameters or normalises another axis")
            return None
        return x

    def _spatial(self, node: Node, x: Channels) -> Channels | None:
        """Pools, padding and resizing: channel by channel when they leave the channel axis alone."""
        axis, rank = x.axis, node.inputs[0].type.rank
        keeps_axis = axis == 1 if node.op != "pad" else node.attrs["pads"][axis] == node.attrs["pads"][rank + axis] == 0
        if node.op == "resize":
            keeps_axis = node.outputs[0].type.shape[axis] == node.inputs[0].type.shape[axis]
        if not keeps_axis:
            self._block(x, f"{node.describe()} changes the channel axis")
            return None
        return x

    def _same(self, node: Node, x: Channels) -> Channels:
        return x

    def _along(self, node: Node, x: Channels) -> Channels | None:
        """Softmax, slices and reductions over other axes keep the channels."""
        rank = node.inputs[0].type.rank
        if node.op in ("softmax", "log_softmax"):
            axes = [node.attrs["axis"] % rank]
        else:
            axes = [a % rank for a in node.attrs["axes"]] or list(range(rank))
        if x.axis in axes:
            self._block(x, f"{node.describe()} works along the channel axis")
            return None
        if node.op.startswith("reduce_") and not node.attrs["keepdims"]:
            return Channels(x.axis - sum(a < x.axis for a in axes), x.segments)
        return x

    def _transpose(self, node: Node, x: Channels) -> Channels:
        return Channels(list(node.attrs["perm"]).index(x.axis), x.segments)

    def _reshape(self, node: Node, x: Channels) -> Channels | None:
        """A reshape that keeps everything before the channel axis and merges or splits what follows
        (a flatten): each channel's unit scales by the inner sizes before / after."""
        before, after = node.inputs[0].type.shape, tuple(node.attrs["shape"])
        outer, inner = int(np.prod(before[:x.axis])), int(np.prod(before[x.axis + 1:]))
        for axis in range(len(after)):
            new_inner = int(np.prod(after[axis + 1:]))
            if int(np.prod(after[:axis])) == outer and after[axis] * new_inner == before[x.axis] * inner and \
                    all(unit * inner % new_inner == 0 for _, unit in x.segments):
                return Channels(axis, tuple((dim, unit * inner // new_inner) for dim, unit in x.segments))
        self._block(x, f"{node.describe()} splits channels across axes")
        return None

    def _concat(self, node: Node, _: Channels) -> Channels | None:
        axis = node.attrs["axis"] % node.outputs[0].type.rank
        layouts = [self.layout.get(id(v)) for v in node.inputs]
        if any(c is not None and c.axis != axis for c in layouts):
            return self._elementwise(node, _)
        segments: list[Segment] = []
        for value, channels in zip(node.inputs, layouts):
            if channels is None:
                channels = Channels(axis, ((self.new_dim(value.type.shape[axis], reason="concatenated with "
                                                         "channels that cannot be pruned"), 1),))
            segments.extend(channels.segments)
        return Channels(axis, tuple(segments))

    def _elementwise(self, node: Node, _: Channels) -> Channels | None:
        """Broadcasting ops: run-time operands that span the channel axis must carry the same channels
        (they are unified); constants are sliced along it."""
        rank = node.outputs[0].type.rank
        aligned = [(v, self.layout.get(id(v))) for v in node.inputs if v is not None]
        structured = [(v, Channels(c.axis + rank - v.type.rank, c.segments)) for v, c in aligned if c is not None]
        first = structured[0][1]
        for value, channels in structured[1:]:
            self._unify(first, channels, f"{node.describe()} combines them")
        for value, channels in aligned:
            local = first.axis - (rank - value.type.rank)
            spans = local >= 0 and value.type.shape[local] > 1
            if channels is None and spans and constant_value(value) is None:
                self._block(first, f"{node.describe()} combines them with a value whose channels cannot be pruned")
        return first


_RULES: dict[str, Callable[[ChannelAnalysis, Node, Channels], Channels | None]] = {
    "linear": ChannelAnalysis._linear,
    "matmul": ChannelAnalysis._matmul,
    "batch_norm": ChannelAnalysis._per_channel,
    "instance_norm": ChannelAnalysis._per_channel,
    **{op: ChannelAnalysis._spatial for op in ("max_pool2d", "avg_pool2d", "global_avg_pool", "global_max_pool",
                                               "pad", "resize")},
    "identity": ChannelAnalysis._same,
    **{op: ChannelAnalysis._along for op in ("softmax", "log_softmax", "slice", "reduce_sum", "reduce_mean",
                                             "reduce_max", "reduce_min", "reduce_prod")},
    "transpose": ChannelAnalysis._transpose,
    "reshape": ChannelAnalysis._reshape,
    "concat": ChannelAnalysis._concat,
}


def kept_indices(analysis: ChannelAnalysis, channels: Channels, keep: dict[int, np.ndarray]) -> np.ndarray | None:
    """Indices along `channels.axis` that survive when class root → kept channels `keep`; None if all do."""
    if not any(analysis.find(dim) in keep for dim, _ in channels.segments):
        return None
    parts, offset = [], 0
    for dim, unit in channels.segments:
        size = analysis.sizes[dim]
        kept = keep.get(analysis.find(dim), np.arange(size))
        parts.append(((kept[:, None] * unit + np.arange(unit)).reshape(-1) + offset))
        offset += size * unit
    return np.concatenate(parts)


def describe_reasons(reasons: Iterable[str]) -> str:
    unique = list(dict.fromkeys(reasons))
    return unique[0] + (f" (and {len(unique) - 1} more reason(s))" if len(unique) > 1 else "")
