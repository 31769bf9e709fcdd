"""Training faults and the run dir: overwrite keeps the old run until the new one is done, one writer per run,
NaN/Inf stop the run before anything non-finite is saved, SIGTERM saves and resumes exactly, a full disk
leaves the previous checkpoint usable, secrets stay out of what we write."""

import errno
import json
import os
import signal
import time

import pytest
import torch

from tear_lora.metadata import AdapterError
from tear_lora.rundir import COMPLETE_MARKER, RunDirError, exclusive_lock, lock_path_for, write_complete_marker
from tear_lora.train.runner import Interrupted, TrainingFault, find_checkpoints, run
from tear_lora.train.trainer import StopOnSignal, TearTrainer

from ..conftest import make_recipe
from .test_train import (
    finish,
    logged_steps,
    max_difference,
    perturbed_copy,
    signal_after_first_step,
    tear_lora,
    write_recipe,
)

FAST = dict(max_steps=4, save_steps=2, learning_rate=1e-2, eval_strategy="no", logging_steps=1)


def fast_recipe(tiny_model_dir, tmp_path, run_name="r", **training):
    return make_recipe(tiny_model_dir, tmp_path, training={**FAST, **training},
                       data={"eval_file": None}, output={"run_name": run_name})


def adapter_bytes(run_dir):
    return (run_dir / "adapter_model.safetensors").read_bytes()


def leftovers(tmp_path, run_name):
    return sorted(p.name for p in (tmp_path / "adapters").glob(f".{run_name}.*") if p.is_dir())


def test_overwrite_keeps_the_previous_run_until_the_new_one_finishes(tmp_path, tiny_model_dir, monkeypatch):
    run_dir = run(fast_recipe(tiny_model_dir, tmp_path, max_steps=2, save_strategy="no"))
    before = adapter_bytes(run_dir)

    # a data error with overwrite: refused before anything is touched
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "x"}\n')
    recipe = fast_recipe(tiny_model_dir, tmp_path, max_steps=2, save_strategy="no")
    recipe.output.overwrite, recipe.data.train_file = True, str(bad)
    with pytest.raises(Exception, match="field 'response'"):
        run(recipe)
    assert adapter_bytes(run_dir) == before

    # a crash in the middle of training (a KeyboardInterrupt as Ctrl-C would raise): old adapter untouched
    recipe = fast_recipe(tiny_model_dir, tmp_path, max_steps=2, save_strategy="no")
    recipe.output.overwrite = True
    calls = []

    def crash_on_second_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    original = TearTrainer.training_step
    monkeypatch.setattr(TearTrainer, "training_step", crash_on_second_step)
    with pytest.raises(KeyboardInterrupt):
        run(recipe)
    monkeypatch.setattr(TearTrainer, "training_step", original)
    assert adapter_bytes(run_dir) == before and leftovers(tmp_path, "r") == []

    # and a finished overwrite replaces it, leaving no work dirs behind
    recipe = fast_recipe(tiny_model_dir, tmp_path, max_steps=2, save_strategy="no", learning_rate=5e-2)
    recipe.output.overwrite = True
    run(recipe)
    assert adapter_bytes(run_dir) != before and leftovers(tmp_path, "r") == []
    assert not list(run_dir.rglob("training_args.bin"))  # HF's pickle is never written
    assert json.loads((run_dir / "training_args.json").read_text())["learning_rate"] == 5e-2


def test_second_writer_on_the_same_run_is_refused_naming_the_holder(tmp_path, tiny_model_dir, capsys):
    """flock conflicts between two open files even in one process, so `main` in-process meets the held lock as
    another process would (two real processes: tests/test_rundir.py's lock test)."""
    from tear_lora.cli import main

    recipe = write_recipe(tmp_path, tiny_model_dir, "busy", max_steps=1)
    with exclusive_lock(lock_path_for(tmp_path / "adapters/busy"), "run dir"):
        assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"pid {os.getpid()}" in err and "Traceback" not in err
    assert not (tmp_path / "adapters/busy").exists()


