"""Padding-free packing (`data.packing`): packed rows train exactly what the same triples train unpacked.

Exactness is checked on the tiny Qwen3 (sdpa and eager, 4-bit and fp32): per-token NLL of every response and
witness target, and every LoRA / token-row gradient, packed vs unpacked to 1e-5; triples in one packed row cannot
see each other; and one optimizer step of the real trainer is the same packed (any micro-batch / accumulation
split) as unpacked, with per-row response weights.
"""

import json

import pytest
import torch

from tear_lora.train.batch import SpanCollator, final_hidden_states, row_response_weight, unwrap_causal_lm
from tear_lora.data.prepare import prepare
from tear_lora.train.loss import count_span_tokens, span_loss, span_targets, token_nll
from tear_lora.data.packing import PACKED_FEATURES, pack_triples
from tear_lora.data.template import CONTEXT, PAD_ROLE, RESPONSE

from ..conftest import REPO, SGD, WEIGHTS, make_recipe, make_trainer, trainable_model, trainable_state


def split_packed(row):
    """A packed row -> [(id, meta, input_ids, span_roles)] of its triples, using its seq_lengths."""
    out, at = [], 0
    for size, id_, meta in zip(row["seq_lengths"], row["id"], row["meta"]):
        out.append((id_, meta, row["input_ids"][at : at + size], row["span_roles"][at : at + size]))
        at += size
    assert at == len(row["input_ids"])
    return out


# ---- packing the data ----------------------------------------------------------------------------------------------


def test_pack_triples_keeps_every_triple_whole_with_its_id_and_meta(eval_rows):
    packed = pack_triples(eval_rows, 256)
    assert packed.features == PACKED_FEATURES
    assert len(packed) < len(eval_rows) / 2  # ~95-token triples: more than two per 256-token row
    assert max(len(r) for r in packed["input_ids"]) <= 256
    triples = {row["id"]: row for row in eval_rows}
    seen = [t for row in packed for t in split_packed(row)]
    assert sorted(t[0] for t in seen) == sorted(triples)  # each triple exactly once
    for id_, meta, ids, roles in seen:
        assert (ids, roles, meta) == (triples[id_]["input_ids"], triples[id_]["span_roles"], triples[id_]["meta"])
        assert roles[0] == CONTEXT  # the template already starts every triple with a context tag


def test_collator_packed_positions_mask_flash_kwargs_and_weights(eval_rows):
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    packed = pack_triples(eval_rows.select(range(12)), 256)
    features = [packed[i] for i in range(3)]
    batch = SpanCollator(0, response_weight=WEIGHTS)(features)
    assert "attention_mask" not in batch  # the block-diagonal mask comes from position_ids only without one
    length = max(len(f["input_ids"]) for f in features)
    assert batch["input_ids"].shape == batch["span_roles"].shape == batch["position_ids"].shape == (3, length)
    for b, f in enumerate(features):
        expected = [p for size in f["seq_lengths"] for p in range(size)]
        n = len(expected)
        assert batch["position_ids"][b, :n].tolist() == expected
        assert batch["position_ids"][b, n:].tolist() == list(range(length - n))  # the tail: one "sequence"
        assert batch["span_roles"][b, :n].tolist() == f["span_roles"]  # the roles already make starts CONTEXT
        assert (batch["span_roles"][b, n:] == PAD_ROLE).all()
        weights = [row_response_weight(m, WEIGHTS) for m, size in zip(f["meta"], f["seq_lengths"]) for _ in range(size)]
        assert batch["response_weights"][b].tolist() == weights + [0.0] * (length - n)
    # flash attention: cu_seq_lens over the flattened batch, as transformers would derive them from position_ids
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert torch.equal(batch["cu_seq_lens_q"], cu_q) and torch.equal(batch["cu_seq_lens_k"], cu_k)
    assert batch["max_length_q"] == batch["max_length_k"] == int(max_q) == int(max_k)
    # a triple's first token is never a target, even if its role said otherwise
    forced = dict(features[0], span_roles=[RESPONSE] * len(features[0]["span_roles"]))
    roles = SpanCollator(0)([forced])["span_roles"][0]
    starts = [0, *torch.tensor(forced["seq_lengths"]).cumsum(0)[:-1].tolist()]
    assert [roles[s].item() for s in starts] == [CONTEXT] * len(starts) and roles[1].item() == RESPONSE


