"""Reading raw triples: a file of any size -> one validated row at a time, or a FILE:LINE error.

Formats (JSONL, CSV, Parquet, a saved HF dataset directory) are parsed in readers.py; here every row's fields
are checked alike whatever the format. Nothing is held per row except what a caller keeps: duplicates are found
through sha256 digests, not the strings.

Every problem becomes a reason naming the user's own column (`field 'answer': must be a non-empty string`) at
the row's line; a problem with the file itself raises DataError at once. Columns that no role uses are
allowed and counted, so the caller can print one notice per column instead of one per row.
"""

from __future__ import annotations

import hashlib
import json
import reprlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .readers import EXCERPT_CHARS, MAX_LINE_BYTES, REQUIRED_FIELDS, DataError, Row, check_source, one_line, parsed_rows
from tear_lora.rundir import json_safe

__all__ = ["EXCERPT_CHARS", "DATA_FIELD_ROLES", "DataError", "Reject", "Row", "TripleReader", "load_triples"]

OPTIONAL_FIELDS = ("id", "meta")
DATA_FIELD_ROLES = REQUIRED_FIELDS + OPTIONAL_FIELDS  # what a recipe's data.fields may map
MAX_LISTED_ERRORS = 20
NOTED_REJECTS = 5  # dropped rows named on stderr after the counts line (data.prepare / read_triples)
MAX_EXTRA_NAMES = 50  # distinct ignored column names counted by name; more are only counted
# One field of any reader (a JSONL/CSV field, a Parquet or saved-dataset cell): longer ones are rejected before
# anything is done with them. prepare passes a tighter bound derived from data.max_seq_len (data.field_bound).
MAX_FIELD_CHARS = MAX_LINE_BYTES
_DIGEST_BYTES = 16  # 128-bit prefixes of sha256: a false "duplicate" is never going to happen
_OTHER_FIELDS = None  # the counter's key for extra field names beyond MAX_EXTRA_NAMES


@dataclass
class Reject:
    line: int
    reason: str
    excerpt: str

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "reason": self.reason, "excerpt": self.excerpt}


def resolve_fields(fields: dict[str, str] | None) -> dict[str, str]:
    """Role -> the user's column name (`data.fields`); a role not mapped keeps its own name."""
    return {role: (fields or {}).get(role, role) for role in DATA_FIELD_ROLES}


class TripleReader:
    """Iterate a raw file as (Row, problem) pairs, problem None for a good row; streams, whatever the size.

    After iterating, `rows_read` and `notices()` describe what was seen. A missing or unreadable file, an
    unknown format, a bad CSV header or a file without rows raise DataError.
    """

    def __init__(self, path: str | Path, fields: dict[str, str] | None = None, keep_extra_fields: bool = False,
                 max_field_chars: int = MAX_FIELD_CHARS):
        self.path = Path(path)
        self.max_field_chars = max_field_chars
        self.columns = resolve_fields(fields)
        self.keep_extra_fields = keep_extra_fields
        self.extra_fields: Counter[str] = Counter()
        self.rows_read = 0
        check_source(self.path)

    def __iter__(self) -> Iterator[tuple[Row, str | None]]:
        self.rows_read, self.extra_fields = 0, Counter()
        id_lines: dict[bytes, int] = {}
        triple_lines: dict[bytes, int] = {}
        stem = self.path.stem.encode("utf-8", "backslashreplace").decode("utf-8")  # for ids of rows without one
        for row, problem in parsed_rows(self.path, self.columns):
            self.rows_read += 1
            if problem is None:
                checked = check_fields(row.fields, self.columns, self.keep_extra_fields, self.extra_fields,
                                       self.max_field_chars)
                if isinstance(checked, str):
                    problem = checked
                else:
                    checked.setdefault("id", f"{stem}-{row.line}")
                    row.fields = checked
                    problem = _duplicate(row, self.columns["id"], id_lines, triple_lines)
            yield row, problem
        if self.rows_read == 0:
            raise DataError(f"{self.path}:1: no rows (the file is empty or has only blank lines)")

    def notices(self) -> list[str]:
        """One line per extra column: how many rows had it and what happened to it."""
        what = "kept in meta" if self.keep_extra_fields else "ignored"
        hint = "" if self.keep_extra_fields else " (map it with data.fields or keep it with data.keep_extra_fields)"
        named = [f"{self.path}: {what} field {name!r} in {n} row{'s' * (n != 1)}{hint}"
                 for name, n in self.extra_fields.items() if name is not _OTHER_FIELDS]
        if _OTHER_FIELDS in self.extra_fields:
            named.append(f"{self.path}: {what} {self.extra_fields[_OTHER_FIELDS]} more field(s) in rows, beyond the "
                         f"first {MAX_EXTRA_NAMES} names")
        return named


