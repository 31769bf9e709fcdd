"""Hostile data: every input either trains correctly or gets FILE:LINE errors; never a traceback, never a
silent drop, never a shifted line number. Named cases seen in real files, then property-based fuzzing."""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import tempfile
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tear_lora.data import rawdata, readers
from tear_lora.data.prepare import DataError, TripleReader, load_triples, prepare

from ..conftest import make_recipe

GOOD = {"input": "Can I freeze milk?", "response": " Yes, up to three months.", "witness": " It thawed fine."}


_numbers = itertools.count()


def row(**changes) -> dict:
    """A good row with an input of its own (so rows never duplicate by accident), changed as asked."""
    return {**GOOD, "input": f"question {next(_numbers)}?", **changes}


def line(value, ascii_only=True) -> bytes:
    """A JSONL line (with its newline); strings are emitted as-is, so a test can write broken JSON."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=ascii_only)
    return text.encode("utf-8", "surrogatepass") + b"\n"


def rows(*values) -> bytes:
    return b"".join(line(value) for value in values)


def csv_text(*records, header=("input", "response", "witness"), terminator="\n") -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=terminator)
    if header:
        writer.writerow(header)
    writer.writerows(records)
    return buffer.getvalue().encode("utf-8")


@dataclass
class Case:
    data: bytes
    good: list[int] = field(default_factory=list)  # lines that must train
    bad: dict[int, str] = field(default_factory=dict)  # line -> a piece of its reason
    suffix: str = ".jsonl"
    error: str | None = None  # a file-level DataError (regex, after "<path>")
    fields: dict | None = None
    notices: list[str] = field(default_factory=list)
    max_line: int | None = None  # MAX_LINE_BYTES for this case, so over-long lines are cheap to make


TOO_LONG = 2000

CASES = {
    # line separators that str.splitlines() would split on, inside JSON strings
    "u2028_u2029_in_string": Case(rows(row(input="a\u2028b\u2029c"), row()).replace(b"\\u2028", "\u2028".encode())
                                  .replace(b"\\u2029", "\u2029".encode()), good=[1, 2]),
    "u0085_nel_in_string": Case(line(row(input="a\x85b"), ascii_only=False) + rows(row()), good=[1, 2]),
    "raw_vt_ff_in_string": Case(rows(row()) + b'{"input": "a\x0bb\x0cc", "response": "r", "witness": "w"}\n'
                                + rows(row(witness="x")), good=[1, 2, 3]),
    "raw_fs_gs_rs_in_string": Case(b'{"input": "\x1c\x1d\x1e!", "response": "r", "witness": "w"}\n' + rows(row()),
                                   good=[1, 2]),
    "escaped_separators": Case(rows(row(input="a\u2028\x0b\x1e\x85b"), row()), good=[1, 2]),
    "u2028_outside_string": Case(rows(row()) + '{"input": "a",\u2028"response": "r", "witness": "w"}\n'.encode()
                                 + rows(row(witness="z")), good=[1, 3], bad={2: "invalid JSON"}),
    "lone_surrogate_input": Case(rows(row(), row(input="x\ud800y")), good=[1],
                                 bad={2: "field 'input': contains a lone surrogate U+D800 at position 2"}),
    "lone_low_surrogate_response": Case(rows(row(response="\udfff")), bad={1: "field 'response': contains a lone"}),
    "lone_surrogate_id": Case(rows(row(id="\ud800"), row()), good=[2], bad={1: "field 'id': contains a lone"}),
    "surrogate_pair_is_fine": Case(rows(row(input="emoji \U0001f600")), good=[1]),
    "int_over_4300_digits": Case(rows(row()) + b'{"input": 1' + b"0" * 5000 + b', "response": "r", "witness": "w"}\n',
                                 good=[1], bad={2: "invalid JSON (a number with more than 4300 digits)"}),
    "int_over_4300_digits_in_meta": Case(b'{"input":"q","response":"r","witness":"w","meta":{"n":' + b"9" * 4400
                                         + b"}}\n", bad={1: "more than 4300 digits"}),
    "deeply_nested": Case(rows(row()) + b'{"input": "q", "response": "r", "witness": "w", "meta": ' + b"[" * 100_000
                          + b"]" * 100_000 + b"}\n" + rows(row(input="z")), good=[1, 3],
                          bad={2: "invalid JSON (nested too deeply)"}),
    "duplicate_key": Case(b'{"input": "a", "input": "b", "response": "r", "witness": "w"}\n',
                          bad={1: "field 'input': appears twice"}),
    "duplicate_key_nested": Case(b'{"input": "a", "response": "r", "witness": "w", "meta": {"k": 1, "k": 2}}\n',
                                 bad={1: "field 'k': appears twice"}),
    "meta_deeper_than_storable": Case(b'{"input": "q", "response": "r", "witness": "w", "meta": {"a": ' + b"[" * 800
                                      + b"]" * 800 + b"}}\n" + rows(row()), good=[2],
                                      bad={1: "field 'meta': nested too deeply to store"}),
    "nul_byte_raw": Case(rows(row()) + b'{"input": "a\x00", "response": "r", "witness": "w"}\n', good=[1],
                         bad={2: "NUL byte at column 13"}),
    "nul_escaped": Case(rows(row(witness="a\x00b")), bad={1: "field 'witness': contains a NUL character"}),
    "invalid_utf8_middle": Case(rows(row(), row()) + b'{"input": "caf\xe9", "response": "r", "witness": "w"}\n'
                                + rows(row(input="x"), row(input="y")), good=[1, 2, 4, 5],
                                bad={3: "not valid UTF-8 (byte 0xe9 at column 15)"}),
    "truncated_utf8_last_line": Case(rows(row()) + b'{"input": "\xe2\x80', good=[1], bad={2: "not valid UTF-8"}),
    "utf16_file": Case(json.dumps(GOOD).encode("utf-16"), bad={1: "UTF-16"}),
    "crlf_and_bom": Case(b"\xef\xbb\xbf" + rows(row()).replace(b"\n", b"\r\n") + rows(row(input="b")), good=[1, 2]),
    "bom_alone_on_first_line": Case(b"\xef\xbb\xbf\n" + rows(row()), good=[2]),
    "bom_on_later_line": Case(rows(row()) + b"\xef\xbb\xbf" + rows(row(input="b")), good=[1], bad={2: "BOM"}),
    "no_final_newline": Case(rows(row(), row(input="b"))[:-1], good=[1, 2]),
    "blank_lines_keep_numbering": Case(b"\n" + rows(row()) + b"  \n\t\n\r\n" + rows(row(witness="")), good=[2],
                                       bad={6: "field 'witness': must be a non-empty string"}),
    "lone_cr_between_tokens": Case(b'{"input": "q",\r"response": "r", "witness": "w"}\n', good=[1]),
    "array_line": Case(rows(row(), [GOOD["input"], "r", "w"]), good=[1], bad={2: "expected an object"}),
    "string_line": Case(rows('"just text"'), bad={1: "got str 'just text'"}),
    "null_line": Case(rows("null"), bad={1: "got null"}),
    "number_line": Case(rows("42"), bad={1: "got int 42"}),
    "field_number": Case(rows(row(input=3)), bad={1: "field 'input': must be a non-empty string (got int 3)"}),
    "field_float_nan": Case(rows('{"input": NaN, "response": "r", "witness": "w"}'), bad={1: "got float nan"}),
    "field_list": Case(rows(row(response=["a"])), bad={1: "field 'response': must be a non-empty string (got list"}),
    "field_null": Case(rows(row(witness=None)), bad={1: "field 'witness': must be a non-empty string (got null)"}),
    "field_bool": Case(rows(row(input=True)), bad={1: "(got bool True)"}),
    "field_object": Case(rows(row(input={"a": 1})), bad={1: "(got dict {'a': 1})"}),
    "field_whitespace_only": Case(rows(row(response=" \t\r\n ")), bad={1: "field 'response': must be a non-empty"}),
    "field_unicode_whitespace_only": Case(rows(row(response="\u2028\u3000\x85")), bad={1: "must be a non-empty"}),
    "field_missing": Case(rows({"input": "q", "response": "r"}), bad={1: "field 'witness': must be a non-empty "
                                                                      "string (missing)"}),
    "huge_field_value_reported_short": Case(rows(row(input=[1] * 100_000)), bad={1: "got list [1, 1, 1, 1, ...]"}),
    "truncated_json": Case(rows(row()) + b'{"input": "q", "resp\n' + rows(row(input="z")), good=[1, 3],
                           bad={2: "invalid JSON"}),
    "trailing_garbage": Case(rows(json.dumps(GOOD) + " x"), bad={1: "invalid JSON (Extra data"}),
    "id_bool": Case(rows(row(id=True)), bad={1: "field 'id': must be a non-empty string or an integer"}),
    "id_float": Case(rows(row(id=1.5)), bad={1: "field 'id': must be"}),
    "id_blank": Case(rows(row(id="  ")), bad={1: "field 'id': must be"}),
    "id_int_and_null_ok": Case(rows(row(id=7), row(id=None)), good=[1, 2]),
    "meta_not_object": Case(rows(row(meta=[1, 2])), bad={1: "field 'meta': must be an object (got list"}),
    "duplicate_id": Case(rows(row(id="a"), row(id="a")), good=[1], bad={2: "duplicate id 'a' (first at line 1)"}),
    "duplicate_triple": Case(rows(row(input="same"), row(input="b"), row(id="x", input="same")), good=[1, 2],
                             bad={3: "duplicate of the triple at line 1"}),
    "extra_fields_one_notice_each": Case(rows(*[row(source="web", score=i) for i in range(5)]), good=[1, 2, 3, 4, 5],
                                         notices=["ignored field 'source' in 5 rows", "ignored field 'score' in 5 rows"]),
    "line_over_limit": Case(rows(row(), row(input="x" * TOO_LONG), row(input="z")), good=[1, 3],
                            bad={2: "over the 2,000-byte limit"}, max_line=TOO_LONG),
    "line_over_limit_without_newline": Case(rows(row()) + b"x" * (TOO_LONG * 3), good=[1], bad={2: "over the"},
                                            max_line=TOO_LONG),
    "line_just_under_limit": Case(rows(row(input="y" * (TOO_LONG - 100))), good=[1], max_line=TOO_LONG),
    "csv_line_over_limit": Case(csv_text(["a", "b", "c"], ["x" * TOO_LONG, "r", "w"], ["q", "r", "w"]),
                                suffix=".csv", good=[2, 4], bad={3: "over the 2,000-byte limit"}, max_line=TOO_LONG),
    "mapped_fields_name_user_columns": Case(rows({"prompt": "q", "answer": "", "outcome": "o"},
                                                 {"prompt": "q", "answer": "a", "outcome": "o", "input": "x"}),
                                            good=[2], bad={1: "field 'answer': must be a non-empty string"},
                                            fields={"input": "prompt", "response": "answer", "witness": "outcome"},
                                            notices=["ignored field 'input' in 1 row "]),
    # file-level
    "empty_file": Case(b"", error=r":1: no rows"),
    "only_bom_and_blanks": Case(b"\xef\xbb\xbf\n \n", error=r":1: no rows"),
    "unsupported_suffix": Case(rows(row()), suffix=".json", error=r": unsupported format '.json'"),
    # CSV
    "csv_multiline_and_separators": Case(csv_text(["multi\r\nline \u2028 \x85", "r", "w"], ["b", "r", "w"],
                                                  terminator="\r\n"), suffix=".csv", good=[2, 4]),
    "csv_field_over_131072_chars": Case(csv_text(["x" * 200_000, "r", "w"], ["q", "r", "w"]), suffix=".csv",
                                        good=[2, 3]),
    "csv_duplicate_header": Case(csv_text(["a", "b", "c"], header=("input", "response", "input")), suffix=".csv",
                                 error=r":1: CSV header repeats column 'input'"),
    "csv_missing_column": Case(csv_text(["a", "b"], header=("input", "response")), suffix=".csv",
                               error=r":1: CSV header lacks column\(s\) 'witness'"),
    "csv_header_after_blank_lines": Case(b"\n\n" + csv_text(["a", "b", "c"]) + b"\n" + csv_text(["", "b", "c"],
                                         header=None), suffix=".csv", good=[4], bad={6: "field 'input'"}),
    "csv_too_many_values": Case(csv_text(["a", "b", "c", "d"], ["q", "r", "w"]), suffix=".csv", good=[3],
                                bad={2: "4 value(s) but the CSV header has 3 columns"}),
    "csv_too_few_values": Case(csv_text(["a", "b"]), suffix=".csv", bad={2: "2 value(s) but"}),
    "csv_empty_cell": Case(csv_text(["a", "", "c"]), suffix=".csv", bad={2: "field 'response': must be a non-empty "
                                                                         "string (got str '')"}),
    "csv_bare_cr_in_unquoted_field": Case(csv_text(["a", "b", "c"]) + b"x,y\rz,w\n" + csv_text(["q", "r", "w"],
                                          header=None), suffix=".csv", good=[2, 4],
                                          bad={3: "line break (CR) inside an unquoted field"}),
    "csv_unterminated_quote": Case(csv_text(["a", "b", "c"]) + b'q,"r,w\n', suffix=".csv", good=[2],
                                   bad={3: "invalid CSV (unexpected end of data)"}),
    "csv_nul_byte": Case(csv_text(["a\x00", "b", "c"], ["q", "r", "w"]), suffix=".csv", good=[3],
                         bad={2: "NUL byte"}),
    "csv_invalid_utf8": Case(csv_text(["a", "b", "c"]) + b"caf\xe9,r,w\n" + csv_text(["q", "r", "w"], header=None),
                             suffix=".csv", good=[2, 4], bad={3: "not valid UTF-8 (byte 0xe9 at column 4)"}),
    "csv_invalid_utf8_inside_multiline_record": Case(csv_text(["a", "b", "c"]) + b'"x\ncaf\xe9",r,w\n',
                                                     suffix=".csv", good=[2], bad={3: "line 4: not valid UTF-8"}),
    "csv_meta_not_json": Case(csv_text(["a", "b", "c", "{oops"], ["q", "r", "w", '{"k": 1}'],
                                       header=("input", "response", "witness", "meta")), suffix=".csv", good=[3],
                              bad={2: "field 'meta': must be a JSON object"}),
    "csv_header_only": Case(csv_text(), suffix=".csv", error=r":1: no rows"),
    "csv_bom_crlf_and_empty_id": Case(b"\xef\xbb\xbf" + csv_text(["a", "b", "c", ""], ["q", "r", "w", "7"],
                                      header=("input", "response", "witness", "id"), terminator="\r\n"),
                                      suffix=".csv", good=[2, 3]),
    "csv_mapped_columns_and_extra": Case(csv_text(["q", "", "o", "web"], ["q", "a", "o", "web"],
                                                  header=("prompt", "answer", "outcome", "source")), suffix=".csv",
                                         good=[3], bad={2: "field 'answer'"},
                                         fields={"input": "prompt", "response": "answer", "witness": "outcome"},
                                         notices=["ignored field 'source' in 2 rows"]),
    "csv_unnamed_extra_column": Case(b"input,response,witness,\nq,r,w,\nq2,r,w,x\n", suffix=".csv", good=[2, 3],
                                     notices=["ignored field '' in 2 rows"]),
    "csv_quoted_cr_and_crlf_kept": Case(b'input,response,witness\r\n"a\rb\r\nc",r,w\r\n', suffix=".csv", good=[2]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_case(name, tmp_path, monkeypatch):
    case = CASES[name]
    if case.max_line:
        monkeypatch.setattr(readers, "MAX_LINE_BYTES", case.max_line)
    path = tmp_path / f"d{case.suffix}"
    path.write_bytes(case.data)
    if case.error:
        with pytest.raises(DataError) as err:
            load_triples(path, fields=case.fields)
        assert re.match(re.escape(str(path)) + case.error, str(err.value)), str(err.value)
        return
    notices: list[str] = []
    kept, rejects = load_triples(path, skip_invalid=True, fields=case.fields, notices=notices)
    assert [r.line for r in kept] == case.good
    assert {r.line: r.reason for r in rejects}.keys() == case.bad.keys(), [(r.line, r.reason) for r in rejects]
    for reject in rejects:
        assert case.bad[reject.line] in reject.reason, reject.reason
        json.dumps(reject.as_dict(), ensure_ascii=False).encode("utf-8")  # the rejects file can hold it
    for expected in case.notices:
        assert any(expected in n for n in notices), notices
    if case.bad:
        assert_error_lines(path, lambda: load_triples(path, fields=case.fields), sorted(case.bad))


def assert_error_lines(path: Path, call, bad_lines: list[int]) -> None:
    """Without skip_invalid: a DataError whose every line is '<path>:<line>: ...', listing the first bad rows."""
    with pytest.raises(DataError) as err:
        call()
    lines = str(err.value).splitlines()
    pattern = re.compile(re.escape(str(path)) + r":(\d+): ")
    assert all(pattern.match(text) for text in lines), lines
    listed = [int(pattern.match(text).group(1)) for text in lines[1 : 1 + rawdata.MAX_LISTED_ERRORS]]
    assert listed == bad_lines[: rawdata.MAX_LISTED_ERRORS]
    assert int(pattern.match(lines[0]).group(1)) == bad_lines[0]
    assert f"{len(bad_lines)} invalid row(s)" in lines[0]


def test_hostile_cases_are_many():
    assert len(CASES) >= 40


def test_rows_keep_their_text_exactly(tmp_path):
    weird = "a\u2028b\x85c\x0bd\x0ce\x1cf\x1dg\x1eh\u2029i\r\nj\rk"
    path = tmp_path / "w.jsonl"
    path.write_bytes(line(row(input=weird), ascii_only=False))
    assert load_triples(path)[0][0].fields["input"] == weird
    path = tmp_path / "w.csv"
    path.write_bytes(b'input,response,witness\r\n"' + weird.encode() + b'",r,w\r\n')  # CR, CRLF kept in quotes
    assert load_triples(path)[0][0].fields["input"] == weird


def test_more_than_twenty_errors_are_counted_with_the_line_of_the_rest(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_bytes(rows(*[row(witness="") for _ in range(30)]))
    with pytest.raises(DataError) as err:
        load_triples(path)
    lines = str(err.value).splitlines()
    assert len(lines) == 22 and lines[-1] == f"{path}:21: ... and 10 more invalid row(s) from this line on"


def test_keep_extra_fields_puts_them_in_meta(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(rows(row(source="web", meta={"domain": "advice", "source": "mine"})))
    kept, _ = load_triples(path, keep_extra_fields=True)
    assert kept[0].fields["meta"] == {"domain": "advice", "source": "mine"}  # the row's own meta wins a clash
    kept, _ = load_triples(path)
    assert kept[0].fields["meta"] == {"domain": "advice", "source": "mine"}
    path.write_bytes(rows(row(source="web", n=1)))
    assert load_triples(path, keep_extra_fields=True)[0][0].fields["meta"] == {"source": "web", "n": 1}
    assert "meta" not in load_triples(path)[0][0].fields


def test_directory_and_unreadable_files(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataError, match=r"dir.jsonl: not a saved HF dataset directory"):
        load_triples(tmp_path / "dir.jsonl")
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([GOOD])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"dd: holds the splits train; point at one split"):
        load_triples(tmp_path / "dd")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"bad.parquet: not a readable Parquet file"):
        load_triples(tmp_path / "bad.parquet")
    link = tmp_path / "dangling.jsonl"
    link.symlink_to(tmp_path / "nowhere.jsonl")
    with pytest.raises(DataError, match="file not found"):
        load_triples(link)


def test_parquet_rows_with_wrong_types_name_their_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"input": ["q", None, "q3"], "response": ["r", "r", "r"], "witness": ["w", "w", "w"],
                      "id": [1, 2, None], "extra": [1.5, 2.5, 3.5]})
    pq.write_table(table, tmp_path / "t.parquet")
    notices: list[str] = []
    kept, rejects = load_triples(tmp_path / "t.parquet", skip_invalid=True, notices=notices)
    assert [r.fields["id"] for r in kept] == ["1", "t-3"]
    assert [(r.line, r.reason) for r in rejects] == [(2, "field 'input': must be a non-empty string (got null)")]
    assert notices == [f"{tmp_path / 't.parquet'}: ignored field 'extra' in 3 rows (map it with data.fields or keep "
                       "it with data.keep_extra_fields)"]


def test_reader_streams_a_big_file(tmp_path):
    """~30 MB of rows: the reader's peak memory stays a small fraction of the file (it holds one line at a time
    plus 16-byte digests per row, never the text)."""
    path = tmp_path / "big.jsonl"
    filler = "lorem ipsum dolor sit amet " * 110  # ~3 KB rows, as in real datasets
    with open(path, "w", encoding="utf-8") as f:
        for i in range(10_000):
            f.write(json.dumps({"input": f"{i} {filler}", "response": "r", "witness": "w"}) + "\n")
    size = path.stat().st_size
    assert size > 29_000_000
    tracemalloc.start()
    try:
        good = sum(problem is None for _, problem in TripleReader(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert good == 10_000
    assert peak < size / 10, f"peak {peak:,} bytes for a {size:,}-byte file"


# ---- through prepare, with the tokenizer ---------------------------------------------------------------------


def test_prepare_hostile_rows_train_or_land_in_rejects(tmp_path, tokenizer, tiny_model_dir):
    weird = "a\u2028b\x85c"
    data = (line(row(input=weird), ascii_only=False) + rows(row(input="x\ud800")) + b"\n"
            + b'{"input": "caf\xe9"}\n' + rows(row(witness="<|witness|> quoted", source="web")))
    path = tmp_path / "h.jsonl"
    path.write_bytes(data)
    recipe = make_recipe(tiny_model_dir, tmp_path, data={"skip_invalid": True, "keep_extra_fields": True})
    prepared = prepare(path, tokenizer, recipe)
    assert prepared.manifest["rows_kept"] == 2 and prepared.manifest["rows_read"] == 4
    assert [r["line"] for r in prepared.manifest["rejects"]] == [2, 4]
    first = prepared.dataset[0]
    assert weird in tokenizer.decode(first["input_ids"])
    assert json.loads(prepared.dataset[1]["meta"]) == {"source": "web"} and prepared.dataset[0]["meta"] is None
    rejects = [json.loads(x) for x in (prepared.out_dir / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in rejects] == [2, 4] and rejects[1]["excerpt"] == '{"input": "caf\\xe9"}'
    assert "field 'input': contains a lone surrogate" in rejects[0]["reason"]


def test_prepare_long_input_is_trimmed_up_to_the_bound_and_refused_beyond(tmp_path, tokenizer, tiny_model_dir):
    """Up to data.field_bound (64 tokens x 128 characters here) a long input is trimmed from the left and kept;
    a 1 MB one is refused at its line, never tokenized (issue 20: that cost +220 bytes per character)."""
    path = tmp_path / "huge.jsonl"
    path.write_bytes(rows(row(input="word " * 1600), row(input="word " * 200_000, id="big")))  # 8 KB, 1 MB
    recipe = make_recipe(tiny_model_dir, tmp_path, data={"max_seq_len": 64, "skip_invalid": True})
    prepared = prepare(path, tokenizer, recipe)
    assert len(prepared.dataset) == 1 and len(prepared.dataset[0]["input_ids"]) == 64
    assert prepared.manifest["rows_trimmed"] == 1
    assert [r["line"] for r in prepared.manifest["rejects"]] == [2] and "bound" in prepared.manifest["rejects"][0]["reason"]


# ---- property-based fuzzing ------------------------------------------------------------------------------------

WEIRD = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e\r\t\x00\ufeff\u200b\u3000 é😀<|witness|>\"\\,"
text_values = st.text(alphabet=st.one_of(st.characters(), st.sampled_from(WEIRD),
                                         st.characters(categories=["Cs"])), max_size=12)
field_values = st.one_of(text_values, text_values, st.integers(), st.none(), st.booleans(),
                         st.lists(st.integers(), max_size=2), st.floats())


def valid_text(value) -> bool:
    """The rule for a required field, stated independently of the implementation."""
    return (isinstance(value, str) and bool(value.strip()) and "\x00" not in value
            and not any(0xD800 <= ord(c) <= 0xDFFF for c in value))


@st.composite
def jsonl_file(draw):
    """-> (bytes, {line: True good / False bad / None either}); blank lines get no entry."""
    out, labels, seen_ids, seen_triples = b"", {}, set(), set()
    for number in range(1, draw(st.integers(1, 12)) + 1):
        kind = draw(st.sampled_from(["row", "row", "row", "blank", "garbage", "nonobject", "dupkey", "bytes"]))
        if kind == "blank":
            out += draw(st.sampled_from([b"", b" ", b"\t", b"\r"])) + b"\n"
            continue
        if kind == "row":
            values = draw(st.sampled_from([text_values, text_values, field_values]))  # mostly text: some rows good
            fields = {name: draw(values) for name in ("input", "response", "witness")}
            if draw(st.booleans()):
                fields["id"] = draw(st.sampled_from(["a", "b", 1]))
            text = json.dumps(fields, ensure_ascii=draw(st.booleans()), allow_nan=True)
            if draw(st.booleans()):  # raw control characters instead of \u escapes (json strict=False reads them)
                text = RAW_CONTROL.sub(lambda m: m.group(1) + chr(int(m.group(2), 16)), text)
            data = text.encode("utf-8", "surrogatepass")
            good = all(valid_text(fields[n]) for n in ("input", "response", "witness"))
            if good:
                row_id = str(fields.get("id", f"d-{number}"))
                triple = tuple(fields[n] for n in ("input", "response", "witness"))
                good = row_id not in seen_ids and triple not in seen_triples
                if good:
                    seen_ids.add(row_id)
                    seen_triples.add(triple)
            labels[number] = good
        elif kind == "garbage":  # "[" + anything is either invalid JSON or a list: never a row
            data, labels[number] = ("[" + draw(text_values).replace("\n", " ")).encode("utf-8", "surrogatepass"), False
        elif kind == "nonobject":
            value = draw(st.one_of(st.integers(), st.text(max_size=5), st.lists(st.booleans(), max_size=3)))
            data, labels[number] = json.dumps(value).encode(), False
        elif kind == "dupkey":
            data, labels[number] = b'{"input": "q", "response": "r", "witness": "w", "input": "q2"}', False
        else:
            data = draw(st.binary(max_size=40)).replace(b"\n", b"")
            if data.removeprefix(b"\xef\xbb\xbf" if number == 1 else b"").strip(b" \t\r"):
                labels[number] = None  # anything but a blank line: good or bad, but reported at this line
        out += data + b"\n"
    return out, labels


RAW_CONTROL = re.compile(r"(?<!\\)((?:\\\\)*)\\u00(0[1-9bcef]|1[0-9a-f])")  # an escape, not an escaped backslash


@st.composite
def csv_file(draw):
    """-> (bytes, {record's first line: good?}); records span lines when a value holds a line break."""
    out, terminator = io.StringIO(), draw(st.sampled_from(["\n", "\r\n"]))
    csv.writer(out, lineterminator=terminator).writerow(["input", "response", "witness"])
    labels, seen = {}, set()
    for _ in range(draw(st.integers(1, 8))):
        number = out.getvalue().count("\n") + 1
        values = [draw(text_values) for _ in range(draw(st.sampled_from([3, 3, 3, 2])))]
        quoting = csv.QUOTE_ALL if any("\r" in v for v in values) else csv.QUOTE_MINIMAL  # a bare CR is malformed
        csv.writer(out, lineterminator=terminator, quoting=quoting).writerow(values)
        labels[number] = len(values) == 3 and all(valid_text(v) for v in values) and tuple(values) not in seen
        if labels[number]:
            seen.add(tuple(values))
    return out.getvalue().encode("utf-8", "surrogatepass"), labels


def check_outcome(path: Path, labels: dict[int, bool | None], call) -> None:
    """`call(skip_invalid)` -> (kept lines, rejected lines): exactly the good lines are kept and exactly the bad
    ones rejected; without skip_invalid, a DataError lists the rejected lines (and nothing else is raised)."""
    if not labels:
        with pytest.raises(DataError, match=re.escape(str(path)) + r":1: no rows"):
            call(True)
        return
    kept, rejected = call(True)
    for number, good in labels.items():
        if good is not None:
            assert (number in kept) == good and (number in rejected) != good, (number, good, kept, rejected)
    assert sorted(kept + rejected) == sorted(labels)
    if rejected:
        assert_error_lines(path, lambda: call(False), sorted(rejected))
    else:
        call(False)


FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def write_temp(directory: str, suffix: str, data: bytes) -> Path:
    path = Path(directory) / f"d{suffix}"
    path.write_bytes(data)
    return path


def loader(path: Path):
    def call(skip: bool):
        kept, rejects = load_triples(path, skip_invalid=skip)
        return [r.line for r in kept], [r.line for r in rejects]
    return call


@FUZZ
@given(jsonl_file())
def test_fuzz_jsonl_rows(file):
    data, labels = file
    with tempfile.TemporaryDirectory() as directory:
        path = write_temp(directory, ".jsonl", data)
        check_outcome(path, labels, loader(path))


@FUZZ
@given(csv_file())
def test_fuzz_csv_rows(file):
    data, labels = file
    with tempfile.TemporaryDirectory() as directory:
        path = write_temp(directory, ".csv", data)
        check_outcome(path, labels, loader(path))


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([".jsonl", ".csv"]))
def test_fuzz_random_bytes_never_crash(data, suffix):
    """Arbitrary bytes: rows or DataError, nothing else; every error line names the file and a real line."""
    last_line = data.count(b"\n") + 1
    with tempfile.TemporaryDirectory() as directory:
        path = write_temp(directory, suffix, data)
        for skip in (True, False):
            try:
                kept, rejects = load_triples(path, skip_invalid=skip)
            except DataError as e:
                for text in str(e).splitlines():
                    match = re.match(re.escape(str(path)) + r":(\d+): ", text)
                    assert match and 1 <= int(match.group(1)) <= last_line, text
            else:
                assert all(1 <= r.line <= last_line for r in kept + rejects)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(jsonl_file())
def test_fuzz_prepare_with_tokenizer(tokenizer, tiny_model_dir, file):
    """The same property through prepare (tokenizing, caching): dataset rows are exactly the good lines, in order."""
    data, labels = file
    lines = data.split(b"\n")
    with tempfile.TemporaryDirectory() as directory:
        path = write_temp(directory, ".jsonl", data)
        recipe = make_recipe(tiny_model_dir, Path(directory), data={"max_seq_len": 4096})

        def call(skip: bool):
            try:
                prepared = prepare(path, tokenizer, recipe, skip_invalid=skip)
            except DataError as e:
                if skip and "no usable rows" in str(e):  # every row was bad: named at the first of them
                    assert re.match(re.escape(str(path)) + rf":{min(labels)}: no usable rows", str(e))
                    return [], sorted(labels)
                raise
            rejected = [r["line"] for r in prepared.manifest["rejects"]]
            kept = sorted(set(labels) - set(rejected))
            assert prepared.manifest["rows_read"] == len(labels) and len(prepared.dataset) == len(kept)
            ids = [str(json.loads(lines[n - 1], strict=False).get("id", f"d-{n}")) for n in kept]
            assert prepared.dataset["id"] == ids
            return kept, rejected

        check_outcome(path, labels, call)


# ---- bounded memory on hostile data (issue 20) -----------------------------------------------------------------


def test_a_field_beyond_the_bound_is_refused_before_it_is_tokenized(tmp_path, tokenizer, tiny_model_dir,
                                                                      monkeypatch):
    """max_seq_len 256 x the longest token (128 chars) = 32,768 characters: a longer field can never fit, and is
    rejected at its FILE:LINE without reaching the tokenizer, in every reader."""
    from tear_lora.data import prepare as data

    bound = data.field_bound(tokenizer, 256)
    assert bound == 256 * max(map(len, tokenizer.get_vocab()))
    huge = "word " * (bound // 5 + 10)
    encoded = []
    original = data.tokenize_row
    monkeypatch.setattr(data, "tokenize_row", lambda tok, fields, **kw: encoded.append(len(fields["input"]))
                        or original(tok, fields, **kw))
    path = tmp_path / "h.jsonl"
    path.write_bytes(rows(row(), row(input=huge), row(input="another")))
    recipe = make_recipe(tiny_model_dir, tmp_path, data={"skip_invalid": True, "max_seq_len": 256})
    prepared = prepare(path, tokenizer, recipe, save=False)
    assert prepared.manifest["rows_rejected"] == 1 and max(encoded) < 100  # the huge field was never tokenized
    assert prepared.manifest["rejects"][0]["line"] == 2
    assert f"over the {bound:,}-character bound" in prepared.manifest["rejects"][0]["reason"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"input": ["ok", huge], "response": ["r", "r"], "witness": ["w", "w"]})
    pq.write_table(table, tmp_path / "h.parquet")
    _, rejects = load_triples(tmp_path / "h.parquet", skip_invalid=True, max_field_chars=bound)
    assert [r.line for r in rejects] == [2] and "character bound" in rejects[0].reason


def test_rejects_keep_a_short_excerpt_not_the_row(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(rows(row(), *[row(witness="", input="x" * 100_000, id=str(i)) for i in range(20)]))
    _, rejects = load_triples(path, skip_invalid=True)
    assert len(rejects) == 20 and all(len(r.excerpt) <= rawdata.EXCERPT_CHARS + 3 for r in rejects)
    assert rejects[0].excerpt.startswith('{"input": "xxx') and rejects[0].excerpt.endswith("...")


def test_prompts_are_streamed_with_the_line_cap(tmp_path, monkeypatch):
    from tear_lora.study.compare import read_prompts

    path = tmp_path / "p.txt"
    path.write_bytes(b"first\r\n\nsecond\n" + b"x" * 2000 + b"\n")
    assert [p["input"] for p in read_prompts(path)] == ["first", "second", "x" * 2000]
    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 1000)
    with pytest.raises(DataError, match=r"p.txt:4: line is 2,001 bytes, over the 1,000-byte limit"):
        read_prompts(path)
