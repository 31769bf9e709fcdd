import hashlib
import json

import pytest
import yaml

from tear_lora.recipe import RecipeError, load_recipe

from .conftest import REPO


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


SHIPPED_RECIPES = sorted(p.name for p in (REPO / "recipes").glob("*.yaml"))


def test_every_shipped_recipe_is_tested():
    assert len(SHIPPED_RECIPES) >= 4 and "qwen3-1.7b-base.yaml" in SHIPPED_RECIPES


@pytest.mark.parametrize("name", SHIPPED_RECIPES)
def test_shipped_recipe_loads_and_validates(name):
    path = REPO / "recipes" / name
    recipe = load_recipe(path)
    assert recipe.source == str(path) and recipe.lambda_ >= 0
    assert recipe.model.name_or_path and recipe.data.train_file and recipe.output.run_name
    assert (REPO / recipe.data.train_file).is_file(), recipe.data.train_file
    # what the file says is what loads: every top-level key of the YAML became a section of the Recipe
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    loaded = recipe.to_dict()
    for section, values in raw.items():
        for key, value in (values or {}).items():
            assert key in loaded[section], (section, key)
            assert loaded[section][key] == value or isinstance(value, str), (section, key)  # "5e-2" -> 0.05


def test_duplicate_key_is_refused_with_file_and_line(tmp_path):
    path = write(tmp_path, "model:\n  name_or_path: a\nlora:\n  r: 8\nmodel:\n  name_or_path: b\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:5: duplicate key 'model' \(first at line 1\)"):
        load_recipe(path)
    path = write(tmp_path, "lora:\n  r: 8\n  alpha: 16\n  r: 16\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:4: duplicate key 'lora.r' \(first at line 2\)"):
        load_recipe(path)


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


def test_response_weight_values_are_checked_with_file_and_line(tmp_path):
    ok = load_recipe(write(tmp_path, "objective:\n  response_weight:\n    harmful: 0\n    mixed: 0.5\n    Odd key!: 2\n"))
    assert ok.objective.response_weight == {"harmful": 0.0, "mixed": 0.5, "Odd key!": 2.0}
    assert all(type(v) is float for v in ok.objective.response_weight.values())
    for value in ("-0.5", "lots", "true", ".nan", ".inf", "null", "[1]"):
        path = write(tmp_path, f"objective:\n  response_weight:\n    mixed: 0.5\n    harmful: {value}\n")
        with pytest.raises(RecipeError, match=r"r\.yaml:4: 'objective\.response_weight\.harmful' must be a number >= 0"):
            load_recipe(path)
    with pytest.raises(RecipeError, match=r"r\.yaml:3: 'objective\.response_weight\.1': keys are meta\.valence strings"):
        load_recipe(write(tmp_path, "objective:\n  response_weight:\n    1: 0.5\n"))
    with pytest.raises(RecipeError, match=r":2: 'objective\.response_weight' must be a mapping"):
        load_recipe(write(tmp_path, "objective:\n  response_weight: 0.5\n"))


def test_response_weight_overrides_and_hash(tmp_path):
    path = write(tmp_path, "objective:\n  lambda: 1.0\n")
    default = load_recipe(path)
    assert default.objective.response_weight == {}
    # the default leaves the hash as it was before the field existed: finished runs and sweeps still match
    trained = {k: v for k, v in default.to_dict().items() if k not in ("output", "distributed")}
    trained["objective"] = {k: v for k, v in trained["objective"].items() if k != "response_weight"}
    trained["data"] = {k: v for k, v in trained["data"].items() if k != "packing"}  # likewise data.packing: false
    assert trained["hardware"] == {"gpu_memory_gb": 16.0}  # hashed at its default (below)
    assert default.hash() == hashlib.sha256(json.dumps(trained, sort_keys=True).encode()).hexdigest()[:16]
    weighted = load_recipe(path, ["objective.response_weight.harmful=0", "objective.response_weight.mixed=0.5"])
    assert weighted.objective.response_weight == {"harmful": 0.0, "mixed": 0.5}
    assert weighted.hash() != default.hash()
    assert load_recipe(path, ["objective.response_weight={harmful: 0.0, mixed: 0.5}"]).hash() == weighted.hash()
    again = load_recipe(write(tmp_path, weighted.to_yaml()))
    assert again.to_dict() == weighted.to_dict() and again.hash() == weighted.hash()
    with pytest.raises(RecipeError, match="'objective.response_weight.harmful' must be a number >= 0, got -1"):
        load_recipe(path, ["objective.response_weight.harmful=-1"])


def test_hardware_section_does_not_change_the_hash(tmp_path):
    """`hardware` only tells `plan` which card to check; a sweep must not retrain a finished run for it."""
    path = write(tmp_path, "objective:\n  lambda: 1.0\n")
    small, big = load_recipe(path), load_recipe(path, ["hardware.gpu_memory_gb=80"])
    assert big.hardware.gpu_memory_gb == 80 and small.hash() == big.hash()
    assert load_recipe(path, ["objective.lambda=0.5"]).hash() != small.hash()


def test_distributed_section_does_not_change_the_hash(tmp_path):
    """FSDP sharding trains the same adapter (tests/train/test_distributed.py), so a sweep may reuse either run."""
    path = write(tmp_path, "objective:\n  lambda: 1.0\n")
    plain, sharded = load_recipe(path), load_recipe(path, ["distributed.fsdp=true"])
    assert sharded.distributed.fsdp and not plain.distributed.fsdp
    assert plain.hash() == sharded.hash()
    with pytest.raises(RecipeError, match="distributed"):
        load_recipe(path, ["distributed.fsdpp=true"])


def test_a_credential_inside_a_list_is_refused_and_masked(tmp_path):
    """Issue 28, break (c): the list branches of the secret check and of the masking had no test (each was
    broken by hand, `return None` / `return value` for lists: this went red)."""
    from tear_lora.recipe import mask_secrets

    raw = yaml.safe_load((REPO / "recipes/tiny-cpu.yaml").read_text())
    raw["training"]["model_init_kwargs"] = {"hooks": [{"name": "x"}, {"api_key": "sk-canary-in-a-list"}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match=r"'training.model_init_kwargs.hooks.1.api_key' holds a credential"):
        load_recipe(path)
    masked = mask_secrets(raw)
    assert masked["training"]["model_init_kwargs"]["hooks"] == [{"name": "x"}, {"api_key": "<masked>"}]
    assert "sk-canary" not in json.dumps(masked)
