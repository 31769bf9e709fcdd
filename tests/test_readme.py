"""The README's Python example runs as written (on the tiny model instead of the demo one), and every local link
in the README points at a file that exists."""

import re

import pytest
import yaml

from .conftest import REPO

README = REPO / "README.md"


def python_block() -> str:
    [block] = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    return block


@pytest.mark.slow  # trains, evaluates and merges through the Python API, ~28 s (docs/testing.md)
def test_python_example_runs(tmp_path, tiny_model_dir, capsys):
    raw = yaml.safe_load((REPO / "recipes/tiny-cpu.yaml").read_text())
    raw["model"]["name_or_path"] = str(tiny_model_dir)
    raw["data"].update(train_file=str(REPO / "data/raw/consequences.jsonl"), eval_file=None,
                       processed_dir=str(tmp_path / "processed"))
    raw["output"]["dir"] = str(tmp_path / "adapters")
    raw["training"].update(max_steps=1, save_strategy="no", eval_strategy="no")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    code = python_block()
    assert '"recipes/demo-cpu.yaml"' in code
    exec(compile(code.replace('"recipes/demo-cpu.yaml"', repr(str(recipe))), "README.md", "exec"), {})
    assert (tmp_path / "adapters/demo-l0.5/tear_lora.json").is_file()
    assert " -> " in capsys.readouterr().out


def test_readme_links_exist():
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text)
    assert links and [link for link in links if not (REPO / link).exists()] == []


def test_readme_stays_short():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 300
