"""Consequence data: raw triples -> validated rows -> token ids with span roles -> a `datasets.Dataset`.

Raw files are JSONL, CSV, Parquet or a saved HF dataset directory, with non-empty string fields `input`,
`response`, `witness` and optional `id` / `meta`. Every problem names FILE:LINE and the field. With
`skip_invalid`, bad rows are written verbatim to a rejects file instead of stopping the run, so nothing is
lost silently. The processed set is cached under `data/processed/<name>/` with a manifest that records where
it came from (file hash, tokenizer, recipe) and what was rejected and why.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, load_from_disk

from . import template

REQUIRED_FIELDS = ("input", "response", "witness")
OPTIONAL_FIELDS = ("id", "meta")
MAX_LISTED_ERRORS = 20


class DataError(ValueError):
    """Bad input data; the message names the file, line and field. The CLI exits with status 2."""


@dataclass
class Row:
    line: int  # 1-based line (JSONL/CSV) or row number (Parquet, HF dir)
    raw: str  # the row as it appeared in the file, kept verbatim for the rejects file
    fields: dict[str, Any]


@dataclass
class Reject:
    line: int
    reason: str
    raw: str

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "reason": self.reason, "raw": self.raw}


# ---- reading --------------------------------------------------------------------------------------------------


def read_rows(path: str | Path) -> list[Row]:
    """Parse a raw file into rows (no field validation yet). File-level problems raise DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        try:
            dataset = load_from_disk(str(path))
        except Exception as e:  # datasets raises several types for "not a saved dataset"
            raise DataError(f"{path}: not a saved HF dataset directory ({e})") from None
        rows = [Row(i + 1, json.dumps(r, ensure_ascii=False, default=str), dict(r)) for i, r in enumerate(dataset)]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            records = pq.read_table(path).to_pylist()
        except Exception as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        rows = [Row(i + 1, json.dumps(r, ensure_ascii=False, default=str), r) for i, r in enumerate(records)]
    elif path.suffix in (".jsonl", ".csv"):
        text = _read_text(path)
        rows = _read_jsonl(text) if path.suffix == ".jsonl" else _read_csv(path, text)
    else:
        raise DataError(f"{path}: unsupported format '{path.suffix}' (use .jsonl, .csv, .parquet or a dataset dir)")
    if not rows:
        raise DataError(f"{path}: file is empty (no rows)")
    return rows


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a UTF-8 byte-order mark is accepted and dropped
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        "re-save the file as UTF-8") from None


def _read_jsonl(text: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):  # splitlines also handles CRLF
        if line.strip():
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as e:
                fields = {"__error__": f"invalid JSON ({e.msg} at column {e.colno})"}
            if not isinstance(fields, dict):
                fields = {"__error__": "expected a JSON object {\"input\": ..., \"response\": ..., \"witness\": ...}"}
            rows.append(Row(number, line, fields))
    return rows


def _read_csv(path: Path, text: str) -> list[Row]:
    lines = text.splitlines(keepends=True)
    reader = csv.DictReader(io.StringIO(text))
    missing = [f for f in REQUIRED_FIELDS if f not in (reader.fieldnames or [])]
    if reader.fieldnames and missing:
        raise DataError(f"{path}:1: CSV header lacks column(s) {', '.join(missing)} (has {', '.join(reader.fieldnames)})")
    rows, start = [], 2
    for record in reader:
        end = reader.line_num
        fields = {k: v for k, v in record.items() if k is not None}
        if None in record:
            fields["__error__"] = f"{len(record[None])} more value(s) than header columns"
        if "meta" in fields and fields["meta"]:
            try:
                fields["meta"] = json.loads(fields["meta"])
            except json.JSONDecodeError:
                fields["__error__"] = "field 'meta': must be a JSON object"
        elif "meta" in fields:
            fields.pop("meta")
        if not fields.get("id"):
            fields.pop("id", None)
        rows.append(Row(start, "".join(lines[start - 1 : end]).rstrip("\r\n"), fields))
        start = end + 1
    return rows


def validate_row(row: Row) -> str | None:
    """The first problem with a row as "field 'x': ..." (or None when it is fine)."""
    fields = row.fields
    if "__error__" in fields:
        return fields["__error__"]
    for name in REQUIRED_FIELDS:
        value = fields.get(name)
        if not isinstance(value, str) or not value.strip():
            got = "missing" if name not in fields else f"got {type(value).__name__} {str(value)[:40]!r}"
            return f"field '{name}': must be a non-empty string ({got})"
    unknown = [k for k in fields if k not in REQUIRED_FIELDS + OPTIONAL_FIELDS]
    if unknown:
        return f"field '{unknown[0]}': unknown field (allowed: {', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)})"
    if "id" in fields and not isinstance(fields["id"], (str, int)):
        return "field 'id': must be a string or integer"
    if "meta" in fields and not isinstance(fields["meta"], (dict, type(None))):
        return "field 'meta': must be an object"
    return None


