"""The native backend: kernel selection, memory plan, JIT module and AOT artifact for a `Target`."""
from lowbit.backends.native.target import FEATURES, NAMED_TARGETS, Target

__all__ = ["FEATURES", "NAMED_TARGETS", "Target"]