def load_triples(path: str | Path, skip_invalid: bool = False, fields: dict[str, str] | None = None,
                 keep_extra_fields: bool = False, notices: list[str] | None = None,
                 max_field_chars: int = MAX_FIELD_CHARS) -> tuple[list[Row], list[Reject]]:
    """Read and validate a whole file into memory; without skip_invalid any bad row stops with every problem
    listed (FILE:LINE: ...). For small files and tests; `prepare` streams through TripleReader instead."""
    reader = TripleReader(path, fields, keep_extra_fields, max_field_chars)
    kept, rejects = [], []
    for row, problem in reader:
        if problem is None:
            kept.append(row)
        else:
            rejects.append(Reject(row.line, problem, row.excerpt))
    if notices is not None:
        notices.extend(reader.notices())
    if rejects and not skip_invalid:
        raise rejection_error(path, rejects, len(rejects))
    return kept, rejects


def rejection_error(path, listed: list[Reject], total: int) -> DataError:
    """Every line reads FILE:LINE: ..., the summary first (at the first bad line), then up to 20 rows."""
    lines = [f"{path}:{listed[0].line}: {total} invalid row(s); fix them, or pass --skip-invalid / set "
             "data.skip_invalid: true (bad rows are then listed in a rejects file)"]
    lines += [f"{path}:{r.line}: {r.reason}" for r in listed[:MAX_LISTED_ERRORS]]
    if total > MAX_LISTED_ERRORS:
        lines.append(f"{path}:{listed[MAX_LISTED_ERRORS].line}: ... and {total - MAX_LISTED_ERRORS} more invalid "
                     "row(s) from this line on")
    return DataError("\n".join(lines))


def describe_counts(path, counts: dict, max_seq_len: int) -> list[str]:
    """What reading a file kept and dropped (data.prepare's counts), as prepare, eval and analyze print it: one
    counts line, then the first NOTED_REJECTS dropped rows as FILE:LINE: reason."""
    lines = [f"{path}: {counts['rows_read']} rows read: {counts['rows_kept']} kept, {counts['rows_rejected_invalid']} "
             f"invalid, {counts['rows_too_long']} too long (data.max_seq_len {max_seq_len}), {counts['rows_trimmed']} "
             "trimmed"]
    rejects = counts["rejects"]
    lines += [f"{path}:{r['line']}: dropped: {r['reason']}" for r in rejects[:NOTED_REJECTS]]
    if len(rejects) > NOTED_REJECTS:
        lines.append(f"{path}:{rejects[NOTED_REJECTS]['line']}: ... and {len(rejects) - NOTED_REJECTS} more dropped "
                     "row(s) from this line on")
    return lines


# ---- validating one row ------------------------------------------------------------------------------------------


