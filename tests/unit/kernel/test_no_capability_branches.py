"""The kernel never branches on a driver's capability or name: behaviour that differs by
driver is a feature declared in HELLO (corral.protocol.FEATURES) or a property of the
capability's contract (corral.protocol.CAPABILITIES), never ``capability == "lb"``."""

from __future__ import annotations

import ast
from pathlib import Path

import corral

CAPABILITY_NAMES = {"net", "fs", "log", "lb", "cron"}
KERNEL = Path(corral.__file__).parent
# where the names are defined, as data: the capability contracts themselves
DEFINITIONS = {KERNEL / "protocol" / "_ops.py"}


def _literal(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def branches_on_a_capability(source: str) -> list[str]:
    """Comparisons with a capability name, and by_capability("...") lookups, in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                values: list[ast.AST] = [side]
                if isinstance(side, ast.Tuple | ast.List | ast.Set):
                    values = list(side.elts)
                for v in values:
                    if _literal(v) in CAPABILITY_NAMES:
                        found.append(f"line {node.lineno}: compares with {_literal(v)!r}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("by_capability", "serving_capability")
              and any(_literal(a) in CAPABILITY_NAMES for a in node.args)):
            found.append(f"line {node.lineno}: {node.func.attr}({_literal(node.args[0])!r})")
    return found


def test_no_kernel_module_branches_on_a_capability_name() -> None:
    """Every module of the kernel distribution, but the contracts' own definitions."""
    offenders = {}
    for path in sorted(KERNEL.rglob("*.py")):
        if path in DEFINITIONS:
            continue
        found = branches_on_a_capability(path.read_text())
        if found:
            offenders[str(path.relative_to(KERNEL))] = found
    assert offenders == {}


def test_the_check_finds_such_a_branch() -> None:
    """The check itself can fail: the branches the kernel used to have are found."""
    assert branches_on_a_capability('if slot.capability == "lb":\n    pass\n')
    assert branches_on_a_capability('rolling = sup.by_capability("net") is not None\n')
    assert branches_on_a_capability('if cap in ("fs", "x"):\n    pass\n')
    assert not branches_on_a_capability('if "listen_sockets" in slot.features:\n    pass\n')
