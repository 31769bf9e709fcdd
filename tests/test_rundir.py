"""rundir: where we may write, atomic files and directories, completion markers, one writer per directory."""

import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tear_lora.recipe import RecipeError, load_recipe
from tear_lora.rundir import (
    COMPLETE_MARKER,
    Checked,
    LockedError,
    RunDirError,
    atomic_write_json,
    atomic_write_text,
    check_run_name,
    child_dir,
    contents,
    exclusive_lock,
    incomplete_reason,
    json_depth,
    lock_path_for,
    read_json,
    stale_siblings,
    swap_in,
    temp_sibling,
    unsafe_root_reason,
    write_complete_marker,
)

from .conftest import REPO


@pytest.mark.parametrize("name", ["..", ".", "", "../x", "a/b", "/abs", ".hidden", "-flag", "a..b", "x\n", "é"])
def test_unsafe_run_names_are_refused(name):
    assert check_run_name(name) is not None


@pytest.mark.parametrize("name", ["run", "qwen3-1.7b-lambda0.5", "A_1", "x.y-z"])
def test_plain_run_names_are_fine(name):
    assert check_run_name(name) is None


def test_protected_roots_are_refused(tmp_path):
    for path in ("/", str(Path.home()), str(REPO), str(REPO.parent), str(REPO / ".." / ".."), "~", "."):
        assert unsafe_root_reason(path) is not None, path
    assert unsafe_root_reason(REPO / "adapters") is None
    assert unsafe_root_reason(tmp_path / "out") is None
    with pytest.raises(RunDirError):
        child_dir(REPO / "adapters", "..")
    assert child_dir(tmp_path, "run") == tmp_path / "run"


@pytest.mark.parametrize("key, value, message", [
    ("output.run_name", "..", "output.run_name"),
    ("output.run_name", ".", "output.run_name"),
    ("output.run_name", "a/../../b", "output.run_name"),
    ("output.dir", "/", "output.dir"),
    ("output.dir", str(REPO), "output.dir"),
    ("output.dir", str(Path.home()), "output.dir"),
])
def test_recipe_refuses_escaping_run_dirs_with_key_and_line(tmp_path, key, value, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text((REPO / "recipes/tiny-cpu.yaml").read_text())
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe, [f"{key}={value}", "output.overwrite=true"])
    assert f"'{message}'" in str(err.value) and str(recipe) in str(err.value)


