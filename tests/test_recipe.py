import pytest

from tear_lora.recipe import Recipe, RecipeError, load_recipe

from .conftest import REPO


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["tiny-cpu.yaml", "qwen3-1.7b-base.yaml"])
def test_shipped_recipes_load(name):
    recipe = load_recipe(REPO / "recipes" / name)
    assert isinstance(recipe, Recipe)
    assert recipe.lambda_ == 1.0


def test_typo_names_file_line_and_suggests(tmp_path):
    path = write(tmp_path, "model:\n  name_or_path: x\nobjective:\n  lamda: 0.5\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:4: unknown key 'objective.lamda'; did you mean 'lambda'"):
        load_recipe(path)


def test_unknown_section_and_training_key(tmp_path):
    with pytest.raises(RecipeError, match=r":1: unknown key 'modle'; did you mean 'model'"):
        load_recipe(write(tmp_path, "modle: {}\n"))
    with pytest.raises(RecipeError, match=r":2: unknown key 'training.learning_rat'.*did you mean 'learning_rate'"):
        load_recipe(write(tmp_path, "training:\n  learning_rat: 0.1\n"))


def test_reserved_training_key(tmp_path):
    with pytest.raises(RecipeError, match="training.output_dir' is not allowed: set output.dir"):
        load_recipe(write(tmp_path, "training:\n  output_dir: x\n"))


def test_wrong_type_and_impossible_values(tmp_path):
    with pytest.raises(RecipeError, match=r":2: 'lora.r' must be an integer, got str 'sixteen'"):
        load_recipe(write(tmp_path, "lora:\n  r: sixteen\n"))
    with pytest.raises(RecipeError, match=r":2: 'objective.lambda' must be >= 0"):
        load_recipe(write(tmp_path, "objective:\n  lambda: -1\n"))
    with pytest.raises(RecipeError, match="'model.quant_type' must be one of 'nf4', 'fp4'"):
        load_recipe(write(tmp_path, "model:\n  quant_type: int3\n"))
    with pytest.raises(RecipeError, match="'lora.dropout' must be in"):
        load_recipe(write(tmp_path, "lora:\n  dropout: 1.5\n"))


def test_invalid_yaml_names_line(tmp_path):
    with pytest.raises(RecipeError, match=r"r\.yaml:3: invalid YAML"):
        load_recipe(write(tmp_path, "model:\n  - a\n b: c\n"))


def test_overrides_are_typed(tmp_path):
    path = write(tmp_path, "objective:\n  lambda: 1.0\n")
    recipe = load_recipe(path, ["objective.lambda=0.5", "lora.r=8", "training.max_steps=3", "output.run_name=x",
                                "training.learning_rate=5e-2", "training.save_strategy=no", "training.optim=adamw_torch"])
    assert recipe.lambda_ == 0.5 and recipe.lora.r == 8 and recipe.training["max_steps"] == 3
    assert recipe.training["learning_rate"] == 0.05 and recipe.training["save_strategy"] == "no"
    assert recipe.training["optim"] == "adamw_torch"
    with pytest.raises(RecipeError, match="unknown key 'objective.lamda'; did you mean 'lambda'"):
        load_recipe(path, ["objective.lamda=2"])
    with pytest.raises(RecipeError, match="expected KEY.PATH=VALUE"):
        load_recipe(path, ["objective.lambda"])


def test_show_roundtrip(tmp_path):
    recipe = load_recipe(REPO / "recipes" / "tiny-cpu.yaml", ["objective.lambda=2"])
    again = load_recipe(write(tmp_path, recipe.to_yaml()))
    assert again.to_dict() == recipe.to_dict() and again.hash() == recipe.hash()


def test_cli_validate_and_show(capsys):
    from tear_lora.cli import main

    assert main(["recipe", "validate", str(REPO / "recipes/tiny-cpu.yaml")]) == 0
    assert main(["recipe", "show", str(REPO / "recipes/tiny-cpu.yaml"), "--set", "objective.lambda=0.25"]) == 0
    assert "lambda: 0.25" in capsys.readouterr().out
    assert main(["recipe", "validate", str(REPO / "recipes/tiny-cpu.yaml"), "--set", "lora.rr=1"]) == 2
    assert "did you mean 'r'" in capsys.readouterr().err
