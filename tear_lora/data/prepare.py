"""Consequence data: raw triples -> validated rows -> token ids with span roles -> a `datasets.Dataset`.

Reading and validating live in rawdata.py (any size, streamed, every problem as FILE:LINE). Here each good
row is tokenized as it is read and written straight to an Arrow file, so a file of several GB never sits in
memory. With `skip_invalid`, bad rows are listed in rejects.jsonl (FILE:LINE, reason, a short excerpt) instead of
stopping the run, so nothing is lost silently. A field longer than `field_bound` (data.max_seq_len x the
longest token) is refused before it is tokenized: memory stays bounded whatever the file holds
(docs/reliability.md has the measurement).

The processed set is cached in `<processed_dir>/<stem>-<key>/`, where the key hashes everything the output
depends on (file content, tokenizer, data settings, this code). Different settings therefore never share a
directory: a run reading one cache is not disturbed by another run building a different one. A cache is built
in a hidden sibling under a lock and swapped in whole; a damaged one is rebuilt, never trusted.

Packing (packing.py, training only) is cached beside the triples (`packed/`, own key), read memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import statistics
import sys
import time
from array import array
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, List, Value, load_from_disk

from . import rawdata, template
from tear_lora import rundir
from .packing import PACKED_FEATURES, describe_packing, pack_triples, packing_stats
from .rawdata import DataError, Reject, Row, TripleReader, load_triples
from .tokens import longest_entry, tokenizer_hash

__all__ = ["DataError", "Prepared", "Reject", "Row", "TripleReader", "file_hash", "load_triples",
           "prepare", "read_triples", "tokenize_row"]

CACHE_FORMAT = 2  # bump when the layout of a processed directory changes
FEATURES = Features({"id": Value("string"), "input_ids": List(Value("int32")), "span_roles": List(Value("int8")),
                     "meta": Value("string")})  # meta: the row's meta object as JSON text, or null
LOCK_POLL_S = 0.25


# ---- tokenizing -----------------------------------------------------------------------------------------------


def field_bound(tokenizer, max_seq_len: int) -> int:
    """Characters beyond which a field cannot fit `max_seq_len` tokens: no token is longer than the vocabulary's
    longest entry (byte-level entries hold at least one character per byte), so longer text needs more tokens."""
    return max_seq_len * max(longest_entry(tokenizer), 1)


def tokenize_row(tokenizer, fields: dict, max_seq_len: int, truncation: str, min_input_tokens: int):
    """-> (input_ids, span_roles, trimmed_count) or a rejection reason string.

    Truncation policy: response and witness are never cut. With `trim_input_left`, the oldest input tokens
    are dropped until the row fits, unless fewer than `min_input_tokens` of input would remain.
    """
    parts = template.segments(fields["input"], fields["response"], fields["witness"])
    input_ids, roles, pieces = template.encode(tokenizer, parts)
    excess = len(input_ids) - max_seq_len
    if excess <= 0:
        return input_ids, roles, 0
    input_len = len(pieces[1])
    if truncation == "reject":
        return f"{len(input_ids)} tokens > data.max_seq_len {max_seq_len} (truncation: reject)"
    if input_len - excess < min_input_tokens:
        return (f"{len(input_ids)} tokens > data.max_seq_len {max_seq_len}; trimming the input would leave "
                f"{max(input_len - excess, 0)} of its {input_len} tokens (< data.min_input_tokens {min_input_tokens})")
    start = len(input_ids) - sum(map(len, pieces)) + len(pieces[0])  # first input-text position (after any BOS)
    return input_ids[:start] + input_ids[start + excess :], roles[:start] + roles[start + excess :], excess


def _tokenize_all(reader: TripleReader, tokenizer, settings: dict, write) -> tuple[dict, list[Reject]]:
    """Stream the reader: tokenize each good row and `write(record, row)` it at once; -> (manifest counts, rejects).

    Without skip_invalid the first bad row dooms the run, so from there on rows are only validated (every
    problem still gets listed) and nothing more is tokenized.
    """
    skip_invalid = settings["skip_invalid"]
    rejects: list[Reject] = []  # what rejects.jsonl will hold: bad rows when skipped, and rows too long
    invalid: list[Reject] = []  # bad rows without skip_invalid: only the ones the error lists
    invalid_count = kept = trimmed = 0
    lengths = {name: array("l") for name in (*template.ROLE_NAMES.values(), "total")}
    limits = {k: settings[k] for k in ("max_seq_len", "truncation", "min_input_tokens")}
    for row, problem in reader:
        if problem is not None:
            invalid_count += 1
            if skip_invalid:
                rejects.append(Reject(row.line, problem, row.excerpt))
            elif len(invalid) <= rawdata.MAX_LISTED_ERRORS:
                invalid.append(Reject(row.line, problem, ""))
            continue
        if invalid_count and not skip_invalid:
            continue
        result = tokenize_row(tokenizer, row.fields, **limits)
        if isinstance(result, str):
            rejects.append(Reject(row.line, result, row.excerpt))
            continue
        input_ids, roles, cut = result
        meta = row.fields.get("meta")
        write({"id": row.fields["id"], "input_ids": input_ids, "span_roles": roles,
               "meta": None if meta is None else rawdata.meta_json(meta)}, row)
        kept, trimmed = kept + 1, trimmed + (cut > 0)
        for role, name in template.ROLE_NAMES.items():
            lengths[name].append(roles.count(role))
        lengths["total"].append(len(roles))
    if invalid_count and not skip_invalid:
        raise rawdata.rejection_error(reader.path, invalid, invalid_count)
    if not kept:
        first = rejects[0]
        raise DataError(f"{reader.path}:{first.line}: no usable rows: all {len(rejects)} were rejected "
                        f"(this one: {first.reason})")
    counts = {"rows_read": reader.rows_read, "rows_kept": kept, "rows_rejected": len(rejects),
              "rows_rejected_invalid": invalid_count, "rows_too_long": len(rejects) - invalid_count,
              "rows_trimmed": trimmed, "tokens": _length_stats(lengths),
              "notices": reader.notices(), "rejects": [{"line": r.line, "reason": r.reason} for r in rejects]}
    return counts, rejects


def _length_stats(lengths: dict[str, array]) -> dict[str, dict[str, float]]:
    """Per-span token counts (min / mean / p95 / max / sum) across rows; 'total' is the whole sequence."""
    stats = {}
    for name, values in lengths.items():
        ordered = sorted(values)
        stats[name] = {"min": ordered[0], "mean": round(statistics.fmean(ordered), 1),
                       "p95": ordered[int(0.95 * (len(ordered) - 1))], "max": ordered[-1], "sum": sum(ordered)}
    return stats


# ---- prepare: build once, cache by content ----------------------------------------------------------------------


@dataclass
class Prepared:
    dataset: Dataset  # one triple per row (FEATURES), always: evaluation, stats and response weights read this
    manifest: dict[str, Any]
    out_dir: Path | None  # the cache directory actually used (None with save=False)
    packed: Dataset | None = None  # the same triples packed (PACKED_FEATURES), when asked for

    @property
    def training_rows(self) -> Dataset:
        """What to train on: the packed rows when packing was asked for, else the triples."""
        return self.dataset if self.packed is None else self.packed


def prepare(raw_path: str | Path, tokenizer, recipe, out_dir: str | Path | None = None,
            skip_invalid: bool | None = None, save: bool = True, packed: bool = False,
            overwrite: bool = False) -> Prepared:
    """Raw file -> tokenized Dataset + manifest, reusing the cache when everything it depends on is unchanged.

    `out_dir` replaces the default `<processed_dir>/<stem>-<key>`; it is built aside and swapped in the same way.
    An existing `out_dir` holding other data is replaced only when it is a finished prepare output and
    `overwrite` (rundir.check_replaceable); the default dir is named by its key, so only a damaged cache of
    these very inputs is ever replaced there.
    `packed` (training passes `recipe.data.packing`) also packs the triples into `Prepared.packed`; it is a setting
    of its own in the cache key, and evaluation never asks for it (its numbers stay per triple).
    """
    raw_path = Path(raw_path)
    reader, settings = _open(raw_path, tokenizer, recipe, skip_invalid, packed)
    source_hash, tok_hash = file_hash(raw_path), tokenizer_hash(tokenizer)
    key = cache_key(source_hash, tokenizer_fingerprint(tokenizer, tok_hash), settings)
    manifest = {"source": str(raw_path), "source_sha256": source_hash, "settings": settings, "cache_key": key,
                "tokenizer": {"name_or_path": tokenizer.name_or_path, "hash": tok_hash},
                "recipe_hash": recipe.hash()}
    if not save:
        records: dict[str, list] = {name: [] for name in FEATURES}
        counts, _ = _tokenize_all(reader, tokenizer, settings, lambda r, _: [records[k].append(r[k]) for k in records])
        _print_notices(counts["notices"] + rawdata.describe_counts(raw_path, counts, recipe.data.max_seq_len))
        dataset = Dataset.from_dict(records, features=FEATURES)
        rows = pack_triples(dataset, recipe.data.max_seq_len) if packed else None
        if rows is not None:
            counts["packing"] = packing_stats(rows, recipe.data.max_seq_len)
            _print_notices([describe_packing(counts["packing"])])
        return Prepared(dataset, {**manifest, **counts}, None, rows)

    final = Path(out_dir) if out_dir else Path(recipe.data.processed_dir) / f"{_safe_name(raw_path)}-{key}"
    cached = _load_cached(final, key)
    if cached is None:
        _check_replaceable(final, overwrite or out_dir is None)
        with _waiting_lock(final):
            cached = _load_cached(final, key)  # another process may have built it while we waited
            if cached is None:
                checked = _check_replaceable(final, overwrite or out_dir is None)  # again, now that we hold the lock
                _build(reader, tokenizer, settings, manifest, final, checked)
                cached = _load_cached(final, key)
        if cached is None:
            raise DataError(f"{final}: the processed data just written cannot be read back; is the disk full?")
    _print_notices(cached.manifest.get("notices", []) + rawdata.describe_counts(raw_path, cached.manifest,
                                                                        recipe.data.max_seq_len))
    if packed:
        _print_notices([describe_packing(cached.manifest["packing"])])
    return cached


def read_triples(raw_path: str | Path, tokenizer, recipe, skip_invalid: bool | None = None) -> tuple[list[dict], dict]:
    """-> (the rows `prepare` keeps, as fields: input, response, witness, id, meta; prepare's counts), read and
    printed exactly as prepare does: analyze, which re-pairs responses and witnesses, needs the text, not ids."""
    raw_path = Path(raw_path)
    reader, settings = _open(raw_path, tokenizer, recipe, skip_invalid)
    rows: list[dict] = []
    counts, _ = _tokenize_all(reader, tokenizer, settings, lambda _, row: rows.append(row.fields))
    _print_notices(counts["notices"] + rawdata.describe_counts(raw_path, counts, recipe.data.max_seq_len))
    return rows, counts


def _open(raw_path: Path, tokenizer, recipe, skip_invalid: bool | None, packed: bool = False):
    """(TripleReader, settings) for a file as the recipe says to read it; file-level problems raise here."""
    skip_invalid = recipe.data.skip_invalid if skip_invalid is None else skip_invalid
    settings = {"max_seq_len": recipe.data.max_seq_len, "truncation": recipe.data.truncation,
                "min_input_tokens": recipe.data.min_input_tokens, "skip_invalid": skip_invalid,
                "fields": rawdata.resolve_fields(recipe.data.fields), "keep_extra_fields": recipe.data.keep_extra_fields,
                "packing": packed}
    reader = TripleReader(raw_path, recipe.data.fields, recipe.data.keep_extra_fields,
                          field_bound(tokenizer, recipe.data.max_seq_len))
    return reader, settings


def _build(reader: TripleReader, tokenizer, settings: dict, manifest: dict, final: Path, checked) -> None:
    """Tokenize into a hidden sibling of `final`, finish every file, then swap it in (the caller holds the lock
    and checked `final`: the swap re-checks it)."""
    rundir.note_leftovers(final, "build", "data prepare")
    building = rundir.temp_sibling(final, "build")
    try:
        from datasets.arrow_writer import ArrowWriter

        rows_file = building / "rows.arrow"
        with ArrowWriter(features=FEATURES, path=str(rows_file)) as writer:
            counts, rejects = _tokenize_all(reader, tokenizer, settings, lambda record, _: writer.write(record))
            writer.finalize()
        triples = Dataset.from_file(str(rows_file))
        triples.save_to_disk(str(building / "dataset"))
        if settings["packing"]:
            rows = pack_triples(triples, settings["max_seq_len"])  # on disk: map writes beside rows.arrow
            rows.save_to_disk(str(building / "packed"))
            counts["packing"] = packing_stats(rows, settings["max_seq_len"])
            del rows
        del triples
        for scratch in [rows_file, *building.glob("cache-*.arrow"), *building.glob("tmp*")]:
            scratch.unlink(missing_ok=True)
        rundir.atomic_write_text(building / "rejects.jsonl",
                                 "".join(json.dumps(r.as_dict(), ensure_ascii=False) + "\n" for r in rejects))
        rundir.atomic_write_json(building / "manifest.json", {**manifest, **counts})
        rundir.write_complete_marker(building, kind="processed data")
        rundir.swap_in(building, final, checked)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


def _load_cached(out_dir: Path, key: str) -> Prepared | None:
    """The finished cache in `out_dir` for `key`, or None: missing, for other inputs, or damaged in any way."""
    if not out_dir.is_dir() or rundir.incomplete_reason(out_dir) is not None:
        return None
    try:
        manifest = rundir.read_json(out_dir / "manifest.json")
        if not isinstance(manifest, dict) or manifest.get("cache_key") != key:
            return None
        dataset = load_from_disk(str(out_dir / "dataset"))
        if len(dataset) != manifest.get("rows_kept") or set(dataset.column_names) != set(FEATURES):
            return None
        packed = None
        if manifest["settings"].get("packing"):
            packed, stats = load_from_disk(str(out_dir / "packed")), manifest["packing"]
            if (len(packed) != stats["rows"] or stats["triples"] != len(dataset)
                    or set(packed.column_names) != set(PACKED_FEATURES)):
                return None
    except Exception:  # whatever is wrong with an old cache (truncated JSON, bad Arrow), the answer is rebuild
        return None
    return Prepared(dataset, manifest, out_dir, packed)


def _check_replaceable(final: Path, overwrite: bool) -> rundir.Checked:
    """Swapping in deletes what was at `final`: allow that only for an earlier prepare output (or nothing)."""
    try:
        return rundir.check_replaceable(final, "processed data", "manifest.json", overwrite, "pass --overwrite",
                                 legacy=True)
    except rundir.RunDirError as e:
        raise DataError(str(e)) from None


@contextmanager
def _waiting_lock(final: Path):
    """rundir.exclusive_lock on `final`, waiting (not refusing) while another process builds the same data:
    two trainings started on the same file must both work, the second reusing what the first built."""
    lock, told = rundir.lock_path_for(final), False
    with ExitStack() as stack:
        while True:
            try:
                stack.enter_context(rundir.exclusive_lock(lock, f"processed data {final}"))
                break
            except rundir.LockedError as e:
                if not told:
                    print(f"note: waiting: {e}", file=sys.stderr, flush=True)
                    told = True
                time.sleep(LOCK_POLL_S)
        yield


def _print_notices(notices: list[str]) -> None:
    for notice in notices:
        print(f"note: {notice}", file=sys.stderr)


def _safe_name(path: Path) -> str:
    """The file's stem as a plain directory name (no separators, no leading dot)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", path.stem).lstrip(".-") or "data"


# ---- identities -----------------------------------------------------------------------------------------------


def cache_key(source_hash: str, tokenizer_id: str, settings: dict) -> str:
    """Short hash of everything a processed set depends on: source bytes, tokenizer, data settings and code."""
    code = hashlib.sha256()
    for module in ("prepare.py", "packing.py", "rawdata.py", "readers.py", "template.py"):
        code.update((Path(__file__).parent / module).read_bytes())
    parts = {"format": CACHE_FORMAT, "source": source_hash, "tokenizer": tokenizer_id,
             "settings": settings, "code": code.hexdigest()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def tokenizer_fingerprint(tokenizer, vocab_hash: str) -> str:
    """The whole tokenizer (normalizer, pre-tokenizer, merges, added tokens) when it is a fast one, not only
    its vocabulary (`vocab_hash`): two tokenizers with one vocabulary can still split text differently."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    whole = hashlib.sha256(backend.to_str().encode()).hexdigest()[:16] if backend is not None else ""
    return whole + vocab_hash


def file_hash(path: str | Path) -> str:
    """sha256 of a file, or of every file of a directory in name order, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    path = Path(path)
    try:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e})") from None
    return digest.hexdigest()
