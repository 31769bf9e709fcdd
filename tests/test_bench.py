"""Smoke tests: the benchmarks run and write the JSON their README tables are made from (no timing asserted)."""

import json
import math
import os
import subprocess
import sys

import pytest

from .conftest import REPO


def run_script(*args, timeout=600):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=REPO)


def bench_loss_small(tmp_path, *impls):
    out = tmp_path / "loss.json"
    impl_args = [a for impl in impls for a in ("--impl", impl)]
    proc = run_script(REPO / "scripts/bench/bench_loss.py", "--tokens", "24", "--vocab", "1000", "--hidden", "32",
                      "--dtype", "float32", *impl_args, "--json", out)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [(r["impl"], r["tokens"]) for r in rows] == [(impl, 24) for impl in impls]
    for row in rows:  # random head (std 0.02), unit hidden states: logits near 0, each NLL near ln(vocab)
        assert isinstance(row["peak_bytes"], int) and row["time_s"] > 0
        assert abs(row["loss"] - 2 * math.log(1000)) < 0.5, row  # response + witness means
    return rows


def test_bench_loss_small_writes_valid_json(tmp_path):
    bench_loss_small(tmp_path, "chunked")


@pytest.mark.slow
def test_bench_loss_impls_compute_the_same_loss(tmp_path):
    rows = bench_loss_small(tmp_path, "naive", "chunked", "chunked_module")
    assert max(r["loss"] for r in rows) - min(r["loss"] for r in rows) < 1e-4


def test_bench_loss_skips_what_cannot_fit(tmp_path):
    out = tmp_path / "loss.json"
    proc = run_script(REPO / "scripts/bench/bench_loss.py", "--tokens", "16384", "--impl", "naive", "--max-gb", "1",
                      "--json", out)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(out.read_text())
    assert row["peak_bytes"] is None and "predicted" in row["skipped"] and row["predicted_bytes"] > 1e9


@pytest.mark.slow
def test_bench_train_tiny_runs_both_trainers(tmp_path):
    out = tmp_path / "train.json"
    proc = run_script(REPO / "scripts/bench/bench_train.py", "--shape", "tiny", "--seq", "64", "--micro-batch", "1",
                      "--steps", "2", "--device", "cpu", "--model-root", tmp_path / "models", "--json", out)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert {r["trainer"] for r in rows} == {"tear", "stock"}
    assert all("error" not in r and r["tokens_per_s"] > 0 and r["rss_peak_train_bytes"] > 0 for r in rows)
    assert rows[0]["plan_peak_allocated_bytes"] > 0
    # train_loss is each trainer's objective: ours response + lambda * witness (two means), stock's one mean over the
    # same tokens, so half ours at lambda 1 (the "halved loss" of round 3); the per-token NLL is what compares
    tear, stock = (next(r for r in rows if r["trainer"] == name) for name in ("tear", "stock"))
    assert tear["train_loss"] == pytest.approx(tear["response_loss"] + tear["lambda"] * tear["witness_loss"], rel=1e-3)
    assert stock["train_loss"] == pytest.approx(tear["train_loss"] / 2, rel=0.01)
    assert stock["token_nll"] == stock["train_loss"] and tear["token_nll"] == pytest.approx(stock["token_nll"], rel=0.01)


