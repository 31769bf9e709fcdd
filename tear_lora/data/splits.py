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
import os
from pathlib import Path

from tear_lora.rundir import atomic_write_json, replacing, write_complete_marker

from .prepare import file_hash
from .rawdata import MAX_LISTED_ERRORS, DataError, Reject, TripleReader, rejection_error

SPLIT_KIND = "domain split"
SPLIT_FILE = "split.json"  # what was held out, and each source's rows and sha256


def domain_split(paths: list[str | Path], held_out: list[str], out_dir: str | Path,
                 overwrite: bool = False) -> list[dict]:
    """Write `<out_dir>/<stem>.in.jsonl` and `<stem>.out.jsonl` for each file; one summary dict per file.

    Every row is read and validated as training reads it (FILE:LINE errors) and must carry a meta.domain; every
    held-out domain must occur in at least one file (a misspelt domain would otherwise hold nothing out). Nothing
    is written unless every file passes. Streamed: a first pass checks each file, a second writes its rows one
    at a time, so memory does not grow with the file (docs/data.md has the measurement). `out_dir` is built
    whole in a hidden sibling and swapped in (rundir.replacing): it may only replace an earlier split of ours,
    with `overwrite`, and a directory of the user's is never written into.
    """
    wanted = [d.strip() for d in held_out if d.strip()]
    if not wanted:
        raise DataError("--hold-out: name at least one meta.domain to hold out, e.g. --hold-out code,health")
    seen: set[str] = set()
    sources = {}
    for path in paths:
        stem = Path(path).name.split(".")[0]
        if stem in sources.values():
            raise DataError(f"{path}: another input has the same name before its first '.'; the outputs would clash")
        seen |= _check_domains(path)
        sources[path] = stem
    missing = sorted(set(wanted) - seen)
    if missing:
        raise DataError(f"--hold-out: no row has meta.domain {', '.join(map(repr, missing))}; the files hold "
                        f"{', '.join(map(repr, sorted(seen)))}")
    out_dir = Path(out_dir)
    inputs = {Path(p).resolve() for p in sources}
    if any(parent in inputs for parent in (out_dir.resolve(), *out_dir.resolve().parents)):
        raise DataError(f"--out {out_dir}: is an input file or inside one; write the split elsewhere")
    with replacing(out_dir, SPLIT_KIND, SPLIT_FILE, overwrite, "pass --overwrite", "split") as building:
        summary = [_write_sides(path, stem, set(wanted), building, out_dir) for path, stem in sources.items()]
        atomic_write_json(building / SPLIT_FILE, {"held_out": wanted, "files": summary})
        write_complete_marker(building, kind=SPLIT_KIND)
    return summary


def _check_domains(path) -> set[str]:
    """The meta.domain values of a file, every row checked as training reads it (bad rows: one DataError listing
    the first few, as load_triples does, but without keeping the rows)."""
    domains, rejects, total = set(), [], 0
    for row, problem in TripleReader(path):
        if problem is None:
            domain = (row.fields.get("meta") or {}).get("domain")
            if not isinstance(domain, str):
                raise DataError(f"{path}:{row.line}: no meta.domain; every row needs one to be split by domain")
            domains.add(domain)
        else:
            total += 1
            if len(rejects) <= MAX_LISTED_ERRORS:
                rejects.append(Reject(row.line, problem, row.excerpt))
    if rejects:
        raise rejection_error(path, rejects, total)
    return domains


def _write_sides(path, stem: str, wanted: set[str], building: Path, out_dir: Path) -> dict:
    """Stream `path` into `<stem>.in.jsonl` / `<stem>.out.jsonl` in the build dir, one row at a time; a side
    with no rows is not written (no triple file may be empty). Returns the file's summary."""
    digest = file_hash(path)
    names = {side: f"{stem}.{side}.jsonl" for side in ("in", "out")}
    counts = {"in": 0, "out": 0}
    files = {side: open(building / name, "w", encoding="utf-8") for side, name in names.items()}
    try:
        for row, problem in TripleReader(path):
            if problem is not None or not isinstance((row.fields.get("meta") or {}).get("domain"), str):
                raise DataError(f"{path}:{row.line}: changed while it was being split; split it once it is complete")
            side = "out" if row.fields["meta"]["domain"] in wanted else "in"
            files[side].write(json.dumps(row.fields, ensure_ascii=False) + "\n")
            counts[side] += 1
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()
    if file_hash(path) != digest:
        raise DataError(f"{path}: changed while it was being split; split it once it is complete")
    written = {}
    for side, name in names.items():
        if not counts[side]:
            (building / name).unlink()  # made just now, in our build dir
        written[side] = {"path": str(out_dir / name) if counts[side] else None, "rows": counts[side]}
    return {"source": str(path), "source_sha256": digest, **written}
