"""A run's checkpoints and work dir: where training happens, what `--resume` may continue, what a run may replace.

- Training happens in a hidden sibling `<output.dir>/.<run>.tmp-<pid>/`; a killed run leaves it behind with its
  checkpoints (each marked complete by TearTrainer, with the recipe it was trained under).
- `--resume` continues the interrupted attempt (the newest work dir holding a complete checkpoint), else the
  finished run's newest checkpoint; a checkpoint of another recipe is refused, naming the keys that differ.
- The run dir itself is replaced only if it is a finished adapter of ours (rundir.check_replaceable).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tear_lora.metadata import METADATA_FILE
from tear_lora.recipe import Recipe
from tear_lora.rundir import (
    COMPLETE_MARKER,
    Checked,
    RunDirError,
    check_replaceable,
    copy_tree_without_links,
    incomplete_reason,
    read_json,
    read_marker,
    stale_siblings,
    temp_sibling,
)

CHECKPOINTS = "checkpoints"
ADAPTER_EXTRAS = ("training_curves.png",)  # written into a finished run dir by `tear-lora report`


# ---- checkpoints ----------------------------------------------------------------------------------------------


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (None when its marker is there and its files parse)."""
    from safetensors import safe_open

    problem = incomplete_reason(checkpoint)
    if problem:
        return problem
    try:
        read_json(checkpoint / "trainer_state.json")
        with safe_open(checkpoint / "adapter_model.safetensors", "pt") as f:
            list(f.keys())
    except Exception as e:  # noqa: BLE001 - json, OS and safetensors errors alike mean "do not resume from it"
        return f"unreadable: {e}"
    return None


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def _checkpoints_in(directory: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(complete checkpoints newest first, [(skipped checkpoint, why)]) under `directory`/checkpoints."""
    found = [p for p in (directory / CHECKPOINTS).glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()]
    good, skipped = [], []
    for checkpoint in sorted(found, key=step_of, reverse=True):
        problem = checkpoint_problem(checkpoint)
        (skipped.append((checkpoint, problem)) if problem else good.append(checkpoint))
    return good, skipped


def _last_written(work: Path) -> float:
    return max((p.stat().st_mtime for p in [work, *(work / CHECKPOINTS).glob("checkpoint-*")]), default=0.0)


def interrupted_attempts(run_dir: Path) -> list[Path]:
    """Work dirs of killed runs of `run_dir` written after its finished run (all of them when there is none),
    newest first. An older one was superseded by the run that finished since: it stays on disk (made by
    another process, so not ours to delete; `train` names it) but is never resumed."""
    marker = run_dir / COMPLETE_MARKER
    finished = marker.stat().st_mtime if marker.is_file() else float("-inf")
    attempts = [p for p in stale_siblings(run_dir) if _last_written(p) > finished]
    return sorted(attempts, key=_last_written, reverse=True)


def find_checkpoints(run_dir: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The checkpoints `--resume` chooses from: those of the interrupted attempt (the newest work dir holding a
    complete checkpoint), else those of the finished run. Never the finished run's while an attempt to
    replace it was interrupted: that would continue the old run under the new recipe's name.
    Returns (complete checkpoints newest first, [(skipped checkpoint, why)])."""
    attempts = interrupted_attempts(run_dir)
    skipped = []
    for attempt in attempts:
        good, bad = _checkpoints_in(attempt)
        skipped += bad
        if good:
            return good, skipped
    good, bad = _checkpoints_in(run_dir)
    return good, skipped + bad


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest complete checkpoint `--resume` would continue from, or None."""
    return next(iter(find_checkpoints(Path(run_dir))[0]), None)


# Recipe keys a resume may change: the number of steps (continuing a finished run further). Anything else
# would make the resumed steps differ from the ones already taken.
RESUME_MAY_CHANGE = {"training.max_steps"}


def _flat(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def check_same_recipe(checkpoint: Path, recipe: Recipe) -> None:
    """Refuse (RunDirError) a checkpoint written under another recipe, naming the keys that differ."""
    marker = read_marker(checkpoint) or {}
    recorded = marker.get("recipe")
    if not isinstance(recorded, dict):
        raise RunDirError(f"cannot resume from {checkpoint}: it records no recipe (written by an older tear_lora "
                          "or not by tear_lora), so it cannot be checked against this one; start over with "
                          "--set output.overwrite=true")
    before, now = _flat(recorded), _flat(recipe.trained_dict())
    differ = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k) and k not in RESUME_MAY_CHANGE)
    if differ:
        shown = ", ".join(f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in differ[:6])
        raise RunDirError(f"cannot resume from {checkpoint}: it was trained with recipe {marker.get('recipe_sha256')}"
                          f", this recipe ({recipe.hash()}) differs in {len(differ)} key(s): {shown}; resume with "
                          "the recipe it was started with, or start over with --set output.overwrite=true")


# ---- the work dir -----------------------------------------------------------------------------------------------


def check_run_dir(recipe: Recipe, resume: str | bool | None) -> Checked:
    """The run dir may be replaced only if it is a finished adapter of ours (rundir.check_replaceable): with
    output.overwrite, or on --resume (the interrupted attempt was going to replace it)."""
    run_dir = recipe.run_dir()
    interrupted = any(_checkpoints_in(attempt)[0] for attempt in interrupted_attempts(run_dir))
    if resume in (None, False) and not recipe.output.overwrite and interrupted:
        raise RunDirError(f"{run_dir} has an interrupted run; pass --resume to continue it, or --set "
                          "output.overwrite=true (or another output.run_name) to start over")
    return check_replaceable(run_dir, "adapter", METADATA_FILE, recipe.output.overwrite or resume not in (None, False),
                             "pass --set output.overwrite=true (or --resume to continue it)", also_ours=ADAPTER_EXTRAS)


def start_work_dir(recipe: Recipe, resume: str | bool | None) -> tuple[Path, Path | None, Checked]:
    """(work dir to train in, checkpoint inside it to resume from or None, what the run dir held: for
    rundir.swap_in's re-check at the end). Refuses what would lose a run."""
    run_dir = recipe.run_dir()
    checked = check_run_dir(recipe, resume)  # again, under the lock
    work, checkpoint = _work_dir(recipe, resume, run_dir)
    return work, checkpoint, checked


def _work_dir(recipe: Recipe, resume: str | bool | None, run_dir: Path) -> tuple[Path, Path | None]:
    if resume in (None, False):
        return temp_sibling(run_dir), None
    if resume is True:
        good, skipped = find_checkpoints(run_dir)
        for checkpoint, why in skipped:
            print(f"resume: skipping {checkpoint}: {why}", flush=True)
        if not good:
            raise RunDirError(f"nothing to resume: no complete checkpoint for run '{recipe.output.run_name}' in "
                              f"{run_dir / CHECKPOINTS} or an interrupted work dir")
        checkpoint = good[0]
    else:
        checkpoint = Path(resume)
        problem = "not found" if not checkpoint.is_dir() else checkpoint_problem(checkpoint)
        if problem:
            raise RunDirError(f"cannot resume from {checkpoint}: {problem}")
    check_same_recipe(checkpoint, recipe)
    print(f"resume: continuing from {checkpoint} (step {step_of(checkpoint)})", flush=True)
    owner = checkpoint.parent.parent
    if owner.resolve() in {p.resolve() for p in stale_siblings(run_dir)}:  # an interrupted run's work dir: adopt it
        work = temp_sibling(run_dir)  # empty and ours: the rename replaces it atomically
        owner.rename(work)
        return work, work / CHECKPOINTS / checkpoint.name
    work = temp_sibling(run_dir)  # a finished run's (or any) checkpoint: copy, the original stays as it is
    try:
        copy_tree_without_links(checkpoint, work / CHECKPOINTS / checkpoint.name)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return work, work / CHECKPOINTS / checkpoint.name


def keep_or_drop(work: Path) -> None:
    """After a failure: keep a work dir that holds a resumable checkpoint, remove one that holds nothing useful."""
    if work.exists() and not any(checkpoint_problem(p) is None for p in (work / CHECKPOINTS).glob("checkpoint-*")):
        shutil.rmtree(work, ignore_errors=True)
