"""Architecture-agnostic path: an untied Llama-style model with no spare rows (resize + both sides' tag rows)."""

import torch

from tear_lora.model import add_adapters, format_breakdown, guard_bnb_cpu, load_base, trainable_breakdown
from tear_lora.tokens import structural_token_ids

from .conftest import make_recipe


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
