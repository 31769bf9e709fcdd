"""File formats: JSONL, CSV, Parquet or a saved HF dataset directory -> (Row, problem) pairs, as parsed.

Why a module of its own: this is where bytes become rows, and every format has its own way to go wrong (a line
over the size cap, invalid UTF-8, a stray CSV quote, a damaged Parquet row group); rawdata.py then checks the
rows' fields the same way whatever the format. Text files are read in binary and split on b"\\n" only, then
decoded line by line: `str.splitlines()` would also split on U+2028, U+0085, form feeds and the like, which are
legal inside JSON strings, and every later line number would be wrong.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REQUIRED_FIELDS = ("input", "response", "witness")
MAX_LINE_BYTES = 64 << 20  # one row; a longer line is rejected (and skipped without being held in memory)
RAW_PREVIEW_CHARS = 2000  # how much of an over-long line is read into its row (for the excerpt)
EXCERPT_CHARS = 200  # what the rejects file keeps of a rejected row, after its FILE:LINE and reason
BOM = b"\xef\xbb\xbf"


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


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


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


def parsed_rows(path: Path, columns: dict[str, str]) -> Iterator[tuple[Row, str | None]]:
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
        reason = "a number with more than 4300 digits" if "digits" in str(e) else one_line(e)
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
            reason = "a line break (CR) inside an unquoted field; quote it" if "new-line" in str(e) else one_line(e)
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
        raise DataError(f"{path}: not a readable Parquet file ({one_line(e)})") from None
    number = 0
    while True:
        try:
            records = next(batches).to_pylist()
        except StopIteration:
            return
        except Exception as e:  # a damaged row group
            raise DataError(f"{path}:{number + 1}: unreadable Parquet data from row {number + 1} on "
                            f"({one_line(e)})") from None
        for record in records:
            number += 1
            yield Row(number, record, record), None


def _dataset_dir_rows(path: Path) -> Iterator[tuple[Row, str | None]]:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for "not a saved dataset"
        raise DataError(f"{path}: not a saved HF dataset directory ({one_line(e)})") from None
    if isinstance(dataset, DatasetDict):
        raise DataError(f"{path}: holds the splits {', '.join(dataset)}; point at one split, e.g. "
                        f"{path / next(iter(dataset))}")
    for number, record in enumerate(dataset, start=1):
        yield Row(number, record, record), None
