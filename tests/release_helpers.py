"""Two tiny adapters of different λ, trained once per test session and shared by the release tests.

Trained through the sweep (`train_sweep` -> `tear_lora.train.runner.run`), on 16 training and 6 eval rows, with a
learning rate high enough (0.05) that two steps move the adapters measurably apart.
"""

from __future__ import annotations

from pathlib import Path

from .conftest import REPO, make_recipe

LAMBDAS = (0.0, 2.0)
_CACHE: dict[str, dict] = {}


def _head(src: Path, dst: Path, rows: int) -> Path:
    dst.write_text("".join(src.read_text(encoding="utf-8").splitlines(keepends=True)[:rows]), encoding="utf-8")
    return dst


def trained_pair(tmp_path_factory, tiny_model_dir: Path) -> dict:
    """{"recipe": yaml path, "eval": eval file, "a": λ=0 adapter dir, "b": λ=2 adapter dir, "root": dir}."""
    key = str(tiny_model_dir)
    if key not in _CACHE:
        from tear_lora.study.compare import sweep_recipes, train_sweep

        root = tmp_path_factory.mktemp("release")
        train = _head(REPO / "data/raw/consequences.jsonl", root / "train.jsonl", 16)
        eval_file = _head(REPO / "data/raw/eval.jsonl", root / "eval.jsonl", 6)
        recipe = make_recipe(
            tiny_model_dir, root, data={"train_file": str(train), "eval_file": str(eval_file)},
            training={"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                      "per_device_eval_batch_size": 6, "learning_rate": 0.05, "save_steps": 2},
            output={"run_name": "pair"})
        recipe_path = root / "pair.yaml"
        recipe_path.write_text(recipe.to_yaml())
        a, b = train_sweep(sweep_recipes(recipe_path, list(LAMBDAS)))
        _CACHE[key] = {"recipe": recipe_path, "eval": eval_file, "a": a, "b": b, "root": root}
    return _CACHE[key]
