"""Reading raw triples: a file of any size -> one validated row at a time, or a FILE:LINE error.

Formats: JSONL, CSV, Parquet, or a saved HF dataset directory. Text files are read in binary and split on
b"\\n" only, then decoded line by line: `str.splitlines()` would also split on U+2028, U+0085, form feeds and
the like, which are legal inside JSON strings, and every later line number would be wrong. Nothing is held
per row except what a caller keeps: duplicates are found through sha256 digests, not the strings.

Every problem becomes a reason naming the user's own column (`field 'answer': must be a non-empty string`) at
the row's line; a problem with the file itself raises DataError at once. Columns that no role uses are
allowed and counted, so the caller can print one notice per column instead of one per row.
"""

from __future__ import annotations

import csv
import hashlib
import json
import reprlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .rundir import json_safe

REQUIRED_FIELDS = ("input", "response", "witness")
OPTIONAL_FIELDS = ("id", "meta")
DATA_FIELD_ROLES = REQUIRED_FIELDS + OPTIONAL_FIELDS  # what a recipe's data.fields may map
MAX_LISTED_ERRORS = 20
MAX_LINE_BYTES = 64 << 20  # one row; a longer line is rejected (and skipped without being held in memory)
MAX_EXTRA_NAMES = 50  # distinct ignored column names counted by name; more are only counted
RAW_PREVIEW_CHARS = 2000  # how much of an over-long line is read into its row (for the excerpt)
EXCERPT_CHARS = 200  # what the rejects file keeps of a rejected row, after its FILE:LINE and reason
# One field of any reader (a JSONL/CSV field, a Parquet or saved-dataset cell): longer ones are rejected before
# anything is done with them. prepare passes a tighter bound derived from data.max_seq_len (data.field_bound).
MAX_FIELD_CHARS = MAX_LINE_BYTES
BOM = b"\xef\xbb\xbf"
_DIGEST_BYTES = 16  # 128-bit prefixes of sha256: a false "duplicate" is never going to happen
_OTHER_FIELDS = None  # the counter's key for extra field names beyond MAX_EXTRA_NAMES


class DataError(ValueError):
    """Bad input data; the message names the file, line and field. The CLI exits with status 2."""


@dataclass
class Row:
    line: int  # 1-based line (JSONL, CSV: the record's first line) or row number (Parquet, HF dir)
    fields: Any  # as parsed; once valid, our roles: input, response, witness, id (+ meta when present)
    source: Any  # the row as read: its text, or a record (Parquet, HF) turned into JSON only when needed

    @property
    def excerpt(self) -> str:
        """The row's start for the rejects file (EXCERPT_CHARS; bytes that are not valid UTF-8 shown as \\xNN):
        with FILE:LINE that finds the row, and 10,000 rejected 100 KB rows cost 2 MB, not 1 GB."""
        text = self.source if isinstance(self.source, str) else json.dumps(
            {k: v[:EXCERPT_CHARS] if isinstance(v, str) else v for k, v in self.source.items()}
            if isinstance(self.source, dict) else self.source, ensure_ascii=False, default=str)
        cut = text[:EXCERPT_CHARS].encode("utf-8", "backslashreplace").decode("utf-8")
        return cut + ("..." if len(text) > EXCERPT_CHARS else "")


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
        for row, problem in _parsed_rows(self.path, self.columns):
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
            return f"field {columns['meta']!r}: cannot be stored as JSON ({_one_line(e)})"
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


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


# ---- reading files -----------------------------------------------------------------------------------------------


def check_source(path: Path) -> None:
    """File-level problems, found before anything is read or hashed."""
    if path.is_dir():
        return
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.suffix.lower() not in (".jsonl", ".csv", ".parquet"):
        raise DataError(f"{path}: unsupported format '{path.suffix}' (use .jsonl, .csv, .parquet or a dataset dir)")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e})") from None


