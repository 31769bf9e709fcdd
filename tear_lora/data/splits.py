"""Leave-domains-out splits: every triple file cut in two by `meta.domain`, so a study can train on some domains and
measure on the others (`tear-lora split-domains`).

A model that learned a notion of consequence should carry it to domains it never trained on; one that memorised
each domain's patterns should not. The split is a pair of ordinary triple files per input (`<stem>.in.jsonl`, the
left-in domains; `<stem>.out.jsonl`, the held-out ones), so training points `data.train_file` at the first and
`analyze` reads the second, with no new recipe field: each run's recipe.yaml records which file it trained on.
`split.json` beside them says what was held out and from which sources (their sha256).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .prepare import file_hash
from .rawdata import DataError, load_triples
from tear_lora.rundir import (
    atomic_write_json,
    atomic_write_text,
    check_replaceable,
    exclusive_lock,
    lock_path_for,
    swap_in,
    temp_sibling,
    write_complete_marker,
)

SPLIT_KIND = "domain split"
SPLIT_FILE = "split.json"  # what was held out, and each source's rows and sha256


def domain_split(paths: list[str | Path], held_out: list[str], out_dir: str | Path,
                 overwrite: bool = False) -> list[dict]:
    """Write `<out_dir>/<stem>.in.jsonl` and `<stem>.out.jsonl` for each file; one summary dict per file.

    Every row is read and validated as training reads it (FILE:LINE errors) and must carry a meta.domain; every
    held-out domain must occur in at least one file (a misspelt domain would otherwise hold nothing out). Nothing
    is written unless every file passes. `out_dir` is built whole in a hidden sibling and swapped in, and it may
    only replace an earlier split of ours, with `overwrite` (rundir.check_replaceable): a directory of the user's
    is never written into.
    """
    wanted = [d.strip() for d in held_out if d.strip()]
    if not wanted:
        raise DataError("--hold-out: name at least one meta.domain to hold out, e.g. --hold-out code,health")
    read, seen = [], set()
    for path in paths:
        rows, _ = load_triples(path)
        for row in rows:
            domain = (row.fields.get("meta") or {}).get("domain")
            if not isinstance(domain, str):
                raise DataError(f"{path}:{row.line}: no meta.domain; every row needs one to be split by domain")
            seen.add(domain)
        stems = [Path(p).name.split(".")[0] for p, _ in read]
        if Path(path).name.split(".")[0] in stems:
            raise DataError(f"{path}: another input has the same name before its first '.'; the outputs would clash")
        read.append((path, rows))
    missing = sorted(set(wanted) - seen)
    if missing:
        raise DataError(f"--hold-out: no row has meta.domain {', '.join(map(repr, missing))}; the files hold "
                        f"{', '.join(map(repr, sorted(seen)))}")
    out_dir = Path(out_dir)
    inputs = {Path(p).resolve() for p, _ in read}
    if any(parent in inputs for parent in (out_dir.resolve(), *out_dir.resolve().parents)):
        raise DataError(f"--out {out_dir}: is an input file or inside one; write the split elsewhere")
    names = {(path, side): f"{Path(path).name.split('.')[0]}.{side}.jsonl" for path, _ in read for side in ("in", "out")}
    check_replaceable(out_dir, SPLIT_KIND, SPLIT_FILE, overwrite, "pass --overwrite")
    with exclusive_lock(lock_path_for(out_dir), f"domain split {out_dir}"):
        check_replaceable(out_dir, SPLIT_KIND, SPLIT_FILE, overwrite, "pass --overwrite")  # again, under the lock
        building = temp_sibling(out_dir, "split")
        try:
            summary = []
            for path, rows in read:
                parts = {"in": [], "out": []}
                for row in rows:
                    parts["out" if row.fields["meta"]["domain"] in wanted else "in"].append(row.fields)
                written = {}
                for side, kept in parts.items():  # an empty side is not written: no triple file may be empty
                    if kept:
                        atomic_write_text(building / names[(path, side)],
                                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
                    written[side] = {"path": str(out_dir / names[(path, side)]) if kept else None, "rows": len(kept)}
                summary.append({"source": str(path), "source_sha256": file_hash(path), **written})
            atomic_write_json(building / SPLIT_FILE, {"held_out": wanted, "files": summary})
            write_complete_marker(building, kind=SPLIT_KIND)
            swap_in(building, out_dir)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    return summary

