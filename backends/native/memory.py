"""The static memory plan: every arena buffer gets an offset; buffers whose lifetimes overlap never
share bytes. Greedy by size (largest first), each at the lowest offset that fits (best known simple
heuristic for this interval-packing problem; peak bytes are reported so it can be judged)."""
from __future__ import annotations

from lowbit.backends.native.lowering import Buffer, Call

ALIGNMENT = 64


def align(size: int, alignment: int = ALIGNMENT) -> int:
    return (size + alignment - 1) // alignment * alignment


def plan_arena(calls: list[Call]) -> int:
    """Assign `offset` to every arena buffer used by `calls`; returns the arena's size in bytes."""
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    buffers: dict[int, Buffer] = {}
    for position, call in enumerate(calls):
        for buffer in call.buffers:
            if buffer.kind != "arena":
                continue
            key = id(buffer)
            buffers[key] = buffer
            first.setdefault(key, position)
            last[key] = position
    placed: list[tuple[int, int, int, int]] = []  # (offset, end, first, last)
    for key in sorted(buffers, key=lambda k: (-buffers[k].nbytes, first[k])):
        size = align(buffers[key].nbytes)
        live = sorted((start, end) for start, end, a, b in placed if a <= last[key] and first[key] <= b)
        offset = 0
        for start, end in live:
            if offset + size <= start:
                break
            offset = max(offset, end)
        buffers[key].offset = offset
        placed.append((offset, offset + size, first[key], last[key]))
    return max((end for _, end, _, _ in placed), default=0)


def layout_weights(weights: list[tuple[Buffer, object]]) -> int:
    """Assign blob offsets to weight buffers; returns the blob's size."""
    offset = 0
    for buffer, _ in weights:
        buffer.offset = offset
        offset += align(buffer.nbytes)
    return offset
