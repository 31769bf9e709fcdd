"""Safe writing: every file and directory tear_lora writes goes through here.

Five promises, each kept by one piece of this module:
- Nothing lands outside where it belongs: run names are plain names, and output roots may not be `/`, the
  home directory, the project or an ancestor of them (`check_run_name`, `unsafe_root_reason`).
- A reader never sees half a file or half a directory: files are written to a temp name and renamed
  (`atomic_write_*`); directories are built under a hidden sibling and swapped in only when complete
  (`swap_in`), so the previous result stays until its replacement is whole. Markers written last
  (`write_complete_marker`) tell a finished directory from a killed one.
- One writer at a time: `exclusive_lock` holds an `fcntl.flock` for the whole job and names the holder; the
  lock file is opened with O_NOFOLLOW, so a planted symlink cannot make us truncate its target.
- Nothing of the user's is replaced: `check_replaceable` is the one rule every verb that writes a directory
  applies before it starts (a finished output of ours of the same kind, and only with overwrite); `swap_in`
  applies it again at the swap (the old directory aside, compared with what was checked, put back if anything
  was added); `temp_sibling` never removes a name it did not just make; `replacing` is the whole rule around a
  build. docs/reliability.md states it; tests/test_user_files.py holds every writer to it.
- What we read back cannot crash us: `read_json` bounds the nesting of every JSON file we read.

Longer than 350 lines because the five promises are kept by one set of primitives (temp siblings, completion
markers, locks): every writing verb needs all of them, and one module is the one place to audit them.

Plain stdlib: none of the libraries we build on offers these for directories (safetensors and HF write
files in place; HF Trainer's checkpoints have no completion marker).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import shutil
import stat
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RUN_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
COMPLETE_MARKER = ".tear_lora_complete"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _read_umask() -> int:
    """The process umask. Reading it means setting it, so this runs once, at import (before any thread of ours
    starts); flipping it later, while another thread creates a file, would give that file the wrong mode."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()


class RunDirError(ValueError):
    """A path or directory state that the requested write would damage; the CLI exits with status 2."""


class LockedError(RunDirError):
    """Another process holds the lock on this directory."""


# ---- where we may write ----------------------------------------------------------------------------------------


def check_run_name(name: str) -> str | None:
    """Why `name` is not a safe directory name (None when it is): one path component, no `..`, no leading dot."""
    if not isinstance(name, str) or not RUN_NAME_PATTERN.fullmatch(name):
        return "must match [A-Za-z0-9][A-Za-z0-9._-]* (a plain name: no '/', no leading '.' or '-')"
    if ".." in name:
        return "must not contain '..'"
    return None


def _protected_dirs() -> list[Path]:
    dirs = [Path("/"), Path.home(), Path.cwd(), PROJECT_ROOT]
    return list(dict.fromkeys(d.resolve() for d in dirs))


def unsafe_root_reason(path: str | Path) -> str | None:
    """Why `path` must never be an output root we create, replace or delete things in (None when it is fine).

    Refused: `/`, the home directory, the current directory, the tear_lora project, and any ancestor of them.
    A subdirectory of them (`adapters/`, `models/x`) is fine.
    """
    resolved = Path(path).expanduser().resolve()
    for protected in _protected_dirs():
        if resolved == protected or resolved in protected.parents:
            what = {Path("/"): "the filesystem root", Path.home().resolve(): "the home directory",
                    PROJECT_ROOT: "the tear_lora project", Path.cwd().resolve(): "the current directory"}
            return f"resolves to {resolved}, which is {what.get(protected, str(protected))} or an ancestor of it"
    return None


def child_dir(root: str | Path, name: str) -> Path:
    """`root/name`, refusing a name or root that would put the directory anywhere else."""
    problem = check_run_name(name)
    if problem:
        raise RunDirError(f"run name {name!r} {problem}")
    problem = unsafe_root_reason(root)
    if problem:
        raise RunDirError(f"output directory {str(root)!r} {problem}")
    path = Path(root) / name
    if path.resolve().parent != Path(root).resolve():
        raise RunDirError(f"{path} does not lie directly inside {root}")
    return path


# ---- atomic files ------------------------------------------------------------------------------------------------


