"""The on-disk cache of compiled models: object code, weights blob and arena size, keyed by a hash of
the graph, the target, the threads a run uses (per-thread scratch and the team are compiled in) and
lowbit's own code generator (so an edited kernel never reuses stale code).

The folder is `$LOWBIT_CACHE_DIR`, else `~/.cache/lowbit`; `LOWBIT_CACHE_DIR=off` turns the cache off.
Entries are written to a temporary name and renamed, so concurrent compiles never see half a file.
The folder is kept under about `$LOWBIT_CACHE_LIMIT_MB` megabytes (default 1024), since every edit of
lowbit's code generator makes all older entries unreachable: when a store takes it over the limit, the
least recently used entries go (a load counts as a use) until 90% of it is left. A process lists the
folder on its first store and then counts its own stores, so that a store does not cost a stat of every
file (tens of thousands in a busy cache).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

import lowbit
from lowbit.ir import Graph


@dataclass
class CacheEntry:
    code: bytes
    weights: bytes
    arena_bytes: int


def cache_dir() -> Path | None:
    setting = os.environ.get("LOWBIT_CACHE_DIR", "")
    if setting.lower() == "off":
        return None
    return Path(setting) if setting else Path.home() / ".cache" / "lowbit"


@lru_cache(maxsize=None)
def _generator_digest() -> str:
    """A hash of the source of everything that generates code, so edits invalidate old entries; the
    reference interpreter and numpy's version too, as lookup tables hold what they compute."""
    import lowbit.backends.native as native
    import lowbit.backends.reference as reference
    import lowbit.kernels as kernels

    digest = hashlib.sha256(f"{lowbit.__version__}|numpy {np.__version__}".encode())
    for package in (kernels, native, reference):
        for path in sorted(Path(package.__file__).parent.rglob("*.py")):
            digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(graph: Graph, target, threads: int = 1, optimize: str = "speed") -> str:
    digest = hashlib.sha256(_generator_digest().encode())
    digest.update(f"{target.triple}|{target.cpu}|{target.llvm_features}|threads={threads}|{optimize}".encode())
    from lowbit.backends.native.sparse_selection import tuning_fingerprint  # (imports the lowerings)
    digest.update(tuning_fingerprint())  # measured sparse/dense constants change kernel choices
    # The summary text names every large constant by a hash of its bytes; hash them fully here.
    digest.update(str(graph).encode())
    for constant in graph.constants:
        digest.update(constant.data.tobytes() if hasattr(constant.data, "tobytes") else b"elided")
    return digest.hexdigest()[:32]


def load_entry(key: str) -> CacheEntry | None:
    folder = cache_dir()
    if folder is None:
        return None
    try:
        meta = json.loads((folder / f"{key}.json").read_text())
        code = (folder / f"{key}.o").read_bytes()
        weights = (folder / f"{key}.weights").read_bytes()
    except (OSError, ValueError):
        return None
    if len(code) != meta.get("code_bytes") or len(weights) != meta.get("weights_bytes"):
        return None  # a damaged entry is recompiled, never used
    with contextlib.suppress(OSError):
        _touch(folder / f"{key}.json")  # recently used: trimmed last
    return CacheEntry(code, weights, int(meta["arena_bytes"]))


def store_entry(key: str, entry: CacheEntry) -> None:
    folder = cache_dir()
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"code_bytes": len(entry.code), "weights_bytes": len(entry.weights),
                "arena_bytes": entry.arena_bytes, "lowbit": lowbit.__version__}
        for suffix, data in ((".o", entry.code), (".weights", entry.weights), (".json", json.dumps(meta).encode())):
            with tempfile.NamedTemporaryFile(dir=folder, delete=False) as handle:
                handle.write(data)
            os.replace(handle.name, folder / f"{key}{suffix}")
        _touch(folder / f"{key}.json")
        _account(folder, sum(len(data) for data in (entry.code, entry.weights)), cache_limit_bytes())
    except OSError:
        pass  # a read-only or full disk costs a recompile next time, nothing else


def _touch(path: Path) -> None:
    """Set `path`'s times to now, to the nanosecond: the file system's own clock for writes and plain
    `utime` ticks in milliseconds, too coarse to order a write and a load that follow each other."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def cache_limit_bytes() -> int:
    try:
        return int(float(os.environ.get("LOWBIT_CACHE_LIMIT_MB", "1024")) * 2**20)
    except ValueError:
        return 1024 * 2**20


TRIM_TO = 0.9  # a trim leaves this fraction of the limit, so that the next ones are many stores away
_usage: dict[Path, int] = {}  # bytes in each cache folder as this process last counted them, plus its stores


def _account(folder: Path, stored: int, limit: int) -> None:
    """Count a store of `stored` bytes; trim when the folder may be over `limit`. Listing the folder costs
    a stat per file, so it happens on a process's first store and when its count passes the limit (other
    processes' stores are seen then: the limit is kept approximately)."""
    if folder in _usage:
        _usage[folder] += stored
        if _usage[folder] <= limit:
            return
    _usage[folder] = trim(folder, limit)


def trim(folder: Path, limit: int) -> int:
    """When the folder's entries take more than `limit` bytes, delete the least recently used ones (by
    their .json's time) until they fit in `TRIM_TO` of it. Returns the bytes left."""
    entries: dict[str, list] = {}  # key → [time of use, bytes, files]
    for path in folder.iterdir():
        key, _, suffix = path.name.partition(".")
        if suffix not in ("o", "weights", "json"):
            continue  # another program's file, or one being written
        stat = path.stat()
        entry = entries.setdefault(key, [0, 0, []])
        entry[1] += stat.st_size
        entry[2].append(path)
        if suffix == "json":
            entry[0] = stat.st_mtime_ns
    total = sum(entry[1] for entry in entries.values())
    if total <= limit:
        return total
    for _, size, files in sorted(entries.values(), key=lambda entry: entry[0]):
        if total <= TRIM_TO * limit:
            break
        for path in files:
            path.unlink(missing_ok=True)
        total -= size
    return total
