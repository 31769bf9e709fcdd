"""Architecture-agnostic path: an untied Llama-style model with no spare rows (resize + both sides' tag rows)."""

import pytest
import torch

from tear_lora.data.tokens import structural_token_ids
from tear_lora.train.model import add_adapters, format_breakdown, guard_bnb_cpu, load_base, trainable_breakdown

from ..conftest import make_recipe


def tiny_llama_dir(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=151_669, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         eos_token_id=151_643, pad_token_id=151_643, bos_token_id=None)
    out = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def test_untied_model_resizes_and_trains_tag_rows_on_both_sides(tmp_path, tiny_model_dir, tokenizer):
    recipe = make_recipe(tiny_llama_dir(tmp_path, tiny_model_dir), tmp_path)
    base = load_base(recipe, tokenizer)
    assert base.get_input_embeddings().weight.shape[0] == 151_680  # grown to a multiple of 64
    tags = list(structural_token_ids(tokenizer).values())
    model = add_adapters(base, recipe, tags)
    counts = trainable_breakdown(model)
    assert counts["token_rows"] == 2 * 6 * 64  # input and output rows: untied
    assert "structural token rows 768" in format_breakdown(counts)

    ids = torch.tensor([tags + [9707, 1879]])
    output = model(input_ids=ids).logits
    (output[0, :, tags].sum() + output.mean()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "trainable_tokens_delta" in n}
    assert len(grads) == 2 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_guard_reaches_every_4bit_layer(tmp_path, tiny_model_dir, tokenizer):
    import bitsandbytes as bnb

    base = load_base(make_recipe(tiny_model_dir, tmp_path), tokenizer)
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14 and guard_bnb_cpu(base) == 14
    assert not any(m.support_avx512bf16_for_cpu for m in layers)


def _pair(recipe, tokenizer):
    """(ours, PEFT's own) on the same base and init, with the tag rows moved off their initial values."""
    from peft import get_peft_model

    from tear_lora.train.model import lora_config

    tags = list(structural_token_ids(tokenizer).values())
    models = []
    for wrap in (lambda base: add_adapters(base, recipe, tags),
                 lambda base: get_peft_model(base, lora_config(recipe, tags, base))):
        torch.manual_seed(0)
        model = wrap(load_base(recipe, tokenizer))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "trainable_tokens_delta" in name or "lora_B" in name:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        models.append(model.train())
    return models, tags


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_row_lookup_equals_peft_token_layer(tmp_path, tiny_model_dir, tokenizer, tied):
    """Our token-row forward gives PEFT's logits and gradients (LoRA and both sides' rows), tied and untied."""
    model_dir = tiny_model_dir if tied else tiny_llama_dir(tmp_path, tiny_model_dir)
    (ours, peft_own), tags = _pair(make_recipe(model_dir, tmp_path), tokenizer)
    assert type(ours.base_model.model.model.embed_tokens.token_adapter).__name__ == "RowLookupTokens"
    ids = torch.tensor([[tags[0], 9707, 1879, tags[1], tags[2], 11, tags[3]], [5, 6, 7, 8, 9, 10, 12]])
    outputs = [m(input_ids=ids).logits for m in (ours, peft_own)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for out in outputs:
        (out[:, :, tags].sum() + out.square().mean()).backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (ours, peft_own)]
    assert sum("trainable_tokens_delta" in n for n in grads[0]) == (1 if tied else 2)
    for name, grad in grads[1].items():
        # fp32 sums in another order (row lookup vs PEFT's merged matmul): 1.005e-6 of the max seen on an AVX-512 CPU
        torch.testing.assert_close(grads[0][name], grad, rtol=0, atol=1e-5 * grad.abs().max().item(), msg=name)


def test_training_step_builds_no_vocab_by_hidden_tensor(tmp_path, tiny_model_dir, tokenizer):
    """The training loss path (final_hidden_states + span loss), forward and backward, creates no tensor the size
    of the embedding matrix: PEFT's token layer builds a merged copy on input and output and a dense gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from tear_lora.data.template import CONTEXT, RESPONSE, WITNESS
    from tear_lora.train.batch import final_hidden_states, unwrap_causal_lm
    from tear_lora.train.loss import span_loss, span_targets

    (ours, peft_own), tags = _pair(make_recipe(tiny_model_dir, tmp_path), tokenizer)
    matrix = ours.get_input_embeddings().weight.numel()

    class Largest(TorchDispatchMode):
        """The largest tensor any op allocates (views of existing storage, e.g. `weight.t()`, are not new)."""

        size = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    Largest.size = max(Largest.size, t.numel())
            return out

    ids = torch.tensor([[tags[0], 9707, tags[1], tags[2], 1879, tags[3], tags[4], 11, tags[5]]])
    roles = torch.tensor([[CONTEXT] * 4 + [RESPONSE] * 2 + [CONTEXT] + [WITNESS] * 2])
    sizes = []
    for model in (ours, peft_own):
        Largest.size = 0
        with Largest():
            hidden = final_hidden_states(model, ids, torch.ones_like(ids))
            span_loss(hidden, span_targets(ids, roles), unwrap_causal_lm(model).get_output_embeddings(), 1.0).loss.backward()
        sizes.append(Largest.size)
    assert sizes[0] < matrix // 4, sizes  # ours: nothing near the matrix size
    assert sizes[1] >= matrix  # PEFT's own layer: the merged copy (the check can see it)


def test_row_lookup_adapter_loads_and_merges_in_plain_peft(tmp_path, tiny_model_dir, tokenizer):
    """Saving is PEFT's: the adapter loads in plain PEFT with PEFT's own token layer and merge_and_unload gives the
    same logits as our forward."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # unquantized base on both sides, so the logits can be compared exactly (4-bit merges are export's tests)
    (ours, _), tags = _pair(make_recipe(tiny_model_dir, tmp_path, model={"load_in_4bit": False}), tokenizer)
    ours.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    ids = torch.tensor([[tags[0], 9707, tags[1], tags[2], 1879, tags[3]]])
    with torch.no_grad():
        expected = ours.eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # Qwen3's spare rows hold the tags: no resize
        base_logits = base(input_ids=ids).logits
        assert (base_logits - expected).abs().max() > 1e-2  # the adapter moves the logits: the checks below can fail
        plain = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        assert type(plain.base_model.model.model.embed_tokens.token_adapter).__name__ == "TrainableTokensLayer"
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        merged = plain.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged.get_input_embeddings().weight[tags],
                                   ours.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta[
                                       "default"].detach())


def test_one_placement_rule_for_every_model(monkeypatch):
    """Base, merged and serving models all load where `device_map()` says: the current CUDA device, else CPU."""
    from tear_lora.train import model as model_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert model_module.device_map() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert model_module.device_map() == {"": 1}