def _parsed_rows(path: Path, columns: dict[str, str]) -> Iterator[tuple[Row, str | None]]:
    """Rows as parsed (no field checks yet); a read error mid-file is a DataError, not a traceback."""
    try:
        if path.is_dir():
            yield from _dataset_dir_rows(path)
        elif path.suffix.lower() == ".parquet":
            yield from _parquet_rows(path)
        else:
            with open(path, "rb") as f:
                yield from (_jsonl_rows(f) if path.suffix.lower() == ".jsonl" else _csv_rows(f, path, columns))
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e})") from None


def capped_lines(f) -> Iterator[tuple[int, bytes, str | None, bool]]:
    """(number, line without its ending, problem, cut): split on b"\\n" only, at most MAX_LINE_BYTES held.

    An over-long line is skipped to its end chunk by chunk; only its start comes back, with `cut` set.
    """
    number = 0
    while data := f.readline(MAX_LINE_BYTES + 1):
        number += 1
        if number == 1 and data.startswith(BOM):  # a UTF-8 byte-order mark is accepted and dropped
            data = data[len(BOM):]
        if len(data) > MAX_LINE_BYTES and not data.endswith(b"\n"):
            size = len(data)
            while chunk := f.readline(1 << 20):
                size += len(chunk)
                if chunk.endswith(b"\n"):
                    break
            yield number, data[:RAW_PREVIEW_CHARS] + b"...", (
                f"line is {size:,} bytes, over the {MAX_LINE_BYTES:,}-byte limit for one row"), True
            continue
        data = data.removesuffix(b"\n")  # a CR before it stays: JSON ignores it, CSV needs it inside quotes
        problem = None
        if b"\x00" in data:
            problem = (f"NUL byte at column {data.index(0) + 1} (is this a UTF-16 or binary file? re-save it as "
                       "UTF-8 text)")
        yield number, data, problem, False


def _decode(data: bytes, problem: str | None) -> tuple[str, str | None]:
    try:
        return data.decode("utf-8"), problem
    except UnicodeDecodeError as e:
        column = len(data[: e.start].decode("utf-8", "replace")) + 1
        utf16 = " (it looks like UTF-16)" if data.startswith((b"\xff\xfe", b"\xfe\xff")) else ""
        return data.decode("utf-8", "backslashreplace"), problem or (
            f"not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column}){utf16}; re-save the file as UTF-8")


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json keeps the last of two equal keys without a word; which one the writer meant is unknowable."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return result


def parse_json(text: str) -> tuple[Any, str | None]:
    """-> (value, None) or (None, reason). strict=False: raw control characters inside strings are text."""
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicate_keys, strict=False), None
    except _DuplicateKey as e:
        return None, f"field {e.args[0]!r}: appears twice in one JSON object (which value is meant?)"
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at column {e.colno})"
    except RecursionError:
        return None, "invalid JSON (nested too deeply)"
    except ValueError as e:  # integers over 4300 digits, among others
        reason = "a number with more than 4300 digits" if "digits" in str(e) else _one_line(e)
        return None, f"invalid JSON ({reason})"


def _jsonl_rows(f) -> Iterator[tuple[Row, str | None]]:
    for number, data, problem, _ in capped_lines(f):
        if problem is None and not data.strip(b" \t\r"):
            continue  # blank lines are skipped; they still count for the line numbers
        text, problem = _decode(data.removesuffix(b"\r"), problem)  # CRLF files are accepted
        fields = None
        if problem is None:
            fields, problem = parse_json(text)
        yield Row(number, fields, text), problem


class _RecordLines:
    """Feeds decoded lines to csv.reader and remembers those the current record used: its first line number,
    its raw text and the first byte-level problem on any of them."""

    def __init__(self, f):
        self.lines = capped_lines(f)
        self.taken: list[str] = []
        self.first, self.problem = 0, None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        number, data, problem, cut = next(self.lines)
        text, problem = _decode(data, problem)
        if not self.taken:
            self.first = number
        elif problem:
            problem = f"line {number}: {problem}"
        self.taken.append(text)
        self.problem = self.problem or problem
        return "\n" if cut else text + "\n"  # the record is rejected anyway; its start alone could misparse

    def take(self) -> tuple[int, str, str | None]:
        record = (self.first, "\n".join(self.taken), self.problem)
        self.taken, self.problem = [], None
        return record