def test_window_counts_packed_equal_unpacked(mixed_rows):
    """What _get_num_items_in_batch sums over micro-batches and ranks: the same counts either way."""
    unpacked = SpanCollator(0, response_weight=WEIGHTS)([mixed_rows[i] for i in range(len(mixed_rows))])
    packed_rows = pack_triples(mixed_rows, 256)
    packed = SpanCollator(0, response_weight=WEIGHTS)([packed_rows[i] for i in range(len(packed_rows))])
    assert len(packed_rows) < len(mixed_rows)
    counts = {}
    for weights in ("response_weights", None):
        expected = count_span_tokens(unpacked["span_roles"], unpacked.get(weights))
        got = count_span_tokens(packed["span_roles"], packed.get(weights))
        assert torch.equal(got, expected), weights
        assert torch.equal(span_targets(packed["input_ids"], packed["span_roles"], packed.get(weights)).counts(),
                           expected)
        counts[weights] = expected
    assert 0 < float(counts["response_weights"][0]) < int(counts[None][0])  # the weights do something


# ---- the model sees each triple alone --------------------------------------------------------------------------------


def model_for(tmp_path, tiny_model_dir, tokenizer, attn, four_bit):
    recipe = make_recipe(tiny_model_dir, tmp_path, model={"attn_implementation": attn, "load_in_4bit": four_bit})
    model = trainable_model(recipe, tokenizer)
    with torch.no_grad():  # non-zero LoRA B, so every LoRA A gets a gradient too
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