@pytest.mark.slow  # ~185 CPU s, a dozen Python processes (docs/testing.md): run with -m slow before a GPU slot
def test_gpu_suite_smoke_runs_every_stage_end_to_end(tmp_path):
    """`gpu_suite.sh --device cpu --smoke`: every stage the GPU run has, on tiny shapes, down to the markdown page,
    so the one GPU command cannot rot between GPU runs; and a smoke run writes nothing into docs/bench."""
    docs = {p: p.stat().st_mtime_ns for p in (REPO / "docs/bench").iterdir()}
    out = tmp_path / "suite"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "scripts/bench/gpu_suite.sh"), "--device", "cpu", "--smoke", "--out",
                           str(out), "--only", "loss,layer,train,switches,recipe,long,multi"], capture_output=True, text=True, env=env, timeout=1500, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    suite = json.loads((out / "suite_cpu.json").read_text())
    assert suite["smoke"] is True
    assert {s["stage"]: s["status"] for s in suite["stages"]} == {
        "loss": "ok", "layer": "ok", "train": "ok", "switches": "ok", "recipe": "ok", "long": "ok",
        "multi": "skipped (0 GPUs)"}
    (loss,) = json.loads((out / "loss_cpu.json").read_text())
    assert loss["impl"] == "chunked" and abs(loss["loss"] - 2 * math.log(1000)) < 0.5 and loss["time_s"] > 0
    layer = json.loads((out / "layer_cpu.json").read_text())
    assert layer["tokens"] == 32 and layer["measured_saved_bytes_per_token"] > 0 < layer["plan_saved_bytes_per_token"]
    train = {r["trainer"]: r for r in json.loads((out / "train_qwen3-1.7b_seq2048_cpu.json").read_text())}
    assert sorted(train) == ["stock", "stock-best", "tear"] and all("error" not in r for r in train.values())
    for row in train.values():  # 2 warm-up steps, 1 timed: its median is its min and max
        assert (row["warmup_steps"], row["timed_steps"], row["spread"]) == (2, 1, 0)
        assert row["step_s_min"] == row["time_per_step_s"] == row["step_s_max"] == round(row["step_times_s"][2], 4)
    # random weights: every token's NLL is near ln(vocab); ours adds the witness mean at lambda 1, so about twice
    assert train["tear"]["train_loss"] == pytest.approx(2 * train["stock"]["train_loss"], rel=0.05)
    assert train["stock-best"]["train_loss"] == pytest.approx(train["stock"]["train_loss"], rel=0.05)
    (switch,) = json.loads((out / "switches_qwen3-1.7b_seq2048_cpu.json").read_text())
    assert switch["trainer"] == "tear-fused-adamw" and "error" not in switch and switch["plan_peak_allocated_bytes"] > 0
    recipe = json.loads((out / "recipe_qwen3-1.7b-base_cpu.json").read_text())
    assert recipe[0]["mode"] == "padded" and recipe[0]["steps"] == 1 and recipe[0]["real_tokens"] > 0
    assert recipe[0]["plan_card_bytes"] > recipe[0]["plan_peak_allocated_bytes"] > 0
    packed = recipe[1]  # each mode in its own process; the packed rows carry less padding than the padded ones
    assert packed["mode"] == "packed" and packed["real_tokens"] / packed["positions"] > (
        recipe[0]["real_tokens"] / recipe[0]["positions"])
    long = json.loads((out / "long_context_cpu.json").read_text())
    (point,) = long["points"]
    assert point["seq"] == 256 and point["micro_batch"] == 1 and point["traced_peak_allocated_bytes"] > 0
    assert point["plan_full_peak_allocated_bytes"] == point["plan_peak_allocated_bytes"]  # tiny: all layers ran
    page = (out / "gpu_suite_cpu.md").read_text()
    for heading in ("## Loss layer", "## One decoder layer", "## Training vs stock", "### Every arm", "## Switches",
                    "## The 16 GB recipe", "## Long context", "## multi: not run"):
        assert heading in page
    assert {p: p.stat().st_mtime_ns for p in (REPO / "docs/bench").iterdir()} == docs


def load_bench_module(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts/bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "scripts/bench"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "scripts/bench"))
    return module


def test_suite_page_shows_failed_and_missing_stages(tmp_path):
    """A failed run or a stage that never ran is on the page with its reason, not silently dropped."""
    table = load_bench_module("gpu_suite_table")
    (tmp_path / "train_qwen3-1.7b_seq2048_cuda.json").write_text(json.dumps([
        {"trainer": "tear", "micro_batch": 8, "seq": 2048, "peak_allocated_bytes": 3 * 2**30, "tokens_per_s": 900.0,
         "mfu": 0.3, "plan_peak_allocated_bytes": 3.3 * 2**30},
        {"trainer": "stock", "micro_batch": 8, "seq": 2048, "error": "CUDA out of memory"}]))
    (tmp_path / "recipe_qwen3-1.7b-base_cuda.json").write_text(json.dumps([
        {"mode": "padded", "steps": 20, "micro_batch": 8, "max_seq_len": 1024, "peak_allocated_bytes": 4 * 2**30,
         "peak_reserved_bytes": 5 * 2**30, "plan_peak_allocated_bytes": 4.2 * 2**30, "plan_card_bytes": 5 * 2**30,
         "plan_fits": True, "time_per_step_s": 1.5, "real_tokens_per_s": 5000.0},
        {"mode": "packed", "skipped": "this tear_lora has no data.packing"}]))
    page = table.render(tmp_path, "cuda")
    assert "| 2048 × 8 | stock: CUDA out of memory |" in page
    assert "| padded | 20 | 8 × 1024 | 4.00 | 5.00 | 4.20 | 1.05 | 5.00 (yes) | 1.5 | 5000.0 |" in page
    assert "| packed | this tear_lora has no data.packing |" in page
    assert "## loss: not run" in page and "## long: not run" in page


def test_long_context_extrapolates_each_point_by_the_plans_per_layer_bytes():
    lc = load_bench_module("bench_long_context")
    gib = 2**30
    rows = [{"seq": 4096, "layers": 2, "traced_peak_allocated_bytes": 2 * gib, "plan_peak_allocated_bytes": 2.2 * gib,
             "plan_full_peak_allocated_bytes": 2.2 * gib + 26 * 0.05 * gib},
            {"seq": 8192, "layers": 2, "traced_peak_allocated_bytes": 3 * gib, "plan_peak_allocated_bytes": 3.0 * gib,
             "plan_full_peak_allocated_bytes": 3.0 * gib + 26 * 0.1 * gib},
            {"seq": 16384, "layers": 2, "error": "killed (out of memory?)"}]
    slope = {"seq": 4096}
    lc.extrapolate(rows, 28, slope)
    assert rows[0]["measured_full_bytes"] == round(2 * gib + 26 * 0.05 * gib)
    assert rows[1]["plan_full_over_measured_full"] == 1.0 and rows[1]["measured_full_is_extrapolated"]
    assert slope["plan_per_layer_bytes"] == round(0.05 * gib)
    assert "measured_full_bytes" not in rows[2]
    (growth,) = lc.marginal_bytes_per_token(rows)
    assert (growth["from_seq"], growth["to_seq"], growth["measured"]) == (4096, 8192, gib // 4096)
