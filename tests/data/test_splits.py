"""`tear-lora split-domains`: the leave-domains-out split is an exact partition by meta.domain, and user mistakes
stop with one line and write nothing."""

import json

import pytest

from tear_lora.cli import main
from tear_lora.data.prepare import load_triples

from ..conftest import REPO

BUNDLED = [REPO / "data/raw" / name for name in ("consequences.jsonl", "eval.jsonl", "contrast.jsonl",
                                                  "minimal_pairs.jsonl")]
HELD_OUT = {"code", "relationships"}


def _ids(path):
    return {row.fields["id"]: row.fields for row in load_triples(path)[0]}


def test_split_is_an_exact_partition_by_domain(tmp_path, capsys):
    out = tmp_path / "split"
    assert main(["split-domains", *map(str, BUNDLED), "--hold-out", " code,relationships", "--out", str(out),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    for source, entry in zip(BUNDLED, summary):
        original, kept, held = _ids(source), _ids(entry["in"]["path"]), _ids(entry["out"]["path"])
        assert entry["in"]["rows"] == len(kept) and entry["out"]["rows"] == len(held) and held and kept
        assert not set(kept) & set(held) and {**kept, **held} == original  # every row, unchanged, exactly once
        assert {r["meta"]["domain"] for r in held.values()} == HELD_OUT
        assert not {r["meta"]["domain"] for r in kept.values()} & HELD_OUT
    assert sorted(p.name for p in out.iterdir()) == sorted([".tear_lora_complete", "split.json", *(
        f"{s.stem}.{side}.jsonl" for s in BUNDLED for side in ("in", "out"))])


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROW = {"input": "What now?", "response": "Wait.", "witness": "Nothing happened."}


@pytest.mark.parametrize("case, expected", [
    ("unknown", "no row has meta.domain 'cod'; the files hold 'a', 'b'"),
    ("no-domain", "a.jsonl:2: no meta.domain"),
    ("clash", "is not a finished tear_lora domain split"),
    ("empty", "name at least one meta.domain"),
])
def test_user_errors_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, case, expected):
    rows = [{**ROW, "meta": {"domain": "a"}}, {**ROW, "response": "Go.", "meta": {"domain": "b"}}]
    if case == "no-domain":
        rows[1]["meta"] = {}
    source = _rows(tmp_path / "a.jsonl", rows)
    if case == "clash":
        source = _rows(tmp_path / "a.in.jsonl", rows)
    out = tmp_path if case == "clash" else tmp_path / "split"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    hold_out = {"unknown": "cod", "empty": ","}.get(case, "a")
    assert main(["split-domains", str(source), "--hold-out", hold_out, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
