"""`tear-lora plan`: offline config, the 16 GB proof for the real recipe, refusal in `train`, and the estimate
against a measured CPU step of the tiny model."""

import json

import pytest

from tear_lora.recipe import load_recipe
from tear_lora.train import plan as plan_mod
from tear_lora.train.plan import GIB, PlanError, Shape, check_memory, estimate, load_model_config, plan

from ..conftest import REPO, make_recipe

QWEN = REPO / "recipes" / "qwen3-1.7b-base.yaml"


def qwen_recipe(*overrides):
    return load_recipe(QWEN, list(overrides))


def test_shipped_qwen3_config_works_offline():
    config, source = load_model_config("Qwen/Qwen3-1.7B-Base")  # conftest sets HF_HUB_OFFLINE=1
    assert "shipped" in source or "cache" in source
    shape = Shape.from_config(config)
    assert (shape.vocab, shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.head_dim,
            shape.intermediate, shape.tied) == (151_936, 2048, 28, 16, 8, 128, 6144, True)


def test_unknown_model_without_config_is_a_plan_error(tmp_path):
    with pytest.raises(PlanError, match="no config.json"):
        load_model_config(str(tmp_path / "nowhere"))


def test_qwen_recipe_fits_16gb_within_14gb():
    p = plan(qwen_recipe())
    assert p.fits and p.card_bytes <= 14e9  # the 16 GB proof: <= 14 GB (decimal) with CUDA context and slack
    c = p.components
    assert c["base linear weights (4-bit)"] == 1_409_286_144 // 2  # 28 layers x 50.3M weights at 4 bits
    assert c["embeddings (tied)"] == 151_936 * 2048 * 2
    assert 1 * GIB < p.peak_allocated < 8 * GIB
    assert p.max_micro_batch >= p.micro_batch == 2  # packed rows of ~10 triples


def test_max_micro_batch_is_the_boundary():
    recipe = qwen_recipe("data.max_seq_len=2048")
    p = plan(recipe)
    shape = Shape.from_config(load_model_config("Qwen/Qwen3-1.7B-Base")[0])
    assert plan_mod.card_bytes(estimate(recipe, shape, p.max_micro_batch, 2048)[2]) <= p.gpu_bytes
    assert plan_mod.card_bytes(estimate(recipe, shape, p.max_micro_batch + 1, 2048)[2]) > p.gpu_bytes
    assert estimate(recipe, shape, 4, 2048)[2] < estimate(recipe, shape, 8, 2048)[2]


def test_absurd_recipe_is_refused_on_cuda_but_not_on_cpu_or_when_forced():
    absurd = qwen_recipe("hardware.gpu_memory_gb=2", "training.per_device_train_batch_size=64",
                         "data.max_seq_len=2048")
    with pytest.raises(PlanError, match="--force"):
        check_memory(absurd, cuda=True)
    assert not check_memory(absurd, cuda=False).fits  # CPU: printed, not enforced
    assert not check_memory(absurd, force=True, cuda=True).fits


def test_train_runs_the_check_before_loading_anything(monkeypatch, tmp_path):
    from tear_lora.train import runner as train

    recipe = qwen_recipe("hardware.gpu_memory_gb=2", "training.per_device_train_batch_size=64",
                         "training.bf16=false", f"output.dir={tmp_path}")
    monkeypatch.setattr(train, "check_memory", lambda r, force=False, **kw: check_memory(r, force=force, cuda=True, **kw))
    monkeypatch.setattr(train, "load_tokenizer_for", lambda r: pytest.fail("loaded the tokenizer before the plan"))
    with pytest.raises(PlanError, match="does not fit"):
        train.run(recipe)