def load_triples(path: str | Path, skip_invalid: bool = False) -> tuple[list[Row], list[Reject]]:
    """Read and validate; without skip_invalid any bad row stops with every problem listed (FILE:LINE: ...)."""
    rows, rejects, kept = read_rows(path), [], []
    id_lines: dict[str, int] = {}
    triple_lines: dict[tuple, int] = {}
    for row in rows:
        problem = validate_row(row)
        if problem is None:
            row.fields["id"] = str(row.fields.get("id", f"{Path(path).stem}-{row.line}"))
            triple = tuple(row.fields[f] for f in REQUIRED_FIELDS)
            if row.fields["id"] in id_lines:
                problem = f"field 'id': duplicate id {row.fields['id']!r} (first at line {id_lines[row.fields['id']]})"
            elif triple in triple_lines:
                problem = f"duplicate of the triple at line {triple_lines[triple]}"
            else:
                id_lines[row.fields["id"]] = triple_lines[triple] = row.line
        if problem is None:
            kept.append(row)
        else:
            rejects.append(Reject(row.line, problem, row.raw))
    if rejects and not skip_invalid:
        listed = "\n".join(f"{path}:{r.line}: {r.reason}" for r in rejects[:MAX_LISTED_ERRORS])
        more = f"\n... and {len(rejects) - MAX_LISTED_ERRORS} more" if len(rejects) > MAX_LISTED_ERRORS else ""
        raise DataError(f"{listed}{more}\n{len(rejects)} invalid row(s); fix them or pass --skip-invalid "
                        "(bad rows then go verbatim to a rejects file)")
    return kept, rejects


# ---- tokenizing -----------------------------------------------------------------------------------------------


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
    start = len(template.prefix_ids(tokenizer)) + len(pieces[0])  # first input-text position
    return input_ids[:start] + input_ids[start + excess :], roles[:start] + roles[start + excess :], excess


@dataclass
class Prepared:
    dataset: Dataset
    manifest: dict[str, Any]
    out_dir: Path | None


def prepare(raw_path: str | Path, tokenizer, recipe, out_dir: str | Path | None = None,
            skip_invalid: bool | None = None, save: bool = True) -> Prepared:
    """Raw file -> tokenized Dataset + manifest; cached on disk when inputs are unchanged."""
    raw_path = Path(raw_path)
    skip_invalid = recipe.data.skip_invalid if skip_invalid is None else skip_invalid
    settings = {"max_seq_len": recipe.data.max_seq_len, "truncation": recipe.data.truncation,
                "min_input_tokens": recipe.data.min_input_tokens, "skip_invalid": skip_invalid}
    source_hash = file_hash(raw_path) if raw_path.exists() else None
    tokenizer_id = {"name_or_path": tokenizer.name_or_path, "hash": tokenizer_hash(tokenizer)}
    out_dir = Path(out_dir) if out_dir else Path(recipe.data.processed_dir) / raw_path.stem
    cached = _load_cached(out_dir, source_hash, tokenizer_id["hash"], settings) if save else None
    if cached is not None:
        return cached

    rows, rejects = load_triples(raw_path, skip_invalid=skip_invalid)
    rows_read = len(rows) + len(rejects)
    records: dict[str, list] = {"id": [], "input_ids": [], "span_roles": []}
    trimmed = 0
    for row in rows:
        result = tokenize_row(tokenizer, row.fields, **{k: settings[k] for k in ("max_seq_len", "truncation", "min_input_tokens")})
        if isinstance(result, str):
            rejects.append(Reject(row.line, result, row.raw))
            continue
        input_ids, roles, cut = result
        trimmed += cut > 0
        records["id"].append(row.fields["id"])
        records["input_ids"].append(input_ids)
        records["span_roles"].append(roles)
    if not records["id"]:
        raise DataError(f"{raw_path}: no usable rows ({len(rejects)} rejected; first: line {rejects[0].line}: {rejects[0].reason})")
    dataset = Dataset.from_dict(records)
    manifest = {
        "source": str(raw_path), "source_sha256": source_hash, "settings": settings, "tokenizer": tokenizer_id,
        "recipe_hash": recipe.hash(), "rows_read": rows_read,
        "rows_kept": len(dataset), "rows_rejected": len(rejects), "rows_trimmed": trimmed,
        "tokens": span_length_stats(records["span_roles"]),
        "rejects": [{"line": r.line, "reason": r.reason} for r in rejects],
    }
    if save:
        out_dir.mkdir(parents=True, exist_ok=True)
        dataset.save_to_disk(str(out_dir / "dataset"))
        with open(out_dir / "rejects.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r.as_dict(), ensure_ascii=False) + "\n" for r in rejects)
        (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    return Prepared(dataset, manifest, out_dir if save else None)


def _load_cached(out_dir: Path, source_hash, tok_hash: str, settings: dict) -> Prepared | None:
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.exists() or not (out_dir / "dataset").exists():
        return None
    manifest = json.loads(manifest_path.read_text())
    if (manifest.get("source_sha256"), manifest.get("tokenizer", {}).get("hash"), manifest.get("settings")) != (
        source_hash, tok_hash, settings):
        return None
    return Prepared(load_from_disk(str(out_dir / "dataset")), manifest, out_dir)


def span_length_stats(all_roles: list[list[int]]) -> dict[str, dict[str, float]]:
    """Per-span token counts (min / mean / p95 / max) across rows; 'total' is the whole sequence."""
    counts: dict[str, list[int]] = {name: [] for name in (*template.ROLE_NAMES.values(), "total")}
    for roles in all_roles:
        for role, name in template.ROLE_NAMES.items():
            counts[name].append(sum(1 for r in roles if r == role))
        counts["total"].append(len(roles))
    return {name: {"min": min(v), "mean": round(statistics.fmean(v), 1),
                   "p95": sorted(v)[int(0.95 * (len(v) - 1))], "max": max(v), "sum": sum(v)}
            for name, v in counts.items()}


def file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """Identity of a vocabulary (ids, tags included), independent of where the tokenizer was loaded from."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]
