
import pytest
import torch

from tear_lora.data.tokens import structural_token_ids

from ..conftest import SGD, WEIGHTS, make_recipe, make_trainer, trainable_model, trainable_state


@pytest.fixture(scope="module")
def eight_rows(eval_rows):
    return eval_rows.select(range(8))  # all helpful


@pytest.mark.parametrize("lam,four_bit,weights", [(1.0, False, None), (0.3, False, None), (1.0, True, None),
                                                  (0.7, True, WEIGHTS)])
def test_gradient_accumulation_is_exact(tmp_path, tiny_model_dir, tokenizer, eight_rows, mixed_rows, lam, four_bit,
                                        weights):
    """One SGD step with lr=1 moves each weight by exactly its gradient: compare 8x1, 2x4, 4x2 windows.
    With response weights (0, 0.5, 1 by valence) the weighted mean's denominator is the whole window's too."""
    results = {}
    rows = mixed_rows if weights else eight_rows
    for micro, accum in ((8, 1), (2, 4), (4, 2)):
        recipe = make_recipe(tiny_model_dir, tmp_path, objective={"lambda": lam, "response_weight": weights or {}},
                             model={"load_in_4bit": four_bit},
                             training={**SGD, "per_device_train_batch_size": micro, "gradient_accumulation_steps": accum})
        model = trainable_model(recipe, tokenizer)
        before = trainable_state(model)
        trainer = make_trainer(model, recipe, tokenizer, rows, tmp_path / f"out{micro}")
        trainer.train()
        after = trainable_state(model)
        assert all(p.dtype == torch.float32 for p in after.values())  # adapters stay fp32 (TRL would make them bf16)
        results[(micro, accum)] = (trainer.state.log_history[0], {n: after[n] - before[n] for n in before})
    log_ref, step_ref = results[(8, 1)]
    assert any(s.abs().max() > 0 for s in step_ref.values())
    # what was optimised is what is logged: the (weighted) response mean plus lambda times the witness mean
    assert log_ref["loss"] == pytest.approx(log_ref["response_loss"] + lam * log_ref["witness_loss"], rel=1e-4)
    names = ["loss", "response_loss", "witness_loss", "response_tokens", "witness_tokens"]
    if weights:  # 3 harmful rows at 0, 2 mixed at 0.5, 3 helpful at 1: sum_rows w * response tokens
        from tear_lora.data.template import RESPONSE
        from tear_lora.train.batch import row_response_weight

        expected = sum(row_response_weight(r["meta"], weights) * r["span_roles"][1:].count(RESPONSE) for r in rows)
        assert log_ref["response_weighted_tokens"] == pytest.approx(expected)
        assert 0 < expected < log_ref["response_tokens"]
        names.append("response_weighted_tokens")
    else:
        assert "response_weighted_tokens" not in log_ref  # no weights: the log lines are as before
    tolerance = 1e-5
    for key, (log, step) in results.items():
        for name in names:
            assert log[name] == pytest.approx(log_ref[name], rel=1e-4), (key, name)
        for name, delta in step.items():
            error = (delta - step_ref[name]).norm() / step_ref[name].norm().clamp(min=1e-12)
            assert error < tolerance or step_ref[name].abs().max() == delta.abs().max() == 0, (key, name, error)


def test_only_lora_and_tag_rows_change(tmp_path, tiny_model_dir, tokenizer, eight_rows):
    recipe = make_recipe(tiny_model_dir, tmp_path, training={**SGD, "optim": "adamw_torch", "learning_rate": 1e-2,
                                                              "max_steps": 3, "per_device_train_batch_size": 4})
    model = trainable_model(recipe, tokenizer)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    embed = model.get_input_embeddings()
    head = model.get_base_model().get_output_embeddings()
    rows, hidden = model.get_base_model().get_input_embeddings().weight.shape
    all_ids, probe = torch.arange(rows), torch.randn(5, hidden)
    with torch.no_grad():
        rows_before, logits_before = embed(all_ids).clone(), head(probe).clone()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n or "trainable_tokens_delta" in n for n in names)

    make_trainer(model, recipe, tokenizer, eight_rows, tmp_path / "out").train()

    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param.detach(), frozen_before[name]), name  # base weights bit-identical
    tags = sorted(structural_token_ids(tokenizer).values())
    with torch.no_grad():
        changed_rows = (embed(all_ids) != rows_before).any(dim=1).nonzero().flatten().tolist()
        changed_cols = (head(probe) != logits_before).any(dim=0).nonzero().flatten().tolist()
    assert changed_rows == tags  # input side: only the six tag rows
    assert changed_cols == tags  # tied output side: only the six tag logits


def test_lambda_warmup_ramps(tmp_path, tiny_model_dir, tokenizer, eight_rows):
    recipe = make_recipe(tiny_model_dir, tmp_path, objective={"lambda": 2.0, "lambda_warmup_steps": 4},
                         training={**SGD, "learning_rate": 1e-3, "max_steps": 3, "per_device_train_batch_size": 8})
    trainer = make_trainer(trainable_model(recipe, tokenizer), recipe, tokenizer, eight_rows, tmp_path / "o")
    trainer.train()
    lambdas = [entry["lambda"] for entry in trainer.state.log_history if "lambda" in entry]
    assert lambdas == [0.5, 1.0, 1.5]  # logged after each step: 2.0 * step / 4
    assert trainer.current_lambda(training=False) == 2.0


