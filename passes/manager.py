"""Running pipelines of passes: parsing pipeline text, verification, IR printing, timing, fixed points."""
from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence, TextIO

from lowbit.errors import LowbitError, VerificationError
from lowbit.ir import Graph, verify
from lowbit.passes.registry import Pass, PassError, make_pass

# Named pipelines usable wherever a pass name is; `default` is what `lowbit.optimize` runs.
PIPELINES: dict[str, str] = {}

_ITEM = re.compile(r"\s*([a-z][a-z0-9-]*)\s*(\{([^{}]*)\})?\s*(,|$)")


def register_pipeline(name: str, text: str) -> None:
    PIPELINES[name] = text


def parse_pipeline(text: str) -> list[Pass]:
    """`"fold-constants,fold-batchnorm,prune-nm{n=2,m=4}"` → pass instances (named pipelines expand)."""
    passes: list[Pass] = []
    position = 0
    text = text.strip()
    if not text:
        return passes
    while position < len(text):
        match = _ITEM.match(text, position)
        if not match or match.end() == position:
            raise PassError(f"cannot parse pipeline {text!r} at character {position + 1}: "
                            f"expected name or name{{key=value,...}}")
        name, options_text = match.group(1), match.group(3)
        if name in PIPELINES and options_text is None:
            passes.extend(parse_pipeline(PIPELINES[name]))
        else:
            options = {}
            for item in filter(None, (part.strip() for part in (options_text or "").split(","))):
                key, sep, value = item.partition("=")
                if not sep:
                    raise PassError(f"option {item!r} of pass '{name}' needs the form key=value")
                options[key.strip()] = value.strip()
            passes.append(make_pass(name, options))
        position = match.end()
    return passes


class PassVerificationError(VerificationError):
    """A pass left the graph broken; keeps the IR text before and after that pass."""

    def __init__(self, pass_name: str, message: str, before: str, after: str) -> None:
        super().__init__(f"the graph is invalid after pass '{pass_name}': {message}")
        self.pass_name = pass_name
        self.before = before
        self.after = after


@dataclass
class PassTiming:
    name: str
    seconds: float
    changed: bool


@dataclass
class PassManager:
    """Runs passes in order; verifies after each (on by default), prints IR, times, iterates to a fixed point.

    `print_ir`: None, "all" (after every pass) or "changed" (after passes that changed the graph).
    """

    passes: Sequence[Pass] | str
    verify: bool = True
    print_ir: str | None = None
    timing: bool = False
    fixed_point: bool = False
    max_rounds: int = 10
    stream: TextIO | None = None
    timings: list[PassTiming] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.passes, str):
            self.passes = parse_pipeline(self.passes)
        if self.print_ir not in (None, "all", "changed"):
            raise PassError(f"print_ir must be None, 'all' or 'changed', not {self.print_ir!r}")

    def run(self, graph: Graph) -> bool:
        """Run the pipeline on `graph` in place; returns whether anything changed."""
        changed_any = False
        for _ in range(self.max_rounds if self.fixed_point else 1):
            changed = False
            for item in self.passes:
                changed |= self._run_one(item, graph)
            changed_any |= changed
            if not changed:
                break
        if self.timing:
            self.report_timing()
        return changed_any

    def _run_one(self, item: Pass, graph: Graph) -> bool:
        before = str(graph) if self.verify else ""
        start = time.perf_counter()
        try:
            changed = bool(item.run(graph))
        except LowbitError:
            raise
        except Exception as error:
            raise PassError(f"pass '{item.spec()}' failed: {type(error).__name__}: {error}") from error
        self.timings.append(PassTiming(item.spec(), time.perf_counter() - start, changed))
        if self.verify:
            try:
                verify(graph)
            except VerificationError as error:
                raise PassVerificationError(item.spec(), str(error), before, str(graph)) from None
        if self.print_ir == "all" or (self.print_ir == "changed" and changed):
            out = self.stream or sys.stderr
            out.write(f"// ----- IR after {item.spec()}{'' if changed else ' (unchanged)'} -----\n{graph}")
        return changed

    def report_timing(self) -> None:
        out = self.stream or sys.stderr
        total = sum(t.seconds for t in self.timings) or 1e-12
        out.write("// ----- pass timing -----\n")
        for entry in self.timings:
            out.write(f"{entry.seconds * 1000:10.2f} ms {100 * entry.seconds / total:6.1f}%  {entry.name}"
                      f"{'' if entry.changed else '  (no change)'}\n")
        out.write(f"{total * 1000:10.2f} ms  total\n")