def per_target_nll(model, batch, ids_per_row, starts_per_row):
    """{(triple id, target offset in the triple): NLL}, the span sums and the loss, for any layout."""
    hidden = final_hidden_states(model, batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
    targets = span_targets(batch["input_ids"], batch["span_roles"], batch.get("response_weights"))
    head = unwrap_causal_lm(model).get_output_embeddings()
    nll = token_nll(hidden[:, :-1].reshape(-1, hidden.shape[-1])[targets.positions], targets.targets, head)
    width = batch["input_ids"].shape[1] - 1
    keyed = {}
    for position, value in zip(targets.positions.tolist(), nll.tolist()):
        row, token = divmod(position, width)
        token += 1  # the target token
        k = max(i for i, s in enumerate(starts_per_row[row]) if s <= token)
        keyed[(ids_per_row[row][k], token - starts_per_row[row][k])] = value
    result = span_loss(hidden, targets, head, 0.7)
    return keyed, result


@pytest.mark.parametrize("attn,four_bit", [("sdpa", True), ("eager", True), ("sdpa", False), ("eager", False)])
def test_packed_batch_equals_unpacked_losses_and_gradients(tmp_path, tiny_model_dir, tokenizer, mixed_rows, attn,
                                                           four_bit):
    model = model_for(tmp_path, tiny_model_dir, tokenizer, attn, four_bit)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    collate = SpanCollator(tokenizer.pad_token_id, response_weight=WEIGHTS)
    features = [mixed_rows[i] for i in range(len(mixed_rows))]
    packed_rows = pack_triples(mixed_rows, 256)
    packed_features = [packed_rows[i] for i in range(len(packed_rows))]
    assert max(len(f["seq_lengths"]) for f in packed_features) >= 3
    layouts = {
        "unpacked": (collate(features), [[f["id"]] for f in features], [[0]] * len(features)),
        "packed": (collate(packed_features), [f["id"] for f in packed_features],
                   [[0, *torch.tensor(f["seq_lengths"]).cumsum(0)[:-1].tolist()] for f in packed_features]),
    }
    results = {}
    for name, (batch, ids, starts) in layouts.items():
        model.zero_grad()
        keyed, result = per_target_nll(model, batch, ids, starts)
        result.loss.backward()
        results[name] = keyed, result, {n: p.grad.clone() for n, p in params.items()}
    (nll_u, res_u, grads_u), (nll_p, res_p, grads_p) = results["unpacked"], results["packed"]
    assert nll_u.keys() == nll_p.keys() and len(nll_u) > 400
    assert max(abs(nll_u[k] - nll_p[k]) for k in nll_u) < 1e-5
    for field in ("response_nll_sum", "witness_nll_sum", "loss"):
        assert getattr(res_p, field).item() == pytest.approx(getattr(res_u, field).item(), rel=1e-6, abs=1e-5), field
    assert torch.equal(res_p.counts, res_u.counts)
    assert sum("lora_A" in n for n in grads_u) and sum("trainable_tokens" in n for n in grads_u)
    for n, reference in grads_u.items():
        assert reference.abs().max() > 0, n
        error = ((grads_p[n] - reference).norm() / reference.norm()).item()
        assert error < 1e-5, (n, error)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_triples_in_a_packed_row_cannot_see_each_other(tmp_path, tiny_model_dir, tokenizer, eval_rows, attn):
    """Change the first triple of a packed row: its own hidden states move, the next triple's do not. The
    control, the same row under a plain all-ones attention mask (one long sequence), shows they would."""
    model = model_for(tmp_path, tiny_model_dir, tokenizer, attn, four_bit=False)
    row = next(r for r in pack_triples(eval_rows, 256) if len(r["seq_lengths"]) >= 2)
    first = row["seq_lengths"][0]
    batch = SpanCollator(tokenizer.pad_token_id)([row])
    changed = batch["input_ids"].clone()
    changed[0, 2 : first - 20] = torch.randint(1000, 100_000, (first - 22,), generator=torch.Generator().manual_seed(0))

    def hidden(input_ids, **how):
        with torch.no_grad():
            return final_hidden_states(model, input_ids, **how)[0]

    packed = {"attention_mask": None, "position_ids": batch["position_ids"]}
    before, after = hidden(batch["input_ids"], **packed), hidden(changed, **packed)
    assert (after[:first] - before[:first]).abs().max() > 1e-2  # the perturbed triple itself moves
    assert (after[first:] - before[first:]).abs().max() < 1e-6  # every later triple in the row does not
    one_sequence = {"attention_mask": torch.ones_like(changed)}
    moved = hidden(changed, **one_sequence)[first:] - hidden(batch["input_ids"], **one_sequence)[first:]
    assert moved.abs().max() > 1e-2


# ---- the trainer ------------------------------------------------------------------------------------------------------


def test_one_training_step_packed_equals_unpacked_under_accumulation(tmp_path, tiny_model_dir, tokenizer, mixed_rows):
    """One SGD step, lr 1, 4-bit, response weights 0 / 0.5 / 1: 8 triples unpacked (8 x 1) vs the same triples
    packed into k rows as k x 1 and 1 x k: the window's span counts make them one loss, so one update."""
    packed = pack_triples(mixed_rows, 256)
    k = len(packed)
    assert 2 <= k < len(mixed_rows)
    steps, logs = {}, {}
    for name, rows, micro, accum in (("unpacked", mixed_rows, 8, 1), ("packed k x 1", packed, k, 1),
                                     ("packed 1 x k", packed, 1, k)):
        recipe = make_recipe(tiny_model_dir, tmp_path, objective={"lambda": 0.7, "response_weight": WEIGHTS},
                             training={**SGD, "per_device_train_batch_size": micro,
                                       "gradient_accumulation_steps": accum})
        model = trainable_model(recipe, tokenizer)
        before = trainable_state(model)
        trainer = make_trainer(model, recipe, tokenizer, rows, tmp_path / name.replace(" ", "_"))
        trainer.train()
        after = trainable_state(model)
        steps[name], logs[name] = {n: after[n] - before[n] for n in before}, trainer.state.log_history[0]
    reference = steps["unpacked"]
    assert any(delta.abs().max() > 0 for delta in reference.values())
    for name in ("packed k x 1", "packed 1 x k"):
        for key in ("loss", "response_loss", "witness_loss", "response_weighted_tokens"):
            assert logs[name][key] == pytest.approx(logs["unpacked"][key], rel=1e-5), (name, key)
        for key in ("response_tokens", "witness_tokens"):
            assert logs[name][key] == logs["unpacked"][key], (name, key)
        for n, delta in steps[name].items():
            error = (delta - reference[n]).norm() / reference[n].norm().clamp(min=1e-12)
            assert error < 1e-5 or reference[n].abs().max() == delta.abs().max() == 0, (name, n, error)


# ---- recipe and cache ---------------------------------------------------------------------------------------------------


def test_packing_recipe_key_hash_and_reserved_trl_keys(tmp_path, tiny_model_dir):
    from tear_lora.recipe import RecipeError

    default = make_recipe(tiny_model_dir, tmp_path)
    packing = make_recipe(tiny_model_dir, tmp_path, data={"packing": True})
    assert default.data.packing is False and packing.data.packing is True
    assert packing.hash() != default.hash()
    with pytest.raises(RecipeError, match=r"'data.packing' must be true/false, got str 'yes please'"):
        make_recipe(tiny_model_dir, tmp_path, data={"packing": "yes please"})
    for key in ("packing", "padding_free"):
        with pytest.raises(RecipeError, match=rf"'training.{key}' is not allowed: set data.packing instead"):
            make_recipe(tiny_model_dir, tmp_path, training={key: True})


def test_packed_cache_is_its_own_key_reused_and_rebuilt_when_damaged(tmp_path, tokenizer, tiny_model_dir,
                                                                    monkeypatch):
    from tear_lora.data import prepare as data

    raw = REPO / "data/raw/eval.jsonl"
    recipe = make_recipe(tiny_model_dir, tmp_path, data={"packing": True})
    plain = prepare(raw, tokenizer, recipe)
    packed = prepare(raw, tokenizer, recipe, packed=True)
    assert plain.packed is None and plain.training_rows is plain.dataset and not (plain.out_dir / "packed").exists()
    assert packed.out_dir != plain.out_dir and packed.training_rows is packed.packed
    assert packed.dataset["input_ids"] == plain.dataset["input_ids"]  # the triples stay what they were
    stats = packed.manifest["packing"]
    assert packed.manifest["settings"]["packing"] is True and stats["triples"] == packed.manifest["rows_kept"]
    assert stats["rows"] == len(packed.packed) and stats["tokens"] == packed.manifest["tokens"]["total"]["sum"]
    from tear_lora.rundir import COMPLETE_MARKER

    # packing's scratch files (map caches beside the triples' Arrow file) are gone before the swap
    assert sorted(p.name for p in packed.out_dir.iterdir()) == sorted([COMPLETE_MARKER, "dataset", "manifest.json",
                                                                      "packed", "rejects.jsonl"])
    in_memory = prepare(raw, tokenizer, recipe, save=False, packed=True)
    assert in_memory.packed["input_ids"] == packed.packed["input_ids"]
    assert in_memory.manifest["packing"] == stats

    original = data._build
    monkeypatch.setattr(data, "_build", lambda *a: pytest.fail("rebuilt a valid packed cache"))
    assert prepare(raw, tokenizer, recipe, packed=True).packed["input_ids"] == packed.packed["input_ids"]
    monkeypatch.setattr(data, "_build", original)
    for arrow in (packed.out_dir / "packed").glob("*.arrow"):
        arrow.unlink()
    assert prepare(raw, tokenizer, recipe, packed=True).packed["input_ids"] == packed.packed["input_ids"]


def test_data_prepare_packs_the_training_file_as_train_will(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    """`tear-lora data prepare` with data.packing builds the packed cache for the recipe's training file (the
    one training then reads, without building again) and a plain one for any other file (evaluation's)."""
    from tear_lora.data import prepare as data
    from tear_lora.cli import main

    train_file, other = REPO / "data/raw/eval.jsonl", REPO / "data/raw/consequences.jsonl"
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(f"model:\n  name_or_path: {tiny_model_dir}\ndata:\n  train_file: {train_file}\n"
                           f"  processed_dir: {tmp_path}/proc\n  packing: true\n")
    assert main(["data", "prepare", str(train_file), "--recipe", str(recipe_path)]) == 0
    assert main(["data", "prepare", str(other), "--recipe", str(recipe_path)]) == 0
    manifests = {m.parent.name.split("-")[0]: json.loads(m.read_text()) for m in (tmp_path / "proc").glob("*/manifest.json")}
    assert manifests["eval"]["settings"]["packing"] and manifests["eval"]["packing"]["rows"] > 0
    assert not manifests["consequences"]["settings"]["packing"] and "packing" not in manifests["consequences"]
    monkeypatch.setattr(data, "_build", lambda *a: pytest.fail("training rebuilt the cache data prepare made"))
    from tear_lora.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    assert len(prepare(train_file, tokenizer, recipe, packed=recipe.data.packing).packed) == (
        manifests["eval"]["packing"]["rows"])


def test_train_with_packing_sees_every_triple_once_per_epoch_and_evaluates_unpacked(tmp_path, tiny_model_dir):
    """`tear-lora train` with data.packing: one epoch is ceil(packed rows / 8) steps, every response and witness
    target trained exactly once in it; evaluation runs on the unpacked triples (same file here, to stay fast)."""
    import math

    from tear_lora.train.runner import run

    recipe = make_recipe(tiny_model_dir, tmp_path, data={"packing": True, "train_file": str(REPO / "data/raw/eval.jsonl")},
                         training={"max_steps": -1, "num_train_epochs": 1, "save_strategy": "no", "logging_steps": 1})
    run_dir = run(recipe)
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "processed").glob("eval-*/manifest.json")]
    packed, plain = sorted(manifests, key=lambda m: not m["settings"]["packing"])
    assert packed["settings"]["packing"] and "packing" not in plain  # evaluation asked for no packed copy
    log = json.loads((run_dir / "log_history.json").read_text())
    log = log["log_history"] if isinstance(log, dict) else log
    steps = [entry for entry in log if "response_tokens" in entry]
    assert len(steps) == math.ceil(packed["packing"]["rows"] / 8) < packed["rows_kept"] / 8
    for span in ("response", "witness"):
        assert sum(entry[f"{span}_tokens"] for entry in steps) == packed["tokens"][span]["sum"]
        assert next(e for e in log if "eval_loss" in e)[f"eval_{span}_tokens"] == plain["tokens"][span]["sum"]


@pytest.mark.slow
def test_bench_packing_runs_every_mode_over_the_same_tokens(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    out = tmp_path / "packing.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts/bench/bench_packing.py"), "--recipe",
                           "recipes/tiny-cpu.yaml", "--set", f"model.name_or_path={tiny_model_dir}", "--limit", "12",
                           "--packed-batch", "2", "--json", str(out)], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    padded, packed = result["modes"]
    assert (padded["mode"], packed["mode"]) == ("padded", "packed b2")
    assert padded["real_tokens"] == packed["real_tokens"] > 0 and packed["rows"] == result["packed_rows"] < 12
    for mode in result["modes"]:
        assert mode["epoch_s"] > 0 and len(mode["step_s"]) == len(mode["step_shapes"]) == mode["steps_per_epoch"]
        assert mode["real_tokens"] <= mode["positions"] == sum(b * t for b, t in mode["step_shapes"])
    assert set(result["cpu_fit"]["parts"]) == {"padded", "packed b2"}
