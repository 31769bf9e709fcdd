import json
import re
import subprocess
import sys
from difflib import SequenceMatcher

import pytest

from tear_lora.data.prepare import DataError, load_triples, prepare
from tear_lora.data.template import RESPONSE, WITNESS

from ..conftest import REPO, make_recipe

GOOD = {"input": "Can I freeze milk?", "response": " Yes, up to three months.", "witness": " It thawed fine."}


def jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_bundled_data_sizes_and_fields():
    train, _ = load_triples(REPO / "data/raw/consequences.jsonl")
    evals, _ = load_triples(REPO / "data/raw/eval.jsonl")
    assert len(train) >= 300 and len(evals) >= 60
    domains = {r.fields["meta"]["domain"] for r in train}
    assert len(domains) >= 7
    assert {r.fields["meta"]["valence"] for r in train} >= {"helpful", "harmful"}


def test_bundled_data_has_no_near_duplicates_or_overlap():
    rows = load_triples(REPO / "data/raw/consequences.jsonl")[0] + load_triples(REPO / "data/raw/eval.jsonl")[0]
    inputs = [r.fields["input"].lower() for r in rows]
    assert len(set(inputs)) == len(inputs)
    ids = [r.fields["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    assert near_duplicates(inputs) == []


def near_duplicates(texts: list[str], limit: float = 0.8) -> list[tuple[float, str, str]]:
    """Pairs whose SequenceMatcher ratio reaches `limit`. real_quick_ratio and quick_ratio bound ratio from
    above, so the exact (quadratic) ratio is computed only where a bound reaches the limit: same answer, ~20x
    faster on the bundled data."""
    found = []
    matcher = SequenceMatcher(None)
    for i, b in enumerate(texts):
        matcher.set_seq2(b)  # SequenceMatcher caches what it learns about seq2
        for a in texts[:i]:
            matcher.set_seq1(a)
            if matcher.real_quick_ratio() >= limit and matcher.quick_ratio() >= limit and matcher.ratio() >= limit:
                found.append((matcher.ratio(), a, b))
    return found


def test_near_duplicates_finds_an_edited_copy():
    text = "My landlord kept my deposit after I moved out and says the carpet was stained. What can I do?"
    edited = text.replace("carpet", "floor").replace("What can I do?", "What are my options?")
    found = near_duplicates(["How do I descale a kettle?", text, "Is it safe to mix bleach and vinegar?", edited])
    assert [(a, b) for _, a, b in found] == [(text, edited)]


def test_bad_row_names_file_line_field(tmp_path):
    path = jsonl(tmp_path, [GOOD, {**GOOD, "witness": ""}, "{not json", {**GOOD, "input": 3}])
    with pytest.raises(DataError) as err:
        load_triples(path)
    message = str(err.value)
    assert f"{path}:2: field 'witness': must be a non-empty string" in message
    assert f"{path}:3: invalid JSON" in message
    assert f"{path}:4: field 'input': must be a non-empty string" in message


def test_skip_invalid_lists_rejects_with_line_reason_and_excerpt(tmp_path, tokenizer, tiny_model_dir):
    bad_line = '{"input": "x", "response": "y"}'
    path = jsonl(tmp_path, [GOOD, bad_line, {**GOOD, "input": "Other?"}])
    recipe = make_recipe(tiny_model_dir, tmp_path)
    prepared = prepare(path, tokenizer, recipe, out_dir=tmp_path / "out", skip_invalid=True)
    assert len(prepared.dataset) == 2 and prepared.manifest["rows_rejected"] == 1
    rejects = [json.loads(line) for line in (tmp_path / "out/rejects.jsonl").read_text().splitlines()]
    assert rejects == [{"line": 2, "reason": "field 'witness': must be a non-empty string (missing)",
                        "excerpt": bad_line}]


def test_duplicates_rejected(tmp_path):
    path = jsonl(tmp_path, [{**GOOD, "id": "a"}, {**GOOD, "id": "b"}, {**GOOD, "input": "x", "id": "a"}])
    kept, rejects = load_triples(path, skip_invalid=True)
    assert len(kept) == 1
    assert rejects[0].reason == "duplicate of the triple at line 1"
    assert rejects[1].reason.startswith("field 'id': duplicate id 'a'")


def test_file_level_problems(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_triples(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match=r"d.jsonl:1: no rows \(the file is empty"):
        load_triples(jsonl(tmp_path, ["", "  "]))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"input": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not valid UTF-8 \(byte 0xe9"):
        load_triples(latin1)
    with pytest.raises(DataError, match="unsupported format '.txt'"):
        load_triples(jsonl(tmp_path, [GOOD], name="d.txt"))


def test_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\r\n").encode() * 1 + (json.dumps({**GOOD, "input": "b"}) + "\r\n").encode())
    rows, _ = load_triples(path)
    assert [r.fields["input"] for r in rows] == [GOOD["input"], "b"]


def test_csv_parquet_and_dataset_dir(tmp_path):
    import csv

    from datasets import Dataset

    csv_path = tmp_path / "d.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["input", "response", "witness"])
        writer.writeheader()
        writer.writerow(GOOD)
        writer.writerow({**GOOD, "input": "multi\nline", "witness": ""})
        writer.writerow({**GOOD, "input": "third"})
    kept, rejects = load_triples(csv_path, skip_invalid=True)
    assert [r.line for r in kept] == [2, 5] and rejects[0].line == 3 and "witness" in rejects[0].reason
    Dataset.from_list([GOOD, {**GOOD, "input": "b"}]).to_parquet(str(tmp_path / "d.parquet"))
    assert len(load_triples(tmp_path / "d.parquet")[0]) == 2
    Dataset.from_list([GOOD]).save_to_disk(str(tmp_path / "ds"))
    assert len(load_triples(tmp_path / "ds")[0]) == 1


def test_truncation_trims_input_from_the_left_never_the_spans(tmp_path, tokenizer, tiny_model_dir):
    long_input = " ".join(f"word{i}" for i in range(200))
    row = {"input": long_input, "response": " Fine.", "witness": " It worked."}
    path = jsonl(tmp_path, [row, {**row, "input": "short"}])
    recipe = make_recipe(tiny_model_dir, tmp_path, data={"max_seq_len": 64})
    prepared = prepare(path, tokenizer, recipe, out_dir=tmp_path / "o")
    first = prepared.dataset[0]
    assert len(first["input_ids"]) == 64 and prepared.manifest["rows_trimmed"] == 1
    for role, text in ((RESPONSE, " Fine."), (WITNESS, " It worked.")):
        assert tokenizer.decode([i for i, r in zip(first["input_ids"], first["span_roles"]) if r == role][:-1]) == text
    assert tokenizer.decode(first["input_ids"]).startswith("<|input|>")
    assert tokenizer.decode(first["input_ids"]).split("<|/input|>")[0].endswith("word199")

    recipe = make_recipe(tiny_model_dir, tmp_path, data={"max_seq_len": 64, "truncation": "reject"})
    prepared = prepare(path, tokenizer, recipe, out_dir=tmp_path / "o2")
    assert len(prepared.dataset) == 1 and "truncation: reject" in prepared.manifest["rejects"][0]["reason"]

    huge = {"input": "q", "response": " " + "yes " * 100, "witness": " ok"}
    prepared = prepare(jsonl(tmp_path, [huge, row], name="h.jsonl"), tokenizer,
                       make_recipe(tiny_model_dir, tmp_path, data={"max_seq_len": 64}), out_dir=tmp_path / "o3")
    assert len(prepared.dataset) == 1 and "min_input_tokens" in prepared.manifest["rejects"][0]["reason"]


def test_prepare_manifest_and_cache(tmp_path, tokenizer, recipe):
    prepared = prepare(REPO / "data/raw/eval.jsonl", tokenizer, recipe, out_dir=tmp_path / "p")
    m = prepared.manifest
    assert m["rows_kept"] == len(prepared.dataset) >= 60 and m["rows_rejected"] == 0
    assert m["tokenizer"]["hash"] and m["recipe_hash"] == recipe.hash() and len(m["source_sha256"]) == 64
    assert set(m["tokens"]) == {"context", "response", "witness", "total"}
    assert (tmp_path / "p/manifest.json").exists() and (tmp_path / "p/dataset").exists()
    again = prepare(REPO / "data/raw/eval.jsonl", tokenizer, recipe, out_dir=tmp_path / "p")
    assert again.dataset["input_ids"] == prepared.dataset["input_ids"]


def test_cli_exit_2_without_traceback(tmp_path, tiny_model_dir):
    path = jsonl(tmp_path, [GOOD, {**GOOD, "witness": None}])
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(f"model:\n  name_or_path: {tiny_model_dir}\ndata:\n  processed_dir: {tmp_path}/proc\n")
    result = subprocess.run([sys.executable, "-m", "tear_lora.cli", "data", "prepare", str(path), "--recipe",
                             str(recipe_path)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert f"{path}:2: field 'witness': must be a non-empty string" in result.stderr
    assert "Traceback" not in result.stderr


# ---- the processed-data cache ------------------------------------------------------------------------------------


def test_cache_dir_is_keyed_by_everything_that_changes_the_output(tmp_path, tokenizer, tiny_model_dir, monkeypatch):
    from tear_lora.data import prepare as data

    raw = REPO / "data/raw/eval.jsonl"
    short = prepare(raw, tokenizer, make_recipe(tiny_model_dir, tmp_path, data={"max_seq_len": 64}))
    long = prepare(raw, tokenizer, make_recipe(tiny_model_dir, tmp_path, data={"max_seq_len": 128}))
    same_fields = make_recipe(tiny_model_dir, tmp_path, data={"max_seq_len": 64, "fields": {"input": "input"}})
    extra = prepare(raw, tokenizer, make_recipe(tiny_model_dir, tmp_path, data={"max_seq_len": 64,
                                                                                "keep_extra_fields": True}))
    other_tokenizer = type(tokenizer).from_pretrained(str(tiny_model_dir))
    from tear_lora.data.tokens import add_structural_tokens

    other_tokenizer.add_tokens(["<extra-token>"])
    add_structural_tokens(other_tokenizer)
    other = prepare(raw, other_tokenizer, make_recipe(tiny_model_dir, tmp_path, data={"max_seq_len": 64}))
    dirs = [p.out_dir for p in (short, long, extra, other)]
    assert len(set(dirs)) == 4 and all(d.parent == tmp_path / "processed" and d.name.startswith("eval-") for d in dirs)
    assert all((d / "manifest.json").is_file() and (d / "dataset").is_dir() for d in dirs)
    assert max(len(r) for r in short.dataset["input_ids"]) <= 64 < max(len(r) for r in long.dataset["input_ids"])

    def no_build(*args):
        raise AssertionError("rebuilt a cache that was still valid")

    monkeypatch.setattr(data, "_build", no_build)
    again = prepare(raw, tokenizer, same_fields)  # same resolved settings: the same cache, reused
    assert again.out_dir == short.out_dir and again.dataset["input_ids"] == short.dataset["input_ids"]


@pytest.mark.parametrize("change", ["truncation", "min_input_tokens", "skip_invalid", "fields", "file_bytes"])
def test_each_data_setting_and_the_file_bytes_key_the_cache(change, tmp_path, tokenizer, tiny_model_dir):
    """Each of these changes what a processed set holds (or may hold), so each must lead to its own cache."""
    rows = [json.loads(line) for line in (REPO / "data/raw/eval.jsonl").read_text().splitlines()[:8]]
    raw = tmp_path / "rows.jsonl"
    raw.write_text("".join(json.dumps({**r, "alt_input": r["input"] + " (asked twice)"}) + "\n" for r in rows))
    base = {"max_seq_len": 256}
    changed = {"truncation": {"truncation": "reject"}, "min_input_tokens": {"min_input_tokens": 2},
               "skip_invalid": {"skip_invalid": True}, "fields": {"fields": {"input": "alt_input"}},
               "file_bytes": {}}[change]
    first = prepare(raw, tokenizer, make_recipe(tiny_model_dir, tmp_path, data=base))
    if change == "file_bytes":
        raw.write_text(raw.read_text().replace("(asked twice)", "(asked again)"))  # same rows, other bytes
    second = prepare(raw, tokenizer, make_recipe(tiny_model_dir, tmp_path, data={**base, **changed}))
    assert second.out_dir != first.out_dir
    assert first.out_dir.is_dir() and second.out_dir.is_dir()  # the earlier set stays usable


def test_damaged_cache_is_rebuilt_not_trusted(tmp_path, tokenizer, recipe):
    raw = REPO / "data/raw/eval.jsonl"
    first = prepare(raw, tokenizer, recipe)
    expected = first.dataset["input_ids"]
    manifest = first.out_dir / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])  # truncated: killed mid-write by an older version, say
    assert prepare(raw, tokenizer, recipe).dataset["input_ids"] == expected
    assert json.loads(manifest.read_text())["rows_kept"] == len(expected)
    manifest.write_text("{}" + " " * (len(manifest.read_text()) - 2))  # same size, wrong content
    assert prepare(raw, tokenizer, recipe).manifest["rows_kept"] == len(expected)
    for arrow in (first.out_dir / "dataset").glob("*.arrow"):
        arrow.unlink()
    assert prepare(raw, tokenizer, recipe).dataset["input_ids"] == expected
    assert not [p for p in (tmp_path / "processed").iterdir() if ".build-" in p.name]  # no temp dirs left


def test_cache_in_use_stays_readable_while_other_settings_build(tmp_path, tokenizer, tiny_model_dir):
    raw = REPO / "data/raw/eval.jsonl"
    recipe_64 = make_recipe(tiny_model_dir, tmp_path, data={"max_seq_len": 64})
    expected = prepare(raw, tokenizer, recipe_64, save=False).dataset["input_ids"]
    in_use = prepare(raw, tokenizer, recipe_64, out_dir=tmp_path / "shared").dataset  # memory-mapped, not read yet
    in_use_default = prepare(raw, tokenizer, recipe_64).dataset
    recipe_128 = make_recipe(tiny_model_dir, tmp_path, data={"max_seq_len": 128})
    prepare(raw, tokenizer, recipe_128)  # another cache dir
    replaced = prepare(raw, tokenizer, recipe_128, out_dir=tmp_path / "shared", overwrite=True)  # same --out, swapped in
    assert in_use_default["input_ids"] == expected and in_use["input_ids"] == expected
    assert replaced.out_dir == tmp_path / "shared" and replaced.manifest["settings"]["max_seq_len"] == 128


def test_second_prepare_waits_for_the_first_then_reuses_it(tmp_path, tokenizer, recipe):
    import shutil
    import threading
    import time

    from tear_lora import rundir

    raw = REPO / "data/raw/eval.jsonl"
    final = prepare(raw, tokenizer, recipe).out_dir
    shutil.rmtree(final)
    results = []
    with rundir.exclusive_lock(rundir.lock_path_for(final), "a build in another process"):
        waiting = threading.Thread(target=lambda: results.append(prepare(raw, tokenizer, recipe)))
        waiting.start()
        time.sleep(1.0)
        assert waiting.is_alive() and not final.exists()  # it waits instead of failing or building alongside
    waiting.join(timeout=120)
    assert results and results[0].out_dir == final and len(results[0].dataset) >= 60


def test_explicit_out_never_replaces_a_foreign_directory(tmp_path, tokenizer, recipe):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(DataError, match="is not a finished tear_lora processed data"):
            prepare(REPO / "data/raw/eval.jsonl", tokenizer, recipe, out_dir=mine, overwrite=overwrite)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_field_mapping_in_prepare_and_recipe_validation(tmp_path, tokenizer, tiny_model_dir):
    from tear_lora.recipe import RecipeError

    path = jsonl(tmp_path, [{"prompt": "q?", "answer": " a.", "outcome": " o.", "source": "web"},
                            {"prompt": "q2?", "answer": " ", "outcome": " o.", "source": "web"}])
    fields = {"input": "prompt", "response": "answer", "witness": "outcome"}
    recipe = make_recipe(tiny_model_dir, tmp_path, data={"fields": fields, "skip_invalid": True})
    prepared = prepare(path, tokenizer, recipe)
    assert len(prepared.dataset) == 1
    assert prepared.manifest["rejects"][0]["reason"].startswith("field 'answer': must be a non-empty string")
    assert prepared.manifest["notices"] == [f"{path}: ignored field 'source' in 2 rows (map it with data.fields "
                                            "or keep it with data.keep_extra_fields)"]
    for bad, message in [({"responce": "answer"}, "unknown role 'data.fields.responce'; did you mean 'response'?"),
                         ({"input": ""}, "'data.fields.input' must be a non-empty column name"),
                         ({"input": 3}, "'data.fields.input' must be a non-empty column name, got 3"),
                         ({"input": "witness"}, "column 'witness' would serve both roles 'input' and 'witness'")]:
        with pytest.raises(RecipeError, match=re.escape(message)):
            make_recipe(tiny_model_dir, tmp_path, data={"fields": bad})
