"""bundle.json read back, checked: what `tear-lora serve` hands to llama-server and prints for you to paste.

A bundle gets shared like an adapter, so its bundle.json is read as tear_lora.json is (metadata.read_metadata):
nothing in it is trusted as it stands. Every path must name a file of the bundle (relative, resolving inside
it, no symlink on the way: `base_gguf: "../outside/private.txt"` or `gguf: "/etc/passwd"` would otherwise
be handed to llama-server as `-m` / `--lora`); adapter names follow the run-name rule (they are printed in shell
commands); no string holds a control character; every field has its type; the JSON nesting is bounded
(rundir.read_json). Anything else is one line naming the file and the field, exit 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tear_lora.metadata import CONTROL_CHARACTERS, strings
from tear_lora.rundir import check_run_name, incomplete_reason, read_json

from .bundle import BUNDLE_FILE, BUNDLE_KIND, BundleError


def read_bundle(directory: str | Path) -> dict:
    """bundle.json of a complete bundle, every field checked, or a BundleError saying what is wrong."""
    directory = Path(directory)
    problem = incomplete_reason(directory) if directory.is_dir() else "no such directory"
    if problem:
        raise BundleError(f"{directory}: not a complete tear-lora bundle ({problem}); make one with `tear-lora bundle`")
    path = directory / BUNDLE_FILE
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: unreadable ({e})") from None
    problem = manifest_problem(directory, manifest)
    if problem:
        raise BundleError(f"{path}: {problem}; not written by `tear-lora bundle`, or edited: make the bundle again")
    return manifest


def manifest_problem(directory: Path, manifest: Any) -> str | None:
    """Why `manifest` (bundle.json of `directory`) cannot be served as it is (None when it can)."""
    if not isinstance(manifest, dict) or manifest.get("kind") != BUNDLE_KIND:
        return f"kind is not {BUNDLE_KIND!r}"
    for key_path, value in strings(manifest, ""):
        if CONTROL_CHARACTERS.search(value):
            return f"{key_path} holds a control character ({value[:40]!r})"
    problem = file_problem(directory, manifest.get("base"), "base", directory=True)
    base_gguf = manifest.get("base_gguf")
    if problem is None and base_gguf is not None:
        problem = file_problem(directory, base_gguf, "base_gguf")
    if problem:
        return problem
    adapters = manifest.get("adapters")
    if not isinstance(adapters, list) or not adapters:
        return f"adapters must be a non-empty list, got {_short(adapters)}"
    names = set()
    for i, entry in enumerate(adapters):
        where = f"adapters[{i}]"
        if not isinstance(entry, dict):
            return f"{where} must be an object, got {_short(entry)}"
        name = entry.get("name")
        problem = check_run_name(name)
        if problem:
            return f"{where}.name {_short(name)} {problem}"
        if name in names:
            return f"{where}.name {name!r} appears twice"
        names.add(name)
        lam = entry.get("lambda")
        if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float))):
            return f"{where}.lambda must be a number, got {_short(lam)}"
        seed = entry.get("seed")  # shown in the page's column header
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            return f"{where}.seed must be an integer, got {_short(seed)}"
        problem = file_problem(directory, entry.get("peft_dir"), f"{where}.peft_dir", directory=True)
        if problem is None and (base_gguf is not None or entry.get("gguf") is not None):
            problem = file_problem(directory, entry.get("gguf"), f"{where}.gguf")
        if problem:
            return problem
    return None


def file_problem(bundle: Path, relative: Any, field: str, directory: bool = False) -> str | None:
    """Why `relative` is not a file (or directory) inside `bundle` reached without a symlink (None when it is)."""
    if not isinstance(relative, str) or not relative:
        return f"{field} must be a path inside the bundle, got {_short(relative)}"
    parts = Path(relative).parts
    if Path(relative).is_absolute() or ".." in parts:
        return f"{field} {relative!r} points outside the bundle (absolute or '..')"
    path = bundle
    for part in parts:
        path = path / part
        if os.path.islink(path):
            return f"{field} {relative!r} goes through a symlink ({path.relative_to(bundle)})"
    if not (path.is_dir() if directory else path.is_file()):
        return f"{field} {relative!r} is not a {'directory' if directory else 'file'} of the bundle"
    if bundle.resolve() not in path.resolve().parents:
        return f"{field} {relative!r} resolves outside the bundle"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
