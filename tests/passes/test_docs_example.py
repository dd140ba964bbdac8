"""The pass in docs/writing-a-pass.md runs and its test passes (the document cannot go stale)."""
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "writing-a-pass.md"


def test_documented_pass_and_its_test():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 2
    pass_code, test_code = blocks
    assert len(pass_code.strip().splitlines()) <= 30
    namespace: dict = {}
    exec(compile(pass_code, str(DOC), "exec"), namespace)
    exec(compile(test_code, str(DOC), "exec"), namespace)
    namespace["test_merge_scales"]()
