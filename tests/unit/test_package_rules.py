"""Package-wide rules that hold by construction (issue #15): library code logs, commands print their product."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _prints_outside_commands(path: Path) -> list[int]:
    """Lines of ``print(...)`` calls that are neither in a command module (``cli.py`` / ``cli_*.py``), nor in a
    command handler function (``_cli``), nor under ``if __name__ == "__main__"``."""
    if path.name == "cli.py" or path.name.startswith("cli_"):
        return []
    tree = ast.parse(path.read_text())
    allowed: set[int] = set()
    for node in ast.walk(tree):
        is_handler = isinstance(node, ast.FunctionDef) and node.name == "_cli"
        is_main = (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name)
            and node.test.left.id == "__name__"
        )
        if is_handler or is_main:
            allowed |= {id(n) for n in ast.walk(node)}
    return [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Name)
        and n.func.id == "print"
        and id(n) not in allowed
    ]


def test_library_modules_log_instead_of_printing():
    found = {
        str(p.relative_to(REPO)): lines
        for p in sorted((REPO / "lancer_dist").rglob("*.py"))
        if (lines := _prints_outside_commands(p))
    }
    assert found == {}, f"print() in library code (use logging.getLogger(__name__)): {found}"


def test_the_rule_sees_a_print(tmp_path: Path):
    bad = tmp_path / "stage.py"
    bad.write_text('def f():\n    print("x")\n\n\nif __name__ == "__main__":\n    print("ok")\n')
    assert _prints_outside_commands(bad) == [2]