def check_fields(fields: Any, columns: dict[str, str], keep_extra: bool, extra_seen: Counter,
                 max_chars: int = MAX_FIELD_CHARS) -> dict | str:
    """The row in our roles (input, response, witness, id?, meta?), or its first problem as "field 'x': ...".
    A text field over `max_chars` is refused before anything else looks at it (tokenizing it would cost
    ~220 bytes of memory per character)."""
    if not isinstance(fields, dict):
        return (f"expected an object with fields {', '.join(repr(columns[r]) for r in REQUIRED_FIELDS)}, "
                f"got {_describe(fields)}")
    used = set(columns.values())
    extra = [name for name in fields if name not in used]
    for name in extra:  # counted in every row that has it, so the notice describes the file
        extra_seen[name if name in extra_seen or len(extra_seen) < MAX_EXTRA_NAMES else _OTHER_FIELDS] += 1
    row: dict[str, Any] = {}
    for role in REQUIRED_FIELDS:
        column = columns[role]
        value = fields.get(column)
        if not isinstance(value, str) or not value.strip():
            got = "missing" if column not in fields else f"got {_describe(value)}"
            return f"field {column!r}: must be a non-empty string ({got})"
        if len(value) > max_chars:
            return (f"field {column!r}: {len(value):,} characters, over the {max_chars:,}-character bound for one "
                    "field (data.max_seq_len x the longest token: it cannot fit); shorten it")
        row[role] = value
    row_id = fields.get(columns["id"])
    if row_id is not None:  # null (a Parquet gap, an empty CSV cell) means "no id": one is made from the line
        if isinstance(row_id, bool) or not isinstance(row_id, (str, int)) or not str(row_id).strip():
            return f"field {columns['id']!r}: must be a non-empty string or an integer (got {_describe(row_id)})"
        row["id"] = str(row_id)
    for role, value in row.items():
        problem = text_problem(value)
        if problem:
            return f"field {columns[role]!r}: {problem}"
    meta = fields.get(columns["meta"])
    if meta is not None and not isinstance(meta, dict):
        return f"field {columns['meta']!r}: must be an object (got {_describe(meta)})"
    if keep_extra and extra:
        meta = {**{name: fields[name] for name in extra}, **(meta or {})}  # the row's own meta wins a clash
    if meta is not None:
        try:
            meta_json(meta)  # what prepare will store: it must not fail there
        except RecursionError:
            return f"field {columns['meta']!r}: nested too deeply to store"
        except ValueError as e:
            return f"field {columns['meta']!r}: cannot be stored as JSON ({one_line(e)})"
        row["meta"] = meta
    return row


def meta_json(meta: dict) -> str:
    """A row's meta as stored in the processed set: ASCII JSON (lone surrogates escaped), NaN as null."""
    return json.dumps(json_safe(meta), ensure_ascii=True, allow_nan=False, default=str)


def text_problem(text: str) -> str | None:
    """Text that would break the tokenizer or the Arrow file (lone surrogates), or that signals corruption (NUL)."""
    if "\x00" in text:
        return f"contains a NUL character at position {text.index(chr(0)) + 1}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"contains a lone surrogate U+{ord(text[e.start]):04X} at position {e.start + 1} (not valid Unicode)"
    return None


def _duplicate(row: Row, id_column: str, id_lines: dict, triple_lines: dict) -> str | None:
    fields = row.fields
    id_key = hashlib.sha256(fields["id"].encode("utf-8", "surrogatepass")).digest()[:_DIGEST_BYTES]
    triple = json.dumps([fields[f] for f in REQUIRED_FIELDS]).encode()  # one unambiguous string for the three
    triple_key = hashlib.sha256(triple).digest()[:_DIGEST_BYTES]
    if id_key in id_lines:
        return f"field {id_column!r}: duplicate id {fields['id'][:80]!r} (first at line {id_lines[id_key]})"
    if triple_key in triple_lines:
        return f"duplicate of the triple at line {triple_lines[triple_key]}"
    id_lines[id_key] = triple_lines[triple_key] = row.line
    return None


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    return f"{type(value).__name__} {_short(value)}"


def _short(value: Any) -> str:
    """repr, bounded: a huge or deeply nested value is never rendered whole (and newlines stay escaped)."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = 40
    short.maxlist = short.maxdict = 4
    short.maxlevel = 2
    return short.repr(value)


