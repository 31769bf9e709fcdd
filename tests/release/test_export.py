"""`tear-lora merge`: dequantized merge reproduces the trained model, `original` differs by the quantization
error, 4-bit merges and wrong bases are refused, and the output stands alone (plain transformers)."""

import json
import subprocess
import sys

import pytest
import torch

from tear_lora.adapters import AdapterSet, check_base
from tear_lora.cli import main
from tear_lora.data.tokens import RESPONSE_CLOSE, WITNESS_CLOSE
from tear_lora.metadata import AdapterError
from tear_lora.release.merge import MergeError, merge_into
from tear_lora.train.model import load_base

from ..release_helpers import trained_pair

VERIFY_ROWS = "2"


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir):
    return trained_pair(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def merged(pair, tmp_path_factory):
    """Both merge modes through the CLI, each verified: dequantized passes (exit 0), original does not (exit 3)."""
    out = tmp_path_factory.mktemp("merged")
    dirs = {}
    for mode, expected_rc in (("dequantized", 0), ("original", 3)):
        dirs[mode] = out / mode
        rc = main(["merge", str(pair["b"]), "--out", str(dirs[mode]), "--base-weights", mode, "--dtype", "fp32",
                   "--verify", "--rows", VERIFY_ROWS])
        assert rc == expected_rc, mode
    return dirs


@pytest.fixture(scope="module")
def reference(pair):
    """The λ=2 adapter on its 4-bit base: what the merges must reproduce."""
    return AdapterSet(pair["b"])


def _verify(path):
    return json.loads((path / "verify.json").read_text())


def _eval_ids(pair, reference, rows=int(VERIFY_ROWS)):
    from tear_lora.data.prepare import prepare

    return [row["input_ids"] for row in prepare(pair["eval"], reference.tokenizer, reference.recipe, save=False).dataset][:rows]


def test_dequantized_merge_matches_adapter_on_4bit(merged, pair, reference):
    result = _verify(merged["dequantized"])
    assert result["passed"] and result["positions"] > 100
    assert result["max_abs_logit"] < 1e-4
    assert result["mean_kl"] < 1e-7
    assert result["top1_agreement"] == 1.0
    # not only what verify.json says: the test computes both models' logits itself
    from transformers import AutoModelForCausalLM

    standalone = AutoModelForCausalLM.from_pretrained(merged["dequantized"]).eval()
    positions = 0
    with torch.no_grad():
        for ids in _eval_ids(pair, reference):
            ids = torch.tensor([ids])
            expected, got = reference.model(input_ids=ids).logits[0], standalone(input_ids=ids).logits[0]
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
            positions += ids.shape[1]
    assert positions == result["positions"]


def test_default_bf16_merge_passes_its_verify(pair, reference, tmp_path):
    """`merge` without --dtype writes bf16 (the release default) and its --verify holds at the bf16 bounds."""
    from transformers import AutoModelForCausalLM

    from tear_lora.release.merge import TOLERANCES
    from tear_lora.release.verify import calibrated_tolerance

    out = tmp_path / "bf16"
    assert main(["merge", str(pair["b"]), "--out", str(out), "--verify", "--rows", VERIFY_ROWS]) == 0
    result = _verify(out)
    assert result["dtype"] == "bf16" and result["passed"]
    # the bound: bf16's table, widened where the base's own bf16 rounding on these rows is larger
    floor = result["floor"]
    assert floor["positions"] == result["positions"] and 0 < floor["mean_kl"] and floor["max_abs_logit"] > 0
    assert result["tolerance"] == calibrated_tolerance(TOLERANCES["bf16"], floor)
    standalone = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert standalone.dtype == torch.bfloat16
    # bf16 rounding moves logits a little, not as far as the bound, and not at all like another adapter would
    with torch.no_grad():
        ids = torch.tensor([_eval_ids(pair, reference, 1)[0]])
        difference = (standalone(input_ids=ids).logits[0].float() - reference.model(input_ids=ids).logits[0]).abs()
    assert 0 < difference.max() <= TOLERANCES["bf16"]["max_abs_logit"]


def _wrong_merge(monkeypatch, how: str):
    """merge_into as a faulty merge would do it: LoRA scaling (alpha/r = 2 here) dropped, or the trained tag rows
    left at their initial values. Only the merge is wrong; the reference is loaded before it, unpatched."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    from tear_lora.release import merge as merge_module

    real_merge_into, real_load = merge_module.merge_into, PeftModel.from_pretrained

    def damaged(*args, **kwargs):
        model = real_load(*args, **kwargs)
        for module in model.modules():
            if how == "dropped-scaling" and isinstance(module, LoraLayer):
                module.scaling = {name: 1.0 for name in module.scaling}
            if how == "tag-rows-untrained" and isinstance(module, TrainableTokensLayer) and not module.tied_adapter:
                for name, rows in module.trainable_tokens_delta.items():
                    rows.data = module.base_layer.weight.data[module.token_indices[name]].to(rows.dtype).clone()
        return model

    def merge_into(model, adapter_dir):
        with monkeypatch.context() as m:
            m.setattr(PeftModel, "from_pretrained", damaged)
            return real_merge_into(model, adapter_dir)

    monkeypatch.setattr(merge_module, "merge_into", merge_into)


@pytest.mark.parametrize("how", ["dropped-scaling", "tag-rows-untrained"])
def test_bf16_verify_refuses_a_wrong_merge(pair, tmp_path, monkeypatch, how):
    """At the default dtype, --verify passes the correct merge (test above) and refuses a wrong one: exit 3,
    passed false; the comparison is with the adapter on its 4-bit base, the floor with that base alone."""
    from tear_lora.release import verify
    from tear_lora.release.merge import is_4bit

    _wrong_merge(monkeypatch, how)
    compared = []
    real_agreement = verify.agreement_over_rows

    def spy(reference, other, rows, device):
        compared.append((is_4bit(reference), is_4bit(other)))
        return real_agreement(reference, other, rows, device)

    monkeypatch.setattr(verify, "agreement_over_rows", spy)
    monkeypatch.setattr("tear_lora.release.merge.agreement_over_rows", spy)
    out = tmp_path / how
    assert main(["merge", str(pair["b"]), "--out", str(out), "--verify", "--rows", VERIFY_ROWS]) == 3
    result = _verify(out)
    assert result["dtype"] == "bf16" and result["passed"] is False
    assert compared == [(True, False), (True, False)]  # the floor, then the merge: 4-bit reference vs bf16 model


def test_original_differs_by_the_quantization_error(merged, reference, tiny_model_dir):
    from safetensors.torch import load_file

    from tear_lora.release.merge import load_merge_base

    dequantized, original = _verify(merged["dequantized"]), _verify(merged["original"])
    assert not original["passed"]
    assert original["max_abs_logit"] > 100 * dequantized["max_abs_logit"]
    assert original["mean_kl"] > 100 * dequantized["mean_kl"]
    # weight by weight, (W + BA) - (Wq + BA) is exactly the base's own quantization error W - Wq
    w = load_file(tiny_model_dir / "model.safetensors")
    wq = load_merge_base(reference.recipe, reference.tokenizer, "dequantized", torch.float32).state_dict()
    merged_w = {mode: load_file(merged[mode] / "model.safetensors") for mode in merged}
    quantized = [k for k in w if k.endswith("proj.weight")]
    assert len(quantized) == 14
    for key in quantized:
        error = w[key] - wq[key]
        assert error.abs().max() > 1e-4  # NF4 really rounded this weight
        torch.testing.assert_close(merged_w["original"][key] - merged_w["dequantized"][key], error, atol=1e-6, rtol=0)
    for key in set(w) - set(quantized):  # embeddings and norms were never quantized: identical in both
        assert torch.equal(merged_w["original"][key], merged_w["dequantized"][key]), key


def test_merge_into_4bit_model_refused(pair, reference):
    with pytest.raises(MergeError, match="4-bit.*erases the adapter"):
        merge_into(load_base(reference.recipe, reference.tokenizer), pair["b"])


def test_mismatched_base_refused(pair, tiny_model_dir, tmp_path, capsys):
    import shutil

    from tear_lora.tiny import tiny_qwen3

    other = tmp_path / "other-base"  # same architecture and vocabulary, other weights
    tiny_qwen3(seed=1).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, other / name)
    rc = main(["merge", str(pair["a"]), "--out", str(tmp_path / "out"), "--base", str(other)])
    assert rc == 2
    assert "trained on base" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_mismatched_tokenizer_refused(pair, reference, qwen_tokenizer):
    with pytest.raises(AdapterError, match="tokenizer"):  # the plain Qwen3 vocabulary: no structural tokens
        check_base(pair["a"], reference.recipe, qwen_tokenizer)


def test_output_dir_must_be_new_or_a_merge_output(pair, capsys):
    # e.g. the adapter dir itself: non-empty and not a merge output (tests/test_integrity.py has the other cases)
    before = sorted(p.name for p in pair["a"].iterdir())
    assert main(["merge", str(pair["a"]), "--out", str(pair["a"])]) == 2
    assert "is not a finished tear_lora merge output" in capsys.readouterr().err
    assert sorted(p.name for p in pair["a"].iterdir()) == before


def test_merged_files(merged, pair):
    out = merged["dequantized"]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True and config["dtype"] == "float32"
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # tied: stored once
    assert not any("lora" in k or "trainable_tokens" in k for k in keys)
    meta = json.loads((pair["b"] / "tear_lora.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    tags = meta["structural_tokens"]
    assert generation["eos_token_id"] == [tags[RESPONSE_CLOSE], tags[WITNESS_CLOSE], 151643]  # each span ends a call
    card = (out / "README.md").read_text()
    for needed in ("λ = 2.0", "<|input|>{input}<|/input|><|response|>{response}<|/response|><|witness|>",
                   "Verify", "passed", meta["data"]["train"]["source_sha256"][:16], "eval_witness_loss"):
        assert needed in card, needed


def test_merged_eval_matches_adapter(merged, pair, reference):
    from tear_lora.study.evaluate import evaluate, source_rows

    merged_rows = evaluate([merged["dequantized"]], pair["eval"])
    assert [r["kind"] for r in merged_rows] == ["merged", "base"]
    for merged_row, adapter_row in zip(merged_rows, source_rows(reference, pair["eval"])):
        for key in ("response_nll", "witness_nll"):
            assert merged_row[key] == pytest.approx(adapter_row[key], abs=1e-4)


STANDALONE = r"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path).eval()
tags = ["<|input|>", "<|/input|>", "<|response|>", "<|/response|>", "<|witness|>", "<|/witness|>"]
ids = [tok.encode(t, add_special_tokens=False) for t in tags]
assert all(len(i) == 1 for i in ids), ids
close = ids[-1][0]

class CloseAt(LogitsProcessor):  # a random tiny model never says <|/witness|> on its own: make it, at step 3
    def __init__(self, start): self.start = start
    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.start == 2:
            scores[:, close] = scores.max() + 100
        return scores

prompt = tok("<|input|>Hi<|/input|><|response|>Hello<|/response|><|witness|>", return_tensors="pt").input_ids
out = model.generate(prompt, max_new_tokens=20, do_sample=False, logits_processor=LogitsProcessorList([CloseAt(prompt.shape[1])]))
new = out[0, prompt.shape[1]:].tolist()
assert new[-1] == close and len(new) == 3, new  # stopped by generation_config.json, 17 tokens early
assert "tear_lora" not in sys.modules
print("ok", ids)
"""


def test_merged_dir_loads_with_plain_transformers(merged):
    result = subprocess.run([sys.executable, "-c", STANDALONE, str(merged["dequantized"])], capture_output=True,
                            text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")