class NaNGradient(torch.autograd.Function):
    """Identity forward (a finite loss), NaN backward: a gradient blow-up the loss does not show."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_non_finite_step_stops_before_anything_non_finite_is_saved(tmp_path, tiny_model_dir, monkeypatch, where):
    original, calls = TearTrainer.compute_loss, []

    def poisoned(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        calls.append(1)
        if len(calls) <= 4:  # optimizer steps 1-2 (2 micro-batches each) are fine
            return loss
        return loss * float("nan") if where == "loss" else NaNGradient.apply(loss)

    monkeypatch.setattr(TearTrainer, "compute_loss", poisoned)
    recipe = fast_recipe(tiny_model_dir, tmp_path, run_name=f"nan-{where}")
    with pytest.raises(TrainingFault) as err:
        run(recipe)
    message = str(err.value)
    assert f"non-finite {'loss' if where == 'loss' else 'gradient norm'}" in message
    assert "optimizer step 3" in message and "checkpoint-2" in message and "last finite logged loss" in message
    assert not recipe.run_dir().exists()
    # what was saved (checkpoint-2) holds only finite numbers, and is resumable
    from safetensors.torch import load_file

    good, _ = find_checkpoints(recipe.run_dir())
    assert [p.name for p in good] == ["checkpoint-2"]
    assert all(torch.isfinite(t).all() for t in load_file(good[0] / "adapter_model.safetensors").values())


def tiny_trainer(tmp_path, tiny_model_dir, tokenizer):
    from datasets import Dataset

    from ..conftest import make_trainer, trainable_model

    recipe = fast_recipe(tiny_model_dir, tmp_path)
    model = trainable_model(recipe, tokenizer)
    rows = Dataset.from_dict({"input_ids": [[1, 2, 3, 4]], "span_roles": [[0, 1, 2, 2]]})
    return model, make_trainer(model, recipe, tokenizer, rows, tmp_path / "ck")


def test_save_refuses_non_finite_adapter(tmp_path, tiny_model_dir, tokenizer):
    model, trainer = tiny_trainer(tmp_path, tiny_model_dir, tokenizer)
    next(p for p in model.parameters() if p.requires_grad).data[0] = float("inf")
    with pytest.raises(RuntimeError, match="NaN/Inf"):
        trainer.save_model(str(tmp_path / "out"))
    assert not (tmp_path / "out/adapter_model.safetensors").exists()


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import peft.peft_model

    original = peft.peft_model.safe_save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if "checkpoint-4" in str(filename):
            with open(filename, "wb") as f:
                f.write(b"\0" * 10)  # a partial file, as a real ENOSPC leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)
    recipe = fast_recipe(tiny_model_dir, tmp_path, run_name="full")
    with pytest.raises(TrainingFault, match="disk full") as err:
        run(recipe)
    assert "checkpoint-2" in str(err.value) and "--resume" in str(err.value)
    good, skipped = find_checkpoints(recipe.run_dir())
    assert [p.name for p in good] == ["checkpoint-2"] and [p.name for p, _ in skipped] == ["checkpoint-4"]

    monkeypatch.setattr(peft.peft_model, "safe_save_file", original)
    run(recipe, resume=True)
    out = capsys.readouterr().out
    assert "skipping" in out and "checkpoint-4" in out and "continuing from" in out
    assert json.loads((recipe.run_dir() / "tear_lora.json").read_text())["metrics"]["global_step"] == 4


def test_resume_skips_incomplete_checkpoints_and_says_why(tmp_path, tiny_model_dir, capsys):
    recipe = fast_recipe(tiny_model_dir, tmp_path, run_name="ck")
    run(recipe)
    checkpoints = recipe.run_dir() / "checkpoints"
    assert (checkpoints / "checkpoint-4" / COMPLETE_MARKER).exists()
    weights = checkpoints / "checkpoint-4/adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated after its marker was written
    good, skipped = find_checkpoints(recipe.run_dir())
    assert [p.name for p in good] == ["checkpoint-2"] and "truncated" in skipped[0][1]
    (checkpoints / "checkpoint-2/trainer_state.json").write_text("{")  # marker sizes hold, but it does not parse
    write_complete_marker(checkpoints / "checkpoint-2")
    good, skipped = find_checkpoints(recipe.run_dir())
    assert good == [] and "unreadable" in dict((p.name, w) for p, w in skipped)["checkpoint-2"]
    with pytest.raises(Exception, match="nothing to resume"):
        run(recipe, resume=True)


def test_resume_continues_the_interrupted_attempt_and_refuses_another_recipe(tmp_path, tiny_model_dir, monkeypatch,
                                                                           capsys):
    """Issue 20: run A finished (lr 1e-4, checkpoints 2 and 4); run B of the same name (overwrite, lr 5e-2) was
    interrupted after checkpoint 2. `--resume` with B's recipe continues B, not A's newer checkpoint 4; with any
    other recipe it is refused, naming the keys that differ, and nothing changes; the resumed B equals B run
    without a stop."""
    from safetensors.torch import load_file

    a = run(fast_recipe(tiny_model_dir, tmp_path, run_name="ab", learning_rate=1e-4))
    a_weights = load_file(a / "adapter_model.safetensors")
    b = fast_recipe(tiny_model_dir, tmp_path, run_name="ab", learning_rate=5e-2)
    b.output.overwrite = True
    calls, original = [], TearTrainer.training_step

    def killed_in_step_3(self, *args, **kwargs):  # 2 micro-batches a step: the 5th call is step 3
        calls.append(1)
        if len(calls) > 4:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TearTrainer, "training_step", killed_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(b)
    monkeypatch.setattr(TearTrainer, "training_step", original)
    assert leftovers(tmp_path, "ab") and max_difference(a_weights, load_file(a / "adapter_model.safetensors")) == 0

    changed = fast_recipe(tiny_model_dir, tmp_path, run_name="ab", learning_rate=1e-4)
    with pytest.raises(RunDirError, match=r"differs in 1 key\(s\): training.learning_rate \(0.05 -> 0.0001\)"):
        run(changed, resume=True)
    capsys.readouterr()
    run(b, resume=True)
    out = capsys.readouterr().out
    assert "continuing from" in out and ".ab.tmp-" in out and "checkpoint-2 (step 2)" in out
    assert all(e["learning_rate"] == 5e-2 for e in json.loads((a / "log_history.json").read_text()) if "loss" in e)
    assert json.loads((a / "training_args.json").read_text())["learning_rate"] == 5e-2
    assert max_difference(a_weights, load_file(a / "adapter_model.safetensors")) > 1e-3
    assert leftovers(tmp_path, "ab") == []
    # and the resumed run is the run B would have been uninterrupted (the in-process twin of the slow SIGKILL /
    # SIGTERM resume tests, which prove it across processes)
    straight = run(fast_recipe(tiny_model_dir, tmp_path, run_name="straight", learning_rate=5e-2))
    assert max_difference(load_file(straight / "adapter_model.safetensors"),
                          load_file(a / "adapter_model.safetensors")) <= 1e-5


def test_resume_refuses_a_checkpoint_missing_trainable_keys(tmp_path, tiny_model_dir, tokenizer):
    from safetensors.torch import load_file, save_file

    _, trainer = tiny_trainer(tmp_path, tiny_model_dir, tokenizer)
    trainer.save_model(str(tmp_path / "good"))
    state = load_file(tmp_path / "good/adapter_model.safetensors")
    trainer._load_from_checkpoint(str(tmp_path / "good"))  # a complete one loads
    state.pop(next(k for k in state if "lora_A" in k))
    save_file(state, tmp_path / "good/adapter_model.safetensors")
    with pytest.raises(AdapterError, match="missing trainable keys"):  # a user error: exit 2 in one line
        trainer._load_from_checkpoint(str(tmp_path / "good"))


@pytest.mark.slow  # 3 processes, ~60 s (docs/testing.md)
def test_sigterm_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    steps = dict(max_steps=5, save_steps=100, learning_rate=1e-2, eval_strategy="no", evaluate=False)
    finish(tear_lora("train", write_recipe(tmp_path, tiny_model_dir, "straight", **steps)))
    recipe = write_recipe(tmp_path, tiny_model_dir, "term", **steps)
    process = tear_lora("train", recipe)
    out = signal_after_first_step(process, signal.SIGTERM)
    assert process.returncode == 143, out[-3000:]
    assert "SIGTERM: stopped after optimizer step" in out and f"tear-lora train {recipe} --resume" in out
    assert "Traceback" not in out and not (tmp_path / "adapters/term").exists()
    good, _ = find_checkpoints(tmp_path / "adapters/term")
    assert len(good) == 1 and 1 <= int(good[0].name.split("-")[1]) < 5
    stopped_at = int(good[0].name.split("-")[1])
    perturbed = perturbed_copy(good[0], tmp_path / "perturbed" / good[0].name)

    out = finish(tear_lora("train", recipe, "--resume"))
    assert logged_steps(out, tmp_path / "adapters/straight/log_history.json") == list(range(stopped_at + 1, 6))
    straight = load_file(tmp_path / "adapters/straight/adapter_model.safetensors")
    resumed = load_file(tmp_path / "adapters/term/adapter_model.safetensors")
    assert max_difference(straight, resumed) <= 1e-5
    finish(tear_lora("train", write_recipe(tmp_path, tiny_model_dir, "from-perturbed", **steps), "--resume", perturbed))
    assert max_difference(straight, load_file(tmp_path / "adapters/from-perturbed/adapter_model.safetensors")) > 1e-3


def test_second_signal_aborts_at_once():
    stop = StopOnSignal()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    finally:
        stop.uninstall()
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_interrupted_is_exit_143_for_sigterm_and_130_for_sigint():
    assert Interrupted("x", signal.SIGTERM).exit_code == 143 and Interrupted("x", signal.SIGINT).exit_code == 130
    assert TrainingFault.exit_code == 4


def test_secrets_never_reach_the_disk(tmp_path, tiny_model_dir, tokenizer):
    """Recipes may carry no credential (recipe.py refuses them at any depth of `training`), and the training
    arguments we write are masked at every depth anyway: HF's own JSON masks only top-level `*_token` keys."""
    from tear_lora.recipe import RecipeError

    secret = "hf_SuperSecretToken123"
    with pytest.raises(RecipeError, match="training.model_init_kwargs.token"):
        fast_recipe(tiny_model_dir, tmp_path, run_name="secret", model_init_kwargs={"token": secret})
    _, trainer = tiny_trainer(tmp_path, tiny_model_dir, tokenizer)
    trainer.args.model_init_kwargs = {"token": secret, "nested": {"api_key": secret}}
    trainer.save_model(str(tmp_path / "out"))
    written = (tmp_path / "out/training_args.json").read_text()
    assert secret not in written and json.loads(written)["model_init_kwargs"]["token"] == "<masked>"
    assert not (tmp_path / "out/training_args.bin").exists()


def test_a_run_writes_files_with_the_usual_permissions_and_no_local_path_in_its_card(tmp_path, tiny_model_dir):
    """safetensors' save_file makes 0600 files; a run dir's files all get 0666 & ~umask (read once at import).
    PEFT's card named the base by the absolute path it was loaded from."""
    from tear_lora.rundir import UMASK

    run_dir = run(fast_recipe(tiny_model_dir, tmp_path, run_name="perm", max_steps=1, save_strategy="no"))
    modes = {p.name: p.stat().st_mode & 0o777 for p in run_dir.iterdir() if p.is_file()}
    assert set(modes.values()) == {0o666 & ~UMASK}, modes
    card = (run_dir / "README.md").read_text()
    assert str(tiny_model_dir) not in card and f"base_model: {tiny_model_dir.name}" in card
