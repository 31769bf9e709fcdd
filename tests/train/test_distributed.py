"""Two processes on CPU (torchrun over gloo, DDP or FSDP2) train exactly what one process trains with the same
window, through the Trainer and through `tear-lora train`.

About 390 CPU seconds with the slow DDP run, 255 without (docs/testing.md): each launch starts a launcher and two
Python processes that import torch and transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ..conftest import REPO, make_recipe
from .test_train import LOGGED_LOSS, max_difference, perturbed_copy

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def launch(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def assert_same_tensors(reference: dict, other: dict, rel: float) -> None:
    """Every tensor equal to `rel` relative to that tensor's largest entry."""
    assert reference.keys() == other.keys()
    for name, ref in reference.items():
        torch.testing.assert_close(other[name], ref, rtol=0, atol=rel * ref.abs().max().item(), msg=name)


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory, tiny_model_dir):
    from tear_lora.tiny import qwen3_tokenizer, tiny_qwen3

    out = tmp_path_factory.mktemp("ddp")
    untied = out / "tiny-untied"
    tiny_qwen3(0, tie_word_embeddings=False).save_pretrained(untied)
    qwen3_tokenizer().save_pretrained(untied)
    for launcher in ([sys.executable], TORCHRUN):
        launch([*launcher, "-m", "tests.train.ddp_worker", str(tiny_model_dir), str(out), str(untied)])
    return out


@pytest.mark.slow  # worker_results: 1 process + 1 torchrun launch, ~160 CPU s (docs/testing.md)
def test_fsdp_with_an_untied_output_layer(worker_results):
    """Untied bases (Qwen3-8B) shard the input embedding on its own; still the same training to 1e-5."""
    reference = load_file(worker_results / "untied-1x2x2.safetensors")
    assert sum("trainable_tokens_delta" in name for name in reference) == 2  # input and output rows
    assert_same_tensors(reference, load_file(worker_results / "untied-fsdp2x2.safetensors"), 1e-5)


@pytest.mark.slow  # worker_results: 1 process + 1 torchrun launch, ~160 CPU s (docs/testing.md)
@pytest.mark.parametrize("suffix", ["", "-unequal"])
def test_two_ranks_equal_one_process(worker_results, suffix):
    """2 ranks x micro-batch 2 (DDP, and FSDP-sharded) == 1 x micro-batch 4 == 1 x micro-batch 2 x accumulation 2,
    after two SGD steps: logged response / witness losses and every LoRA and token-row tensor to 1e-5. In
    `-unequal` rank 1's first batch has no witness targets at all, so the ranks' span counts differ."""
    ref = load_file(worker_results / f"1x2x2{suffix}.safetensors")
    ref_log = json.loads((worker_results / f"1x2x2{suffix}.json").read_text())
    assert any("token_rows" in n or "trainable_tokens" in n for n in ref) and any("lora_B" in n for n in ref)
    for case in ("1x4", "2x2", "fsdp2x2"):
        assert_same_tensors(ref, load_file(worker_results / f"{case}{suffix}.safetensors"), 1e-5)
        log = json.loads((worker_results / f"{case}{suffix}.json").read_text())
        assert log["world_size"] == (1 if case == "1x4" else 2)
        assert len(log["logs"]) == len(ref_log["logs"]) == 2
        for got, want in zip(log["logs"], ref_log["logs"]):
            for key in ("response_loss", "witness_loss", "loss"):
                assert got[key] == pytest.approx(want[key], rel=1e-5), (case, key)
            for key in ("response_tokens", "witness_tokens"):
                assert got[key] == want[key], (case, key)
    if suffix:  # the unequal case really lost witness targets in step 1 (rows 2-3: all of rank 1's batch)
        plain = json.loads((worker_results / "1x2x2.json").read_text())["logs"]
        assert ref_log["logs"][0]["witness_tokens"] < plain[0]["witness_tokens"]


@pytest.mark.slow  # worker_results: 1 process + 1 torchrun launch, ~160 CPU s (docs/testing.md)
def test_packed_rows_on_two_ranks_equal_one_process(worker_results):
    """data.packing under DDP: 2 ranks x 1 packed row == 1 process x 1 row x accumulation 2, two SGD steps. The
    rows hold different numbers of triples and targets, so the all-reduced span counts are what makes them equal."""
    ref = load_file(worker_results / "packed-1x1x2.safetensors")
    assert_same_tensors(ref, load_file(worker_results / "packed-2x1.safetensors"), 1e-5)
    ref_log = json.loads((worker_results / "packed-1x1x2.json").read_text())["logs"]
    log = json.loads((worker_results / "packed-2x1.json").read_text())["logs"]
    assert len(log) == len(ref_log) == 2
    for got, want in zip(log, ref_log):
        assert got["response_tokens"] == want["response_tokens"] and got["witness_tokens"] == want["witness_tokens"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


REFERENCE = {"training": {"max_steps": 3, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                          "save_strategy": "no", "seed": 11},
             "lora": {"dropout": 0.0}, "data": {"eval_file": None}, "output": {"run_name": "reference"}}


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory, tiny_model_dir):
    """One process, micro-batch 2 x accumulation 2, three AdamW steps: the adapter every launch must reproduce."""
    from tear_lora.train.runner import run

    return load_file(run(make_recipe(tiny_model_dir, tmp_path_factory.mktemp("one"), **REFERENCE))
                     / "adapter_model.safetensors")


