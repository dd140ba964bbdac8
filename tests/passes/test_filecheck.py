import pytest
from filecheck import filecheck

OUTPUT = "a = relu(x)\nb = add(a, c)\nc = mul(b, b)\n"


def test_check_and_next_and_not():
    filecheck(OUTPUT, "CHECK: relu\nCHECK-NEXT: add\nCHECK-NOT: sub\nCHECK: mul")


@pytest.mark.parametrize("checks, message", [
    ("CHECK: conv", "not found"),
    ("CHECK: relu\nCHECK-NEXT: mul", "does not match the next line"),
    ("CHECK: relu\nCHECK-NOT: add\nCHECK: mul", "CHECK-NOT: 'add' found"),
    ("CHECK-NOT: {{m.l}}", "found in line 'c = mul"),
])
def test_failures_say_which_directive(checks, message):
    with pytest.raises(AssertionError, match=message):
        filecheck(OUTPUT, checks)