def json_safe(value: Any) -> Any:
    """`value` with every NaN / Inf replaced by None: bare NaN is not JSON, and other readers reject it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temp file in the same directory, fsync, rename over `path`: readers see old or new, never half.
    A directory or a symlink at `path` is the user's, not a file of ours to replace: refused (RunDirError)."""
    path = Path(path)
    if path.is_symlink() or path.is_dir():
        raise RunDirError(f"{path} is a {'symlink' if path.is_symlink() else 'directory'}; nothing was changed: "
                          "give the path of a file to write")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600; a written file gets the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _ignore_missing():
            os.unlink(tmp)
        raise
    return path


def usual_permissions(directory: str | Path, pattern: str = "*.safetensors") -> None:
    """Give files a library wrote with mode 0600 (safetensors' `save_file` does) the mode any other file gets
    under this umask, so a shared run dir is readable like the rest of its files."""
    for path in Path(directory).glob(pattern):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~UMASK)


def atomic_save_figure(figure, path: str | Path, **savefig_kwargs) -> Path:
    """A matplotlib figure as a PNG, rendered in memory and written atomically (its directory is created)."""
    import io

    png = io.BytesIO()
    figure.savefig(png, format="png", **savefig_kwargs)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, png.getvalue())


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(json_safe(obj), indent=indent, ensure_ascii=False, allow_nan=False) + "\n")


@contextmanager
def _ignore_missing():
    try:
        yield
    except FileNotFoundError:
        pass


# ---- directories -------------------------------------------------------------------------------------------------


def temp_sibling(final: str | Path, kind: str = "tmp") -> Path:
    """A fresh hidden sibling `.<name>.<kind>-<pid>` of `final` (same filesystem, so a rename is atomic), made by
    this process: a name already taken (a leftover of an earlier process with our pid, or the user's) is never
    removed or reused; a unique `.<name>.<kind>-<pid>-<random>` is made instead."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    path = final.parent / f".{final.name}.{kind}-{os.getpid()}"
    try:
        path.mkdir()
    except FileExistsError:
        path = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{path.name}-"))
        os.chmod(path, 0o777 & ~UMASK)  # mkdtemp makes 0700; the output gets the usual mode
    return path


def stale_siblings(final: str | Path, kind: str = "tmp") -> list[Path]:
    """Hidden siblings of `final` named as `temp_sibling` names them (`.<name>.<kind>-<pid>[-<random>]`, real
    directories), left by earlier processes (killed runs), newest first. Read only: nothing here deletes them."""
    final = Path(final)
    ours = re.compile(rf"\.{re.escape(final.name)}\.{re.escape(kind)}-[0-9]+(-[A-Za-z0-9_]+)?")
    found = [p for p in final.parent.glob(f".{final.name}.{kind}-*")
             if ours.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def note_leftovers(final: str | Path, kind: str, what: str) -> None:
    """Say (stderr) which builds of killed earlier runs lie beside `final`: they are not ours to delete (another
    process made them, and a user may have put files there), so the user decides."""
    for stale in stale_siblings(final, kind):
        print(f"note: {stale} is left from an earlier {what} that did not finish; delete it when you no longer "
              "need it", file=sys.stderr)


def contents(directory: str | Path) -> dict[str, tuple]:
    """Everything under `directory` (links not followed): relative path -> (type, size, mtime_ns) for files,
    (type,) for directories, links and the rest: what `swap_in` compares with what was checked."""
    found: dict[str, tuple] = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            found[os.path.relpath(path, directory)] = (kind, st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) \
                else (kind,)
    return found


class Checked:
    """What `check_replaceable` found at `path` (None: nothing there), so `swap_in` can tell whether anything
    was added or changed since: the check and the swap may be hours apart."""

    def __init__(self, path: Path, entries: dict[str, tuple] | None):
        self.path, self.entries = path, entries

    def change(self, now: dict[str, tuple]) -> str | None:
        """The first entry added or changed since the check, as words (None when nothing was)."""
        before = self.entries or {}
        for name, entry in sorted(now.items()):
            if name not in before:
                return f"{name} was added"
            if before[name] != entry:
                return f"{name} was changed"
        return None


def swap_in(built: Path, final: Path, checked: Checked) -> None:
    """Make the completely built directory `built` become `final`, re-checking `final` at the moment of the swap.

    The old `final` is renamed aside (rename(2) cannot replace a non-empty directory) and compared with what
    `check_replaceable` saw (`checked`): if anything was added or changed meanwhile (a NOTES.txt saved into it
    while we built), it is put back as it was and RunDirError is raised. Only after that is the new one put in
    place and the old one deleted; if putting the new one in place fails, the old one is put back.
    """
    final = Path(final)
    if Path(checked.path) != final:
        raise ValueError(f"swap_in: {final} was not the directory checked ({checked.path})")
    aside = None
    if os.path.lexists(final):
        if final.is_symlink() or not final.is_dir():
            raise RunDirError(f"{final} became a file or a symlink while the new one was being built; nothing "
                              "was replaced: move it away or choose another path, and run again")
        aside = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-{os.getpid()}-"))
        os.rename(final, aside)  # onto the empty directory mkdtemp made: atomic, and a name no one else holds
        change = checked.change(contents(aside))
        if change:
            _put_back(aside, final)
            raise RunDirError(f"{final} changed while the new one was being built ({change}); it was left as it "
                              "is and nothing was replaced: move your files out of it or choose another path, "
                              "and run again")
    try:
        os.rename(built, final)
    except BaseException:
        if aside is not None:
            _put_back(aside, final)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _put_back(aside: Path, final: Path) -> None:
    try:
        os.rename(aside, final)
    except OSError as e:  # something was created at `final` in the moment it was away: keep both, say where
        raise RunDirError(f"{final} was recreated while it was being replaced; the previous one is kept at "
                          f"{aside}: nothing was deleted ({e.strerror})") from None


# ---- reading JSON back -------------------------------------------------------------------------------------------

MAX_JSON_DEPTH = 64  # deeper than anything we write (markers, metadata, manifests, bundle.json: under 8)
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """How deeply the arrays and objects of JSON `text` nest, counted without parsing (so without recursion)."""
    depth = deepest = 0
    for match in _JSON_BRACKET.finditer(_JSON_STRING.sub('""', text)):
        depth += 1 if match.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def load_json(text: str, source: str | Path, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`json.loads` for every JSON file tear_lora reads back: nesting deeper than `max_depth` is refused in one
    line (RunDirError naming `source`) before parsing; Python's parser would raise RecursionError, and every
    reader that walks the result recursively would too. Other problems raise ValueError as json does."""
    if json_depth(text) > max_depth:
        raise RunDirError(f"{source}: JSON nested deeper than {max_depth} levels; tear_lora never writes that: "
                          "not a file of ours, or damaged")
    return json.loads(text)


