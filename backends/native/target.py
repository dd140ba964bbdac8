"""What code is generated for: an LLVM triple, a CPU, the instruction-set features kernels choose
routes by, and the vector width.

The host is detected through LLVM; the others are named so that code for a machine this one is not
(AVX-512 VNNI servers, AArch64 boards) can be generated, checked as assembly and cross-compiled.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from lowbit.errors import TargetError
from lowbit.kernels.llvm import host_cpu

# The features kernels select instruction routes by; every name is also LLVM's feature name.
FEATURES = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avxvnni",
                      "amx-tile", "amx-int8", "neon", "dotprod", "i8mm"})


@dataclass(frozen=True)
class Target:
    """A code-generation target.

    `features` is the subset of `FEATURES` kernels may rely on; `llvm_features` is the feature string
    handed to LLVM (for the host the full detected string, which also switches off what a virtual
    machine hides although the CPU name implies it).
    """

    name: str
    triple: str
    cpu: str
    features: frozenset[str]
    vector_bytes: int
    llvm_features: str

    @property
    def arch(self) -> str:
        """The triple's architecture, e.g. `x86_64` or `aarch64`."""
        return self.triple.split("-", 1)[0]

    def has(self, *features: str) -> bool:
        return all(feature in self.features for feature in features)

    @staticmethod
    def host() -> "Target":
        """The machine this process runs on."""
        return _host()

    @staticmethod
    def named(name: str) -> "Target":
        try:
            return NAMED_TARGETS[name]
        except KeyError:
            known = ", ".join(["host", *NAMED_TARGETS])
            raise TargetError(f"unknown target '{name}'; known targets: {known}") from None

    @staticmethod
    def parse(spec: str) -> "Target":
        """`"host"` or one of the names in `NAMED_TARGETS`."""
        return Target.host() if spec == "host" else Target.named(spec)

    def __str__(self) -> str:
        return f"{self.name} ({self.triple}, {self.cpu}, {' '.join(sorted(self.features))})"


def _vector_bytes(features: frozenset[str]) -> int:
    if "avx512f" in features:
        return 64
    return 32 if "avx2" in features else 16


def _named(name: str, triple: str, cpu: str, *features: str) -> Target:
    unknown = set(features) - FEATURES
    if unknown:
        raise ValueError(f"target {name}: features {sorted(unknown)} are not in FEATURES")
    frozen = frozenset(features)
    return Target(name, triple, cpu, frozen, _vector_bytes(frozen),
                  ",".join(f"+{feature}" for feature in sorted(frozen)))


_X86 = "x86_64-unknown-linux-gnu"
_ARM = "aarch64-unknown-linux-gnu"
NAMED_TARGETS: dict[str, Target] = {target.name: target for target in (
    _named("x86_64-avx2", _X86, "haswell", "avx2", "fma"),
    _named("x86_64-avx512", _X86, "skylake-avx512", "avx2", "fma", "avx512f", "avx512bw", "avx512vl"),
    _named("x86_64-avx512vnni", _X86, "cascadelake",
           "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni"),
    _named("x86_64-avxvnni", _X86, "alderlake", "avx2", "fma", "avxvnni"),
    _named("x86_64-amx", _X86, "sapphirerapids",
           "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avxvnni", "amx-tile", "amx-int8"),
    _named("aarch64", _ARM, "cortex-a53", "neon"),
    _named("aarch64-dotprod", _ARM, "neoverse-n1", "neon", "dotprod"),
)}

@lru_cache(maxsize=None)
def _host() -> Target:
    cpu = host_cpu()
    features = cpu.features & FEATURES
    return Target("host", cpu.triple, cpu.cpu, features, _vector_bytes(features), cpu.llvm_features)