def test_cli_plan_json(capsys):
    from tear_lora.cli import main

    assert main(["plan", str(QWEN), "--json", "--set", "training.per_device_train_batch_size=4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fits"] and result["micro_batch"] == 4 and result["peak_allocated"] < result["card_bytes"]


@pytest.mark.slow
def test_tiny_estimate_matches_a_measured_cpu_step(tiny_model_dir, tmp_path, tokenizer):
    """One TearTrainer step of the tiny model on CPU, torch allocations traced by the profiler, vs the plan."""
    import tempfile

    import torch
    from datasets import Dataset
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    from tear_lora.data.template import CONTEXT, RESPONSE, WITNESS
    from tear_lora.data.tokens import structural_token_ids
    from tear_lora.train.batch import SpanCollator
    from tear_lora.train.model import add_adapters, load_base
    from tear_lora.train.runner import sft_config
    from tear_lora.train.trainer import TearTrainer

    recipe = make_recipe(tiny_model_dir, tmp_path, training={"per_device_train_batch_size": 4, "max_steps": 1,
                                                             "gradient_accumulation_steps": 1, "save_strategy": "no"})
    model = add_adapters(load_base(recipe, tokenizer), recipe, list(structural_token_ids(tokenizer).values()))
    seq = recipe.data.max_seq_len
    roles = [CONTEXT] * (seq // 2) + [RESPONSE] * (seq // 4) + [WITNESS] * (seq - seq // 2 - seq // 4)
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_list([{"input_ids": torch.randint(0, 151_000, (seq,), generator=g).tolist(),
                               "span_roles": roles} for _ in range(4)])
    trainer = TearTrainer(model=model, args=sft_config(recipe, output_dir=tempfile.mkdtemp(dir=tmp_path)),
                          train_dataset=data, processing_class=tokenizer,
                          data_collator=SpanCollator(tokenizer.pad_token_id),
                          loss_chunk_size=recipe.objective.loss_chunk_size)
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    static = sum(t.untyped_storage().nbytes() for t in tensors)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        trainer.train()
    current = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        current += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, current)
    measured = static + peak
    estimated = plan(recipe).peak_allocated
    assert 0.8 * measured < estimated < 1.25 * measured, (estimated, measured)


FSDP_8B = REPO / "recipes" / "qwen3-8b-base-fsdp-2x16gb.yaml"


def test_per_rank_plan_ddp_and_fsdp():
    """DDP ranks hold everything plus gradient buckets; FSDP ranks hold 1/N of the weights and adapter state, but the
    root (here: tied embeddings) whole all step plus its shard, and two decoder layers whole."""
    single, ddp = plan(qwen_recipe()), plan(qwen_recipe(), nproc=2)
    assert (ddp.nproc, ddp.sharding, single.sharding) == (2, "ddp", "none")
    assert ddp.components["DDP gradient buckets"] > 0 and ddp.peak_allocated > single.peak_allocated
    fsdp = plan(qwen_recipe("distributed.fsdp=true"), nproc=2)
    c, s = fsdp.components, single.components
    assert fsdp.sharding == "fsdp"
    assert c["base linear weights (4-bit)"] == s["base linear weights (4-bit)"] / 2
    assert c["embeddings (tied)"] == pytest.approx(1.5 * s["embeddings (tied)"])
    assert c["LoRA + token rows: weights, grads, optimizer"] == pytest.approx(
        s["LoRA + token rows: weights, grads, optimizer"] / 2)
    assert c["FSDP: two decoder layers whole (running + prefetched)"] == pytest.approx(
        2 * (s["base linear weights (4-bit)"] + s["quantization state"]) / 28)
    # unsharding the root gathers it into a buffer, then copies it out: one more matrix at the forward's start
    components, phase, _ = estimate(qwen_recipe("distributed.fsdp=true", "data.max_seq_len=64",
                                                "training.per_device_train_batch_size=1"),
                                  Shape.from_config(load_model_config("Qwen/Qwen3-1.7B-Base")[0]), 1, 64, 2)
    assert phase == "forward: unsharding the root"
    assert components["FSDP: gather copy of the root's matrix"] == s["embeddings (tied)"]
    assert plan(qwen_recipe("distributed.fsdp=true")).components == s  # one process: nothing to shard


def test_fsdp_recipe_needs_two_cards_and_fits_them():
    """The shipped 8B recipe's claims, from the shipped Qwen3-8B config (untied: the input embedding is a unit of its
    own, sharded; the output layer stays whole on every rank)."""
    recipe = load_recipe(FSDP_8B)
    one, two = plan(recipe), plan(recipe, nproc=2)
    assert two.fits and not one.fits
    assert one.max_micro_batch == 6 and two.max_micro_batch == 7
    matrix = 151_936 * 4096 * 2
    assert two.components["embeddings + output layer"] == pytest.approx(matrix * (0.5 + 1 + 0.5))
    with pytest.raises(PlanError, match="--nproc 2"):  # one process of an FSDP recipe: the fix names the launch
        check_memory(recipe, cuda=True, quiet=True)


def test_plan_cli_nproc(capsys):
    from tear_lora.cli import main

    assert main(["plan", str(FSDP_8B), "--nproc", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["nproc"] == 2 and out["sharding"] == "fsdp" and out["fits"] and out["micro_batch"] == 7
    assert main(["plan", str(FSDP_8B), "--nproc", "0"]) == 2


def test_attention_mask_counted_only_where_transformers_builds_one():
    """transformers' sdpa path builds no [B, 1, T, T] mask for an unpadded batch (it runs SDPA with is_causal and
    native grouped-query attention); one row is never padded, so micro-batch 1 has none: 1 GiB less at 32k tokens.
    Several rows (padding, the worst case) and packed rows get the mask and k/v repeated to every head."""
    shape = Shape.from_config(load_model_config("Qwen/Qwen3-1.7B-Base")[0])
    seq, act, key = 32_768, 2, "checkpointed layer inputs"
    padded = (f"data.max_seq_len={seq}", "data.packing=false")
    one, _, one_peak = estimate(qwen_recipe(*padded), shape, 1, seq)
    rotary = seq * shape.head_dim * 2 * 4
    assert one[key] == 28 * seq * 2048 * act + rotary
    two = estimate(qwen_recipe(*padded), shape, 2, seq)[0]
    assert two[key] == 2 * (one[key] - rotary) + 2 * seq * seq + 2 * rotary
    flash = estimate(qwen_recipe("model.attn_implementation=flash_attention_2"), shape, 2, seq)[0]
    assert flash[key] == 2 * (one[key] - rotary) + 2 * rotary
    # k and v repeated from 8 to 16 heads once a mask goes in: 2 x 1024 x 2 B more per token in the recomputed layer
    layer = "one layer recomputed (activations + gradients)"
    weight_in_flight = 2048 * 6144 * act  # the largest linear's dequantized weight, once per layer, not per token
    assert two[layer] - 2 * one[layer] + weight_in_flight == pytest.approx(2 * seq * 2 * 1024 * act, abs=8)
    eager = estimate(qwen_recipe(*padded, "model.attn_implementation=eager"), shape, 1, seq)[0]
    assert eager[key] == one[key] + seq * seq * act  # eager always builds a float mask
    assert any("eager" in n for n in plan(qwen_recipe("model.attn_implementation=eager")).notes)
    packed = estimate(qwen_recipe(f"data.max_seq_len={seq}", "data.packing=true"), shape, 1, seq)[0]
    assert packed[key] == one[key] + seq * seq  # data.packing: the block-diagonal mask, even for one row


def test_16gb_card_holds_32k_tokens_at_micro_batch_1():
    """The long-context claim in docs/performance.md: all 28 layers at 32,768 tokens, micro-batch 1, fit 16 GiB."""
    p = plan(qwen_recipe("data.max_seq_len=32768", "training.per_device_train_batch_size=1"))
    assert p.fits and p.phase == "backward through a layer" and p.max_micro_batch >= 1
    assert 8 * GIB < p.peak_allocated < 12 * GIB


def test_recomputed_layer_counts_the_larger_of_its_forward_and_backward_transients():
    """The recomputed forward's MLP holds more than the backward's gradients when LoRA dropout is on (measured on a
    Qwen3-1.7B layer: 32.7 vs 24.5 KB/token), less without it (12.3 KB): the plan takes the larger."""
    from tear_lora.train.plan import layer_bytes_per_token

    shape = Shape.from_config(load_model_config("Qwen/Qwen3-1.7B-Base")[0])
    lora_on = set(shape.linears())
    with_dropout = layer_bytes_per_token(shape, 2, 0.05, lora_on)[1]
    without = layer_bytes_per_token(shape, 2, 0.0, lora_on)[1]
    assert with_dropout == (2 * 6144 + 2 * 2048) * 2 > without == (6144 + 3 * 2048) * 2


@pytest.mark.slow
def test_one_layer_measured_within_5_percent_of_the_formula(tmp_path):
    """scripts/bench/bench_layer.py on a Qwen3-1.7B-shaped 4-bit LoRA layer, keeping what CUDA keeps: saved +
    transient bytes per token against layer_bytes_per_token (about a minute: builds a one-layer model)."""
    import subprocess
    import sys

    out = tmp_path / "layer.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts/bench/bench_layer.py"), "--tokens", "1024",
                           "--cuda-like", "--model-root", str(tmp_path / "models"), "--json", str(out)],
                          capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text())
    assert 0.95 < row["plan_over_measured"] < 1.05 and 0.95 < row["plan_over_measured_layer"] < 1.05, row