# DDP's run is slow-only (-m slow; ~130 CPU s, docs/testing.md): FSDP's run goes through the same CLI, overwrite,
# rank-0-only writes and resume under two processes, and DDP's exactness is the fast tests above.
@pytest.mark.slow  # 3 torchrun launches each, ~120 CPU s (docs/testing.md)
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_torchrun_cli_replaces_a_run_and_resumes(tmp_path, tiny_model_dir, three_steps, fsdp):
    """`torchrun -m tear_lora.cli train` with overwrite replaces a previous run (only rank 0 touches the run dir);
    after two steps with a checkpoint each, `--resume` under two processes continues to the same adapter as one
    uninterrupted process with micro-batch 2 x accumulation 2 (AdamW, default shuffled sampling). Under FSDP the
    checkpoint holds the whole optimizer state, and the adapter loads with plain PEFT."""
    from tear_lora.train.runner import run

    run_dir = run(make_recipe(tiny_model_dir, tmp_path, **{**REFERENCE, "output": {"run_name": "r"}}))
    cli = [*TORCHRUN, "-m", "tear_lora.cli", "train", str(REPO / "recipes/tiny-cpu.yaml"),
           "--set", f"model.name_or_path={tiny_model_dir}", "--set", f"output.dir={tmp_path / 'adapters'}",
           "--set", f"data.processed_dir={tmp_path / 'processed'}", "--set", "data.eval_file=null",
           "--set", "output.run_name=r", "--set", "lora.dropout=0", "--set", "training.seed=11",
           "--set", "training.per_device_train_batch_size=2", "--set", "training.gradient_accumulation_steps=1",
           "--set", "training.save_steps=1", "--set", f"distributed.fsdp={str(fsdp).lower()}"]
    first = launch([*cli, "--set", "training.max_steps=2", "--set", "output.overwrite=true"])
    assert first.stdout.count("adapter saved to") == 1  # the main process reports, the other stays quiet
    assert ("sharded over 2 processes" in first.stdout) == fsdp
    meta = json.loads((run_dir / "tear_lora.json").read_text())
    assert meta["world_size"] == 2 and meta["metrics"]["global_step"] == 2
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == [".r.lock", "r"]  # no work dir left

    perturbed = perturbed_copy(run_dir / "checkpoints/checkpoint-2", tmp_path / "perturbed/checkpoint-2")
    resumed = launch([*cli, "--set", "training.max_steps=3", "--resume"])
    assert "continuing from" in resumed.stdout and "checkpoint-2" in resumed.stdout
    assert len(LOGGED_LOSS.findall(resumed.stdout)) == 1  # only step 3 ran (the main process logs each step)
    assert json.loads((run_dir / "tear_lora.json").read_text())["metrics"]["global_step"] == 3
    # AdamW's first steps are ~lr x sign(gradient): float noise in a near-zero gradient can move an entry by up to
    # a step (2e-3 here), so the bound is absolute, 1% of a step; measured <= 1e-6
    got = load_file(run_dir / "adapter_model.safetensors")
    for name, tensor in three_steps.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=2e-5, msg=name)
    # the checkpoint's weights are what the resumed processes start from: a shifted tensor there changes the result
    launch([*cli, "--set", "training.max_steps=3", "--set", "output.run_name=r2", "--resume", str(perturbed)])
    assert max_difference(three_steps, load_file(tmp_path / "adapters/r2/adapter_model.safetensors")) > 1e-3
    if fsdp:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # Qwen3's spare rows hold the tags: no resize
        model = PeftModel.from_pretrained(base, run_dir)
        delta = model.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
        torch.testing.assert_close(delta.detach(), got["base_model.model.model.embed_tokens.token_adapter."
                                                       "trainable_tokens_delta"])


def test_train_tears_the_process_group_down_even_when_it_fails(tmp_path, monkeypatch):
    """`tear-lora train` destroys the launcher's process group on every exit path (gloo prints nothing when a
    group is abandoned, NCCL warns and may hang at exit), and `teardown` really destroys it."""
    import torch.distributed as dist

    from tear_lora.cli import main
    from tear_lora.train import distributed

    calls = []
    monkeypatch.setattr(distributed, "teardown", lambda: calls.append(1))
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2 and not calls  # no recipe: nothing started
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  name_or_path: {tmp_path / 'no-model'}\ndata:\n  train_file: {tmp_path / 'no.jsonl'}\n"
                      f"  eval_file: null\n  processed_dir: {tmp_path / 'p'}\noutput:\n  dir: {tmp_path / 'a'}\n"
                      "training:\n  bf16: false\n")
    assert main(["train", str(recipe)]) == 2 and calls == [1]  # failed inside run(): still torn down

    monkeypatch.undo()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    distributed.teardown()
    assert not dist.is_initialized()