def read_json(path: str | Path, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`load_json` of a file (UTF-8)."""
    return load_json(Path(path).read_text(encoding="utf-8"), path, max_depth)


def write_complete_marker(directory: str | Path, info: dict | None = None, kind: str | None = None) -> Path:
    """Written last: lists every file with its size, so a later reader can tell complete from killed mid-write;
    `kind` (adapter, merge, processed data, ...) says which of our outputs it is (`check_replaceable`)."""
    directory = Path(directory)
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
             if p.is_file() and p != directory / COMPLETE_MARKER}  # nested ones (checkpoints') are listed
    head = {"kind": kind} if kind else {}
    return atomic_write_json(directory / COMPLETE_MARKER, {**head, "files": files, **(info or {})})


def read_marker(directory: str | Path) -> dict | None:
    """The completion marker of `directory` as a dict with a `files` dict, or None (absent or unreadable)."""
    try:
        marker = read_json(Path(directory) / COMPLETE_MARKER)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), dict) else None


def incomplete_reason(directory: str | Path) -> str | None:
    """Why `directory` is not a complete tear_lora output (None when its marker exists and every file matches)."""
    directory = Path(directory)
    marker = directory / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER} marker (the write that made it did not finish)"
    try:
        files = read_json(marker)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {COMPLETE_MARKER} marker"
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written (truncated or changed)"
    return None


# ---- replacing a directory: the one rule ------------------------------------------------------------------------


def check_replaceable(path: str | Path, kind: str, metadata_file: str, overwrite: bool, how_to_overwrite: str,
                      also_ours: tuple[str, ...] = (), legacy: bool = False) -> Checked:
    """The rule every verb that writes a directory applies before it starts (train, sweep, data prepare, merge,
    bundle, split-domains): `path` may be created when absent or empty; an existing one is replaced only when it
    is a finished output of ours of the same `kind` (a completion marker naming that kind, listing
    `metadata_file` and every file there) and only with `overwrite`. Anything else raises RunDirError naming the
    path; nothing is touched. Returns what was found, for `swap_in` to compare with at the swap.

    `also_ours`: names our own later verbs add in place (e.g. report's training_curves.png). `legacy`: accept a
    marker that names no kind (written before kinds were recorded) when it lists `metadata_file`.
    """
    path = Path(path)
    problem = unsafe_root_reason(path)
    if problem:
        raise RunDirError(f"{path}: will not write a {kind} there: it {problem}")
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise RunDirError(f"{path} is a file or a symlink, not a directory tear_lora made; nothing was changed: "
                          "choose another path")
    if not path.exists():
        return Checked(path, None)
    if not any(path.iterdir()):
        return Checked(path, {})
    reason = foreign_reason(path, kind, metadata_file, also_ours, legacy)
    if reason:
        raise RunDirError(f"{path} exists and is not a finished tear_lora {kind} ({reason}); nothing was changed: "
                          "choose another path, or move it away yourself")
    if not overwrite:
        raise RunDirError(f"{path} already holds a finished tear_lora {kind}; {how_to_overwrite} to replace it "
                          "(the old one is kept until the new one is complete), or choose another path")
    return Checked(path, contents(path))


@contextmanager
def replacing(final: str | Path, kind: str, metadata_file: str, overwrite: bool, how_to_overwrite: str,
              build_kind: str, legacy: bool = False):
    """The whole rule for a verb that writes one directory, around the block that builds it: check `final`
    (`check_replaceable`, before anything is made), lock it, check again under the lock, yield a fresh hidden
    build dir made by this process; when the block ends normally, swap it in with the re-check at the swap
    (`swap_in`); when it raises, delete the build dir (ours) and nothing else. Builds of killed earlier runs
    are named, never deleted."""
    final = Path(final)
    check_replaceable(final, kind, metadata_file, overwrite, how_to_overwrite, legacy=legacy)
    with exclusive_lock(lock_path_for(final), f"{kind} {final}"):
        checked = check_replaceable(final, kind, metadata_file, overwrite, how_to_overwrite, legacy=legacy)
        note_leftovers(final, build_kind, kind)
        build = temp_sibling(final, build_kind)
        try:
            yield build
            swap_in(build, final, checked)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise


def foreign_reason(path: Path, kind: str, metadata_file: str, also_ours: tuple[str, ...] = (),
                   legacy: bool = False) -> str | None:
    """Why replacing the directory `path` could lose something that is not a finished `kind` of ours (None
    when it is one, holding only the files its marker lists)."""
    marker = read_marker(path)
    if marker is None:
        return f"no readable {COMPLETE_MARKER} marker"
    if marker.get("kind") != kind and not (legacy and "kind" not in marker):
        return f"its marker says {marker.get('kind') or 'no kind'}, not {kind}"
    listed = set(marker["files"])
    if metadata_file not in listed:
        return f"no {metadata_file}"
    for root, dirs, files in os.walk(path):  # does not follow links: a link is itself something not ours
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            relative = os.path.relpath(os.path.join(root, name), path)
            if os.path.islink(os.path.join(root, name)):
                return f"{relative} is a symlink"
            if relative != COMPLETE_MARKER and relative not in listed and relative not in also_ours:
                return f"it holds {relative}, which tear_lora did not write"
    return None


def copy_tree_without_links(source: str | Path, destination: str | Path) -> None:
    """copytree that refuses a tree holding symlinks (copying one would copy whatever it points at, anywhere);
    links found after the check are copied as links, never followed."""
    for root, dirs, files in os.walk(source):
        for name in dirs + files:
            if os.path.islink(os.path.join(root, name)):
                raise RunDirError(f"{os.path.join(root, name)} is a symlink; tear_lora copies only plain files "
                                  "and directories: replace it with the file itself")
    shutil.copytree(source, destination, symlinks=True)


# ---- one writer ----------------------------------------------------------------------------------------------------


@contextmanager
def exclusive_lock(lock_path: str | Path, what: str):
    """Hold an exclusive `flock` on `lock_path` for the block; if another process holds it, refuse at once.

    The lock file records the holder's pid so the refusal can name it. flock is released by the kernel when
    the holder dies, so a killed run never leaves a stale lock behind.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:  # O_NOFOLLOW: a symlink planted at the lock path is refused, never followed and truncated
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise RunDirError(f"{lock_path} is a symlink; tear_lora's lock files are plain files: remove the link "
                          "(its target was not touched)") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunDirError(f"{lock_path} is not a plain file; remove it (it was not touched)")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise LockedError(f"{what} is in use by another tear_lora process (pid {holder}; lock {lock_path}); "
                              "wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def lock_path_for(directory: str | Path) -> Path:
    """The lock file guarding `directory`: a hidden sibling, so it survives the directory being swapped."""
    directory = Path(directory)
    return directory.parent / f".{directory.name}.lock"
