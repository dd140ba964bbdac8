"""A small FileCheck for printed IR: CHECK, CHECK-NEXT, CHECK-NOT and CHECK-SAME-free line matching.

Directives are lines of the check text:
    CHECK: text        the next line (at or after the cursor) containing `text`
    CHECK-NEXT: text   the line right after the previous match must contain `text`
    CHECK-NOT: text    no line between the previous match and the next match contains `text`
`{{regex}}` inside a directive's text is a regular expression; the rest matches literally.
"""
from __future__ import annotations

import re


def _compile(text: str) -> re.Pattern:
    parts = re.split(r"\{\{(.*?)\}\}", text.strip())
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?:{p})" for i, p in enumerate(parts)))


def filecheck(output: str, checks: str) -> None:
    """Raise AssertionError naming the first directive that does not hold over `output`."""
    lines = output.splitlines()
    directives = []
    for raw in checks.strip().splitlines():
        match = re.match(r"\s*(CHECK(?:-NEXT|-NOT)?):(.*)$", raw)
        if match:
            directives.append((match.group(1), _compile(match.group(2)), match.group(2).strip()))
    if not directives:
        raise ValueError("check text has no CHECK directives")
    cursor = 0  # index of the first line not yet consumed
    pending_not: list[tuple[re.Pattern, str]] = []
    last_match = -1
    for kind, pattern, text in directives:
        if kind == "CHECK-NOT":
            pending_not.append((pattern, text))
            continue
        if kind == "CHECK-NEXT":
            index = last_match + 1
            if index >= len(lines) or not pattern.search(lines[index]):
                got = lines[index] if index < len(lines) else "<end of output>"
                raise AssertionError(f"CHECK-NEXT: {text!r} does not match the next line {got!r}\n{output}")
        else:
            index = next((i for i in range(cursor, len(lines)) if pattern.search(lines[i])), None)
            if index is None:
                raise AssertionError(f"CHECK: {text!r} not found after line {cursor}\n{output}")
        _check_absent(lines, cursor, index, pending_not, output)
        pending_not = []
        last_match = index
        cursor = index + 1
    _check_absent(lines, cursor, len(lines), pending_not, output)


def _check_absent(lines, start, end, patterns, output) -> None:
    for pattern, text in patterns:
        for line in lines[start:end]:
            if pattern.search(line):
                raise AssertionError(f"CHECK-NOT: {text!r} found in line {line!r}\n{output}")
