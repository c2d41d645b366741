"""The size limits the project keeps (DEVELOPERS.md): a file in sinkquant/ at most 450 lines, a class
200, a function 80 (integrations/ too), README.md 150. Static: reads the sources with ast."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILE, CLASS, FUNCTION, README = 450, 200, 80, 150


def _over_limits(root: Path = ROOT) -> list[str]:
    over = []
    for path in sorted((root / "sinkquant").rglob("*.py")) + sorted((root / "integrations").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(root)
        lines = text.count("\n")
        if lines > FILE and where.parts[0] == "sinkquant":
            over.append(f"{where}: {lines} lines (> {FILE})")
        for node in ast.walk(ast.parse(text)):
            span = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef) and span > CLASS:
                over.append(f"{where}: class {node.name} spans {span} lines (> {CLASS})")
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and span > FUNCTION:
                over.append(f"{where}: {node.name}() spans {span} lines (> {FUNCTION})")
    readme = (root / "README.md").read_text(encoding="utf-8").count("\n")
    if readme > README:
        over.append(f"README.md: {readme} lines (> {README})")
    return over


def test_files_classes_functions_and_readme_are_within_the_limits():
    over = _over_limits()
    assert not over, "past the size limits:\n" + "\n".join(over)


def test_the_check_sees_each_kind_of_excess(tmp_path):
    (tmp_path / "sinkquant").mkdir()
    (tmp_path / "integrations").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(FUNCTION))
    (tmp_path / "sinkquant" / "long.py").write_text(f"def long():\n{body}\n" + "\n" * FILE)
    (tmp_path / "README.md").write_text("x\n" * (README + 1))
    assert _over_limits(tmp_path) == [
        f"sinkquant/long.py: {FUNCTION + 1 + FILE} lines (> {FILE})",
        f"sinkquant/long.py: long() spans {FUNCTION + 1} lines (> {FUNCTION})",
        f"README.md: {README + 1} lines (> {README})",
    ]
