"""The package's shape (DESIGN.md): no import cycles between our modules (lazy imports inside functions count:
they are how the export <-> gguf_export cycle hid), and the
read-only verbs free of TRL and the trainer."""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tear_lora"

# The flow (docs/architecture.md): data <- train <- study / release <- cli. Root modules sit where what they
# import puts them: rundir and recipe_yaml below everything; recipe and metadata read data's field and token
# lists; adapters opens a trained model (train's loader) for study and release.
LEVELS = {"rundir": 0, "recipe_yaml": 0, "tiny": 0, "data": 1, "recipe": 2, "metadata": 2, "train": 3,
          "adapters": 4, "study": 5, "release": 5, "cli": 6, "__main__": 6, "__init__": 6}


def module_names(package: Path) -> dict[str, Path]:
    """Dotted names under the package ("data.prepare", "rundir", "train" for train/__init__.py)."""
    names = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def internal_imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Our modules (dotted) that `path`, known as `name`, imports anywhere (module level or inside functions)."""
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def add(dotted: str, imported: list[str]) -> None:
        for item in imported:  # `from pkg import module` names the module; `from module import x` the module
            found.add(f"{dotted}.{item}" if f"{dotted}.{item}" in known else dotted)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".") if here else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                dotted = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("tear_lora"):
                dotted = node.module.removeprefix("tear_lora").removeprefix(".")
            else:
                continue
            add(dotted, [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("tear_lora.") for a in node.names if a.name.startswith("tear_lora."))
    return {f for f in found if f in known} - {name}


def import_graph(package: Path) -> dict[str, set[str]]:
    modules = module_names(package)
    return {name: internal_imports(path, name, set(modules)) for name, path in modules.items()}


def level(module: str) -> int:
    top = module.split(".")[0] or "__init__"
    assert top in LEVELS, f"{module}: give it a place in LEVELS (and in docs/architecture.md)"
    return LEVELS[top]


def arrows_up(graph: dict[str, set[str]]) -> list[str]:
    """Imports against the flow: to a higher level, or across between study and release."""
    bad = []
    for module, imported in sorted(graph.items()):
        for other in sorted(imported):
            wings = module.split(".")[0], other.split(".")[0]
            if level(other) > level(module) or (level(other) == level(module) and wings[0] != wings[1]):
                bad.append(f"{module} -> {other}")
    return bad


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


def test_arrows_up_sees_a_wing_importing_above_it(tmp_path):
    for wing in ("data", "train", "study", "release"):
        (tmp_path / wing).mkdir()
        (tmp_path / wing / "__init__.py").write_text("")
    (tmp_path / "data" / "a.py").write_text("def f():\n    from tear_lora.train.b import x\n")
    (tmp_path / "train" / "b.py").write_text("from ..data import a\n")
    (tmp_path / "study" / "c.py").write_text("from tear_lora.release import d\n")
    (tmp_path / "release" / "d.py").write_text("from tear_lora.train import b\n")
    assert arrows_up(import_graph(tmp_path)) == ["data.a -> train.b", "study.c -> release.d"]


def test_imports_follow_the_flow():
    assert arrows_up(import_graph(PACKAGE)) == []


def test_read_only_verbs_do_not_import_trl_or_the_trainer():
    code = ("import sys\nimport tear_lora.study.evaluate, tear_lora.study.analyze, tear_lora.study.generate, tear_lora.study.compare, "
            "tear_lora.release.merge, tear_lora.adapters, tear_lora.train.batch\n"
            "print(sorted(m for m in sys.modules if m == 'trl' or m.startswith('trl.') or m == 'tear_lora.train.trainer'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


MAX_MODULE_LINES = 350  # DESIGN.md: a module is small enough to read in one sitting
LONGER_BECAUSE = "Longer than 350 lines because"


def oversized_without_reason(package: Path) -> list[str]:
    """Modules over MAX_MODULE_LINES whose docstring does not say why they are one module anyway."""
    found = []
    for path in sorted(package.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES and LONGER_BECAUSE not in (ast.get_docstring(ast.parse(text)) or ""):
            found.append(f"{path.relative_to(package)}: {lines} lines")
    return found


def test_oversized_without_reason_sees_a_long_module(tmp_path):
    (tmp_path / "short.py").write_text('"""Short."""\n')
    (tmp_path / "long.py").write_text('"""Long."""\n' + "x = 1\n" * MAX_MODULE_LINES)
    (tmp_path / "said.py").write_text(f'"""{LONGER_BECAUSE} it is one table."""\n' + "x = 1\n" * MAX_MODULE_LINES)
    assert oversized_without_reason(tmp_path) == [f"long.py: {MAX_MODULE_LINES + 1} lines"]


def test_every_module_is_small_or_says_why():
    assert oversized_without_reason(PACKAGE) == [], (
        f"split these along a seam, or say in the module docstring '{LONGER_BECAUSE} ...'")


def test_public_train_entry_point_is_the_runner():
    import tear_lora.train
    from tear_lora.train import run
    from tear_lora.train.runner import run as runner_run

    assert run is runner_run is tear_lora.train.run


def _cli_verbs() -> set[str]:
    """Every verb of `tear-lora`, nested ones as "data prepare"."""
    from tear_lora.cli import build_parser

    def choices(parser):
        return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))

    verbs = set()
    for name, sub in choices(build_parser()).items():
        nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        verbs |= {f"{name} {action}" for action in nested[0].choices} if nested else {name}
    return verbs


def test_every_verb_and_deleting_script_has_its_row_in_the_canary_table():
    """Issue 28: each new verb wrote its own rule and skipped the shared tests. A verb is a row of the canary
    table (tests/test_user_files.py: WRITERS, or FILE_WRITERS for one named file) or declared READ_ONLY_VERBS;
    a script under scripts/ that deletes (`rm`, rmtree, unlink) is a row of WRITERS."""
    from .test_user_files import FILE_WRITERS, READ_ONLY_VERBS, WRITERS

    rows = {name.split(" --")[0] for name in WRITERS} | set(FILE_WRITERS) | set(READ_ONLY_VERBS)
    assert sorted(_cli_verbs() - rows) == [], "verbs with no row in tests/test_user_files.py"
    assert not set(READ_ONLY_VERBS) & ({name.split(" --")[0] for name in WRITERS} | set(FILE_WRITERS))
    deleting = re.compile(r"(^|[\s;&|(`])rm\s|rmtree|os\.remove|\.unlink\(", re.M)
    scripts = sorted(str(p.relative_to(PACKAGE.parent)) for p in (PACKAGE.parent / "scripts").rglob("*")
                     if p.suffix in (".sh", ".py") and deleting.search(p.read_text(encoding="utf-8")))
    assert scripts and sorted(set(scripts) - set(WRITERS)) == [], "deleting scripts with no row"