def test_activation_offloading_moves_the_checkpointed_inputs_off_the_card():
    """28 layers' inputs at 8 x 2048 tokens are 28 x 16,384 x 2,048 x 2 B; TRL's offloader keeps at most its
    5-tensor stash of them, transformers' synchronous offload one."""
    base = plan(qwen_recipe("training.per_device_train_batch_size=8", "data.max_seq_len=2048"))
    trl = plan(qwen_recipe("training.per_device_train_batch_size=8", "data.max_seq_len=2048",
                           "training.activation_offloading=true"))
    hf = plan(qwen_recipe("training.per_device_train_batch_size=8", "data.max_seq_len=2048",
                          "training.activation_checkpointing_kwargs={'offload': true}"))
    layer = 8 * 2048 * 2048 * 2
    key = "checkpointed layer inputs"
    assert base.components[key] - trl.components[key] == (28 - 5) * layer
    assert base.components[key] - hf.components[key] == (28 - 1) * layer
    assert hf.peak_allocated < trl.peak_allocated < base.peak_allocated


def tiny_config(model_type: str) -> dict:
    """A tiny config dict of a non-Llama family, as a config.json holds it."""
    from transformers import AutoConfig

    sizes = {"gpt2": dict(n_embd=64, n_layer=2, n_head=4),
             "phi": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)}
    return AutoConfig.for_model(model_type, vocab_size=1000, bos_token_id=0, eos_token_id=0, **sizes[model_type]).to_dict()


