"""Shared fixtures: the real Qwen3 tokenizer and a tiny random Qwen3, built once per test run, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from tear_lora.tiny import qwen3_tokenizer

    return qwen3_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tear_lora.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3")


@pytest.fixture()
def tokenizer(tiny_model_dir):
    """A fresh tokenizer with the structural tokens (tests may mutate it)."""
    from tear_lora.tokens import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def make_recipe(tiny_model_dir: Path, tmp_path: Path, **sections):
    """The tiny-cpu recipe pointed at the fixture model and a temporary output, with section overrides."""
    import yaml

    from tear_lora.recipe import recipe_from_dict

    raw = yaml.safe_load((REPO / "recipes" / "tiny-cpu.yaml").read_text())
    raw["model"]["name_or_path"] = str(tiny_model_dir)
    raw["data"]["train_file"] = str(REPO / "data/raw/consequences.jsonl")
    raw["data"]["eval_file"] = str(REPO / "data/raw/eval.jsonl")
    raw["data"]["processed_dir"] = str(tmp_path / "processed")
    raw["output"]["dir"] = str(tmp_path / "adapters")
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return recipe_from_dict(raw, source="tiny-cpu.yaml")


@pytest.fixture()
def recipe(tiny_model_dir, tmp_path):
    return make_recipe(tiny_model_dir, tmp_path)
