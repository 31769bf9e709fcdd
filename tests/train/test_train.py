"""`tear-lora train` end to end in subprocesses, as a user runs it: adapter dir, reload, resume after SIGKILL."""

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ..conftest import REPO

TRAIN_FILES = ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "recipe.yaml", "tear_lora.json", "log_history.json")


def write_recipe(tmp_path, tiny_model_dir, run_name, evaluate=True, **training):
    raw = yaml.safe_load((REPO / "recipes/tiny-cpu.yaml").read_text())
    raw["model"]["name_or_path"] = str(tiny_model_dir)
    raw["data"].update(train_file=str(REPO / "data/raw/consequences.jsonl"),
                       eval_file=str(REPO / "data/raw/eval.jsonl") if evaluate else None,
                       processed_dir=str(tmp_path / "processed"))
    raw["output"].update(run_name=run_name, dir=str(tmp_path / "adapters"))
    raw["training"].update(training)
    path = tmp_path / f"{run_name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def tear_lora(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "tear_lora.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def signal_after_first_step(process, signum, timeout=300) -> str:
    """Send `signum` once the first optimizer step is logged (as a user's Ctrl-C or a scheduler would); the output."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "'loss'" in line:
            process.send_signal(signum)
            break
    return "".join(lines) + process.communicate(timeout=timeout)[0]


def finish(process, timeout=600):
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-3000:]
    return out


LOGGED_LOSS = re.compile(r"\{'loss': [^}]*\}")


def logged_steps(out: str, log_history_file: Path) -> list[int | None]:
    """The optimizer steps a process logged: each printed loss line matched, by its token counts, to the step of
    an uninterrupted run's log (log_history.json) that trained on the same batch."""
    by_batch = {(e["response_tokens"], e["witness_tokens"]): e["step"]
                for e in json.loads(log_history_file.read_text()) if "loss" in e}
    return [by_batch.get((d["response_tokens"], d["witness_tokens"]))
            for d in map(ast.literal_eval, LOGGED_LOSS.findall(out))]


def perturbed_copy(checkpoint: Path, to: Path) -> Path:
    """A copy of `checkpoint` with one adapter tensor shifted (its marker rewritten to match): resuming from it
    must give another adapter, which shows the resumed run really starts from the checkpoint's weights."""
    from safetensors.torch import load_file, save_file

    from tear_lora.rundir import read_marker, write_complete_marker

    copy = Path(shutil.copytree(checkpoint, to))
    weights = load_file(copy / "adapter_model.safetensors")
    name = sorted(k for k in weights if "lora_B" in k)[0]
    weights[name] = weights[name] + 0.5
    save_file(weights, copy / "adapter_model.safetensors", metadata={"format": "pt"})
    marker = read_marker(checkpoint)
    write_complete_marker(copy, {k: v for k, v in marker.items() if k not in ("files", "kind")}, kind=marker["kind"])
    return copy


