"""Target descriptions: the detected host and the named cross targets."""
from __future__ import annotations

import pytest

from lowbit.backends.native import FEATURES, NAMED_TARGETS, Target
from lowbit.errors import TargetError


def test_host_is_detected() -> None:
    host = Target.parse("host")
    assert host is Target.host()
    assert host.features <= FEATURES and host.arch in host.triple
    assert host.vector_bytes in (16, 32, 64)
    if host.has("avx512f"):
        assert host.vector_bytes == 64


@pytest.mark.parametrize("name", sorted(NAMED_TARGETS))
def test_named_targets(name: str) -> None:
    target = Target.parse(name)
    assert target.name == name and target.features <= FEATURES
    assert target.arch == name.split("-")[0]
    assert all(f"+{feature}" in target.llvm_features for feature in target.features)
    hash(target)  # frozen: usable as a cache key


def test_named_target_features() -> None:
    assert Target.parse("aarch64").features == {"neon"}
    assert Target.parse("aarch64-dotprod").has("neon", "dotprod")
    assert Target.parse("x86_64-avx512vnni").vector_bytes == 64
    assert Target.parse("x86_64-avxvnni").has("avxvnni") and not Target.parse("x86_64-avxvnni").has("avx512f")
    assert Target.parse("x86_64-amx").has("amx-tile", "amx-int8", "avx512vnni")
    assert not Target.parse("x86_64-avx512vnni").has("amx-tile")


def test_unknown_target_lists_the_names() -> None:
    with pytest.raises(TargetError, match="unknown target 'riscv64'.*host, x86_64-avx2.*aarch64-dotprod"):
        Target.parse("riscv64")
