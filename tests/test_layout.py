"""The package's shape (DESIGN.md): no import cycles between our modules (lazy imports inside functions count:
they are how the export <-> gguf_export cycle hid), and the
read-only verbs free of TRL and the trainer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tear_lora"


def internal_imports(path: Path) -> set[str]:
    """Our modules that `path` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("tear_lora."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("tear_lora."))
    return found - {path.stem}


def import_graph(package: Path) -> dict[str, set[str]]:
    modules = {p.stem: p for p in package.glob("*.py")}
    return {name: internal_imports(path) & set(modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_lazy_two_module_cycle(tmp_path):
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import y\n")
    (tmp_path / "c.py").write_text("from . import a\n")
    assert find_cycle(import_graph(tmp_path)) == ["a", "b", "a"]
    (tmp_path / "b.py").write_text("def f():\n    pass\n")
    assert find_cycle(import_graph(tmp_path)) is None


def test_no_import_cycle_inside_the_package():
    assert find_cycle(import_graph(PACKAGE)) is None


def test_read_only_verbs_do_not_import_trl_or_the_trainer():
    code = ("import sys\nimport tear_lora.evaluate, tear_lora.analyze, tear_lora.generate, tear_lora.compare, "
            "tear_lora.export, tear_lora.adapters, tear_lora.batch\n"
            "print(sorted(m for m in sys.modules if m == 'trl' or m.startswith('trl.') or m == 'tear_lora.trainer'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


MAX_MODULE_LINES = 350  # DESIGN.md: a module is small enough to read in one sitting
LONGER_BECAUSE = "Longer than 350 lines because"


def oversized_without_reason(package: Path) -> list[str]:
    """Modules over MAX_MODULE_LINES whose docstring does not say why they are one module anyway."""
    found = []
    for path in sorted(package.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES and LONGER_BECAUSE not in (ast.get_docstring(ast.parse(text)) or ""):
            found.append(f"{path.name}: {lines} lines")
    return found


def test_oversized_without_reason_sees_a_long_module(tmp_path):
    (tmp_path / "short.py").write_text('"""Short."""\n')
    (tmp_path / "long.py").write_text('"""Long."""\n' + "x = 1\n" * MAX_MODULE_LINES)
    (tmp_path / "said.py").write_text(f'"""{LONGER_BECAUSE} it is one table."""\n' + "x = 1\n" * MAX_MODULE_LINES)
    assert oversized_without_reason(tmp_path) == [f"long.py: {MAX_MODULE_LINES + 1} lines"]


def test_every_module_is_small_or_says_why():
    assert oversized_without_reason(PACKAGE) == [], (
        f"split these along a seam, or say in the module docstring '{LONGER_BECAUSE} ...'")