def test_cli_train_escape_is_refused_and_nothing_is_deleted(tmp_path, monkeypatch, capsys):
    """Regression: run_name '..' with overwrite used to rmtree the parent of adapters/ (the project). In-process
    (`main`): the exit status of a real process is test_user_files.py::test_train_cli_process_exits_2_in_one_line."""
    from tear_lora.cli import main

    canary = REPO / "adapters" / "README.md"
    before = canary.read_bytes()
    monkeypatch.chdir(REPO)
    for override in ("output.run_name=..", "output.run_name=.", "output.dir=/"):
        code = main(["train", str(REPO / "recipes/tiny-cpu.yaml"), "--set", override, "--set", "output.overwrite=true"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "Traceback" not in err and override.split("=")[0] in err
    assert canary.read_bytes() == before and (REPO / ".git").exists() and (REPO / "tear_lora").is_dir()


def test_atomic_writes_never_leave_half_a_file(tmp_path, monkeypatch):
    path = atomic_write_json(tmp_path / "m.json", {"loss": float("nan"), "ok": [1.0, math.inf]})
    assert json.loads(path.read_text()) == {"loss": None, "ok": [1.0, None]}  # no bare NaN: valid JSON
    atomic_write_text(tmp_path / "t.txt", "old")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "t.txt", "new" * 1000)
    assert (tmp_path / "t.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "t.txt"]  # no temp file left behind


def test_swap_in_replaces_only_when_complete(tmp_path):
    final = tmp_path / "run"
    final.mkdir()
    (final / "a").write_text("old")
    checked = Checked(final, contents(final))
    built = temp_sibling(final)
    assert built.name.startswith(".run.tmp-") and built.parent == tmp_path
    (built / "a").write_text("new")
    swap_in(built, final, checked)
    assert (final / "a").read_text() == "new" and not built.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # the old one is gone only after the swap


@pytest.mark.parametrize("change", ["added", "changed", "link", "appeared"])
def test_swap_in_rechecks_at_the_swap_and_puts_the_old_one_back(tmp_path, change):
    """Issue 28: the check and the swap are minutes apart; whatever was added or changed in between is kept."""
    final = tmp_path / "run"
    if change != "appeared":
        final.mkdir()
        (final / "a").write_text("old")
    checked = Checked(final, contents(final) if final.exists() else None)
    built = temp_sibling(final)
    (built / "a").write_text("new")
    final.mkdir(exist_ok=True)
    if change in ("added", "appeared"):
        (final / "NOTES.txt").write_text("saved while it was rebuilt")
    elif change == "changed":
        (final / "a").write_text("edited by the user")
    else:
        os.symlink(tmp_path, final / "link")
    before = {p: p.read_bytes() if p.is_file() else None for p in final.rglob("*")}
    with pytest.raises(RunDirError, match="changed while the new one was being built"):
        swap_in(built, final, checked)
    assert {p: p.read_bytes() if p.is_file() else None for p in final.rglob("*")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([final.name, built.name])  # nothing else made


def test_temp_sibling_never_removes_or_reuses_a_name_taken(tmp_path):
    final = tmp_path / "run"
    taken = tmp_path / f".run.tmp-{os.getpid()}"
    taken.mkdir()
    (taken / "precious.txt").write_text("mine")
    built = temp_sibling(final)
    assert built != taken and built.name.startswith(f".run.tmp-{os.getpid()}-")
    assert (taken / "precious.txt").read_text() == "mine" and not any(built.iterdir())
    assert stale_siblings(final) and taken in stale_siblings(final)
    (tmp_path / ".run.tmp-mybackup").mkdir()  # not a name we give: never a sibling of ours
    assert tmp_path / ".run.tmp-mybackup" not in stale_siblings(final)


def test_a_fifo_at_the_lock_path_is_refused_not_opened_as_a_lock(tmp_path):
    """Issue 28, break (a): the regular-file check on the lock had no test; a FIFO (or a device) is not a lock."""
    fifo = tmp_path / ".run.lock"
    os.mkfifo(fifo)
    with pytest.raises(RunDirError, match="not a plain file"):
        with exclusive_lock(fifo, "run"):
            pass
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_json_nested_beyond_the_bound_is_one_error_not_a_recursion_error(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(RunDirError, match="nested deeper than 64 levels"):
        read_json(deep)
    assert json_depth('{"a": ["[[[", {"b": "\\"}]}') == 3 and read_json_text_ok(tmp_path)


def read_json_text_ok(tmp_path) -> bool:
    (tmp_path / "ok.json").write_text(json.dumps({"a": [[[1]]]}))
    return read_json(tmp_path / "ok.json") == {"a": [[[1]]]}


def test_completion_marker_detects_missing_and_truncated_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "w.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub/c.json").write_text("{}")
    assert "no .tear_lora_complete" in incomplete_reason(tmp_path)
    write_complete_marker(tmp_path)
    assert incomplete_reason(tmp_path) is None
    (tmp_path / "w.bin").write_bytes(b"x" * 50)
    assert "w.bin has 50 bytes, 100 were written" in incomplete_reason(tmp_path)
    (tmp_path / "sub/c.json").unlink()
    (tmp_path / "w.bin").write_bytes(b"x" * 100)
    assert "sub/c.json is missing" in incomplete_reason(tmp_path)
    (tmp_path / COMPLETE_MARKER).write_text("{trunc")
    assert "unreadable" in incomplete_reason(tmp_path)


def test_lock_refuses_a_second_holder_and_names_it(tmp_path):
    lock = lock_path_for(tmp_path / "run")
    assert lock == tmp_path / ".run.lock"
    script = ("import sys; from tear_lora.rundir import exclusive_lock, LockedError\n"
              "try:\n    with exclusive_lock(sys.argv[1], 'run dir x'): print('got it')\n"
              "except LockedError as e: print(e); sys.exit(2)")
    with exclusive_lock(lock, "run dir x"):
        other = subprocess.run([sys.executable, "-c", script, str(lock)], capture_output=True, text=True, timeout=60)
        assert other.returncode == 2 and f"pid {os.getpid()}" in other.stdout
        with pytest.raises(LockedError):  # a second open file description in this process is refused too
            with exclusive_lock(lock, "run dir x"):
                pass
    other = subprocess.run([sys.executable, "-c", script, str(lock)], capture_output=True, text=True, timeout=60)
    assert other.returncode == 0 and "got it" in other.stdout  # released when the holder leaves the block


def test_umask_is_read_once_at_import_not_flipped_per_write(tmp_path, monkeypatch):
    """Setting the umask to read it is process-wide: a thread creating a file meanwhile would get mode 0666."""
    def no_umask(mask):
        raise AssertionError("os.umask called after import")

    monkeypatch.setattr(os, "umask", no_umask)
    path = atomic_write_text(tmp_path / "f.txt", "x")
    from tear_lora.rundir import UMASK

    assert (path.stat().st_mode & 0o777) == 0o666 & ~UMASK


def test_atomic_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        assert (atomic_write_text(tmp_path / "f.txt", "x").stat().st_mode & 0o777) == 0o644
    finally:
        os.umask(old)
