"""Passes: IR-to-IR transformations, their registry and the pass manager.

Write a pass as a function `fn(graph, *, option=default) -> bool` decorated with `@register("name")`,
or as a frozen dataclass subclassing `Pass`; see docs/writing-a-pass.md.
"""
from lowbit.passes import cleanup, fusion, transformer  # noqa: F401  (registers the built-in passes)
from lowbit.passes import prune, quantize  # noqa: F401,E402  (registers the pruning and quantization passes)
from lowbit.passes.manager import (PIPELINES, PassManager, PassTiming, PassVerificationError, parse_pipeline,
                                   register_pipeline)
from lowbit.passes.registry import Pass, PassError, get_pass, make_pass, register, registered_passes
from lowbit.passes.rewrite import Const, Fusion, Match, Op, RewritePattern, Var, apply_patterns, match_at

register_pipeline("cleanup", "fold-constants,remove-noops,cse,dce")
register_pipeline("fuse", "fold-batchnorm,fuse-linear,fuse-layernorm,fuse-gelu,fuse-attention,fuse-epilogue")
register_pipeline("default", "cleanup,fuse,dce")

__all__ = [
    "Pass", "PassError", "register", "get_pass", "make_pass", "registered_passes",
    "PassManager", "PassTiming", "PassVerificationError", "parse_pipeline", "register_pipeline", "PIPELINES",
    "RewritePattern", "Fusion", "Op", "Var", "Const", "Match", "apply_patterns", "match_at",
]
