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
    from tear_lora.data.tokens import load_tokenizer

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


# One SGD step with lr 1 moves each weight by exactly its gradient: the exactness tests compare those steps.
SGD = {"optim": "sgd", "learning_rate": 1.0, "max_grad_norm": 0.0, "lr_scheduler_type": "constant",
       "max_steps": 1, "logging_steps": 1, "save_strategy": "no", "report_to": "none"}

# Response-loss weights by valence for the tests that mix them (objective.response_weight).
WEIGHTS = {"harmful": 0.0, "mixed": 0.5}


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def eval_rows(tmp_path_factory, tiny_model_dir):
    """The bundled eval triples, tokenized for the tiny model (not cached on disk)."""
    from tear_lora.data.prepare import prepare
    from tear_lora.data.tokens import load_tokenizer

    recipe = make_recipe(tiny_model_dir, tmp_path_factory.mktemp("rows"))
    return prepare(REPO / "data/raw/eval.jsonl", load_tokenizer(str(tiny_model_dir)), recipe, save=False).dataset


@pytest.fixture(scope="module")
def mixed_rows(eval_rows):
    """8 triples: 3 harmful, 2 mixed, 3 helpful (response weights 0, 0.5, 1 under WEIGHTS)."""
    import json

    valences = [json.loads(meta)["valence"] for meta in eval_rows["meta"]]
    pick = {"harmful": 3, "mixed": 2, "helpful": 3}
    chosen = [i for v, n in pick.items() for i in [j for j, w in enumerate(valences) if w == v][:n]]
    return eval_rows.select(chosen)


@pytest.fixture()
def recipe(tiny_model_dir, tmp_path):
    return make_recipe(tiny_model_dir, tmp_path)


def trainable_model(recipe, tokenizer, seed: int = 0):
    """4-bit tiny base + LoRA + tag rows, initialised reproducibly."""
    import torch

    from tear_lora.data.tokens import structural_token_ids
    from tear_lora.train.model import add_adapters, load_base

    torch.manual_seed(seed)
    base = load_base(recipe, tokenizer)
    return add_adapters(base, recipe, list(structural_token_ids(tokenizer).values()))


def make_trainer(model, recipe, tokenizer, train_dataset, output_dir, eval_dataset=None):
    from tear_lora.train.batch import SpanCollator
    from tear_lora.train.runner import sft_config
    from tear_lora.train.trainer import TearTrainer

    return TearTrainer(model=model, args=sft_config(recipe, output_dir=output_dir), train_dataset=train_dataset,
                       eval_dataset=eval_dataset, processing_class=tokenizer,
                       data_collator=SpanCollator(tokenizer.pad_token_id, response_weight=recipe.objective.response_weight),
                       lambda_=recipe.lambda_,
                       lambda_warmup_steps=recipe.objective.lambda_warmup_steps,
                       loss_chunk_size=recipe.objective.loss_chunk_size)
