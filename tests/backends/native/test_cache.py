"""The on-disk cache of compiled models: a second compile of the same graph loads the code."""
import numpy as np
import pytest

import lowbit
from lowbit.ir import parse

GRAPH = """
graph "g" {
  input %x: f32[4,8]
  @w = const f32[3,8] elided<"filled below">
  %0 = linear(%x, @w) {activation = "relu"} : f32[4,3]
  output "y" = %0
}
"""


def graph(seed: int):
    g = parse(GRAPH.replace('elided<"filled below">', "dense<" + str(
        np.random.default_rng(seed).standard_normal((3, 8)).round(3).astype(np.float32).tolist()) + ">"))
    return g


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_second_compile_comes_from_the_cache_with_the_same_results(cache):
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)}
    first = lowbit.compile(graph(1))
    second = lowbit.compile(graph(1))
    assert not first.from_cache and second.from_cache
    np.testing.assert_array_equal(first.run(feeds)["y"], second.run(feeds)["y"])
    np.testing.assert_allclose(second.run(feeds)["y"], lowbit.run_reference(graph(1), feeds)["y"], rtol=1e-5)
    assert len(second.program.calls) >= 1  # the lowering is still available on demand


def test_other_weights_are_another_entry(cache):
    lowbit.compile(graph(1))
    assert not lowbit.compile(graph(2)).from_cache


def test_damaged_entries_are_recompiled(cache):
    lowbit.compile(graph(1))
    for code in cache.glob("*.o"):
        code.write_bytes(code.read_bytes()[:-10])
    again = lowbit.compile(graph(1))
    assert not again.from_cache
    feeds = {"x": np.ones((4, 8), np.float32)}
    np.testing.assert_allclose(again.run(feeds)["y"], lowbit.run_reference(graph(1), feeds)["y"], rtol=1e-5)


def test_cache_can_be_turned_off(cache, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", "off")
    lowbit.compile(graph(1))
    assert not lowbit.compile(graph(1)).from_cache and not list(cache.iterdir())


def test_the_cache_keeps_under_its_size_limit_dropping_the_least_recently_used(cache, monkeypatch):
    lowbit.compile(graph(1))
    entry_bytes = sum(path.stat().st_size for path in cache.iterdir())
    monkeypatch.setenv("LOWBIT_CACHE_LIMIT_MB", str(2.5 * entry_bytes / 2**20))  # room for two entries
    lowbit.compile(graph(2))
    assert lowbit.compile(graph(1)).from_cache  # a use: graph(2) is now the least recently used
    lowbit.compile(graph(3))
    assert len(list(cache.glob("*.json"))) == 2
    assert sum(path.stat().st_size for path in cache.iterdir()) <= 2.5 * entry_bytes
    assert lowbit.compile(graph(1)).from_cache and lowbit.compile(graph(3)).from_cache
    assert not lowbit.compile(graph(2)).from_cache


def test_stores_under_the_limit_list_the_folder_once(cache, monkeypatch):
    """Listing a big cache folder costs a stat per file: a process lists it on its first store, and again
    only when its count of stored bytes passes the limit."""
    from lowbit.backends.native import cache as disk_cache

    listed = []
    real_trim = disk_cache.trim
    monkeypatch.setattr(disk_cache, "trim", lambda folder, limit: listed.append(folder) or real_trim(folder, limit))
    for seed in range(4):
        lowbit.compile(graph(seed))
    assert listed == [cache]
    entry_bytes = sum(path.stat().st_size for path in cache.iterdir()) / 4
    monkeypatch.setenv("LOWBIT_CACHE_LIMIT_MB", str(4.5 * entry_bytes / 2**20))
    lowbit.compile(graph(4))  # five entries: over the limit, trimmed to 90% of it
    assert len(listed) == 2 and len(list(cache.glob("*.json"))) == 4
