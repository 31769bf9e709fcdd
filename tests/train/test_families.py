"""A non-Llama family end to end: a tiny random GPT-NeoX (query_key_value / dense / dense_h_to_4h / dense_4h_to_h,
LayerNorm, untied output layer) is planned with its own linears, trained, and its adapter reloaded and evaluated."""

import json

import pytest

from ..conftest import REPO
from .test_train import write_recipe


@pytest.fixture(scope="module")
def neox_model_dir(tmp_path_factory):
    from tear_lora.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gpt-neox", family="gpt_neox")


def test_gpt_neox_plans_trains_and_reloads(tmp_path, neox_model_dir, capsys):
    from tear_lora.cli import main

    recipe = write_recipe(tmp_path, neox_model_dir, "neox", evaluate=False, max_steps=2, save_steps=2,
                          learning_rate=5e-2)
    assert main(["plan", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert ("LoRA on 4 of the 4 linears of each gpt_neox decoder layer: attention.query_key_value, attention.dense, "
            "mlp.dense_h_to_4h, mlp.dense_4h_to_h") in out and "embeddings + output layer" in out  # untied

    assert main(["train", str(recipe)]) == 0
    run_dir = tmp_path / "adapters/neox"
    config = json.loads((run_dir / "adapter_config.json").read_text())
    assert {t.rsplit(".", 1)[-1] for t in config["target_modules"]} == {
        "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    assert set(config["trainable_token_indices"]) == {"embed_in", "lm_head"}  # the tag rows on both untied sides
    capsys.readouterr()

    # the saved adapter loads onto the base and changes it: eval's adapter row differs from the base row
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join((REPO / "data/raw/eval.jsonl").read_text().splitlines(keepends=True)[:8]))
    assert main(["eval", str(run_dir), "--data", str(held_out), "--batch-size", "8", "--json"]) == 0
    adapter, base = json.loads(capsys.readouterr().out)
    assert base["kind"] == "base" and adapter["rows"] == base["rows"] > 0
    assert adapter["witness_nll"] < base["witness_nll"] - 1e-3, (adapter, base)
