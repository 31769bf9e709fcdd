"""Smoke tests: the benchmarks run and write the JSON their README tables are made from (no timing asserted)."""

import json
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
    for row in rows:
        assert isinstance(row["peak_bytes"], int) and row["peak_bytes"] >= 0 and row["time_s"] >= 0
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
