"""The package has no import cycle: every module can be understood from the modules below it.

Static: reads every `import` and `from ... import` in sinkquant/ (those inside functions too, since a
lazy import is still a dependency) and asks graphlib for an order; a cycle raises CycleError."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sinkquant"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's own modules `name` imports (a name imported from a module counts as that module,
    unless it is a submodule; a package's __init__ pulling in its own submodules does not count)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    wanted: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            wanted.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            wanted.update(
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names
            )
    deps = set()
    for target in wanted:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if (
            target
            and target != name
            and not name.startswith(target + ".")
            and not target.startswith(name + ".")
        ):
            deps.add(target)
    return deps


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_no_import_cycle():
    try:
        list(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle in sinkquant/: {' -> '.join(exc.args[1])}")


def test_the_check_finds_a_cycle(tmp_path, monkeypatch):
    """The walker sees lazy imports: a cycle closed inside a function fails the check."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter(import_graph()).static_order())


def test_quantize_means_weights():
    """The KV cache and the C++ kernels live in packages of their own."""
    names = {p.stem for p in (PACKAGE / "quantize").glob("*.py")}
    assert not names & {"kv_cache", "kv_store", "generation", "cpu_kernels"}