def test_bnb_cpu_guard_keeps_gradients_right_after_eval_forward(tmp_path, tiny_model_dir, tokenizer, eight_rows):
    """An eval-mode forward (as in an eval loop or generate) must not corrupt later 4-bit backward passes."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from tear_lora.train.batch import SpanCollator
    from tear_lora.train.model import add_adapters, load_base

    recipe = make_recipe(tiny_model_dir, tmp_path)
    batch = SpanCollator(tokenizer.pad_token_id)([eight_rows[i] for i in range(4)])

    def lora_grads(model):
        model.zero_grad()
        model.train()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits.float().logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n}

    def relative_error(grads, reference):
        return max(((grads[n] - reference[n]).norm() / reference[n].norm()).item() for n in reference)

    quantized = trainable_model(recipe, tokenizer)
    with torch.no_grad():  # make LoRA B non-zero so A gets gradients too
        for name, param in quantized.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)

    # Reference: the same weights with every 4-bit layer dequantized into a plain Linear.
    reference = load_base(recipe, tokenizer, quantize=False)
    for name, module in quantized.get_base_model().named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            dense = reference.get_submodule(name.replace(".base_layer", ""))
            dense.weight.data = F.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    reference = add_adapters(reference, recipe, list(structural_token_ids(tokenizer).values()))
    set_peft_model_state_dict(reference, get_peft_model_state_dict(quantized))
    expected = lora_grads(reference)

    assert relative_error(lora_grads(quantized), expected) < 1e-3
    quantized.eval()
    with torch.no_grad():
        quantized.generate(batch["input_ids"][:1, :8], max_new_tokens=2, do_sample=False)
    assert relative_error(lora_grads(quantized), expected) < 1e-3

    # Without the guard, on CPUs with AVX512-BF16, the same sequence gives wrong gradients.
    if bnb.functional.has_avx512bf16() if hasattr(bnb.functional, "has_avx512bf16") else False:
        unguarded = trainable_model(recipe, tokenizer)
        set_peft_model_state_dict(unguarded, get_peft_model_state_dict(quantized))
        for module in unguarded.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = True
        unguarded.eval()
        with torch.no_grad():
            unguarded(input_ids=batch["input_ids"][:1])
        assert relative_error(lora_grads(unguarded), expected) > 0.1


# ---- per-row response weights --------------------------------------------------------------------------------


def test_row_response_weight_reads_meta_valence():
    from tear_lora.train.batch import row_response_weight

    mapping = {"harmful": 0.0, "mixed": 0.5}
    assert row_response_weight('{"valence": "harmful", "domain": "x"}', mapping) == 0.0
    assert row_response_weight('{"valence": "mixed"}', mapping) == 0.5
    assert row_response_weight({"valence": "mixed"}, mapping) == 0.5
    for meta in ('{"valence": "helpful"}', '{"domain": "x"}', None, "null", "[1]", '{"valence": ["harmful"]}',
                 '{"valence": 3}', "not json"):
        assert row_response_weight(meta, mapping) == 1.0, meta


def test_collator_emits_weights_only_with_a_mapping(tokenizer, mixed_rows):
    from tear_lora.train.batch import SpanCollator

    features = [mixed_rows[i] for i in range(8)]
    plain = SpanCollator(tokenizer.pad_token_id)(features)
    empty = SpanCollator(tokenizer.pad_token_id, response_weight={})(features)
    weighted = SpanCollator(tokenizer.pad_token_id, response_weight=WEIGHTS)(features)
    assert set(plain) == set(empty) == {"input_ids", "attention_mask", "span_roles"}
    assert all(torch.equal(plain[k], empty[k]) and torch.equal(plain[k], weighted[k]) for k in plain)
    assert weighted["response_weights"].dtype == torch.float32
    assert weighted["response_weights"].tolist() == [0.0, 0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0]


def test_all_zero_weight_window_trains_witness_only_and_eval_stays_unweighted(tmp_path, tiny_model_dir, tokenizer,
                                                                             eight_rows, mixed_rows):
    """Every row at weight 0: the response term is 0 (no NaN), the step is the witness term's alone; the
    evaluation loss of the same trainer is the plain NLL, weights or not."""
    from tear_lora.train.batch import SpanCollator

    recipe = make_recipe(tiny_model_dir, tmp_path, objective={"lambda": 0.5, "response_weight": {"helpful": 0}},
                         training={**SGD, "learning_rate": 1e-3, "per_device_train_batch_size": 4,
                                   "gradient_accumulation_steps": 2, "per_device_eval_batch_size": 4})
    model = trainable_model(recipe, tokenizer)
    before = trainable_state(model)
    trainer = make_trainer(model, recipe, tokenizer, eight_rows, tmp_path / "out", eval_dataset=mixed_rows)
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["response_loss"] == 0 and log["response_weighted_tokens"] == 0 and log["response_tokens"] > 0
    assert log["loss"] == pytest.approx(0.5 * log["witness_loss"], rel=1e-5)
    after = trainable_state(model)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any((after[n] - before[n]).abs().max() > 0 for n in before)  # the witness still trained

    weighted_eval = trainer.evaluate()
    trainer.data_collator = SpanCollator(tokenizer.pad_token_id)
    plain_eval = trainer.evaluate()
    assert "eval_response_weighted_tokens" not in weighted_eval
    for name in ("eval_loss", "eval_response_loss", "eval_witness_loss", "eval_response_tokens"):
        assert weighted_eval[name] == plain_eval[name], name
    assert weighted_eval["eval_response_loss"] > 0