def max_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow  # 2 processes with eval, ~47 s (docs/testing.md)
def test_train_end_to_end_and_reload_in_fresh_process(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir, "e2e", max_steps=4, save_steps=2, learning_rate=1e-2)
    out = finish(tear_lora("train", recipe))
    assert "trainable parameters:" in out and "'response_loss'" in out and "'witness_loss'" in out
    run_dir = tmp_path / "adapters/e2e"
    for name in TRAIN_FILES:
        assert (run_dir / name).exists(), name
    assert (run_dir / "checkpoints/checkpoint-4/trainer_state.json").exists()
    meta = json.loads((run_dir / "tear_lora.json").read_text())
    assert meta["lambda"] == 1.0 and meta["base"]["content_sha256"] and meta["data"]["train"]["rows"] >= 300
    assert meta["trainable_parameters"]["token_rows"] == 6 * 64
    from safetensors import safe_open

    with safe_open(run_dir / "adapter_model.safetensors", "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert not any(151_936 in shape for shape in shapes.values())  # no whole embedding matrix saved

    # A fresh process with plain transformers + PEFT reproduces the trainer's eval loss.
    script = f"""
import json, torch, torch.nn.functional as F
from datasets import load_from_disk
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.float32)
base = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r}, dtype=torch.float32, quantization_config=q)
for m in base.modules():
    if hasattr(m, "support_avx512bf16_for_cpu"):
        m.support_avx512bf16_for_cpu = False
model = PeftModel.from_pretrained(base, {str(run_dir)!r}).eval()
sums, counts = [0.0, 0.0], [0, 0]
with torch.no_grad():
    for row in load_from_disk({str(next((tmp_path / "processed").glob("eval-*")) / "dataset")!r}):
        ids, roles = torch.tensor([row["input_ids"]]), torch.tensor(row["span_roles"][1:])
        nll = F.cross_entropy(model(input_ids=ids).logits[0, :-1].float(), ids[0, 1:], reduction="none")
        for k, role in enumerate((1, 2)):
            sums[k] += nll[roles == role].sum().item(); counts[k] += int((roles == role).sum())
print(json.dumps([sums[0] / counts[0], sums[1] / counts[1]]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    response, witness = json.loads(result.stdout.strip().splitlines()[-1])
    assert response == pytest.approx(meta["metrics"]["eval_response_loss"], abs=1e-4)
    assert witness == pytest.approx(meta["metrics"]["eval_witness_loss"], abs=1e-4)


def test_existing_run_dir_is_not_overwritten(tmp_path, tiny_model_dir, capsys):
    """In-process (`main`); a real process's exit 2 is test_user_files.py::test_train_cli_process_exits_2_in_one_line."""
    from tear_lora.cli import main

    recipe = write_recipe(tmp_path, tiny_model_dir, "twice", evaluate=False, max_steps=1, save_strategy="no")
    assert main(["train", str(recipe)]) == 0
    before = (tmp_path / "adapters/twice/adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "already holds a finished tear_lora adapter" in err and "Traceback" not in err
    assert (tmp_path / "adapters/twice/adapter_model.safetensors").read_bytes() == before


@pytest.mark.slow  # 5 processes, ~70 s (docs/testing.md)
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    steps = dict(max_steps=4, save_steps=2, learning_rate=1e-2, eval_strategy="no", evaluate=False)  # eval: 25 s/run
    finish(tear_lora("train", write_recipe(tmp_path, tiny_model_dir, "straight", **steps)))

    recipe = write_recipe(tmp_path, tiny_model_dir, "killed", **steps)
    process = tear_lora("train", recipe, start_new_session=True)
    # training happens in a hidden work dir; a checkpoint counts once its completion marker exists
    marker = f".killed.tmp-{process.pid}/checkpoints/checkpoint-2/.tear_lora_complete"
    deadline = time.time() + 300
    while not (tmp_path / "adapters" / marker).exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    assert (tmp_path / "adapters" / marker).exists()
    assert not (tmp_path / "adapters/killed").exists()  # it really was interrupted: no run dir yet

    straight = load_file(tmp_path / "adapters/straight/adapter_model.safetensors")
    final = tmp_path / "adapters/killed/adapter_model.safetensors"

    def assert_matches_straight():
        resumed = load_file(final)
        assert straight.keys() == resumed.keys()
        diffs = {name: (straight[name] - resumed[name]).abs().max().item() for name in straight}
        assert max(diffs.values()) <= 1e-5, diffs

    perturbed = perturbed_copy(tmp_path / "adapters" / marker.rsplit("/", 1)[0], tmp_path / "perturbed/checkpoint-2")
    out = finish(tear_lora("train", recipe, "--resume"))
    assert "resume: continuing from" in out and "checkpoint-2" in out and "adapter saved" in out
    assert logged_steps(out, tmp_path / "adapters/straight/log_history.json") == [3, 4]  # only the remaining steps
    assert_matches_straight()
    other = write_recipe(tmp_path, tiny_model_dir, "from-perturbed", **steps)  # same recipe, another run name
    finish(tear_lora("train", other, "--resume", perturbed))
    assert max_difference(straight, load_file(tmp_path / "adapters/from-perturbed/adapter_model.safetensors")) > 1e-3
    assert [p.name for p in (tmp_path / "adapters").iterdir() if p.name.startswith(".killed.tmp")] == []

    # Killed after the last checkpoint but before the final save: resuming at max_steps trains nothing more.
    final.unlink()
    (tmp_path / "adapters/killed/adapter_config.json").unlink()
    assert "adapter saved" in finish(tear_lora("train", recipe, "--resume"))
    assert json.loads((tmp_path / "adapters/killed/tear_lora.json").read_text())["metrics"]["global_step"] == 4
    assert_matches_straight()


def test_response_weight_summary_names_keys_that_match_no_row():
    from datasets import Dataset

    from tear_lora.train.runner import describe_response_weights

    meta = [json.dumps({"valence": v}) for v in ("helpful", "harmful", "harmful", "mixed")] + [None]
    rows = Dataset.from_dict({"meta": meta})
    assert describe_response_weights(rows, {"harmful": 0.0, "mixed": 0.5}) == (
        "response weights: harmful x0 on 2 rows, mixed x0.5 on 1 rows; weight 1 on 2")
    text = describe_response_weights(rows, {"harmfull": 0.0})
    assert "warning: objective.response_weight key(s) harmfull match no training row" in text
    assert "harmful, helpful, mixed" in text
