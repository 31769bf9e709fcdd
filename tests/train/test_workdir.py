"""Which interrupted attempt `--resume` continues (issue 28, break (d)): the newest of several, never one that a
finished run has superseded since. Checkpoints are made by hand (marker, state, a safetensors file): no training."""

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from tear_lora.rundir import write_complete_marker
from tear_lora.train.workdir import find_checkpoints, interrupted_attempts


def checkpoint(work: Path, step: int, when: float) -> Path:
    path = work / "checkpoints" / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, path / "adapter_model.safetensors")
    write_complete_marker(path, kind="checkpoint")
    for p in (path, path.parent, work):
        os.utime(p, (when, when))
    return path


def test_resume_picks_the_newest_of_several_interrupted_attempts(tmp_path):
    """Three killed attempts, written at different times and with step numbers that do not follow their age:
    the newest attempt is continued (checked by dropping `reverse=True` in find_checkpoints: this went red)."""
    run = tmp_path / "run"
    now = 1_700_000_000.0
    checkpoint(tmp_path / ".run.tmp-101", 8, now - 300)
    newest = checkpoint(tmp_path / ".run.tmp-202", 2, now)
    checkpoint(tmp_path / ".run.tmp-303", 4, now - 100)
    good, skipped = find_checkpoints(run)
    assert good == [newest] and skipped == []
    assert [p.name for p in interrupted_attempts(run)] == [".run.tmp-202", ".run.tmp-303", ".run.tmp-101"]


def test_attempts_older_than_the_finished_run_are_never_resumed_nor_deleted(tmp_path):
    """A run that finished after an attempt was interrupted supersedes it: --resume takes the finished run's own
    checkpoint, and the old attempt stays on disk (not ours to delete: another process made it)."""
    run = tmp_path / "run"
    now = 1_700_000_000.0
    old = checkpoint(tmp_path / ".run.tmp-101", 6, now - 300)
    finished = checkpoint(run, 4, now - 200)
    (run / "tear_lora.json").write_text("{}")
    write_complete_marker(run, kind="adapter")
    os.utime(run / ".tear_lora_complete", (now - 100, now - 100))
    assert find_checkpoints(run)[0] == [finished] and interrupted_attempts(run) == []
    assert old.is_dir()
    (tmp_path / ".run.tmp-mine").mkdir()  # a name we never give: not an attempt, whatever it holds
    assert interrupted_attempts(run) == []