def _csv_rows(f, path: Path, columns: dict[str, str]) -> Iterator[tuple[Row, str | None]]:
    csv.field_size_limit(max(csv.field_size_limit(), MAX_LINE_BYTES))  # the default (131,072) is too small
    feed = _RecordLines(f)
    reader = csv.reader(feed, strict=True)  # strict: a stray quote is an error, not a silently merged row
    header = None
    while True:
        try:
            values, problem = next(reader), None
        except StopIteration:
            break
        except csv.Error as e:
            reason = "a line break (CR) inside an unquoted field; quote it" if "new-line" in str(e) else _one_line(e)
            values, problem = None, f"invalid CSV ({reason})"
        line, raw, byte_problem = feed.take()
        problem = byte_problem or problem
        if problem is None and len(values) <= 1 and not "".join(values).strip():
            continue  # a blank line
        if header is None:
            if problem:
                raise DataError(f"{path}:{line}: CSV header: {problem}")
            header = _check_header(path, line, values, columns)
            continue
        fields = None
        if problem is None:
            fields, problem = _csv_fields(header, values, columns)
        yield Row(line, fields, raw), problem


def _check_header(path: Path, line: int, names: list[str], columns: dict[str, str]) -> list[str]:
    repeated = [name for name, n in Counter(names).items() if n > 1]
    if repeated:
        raise DataError(f"{path}:{line}: CSV header repeats column {repeated[0]!r}; every column needs its own name")
    missing = [columns[role] for role in REQUIRED_FIELDS if columns[role] not in names]
    if missing:
        raise DataError(f"{path}:{line}: CSV header lacks column(s) {', '.join(map(repr, missing))} "
                        f"(has {', '.join(map(repr, names))}){'' if columns['input'] == 'input' else ' (data.fields)'}")
    return names


def _csv_fields(header: list[str], values: list[str], columns: dict[str, str]) -> tuple[dict | None, str | None]:
    """CSV cells -> fields: an empty id or meta cell means none, and the meta cell holds a JSON object."""
    if len(values) != len(header):
        return None, f"{len(values)} value(s) but the CSV header has {len(header)} columns"
    fields: dict[str, Any] = dict(zip(header, values))
    meta_column = columns["meta"]
    for name in (columns["id"], meta_column):
        if fields.get(name) == "":
            fields[name] = None
    if fields.get(meta_column) is not None:
        fields[meta_column], problem = parse_json(fields[meta_column])
        if problem:
            return None, f"field {meta_column!r}: must be a JSON object ({problem})"
    return fields, None


def _parquet_rows(path: Path) -> Iterator[tuple[Row, str | None]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=64)  # rows as Python objects: few at a time
    except Exception as e:  # pyarrow raises several types for "not Parquet"
        raise DataError(f"{path}: not a readable Parquet file ({_one_line(e)})") from None
    number = 0
    while True:
        try:
            records = next(batches).to_pylist()
        except StopIteration:
            return
        except Exception as e:  # a damaged row group
            raise DataError(f"{path}:{number + 1}: unreadable Parquet data from row {number + 1} on "
                            f"({_one_line(e)})") from None
        for record in records:
            number += 1
            yield Row(number, record, record), None


def _dataset_dir_rows(path: Path) -> Iterator[tuple[Row, str | None]]:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for "not a saved dataset"
        raise DataError(f"{path}: not a saved HF dataset directory ({_one_line(e)})") from None
    if isinstance(dataset, DatasetDict):
        raise DataError(f"{path}: holds the splits {', '.join(dataset)}; point at one split, e.g. "
                        f"{path / next(iter(dataset))}")
    for number, record in enumerate(dataset, start=1):
        yield Row(number, record, record), None