@pytest.mark.parametrize("model_type, linears, groups, tied", [
    ("gpt_neox", {"attention.query_key_value": (64, 192), "attention.dense": (64, 64),
                  "mlp.dense_h_to_4h": (64, 256), "mlp.dense_4h_to_h": (256, 64)},
     [("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)], False),
    ("phi", {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 64), "self_attn.v_proj": (64, 64),
             "self_attn.dense": (64, 64), "mlp.fc1": (64, 256), "mlp.fc2": (256, 64)},
     [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.dense",), ("mlp.fc1",), ("mlp.fc2",)],
     False),
    ("gpt2", {"attn.c_attn": (64, 192), "attn.c_proj": (64, 64), "mlp.c_fc": (64, 256), "mlp.c_proj": (256, 64)},
     [("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)], True),
])
def test_non_llama_families_are_planned_with_their_own_linears(model_type, linears, groups, tied, tmp_path):
    """The decoder linears come from the model itself (built on the meta device), so the LoRA terms use the family's
    names and widths: GPT-NeoX's fused query_key_value, Phi's dense/fc1/fc2, GPT-2's Conv1D (and its two c_proj)."""
    from tear_lora.tiny import tiny_gpt_neox_config

    config = tiny_gpt_neox_config().to_dict() if model_type == "gpt_neox" else tiny_config(model_type)
    shape = Shape.from_config(config)
    assert shape.linears() == linears and shape.input_groups == groups and shape.tied is tied
    assert (shape.hidden, shape.layers, shape.intermediate) == (64, 2, 256)
    recipe = qwen_recipe("lora.target_modules=all-linear", "lora.r=8")
    assert plan_mod._sizes(recipe, shape)["lora_params"] == 2 * 8 * sum(i + o for i, o in linears.values())
    p = plan(recipe, config)
    assert p.fits and f"LoRA on {len(linears)} of the {len(linears)} linears" in p.notes[-1]
    assert all(name in p.notes[-1] for name in linears)
    leaf = list(linears)[-1].rsplit(".", 1)[-1]  # PEFT's rule: a name matches by its last dotted parts (GPT-2: both c_proj)
    on = shape.lora_targets([leaf])
    assert on == {n for n in linears if n.endswith("." + leaf)}
    saved_all = plan_mod.layer_bytes_per_token(shape, 2, 0.0, set(linears))[0]
    assert plan_mod.layer_bytes_per_token(shape, 2, 0.0, on)[0] < saved_all


def test_lora_targets_the_model_lacks_are_refused_in_plan_and_train(capsys):
    """A target name that matches no module is a recipe error: `plan` exits 2 with one line naming the model's
    linears, and `train` stops before loading anything (PEFT would skip it silently next to a good name)."""
    from tear_lora.cli import main

    bad = qwen_recipe("lora.target_modules=['q_proj', 'query_key_value']")
    with pytest.raises(plan_mod.TargetModulesError, match="'query_key_value' names no module of this qwen3 model; "
                       "its decoder linears are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"):
        check_memory(bad, cuda=False, quiet=True)
    assert main(["plan", str(QWEN), "--set", "lora.target_modules=['qkv']"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: lora.target_modules: 'qkv' names no module") and "\n" not in err
    # dotted suffixes and regexes match as PEFT matches them
    shape = Shape.from_config(load_model_config("Qwen/Qwen3-1.7B-Base")[0])
    assert shape.lora_targets(["self_attn.q_proj", "mlp.down_proj"]) == {"self_attn.q_proj", "mlp.down_proj"}
    assert shape.lora_targets(r".*\.(k|v)_proj") == {"self_attn.k_proj", "self_attn.v_proj"}


def test_a_model_transformers_cannot_build_skips_the_plan_with_one_line(tmp_path, capsys):
    """Unknown model_type (or a config missing what its class needs): `plan` refuses with what it supports; training
    only warns that the plan was skipped."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-family", "hidden_size": 64}))
    recipe = qwen_recipe(f"model.name_or_path={tmp_path}")
    with pytest.raises(PlanError, match="cannot build model_type 'no-such-family'.*supports the causal LMs transformers"):
        plan(recipe)
    assert check_memory(recipe, cuda=True) is None
    out = capsys.readouterr().out
    assert out.startswith("warning: memory plan skipped: cannot build model_type 'no-such-family'") and out.count("\n") == 1
