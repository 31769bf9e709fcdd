"""AdapterSet: one 4-bit base, adapters switched with set_adapter; swapping is exact and token rows follow."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tear_lora.adapters import AdapterSet
from tear_lora.cli import main
from tear_lora.data.template import encode, segments
from tear_lora.data.tokens import STRUCTURAL_TOKENS
from tear_lora.metadata import AdapterError

from .release_helpers import trained_pair

TEXT = ("My landlord wants to raise the rent by 15%. Should I negotiate?", "Ask for 5% and offer a two-year lease.",
        "He agreed to 7% and a two-year lease.")


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir):
    return trained_pair(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def both(pair):
    adapters = AdapterSet(pair["a"])
    adapters.add(pair["b"])
    return adapters


def _logits(adapters, label=None):
    if label is not None:
        adapters.use(label)
    ids, _, _ = encode(adapters.tokenizer, segments(*TEXT))
    with torch.no_grad():
        return adapters.model(input_ids=torch.tensor([ids])).logits[0]


def test_swap_a_b_a_reproduces_single_adapter_logits(both, pair):
    a_name, b_name = both.labels
    assert (a_name, b_name) == ("pair-lambda0", "pair-lambda2")
    first_a = _logits(both, a_name)
    b = _logits(both, b_name)
    again_a = _logits(both, a_name)
    assert torch.equal(first_a, again_a)
    assert (first_a - b).abs().max() > 1e-2  # the two adapters really differ
    single_a = _logits(AdapterSet(pair["a"]))  # a fresh base with only adapter A
    assert torch.equal(first_a, single_a)


def test_token_rows_follow_the_active_adapter(both, pair):
    ids = [both.tokenizer.convert_tokens_to_ids(t) for t in STRUCTURAL_TOKENS]
    saved = {label: load_file(pair[key] / "adapter_model.safetensors")[
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
        for label, key in zip(both.labels, ("a", "b"))}
    assert not torch.equal(saved["pair-lambda0"], saved["pair-lambda2"])
    for label in [*both.labels, both.labels[0]]:
        both.use(label)
        embed = both.model.get_input_embeddings().weight[ids]
        output = both.model.get_output_embeddings().weight[ids]  # tied: the output side follows the same rows
        assert torch.equal(embed, saved[label]), label
        assert torch.equal(output, saved[label]), label
    with both.model.disable_adapter():  # the base's own (initialised) rows
        base_rows = both.model.get_input_embeddings().weight[ids]
        assert not torch.equal(base_rows, saved["pair-lambda0"])


def test_adapter_of_another_base_refused(both, pair, tmp_path, capsys):
    other = tmp_path / "other-base-adapter"
    shutil.copytree(pair["b"], other, ignore=shutil.ignore_patterns("checkpoints"))
    meta = json.loads((other / "tear_lora.json").read_text())
    meta["base"]["content_sha256"] = "0" * 64
    (other / "tear_lora.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="trained on base"):
        both.add(other)
    assert main(["compare", str(pair["a"]), str(other), "--data", str(pair["eval"])]) == 2
    assert "trained on base" in capsys.readouterr().err

    meta["base"] = json.loads((pair["b"] / "tear_lora.json").read_text())["base"]  # same weights, other NF4 settings
    meta["quantization"]["double_quant"] = not meta["quantization"]["double_quant"]
    (other / "tear_lora.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="quantized as"):
        both.add(other)
    assert len(both.labels) == 2


def test_not_an_adapter_dir(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--input", "hi"]) == 2
    assert "neither an adapter dir" in capsys.readouterr().err
