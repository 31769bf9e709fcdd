"""`tear-lora analyze`: each instrument measures what it claims, on models built here.

- A tiny model trained so that its witness copies the response's word must match every pair and be very
  sensitive to the response (with its true minimal partner); a random model, whose predictions ignore the
  context, gets ~0 Δ and ~0 sensitivity.
- The probe finds valence where the response carries it (yes/no before `<|/response|>`), not in the embedding
  layer (the same tag token on every row), beyond its permutation null. The nulls themselves, on synthetic data:
  tests/study/test_nulls.py.
- The lexical controls can fail both ways: where valence is spelled out in the words (yes/no; a witness repeating
  its response's word), the words-only control reaches the model (probe − words contains 0); where it is carried
  only by a number no bag of words can generalise (a dose above or below 50 mg, every dose a new word), a tiny
  model trained to use it beats the control on the probe and on matching.
"""

import json

import numpy as np
import pytest
import torch

from tear_lora.cli import main
from tear_lora.study.analyze import Settings, analyze
from tear_lora.study.nulls import unit_bootstrap

WORDS = [" apple", " stone", " river", " candle", " paper", " horse", " glass", " cloud", " bread", " metal",
         " music", " salt"]
PROMPT = "Say a word."
FAST = Settings(folds=3, bootstrap=200, draws=200, batch_size=12)


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tagged_tokenizer():
    from tear_lora.data.tokens import add_structural_tokens
    from tear_lora.tiny import qwen3_tokenizer

    tokenizer = qwen3_tokenizer()
    add_structural_tokens(tokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def random_model_dir(tmp_path_factory, tagged_tokenizer):
    from tear_lora.data.tokens import fit_embeddings
    from tear_lora.tiny import tiny_qwen3

    model = tiny_qwen3(0)
    fit_embeddings(model, tagged_tokenizer)
    return _save(model, tagged_tokenizer, tmp_path_factory.mktemp("random"))


@pytest.fixture(scope="module")
def copy_model_dir(tmp_path_factory, tagged_tokenizer):
    """Full fine-tune of the tiny model on `<|input|>Say a word.<|/input|><|response|> w<|/response|><|witness|> w`:
    the witness is the response's word, so it can only be predicted by reading the response."""
    model = _train_witness(tagged_tokenizer, [(PROMPT, w, w) for w in WORDS], steps=70)  # it has learned to copy
    return _save(model, tagged_tokenizer, tmp_path_factory.mktemp("copy"))


def _train_witness(tokenizer, triples, steps):
    """Full fine-tune of the tiny model on the witness tokens of equal-length (input, response, witness) rows."""
    from tear_lora.data import template
    from tear_lora.data.tokens import fit_embeddings
    from tear_lora.tiny import tiny_qwen3

    model = tiny_qwen3(0)
    fit_embeddings(model, tokenizer)
    rows = [template.encode(tokenizer, template.segments(*triple))[:2] for triple in triples]
    ids, roles = torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])
    targets = roles[:, 1:] == template.WITNESS
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)  # ~10x faster than foreach on CPU
    torch.manual_seed(0)
    for _ in range(steps):
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1][targets]  # only the witness positions
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden), ids[:, 1:][targets])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5, loss.item()
    return model.eval()


# Doses: below 50 mg the witness is " fine", above it " sick". Every dose is its own two-digit word, so a bag of
# words never sees a test dose in training; the model sees the tens digit (Qwen3 splits digits) and can learn it.
LOW_DOSES, HIGH_DOSES = list(range(10, 50, 2))[:16], list(range(61, 100, 2))[:16]


def _dose_triples():
    """(pair, input, response, witness, valence) for 16 pairs: one input, a low and a high dose."""
    rows = []
    for k, (low, high) in enumerate(zip(LOW_DOSES, HIGH_DOSES)):
        prompt = f"Patient {chr(65 + k)} asks for a dose."
        rows += [(f"d{k}", prompt, f" take {low} mg", " fine", "helpful"),
                 (f"d{k}", prompt, f" take {high} mg", " sick", "harmful")]
    return rows


@pytest.fixture(scope="module")
def dose_model_dir(tmp_path_factory, tagged_tokenizer):
    """Trained so that the witness depends only on whether the dose is above 50 mg."""
    model = _train_witness(tagged_tokenizer, [(prompt, response, witness) for _, prompt, response, witness, _
                                              in _dose_triples()], steps=120)
    return _save(model, tagged_tokenizer, tmp_path_factory.mktemp("dose"))


@pytest.fixture(scope="module")
def dose_file(tmp_path_factory):
    rows = [{"id": f"{pair}-{valence}", "input": prompt, "response": response, "witness": witness,
             "meta": {"domain": "dose", "valence": valence, "pair": pair}}
            for pair, prompt, response, witness, valence in _dose_triples()]
    return _write(tmp_path_factory.mktemp("dose-data") / "dose.jsonl", rows)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Six contrast pairs: both sides share the input; each witness repeats its own response's word."""
    rows = []
    for k in range(6):
        for valence, word in (("helpful", WORDS[2 * k]), ("harmful", WORDS[2 * k + 1])):
            rows.append({"id": f"p{k}-{valence}", "input": PROMPT, "response": word, "witness": word,
                         "meta": {"domain": "words", "valence": valence, "pair": f"p{k}"}})
    return _write(tmp_path_factory.mktemp("data") / "pairs.jsonl", rows)


def _result(report, name_part=""):
    (source,) = [s for s in report["sources"] if name_part in s["name"]]
    return next(iter(source["data"].values()))


def test_model_that_reads_the_response_matches_and_is_sensitive(copy_model_dir, pairs_file):
    result = _result(analyze([copy_model_dir], [pairs_file], FAST))
    matching, sensitivity = result["matching"], result["sensitivity"]
    assert matching["pairs"] == 6 and matching["p_positive"] == 1.0 and matching["both_sides"] == 1.0
    assert matching["delta_nats"] > 2.0 and matching["delta_ci"][0] > 1.0 and matching["delta_p"] < 0.05
    assert matching["n"] == 6 and matching["n_of"] == "pairs" and "sign flip" in matching["null"]
    assert sensitivity["n"] == 12 and sensitivity["nats_per_token"] > 2.0 and sensitivity["ci"][0] > 1.0
    assert sensitivity["swapped_witness_nll"] > sensitivity["true_witness_nll"] + 2.0
    # the swap is the true minimal partner: with one-token witnesses, per token is per witness, so sensitivity is
    # matching's Δ exactly (round 2's random row of the domain would give another number)
    assert sensitivity["nats_per_token"] == pytest.approx(matching["delta_nats"], rel=1e-6)
    # the witness repeats its response's word: the words-only control matches every pair as well
    assert matching["lexical"]["p_positive"] == 1.0 and matching["lexical"]["delta_nats"] > 0.5
    assert sensitivity["lexical"]["nats_per_word"] > 0.5


class RecordingScorer:
    """A stand-in scorer: every (input, response, witness) it is asked about gets its own fixed random NLL, and it
    remembers what it was asked. Sensitivity can then be computed by hand from the true minimal partners."""

    def __init__(self):
        self.settings, self.seen, self.nll = Settings(bootstrap=20, draws=20), [], {}
        self.rng = np.random.default_rng(0)

    def encode(self, x, response, witness):
        return (x, response, witness)

    def witness_nll(self, encoded, what):
        self.seen += encoded
        for key in encoded:
            self.nll.setdefault(key, (float(self.rng.uniform(1, 9)), 3))
        return np.array([self.nll[key] for key in encoded], dtype=float)


def test_sensitivity_swaps_each_response_with_its_true_minimal_partner():
    """Round 2 swapped in a random row of the domain (another scenario). Every response scored against a witness
    comes from a row with the same input, and the figure is exactly the true partners' swap, by hand."""
    from tear_lora.study.analyze import witness_swaps

    rows = [{"input": f"situation {p}", "response": f"{valence} answer {p}", "witness": f"{valence} outcome {p}",
             "meta": {"domain": "one", "pair": p, "valence": valence}}
            for p in range(6) for valence in ("helpful", "harmful")]
    scorer = RecordingScorer()
    _, sensitivity = witness_swaps(scorer, rows)
    inputs_of = {row["response"]: row["input"] for row in rows}
    assert {inputs_of[response] == x for x, response, _ in scorer.seen} == {True}
    differences = []
    for p in range(6):
        a, b = rows[2 * p], rows[2 * p + 1]
        nll = {(r["response"], w["witness"]): scorer.nll[(a["input"], r["response"], w["witness"])][0]
               for r in (a, b) for w in (a, b)}
        differences.append(nll[b["response"], a["witness"]] - nll[a["response"], a["witness"]]
                           + nll[a["response"], b["witness"]] - nll[b["response"], b["witness"]])
    differences, tokens = np.array(differences), np.full(6, 6.0)
    assert sensitivity["n"] == 12
    assert sensitivity["nats_per_token"] == pytest.approx(differences.sum() / tokens.sum(), rel=1e-9)
    # per pair too (the interval resamples pairs): a total alone would not see partners swapped between pairs
    expected = unit_bootstrap(differences, [f"pair:{p}" for p in range(6)], 20, 0, tokens)
    assert sensitivity["ci"] == pytest.approx(expected, rel=1e-9)


def test_probe_on_too_few_families_is_skipped_with_the_reason():
    """Eight pairs of one family: no grouped selection split exists. The probe and the words controls say so (a
    ValueError traceback from scikit-learn's KFold before), and no forward pass is spent on it."""
    from tear_lora.study.analyze import impact_probe, words_controls

    rows = [{"input": f"situation {p}", "response": f"{valence} answer {p}", "witness": f"{valence} outcome {p}",
             "meta": {"family": "only-one", "pair": p, "valence": valence}}
            for p in range(8) for valence in ("helpful", "harmful")]
    scorer = RecordingScorer()
    scorer.response_end_states = None  # never called
    result = impact_probe(scorer, rows, words_controls(rows, scorer.settings))
    assert "needs rows from more groups" in result["skipped"] and "1 here" in result["skipped"]


def test_model_that_ignores_the_response_gets_zero_margin_and_sensitivity(random_model_dir, pairs_file):
    result = _result(analyze([random_model_dir], [pairs_file], FAST))
    matching, sensitivity = result["matching"], result["sensitivity"]
    assert abs(matching["delta_nats"]) < 0.05 and matching["delta_ci"][0] <= 0.0 <= matching["delta_ci"][1] + 1e-9
    assert abs(sensitivity["nats_per_token"]) < 0.05
    # ~ln(151,936) per token: a context-blind model
    assert sensitivity["true_witness_nll"] == pytest.approx(np.log(151_936), abs=0.5)


def test_probe_finds_valence_only_where_the_response_carries_it(random_model_dir, tmp_path):
    rows = [{"id": f"r{i}", "input": f"Question {i}?", "response": f"{w} {'yes' if i % 2 else 'no'}",
             "witness": " ok", "meta": {"domain": "d", "valence": "helpful" if i % 2 else "harmful"}}
            for i, w in enumerate(WORDS * 4)]
    report = analyze([random_model_dir], [_write(tmp_path / "probe.jsonl", rows)],
                     Settings(folds=4, bootstrap=100, draws=200))
    probe = _result(report)["probe"]
    assert probe["rows"] == 48 and probe["n"] == probe["scored_rows"] == 48 - probe["selection_rows"]
    assert probe["null"].startswith("label shuffle across rows within each split")  # no pairs, no families
    assert len(probe["layer_auroc_scored"]) == 3  # embeddings + 2 decoder layers
    assert probe["layer_auroc_scored"][0] == pytest.approx(0.5)  # the same tag embedding on every row
    assert probe["auroc"] >= 0.9 and probe["layer"] > 0 and probe["p"] < 0.05 and probe["above_null"] > 0.3
    matching = _result(report)["matching"]  # no pairs here: skipped, nothing dropped
    assert set(matching) == {"skipped", "dropped"} and matching["dropped"] == {"incomplete": 0, "too_long": 0}
    # valence is spelled out in the words: the words controls read it too, so nothing is beyond the words
    assert probe["words_best_auroc"] == 1.0 and probe["grouped_by"] == "item"
    low, high = probe["beyond_words_ci"]
    assert probe["beyond_words"] <= 0.0 and low <= 0.0 <= high + 1e-9


@pytest.mark.slow  # dose_model_dir: a 120-step fine-tune, ~60 s (docs/testing.md)
def test_valence_carried_only_by_a_number_beats_the_words_only_controls(dose_model_dir, dose_file):
    result = _result(analyze([dose_model_dir], [dose_file], Settings(folds=4, bootstrap=200, draws=200)))
    probe, matching = result["probe"], result["matching"]
    assert probe["rows"] == 32 and probe["null"].startswith("within-pair label swap, 200 draws")
    assert max(probe["words"].values()) <= 0.6  # no test dose was ever a training word
    assert probe["auroc"] >= 0.9 and probe["p"] < 0.05 and probe["beyond_words"] >= 0.3
    assert probe["beyond_words_ci"][0] > 0.0
    # the model prefers each witness after its own dose; word overlap cannot tell " fine" from " sick"
    assert matching["pairs"] == 16 and matching["p_positive"] >= 0.9 and matching["delta_ci"][0] > 0.5
    assert matching["delta_p"] < 0.01
    assert matching["lexical"]["p_positive"] == 0.5 and matching["lexical"]["delta_nats"] == pytest.approx(0.0)


def test_adapters_share_one_base_and_the_cli_writes_json_and_plot(tmp_path_factory, tiny_model_dir, pairs_file,
                                                                  tmp_path, capsys):
    from ..release_helpers import trained_pair

    pair = trained_pair(tmp_path_factory, tiny_model_dir)
    capsys.readouterr()  # training's own output, when this test trained the pair
    plot = tmp_path / "analyze.png"
    assert main(["analyze", str(pair["a"]), str(pair["b"]), "--data", str(pairs_file), "--folds", "3",
                 "--bootstrap", "100", "--draws", "100", "--layers", "0,2", "--json", "--plot", str(plot),
                 "--report", str(tmp_path / "report")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["kind"] for s in report["sources"]] == ["adapter", "adapter", "base"]
    assert sorted(s["lambda"] for s in report["sources"][:2]) == [0.0, 2.0]
    for source in report["sources"]:
        result = source["data"][str(pairs_file)]
        assert result["matching"]["pairs"] == 6 and result["sensitivity"]["n"] == 12
        assert len(result["probe"]["layer_auroc_scored"]) == 2 and result["probe"]["layer"] in (0, 2)
    assert report["settings"]["folds"] == 3 and plot.stat().st_size > 10_000
    written = tmp_path / "report"
    assert sorted(p.name for p in written.iterdir() if not p.name.startswith(".")) == [
        "analyze.json", "analyze.png", "analyze.txt", "study.png", "tables.md"]
    assert json.loads((written / "analyze.json").read_text())["sources"][0]["name"] == report["sources"][0]["name"]
    assert "95% CI, items then seeds" in (written / "tables.md").read_text()
    again = ["analyze", str(pair["a"]), "--data", str(pairs_file), "--folds", "3", "--bootstrap", "50", "--draws",
             "50", "--report", str(written)]
    assert main(again) == 2 and "--overwrite" in capsys.readouterr().err  # an earlier report: only with --overwrite
    assert main([*again, "--overwrite"]) == 0
    text = capsys.readouterr().out
    assert "matching Δ" in text and "base (adapter disabled)" in text and "matching on 6 pairs" in text


# ---- eval and analyze read a file alike: same rows kept, same counts printed, same refusal ----------------------

LONG = 35  # words: a side this long fits max_seq_len 64 on its own, but not after a response as long


@pytest.fixture(scope="module")
def flawed_file(tmp_path_factory):
    """9 lines: line 5 lacks its witness (invalid), line 7's witness cannot fit max_seq_len 64 (too long), which
    leaves pair p2 one-sided; pair p3 fits side by side, but each witness after the other response is too long."""
    def triple(pair, valence, response, witness, domain="words"):
        return {"id": f"{pair}-{valence}", "input": PROMPT, "response": response, "witness": witness,
                "meta": {"domain": domain, "valence": valence, "pair": pair}}

    rows = [triple("p0", "helpful", WORDS[0], WORDS[0]), triple("p0", "harmful", WORDS[1], WORDS[1]),
            triple("p1", "helpful", WORDS[2], WORDS[2]), triple("p1", "harmful", WORDS[3], WORDS[3]),
            {"id": "bad", "input": PROMPT, "response": WORDS[4]},
            triple("p2", "helpful", WORDS[4], WORDS[4]), triple("p2", "harmful", WORDS[5], WORDS[5] * 80),
            triple("p3", "helpful", WORDS[6], WORDS[6] * LONG, "long"),
            triple("p3", "harmful", WORDS[7] * LONG, WORDS[7], "long")]
    return _write(tmp_path_factory.mktemp("flawed") / "flawed.jsonl", rows)


def _with_recipe(model_dir, out, **data):
    """The model dir (linked, not copied) with a recipe.yaml setting `data`: eval and analyze read files by it."""
    from tear_lora.recipe import recipe_from_dict

    out.mkdir()
    for item in model_dir.iterdir():
        (out / item.name).symlink_to(item)
    (out / "recipe.yaml").write_text(recipe_from_dict({"data": {"max_seq_len": 64, **data}}).to_yaml())
    return out


def _count_lines(err, path):
    return [line for line in err.splitlines() if line.startswith(f"note: {path}")]


def test_eval_and_analyze_keep_drop_and_count_the_same_rows(random_model_dir, flawed_file, tmp_path, capsys):
    model = _with_recipe(random_model_dir, tmp_path / "model", skip_invalid=True)
    assert main(["eval", str(model), "--data", str(flawed_file), "--json"]) == 0
    out, err = capsys.readouterr()
    (row,) = json.loads(out)
    eval_lines = _count_lines(err, flawed_file)
    assert row["rows"] == 7
    assert eval_lines == [
        f"note: {flawed_file}: 9 rows read: 7 kept, 1 invalid, 1 too long (data.max_seq_len 64), 0 trimmed",
        f"note: {flawed_file}:5: dropped: field 'witness': must be a non-empty string (missing)",
        f"note: {flawed_file}:7: dropped: {80 + 11} tokens > data.max_seq_len 64; trimming the input would leave 0 "
        "of its 4 tokens (< data.min_input_tokens 8)"], err
    assert main(["analyze", str(model), "--data", str(flawed_file), "--folds", "3", "--bootstrap", "50",
                 "--json"]) == 0
    out, err = capsys.readouterr()
    assert _count_lines(err, flawed_file) == eval_lines  # read once, printed once, word for word
    result = json.loads(out)["sources"][0]["data"][str(flawed_file)]
    assert result["rows"] == {"rows_read": 9, "rows_kept": 7, "rows_rejected_invalid": 1, "rows_too_long": 1,
                              "rows_trimmed": 0, "max_seq_len": 64}
    # p0 and p1 measured; p2 lost its harmful side at reading; p3's witnesses cannot follow each other's response
    assert result["matching"]["pairs"] == 2 and result["matching"]["dropped"] == {"incomplete": 1, "too_long": 1}
    # sensitivity swaps each response with its true partner: the same pairs as matching, both witnesses of each
    assert result["sensitivity"]["n"] == 4 and result["sensitivity"]["dropped"] == result["matching"]["dropped"]
    assert "skipped" in result["probe"]  # 4 helpful, 3 harmful rows: too few to split
    assert main(["analyze", str(model), "--data", str(flawed_file), "--folds", "3", "--bootstrap", "50"]) == 0
    text = capsys.readouterr().out
    assert "9 rows read: 7 kept, 1 invalid, 1 too long (data.max_seq_len 64), 0 trimmed" in text
    assert "matching on 2 pairs (4 witnesses; dropped: 1 incomplete, 1 too long)" in text


def test_eval_and_analyze_refuse_an_invalid_row_alike(random_model_dir, flawed_file, tmp_path, capsys):
    model = _with_recipe(random_model_dir, tmp_path / "model", skip_invalid=False)
    errors = []
    for argv in (["eval", str(model), "--data", str(flawed_file)],
                 ["analyze", str(model), "--data", str(flawed_file)]):
        assert main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and "Traceback" not in err
        error = err[err.index("error: "):].splitlines()
        assert error[0].startswith(f"error: {flawed_file}:5: 1 invalid row(s); fix them"), error
        assert error[1:] == [f"{flawed_file}:5: field 'witness': must be a non-empty string (missing)"], error
        errors.append(error)
        # the message's --skip-invalid exists on both verbs and overrides the source's data.skip_invalid
        assert main([*argv, "--skip-invalid", *(["--folds", "3", "--bootstrap", "50"] * (argv[0] == "analyze"))]) == 0
        assert _count_lines(capsys.readouterr().err, flawed_file)[0] == (
            f"note: {flawed_file}: 9 rows read: 7 kept, 1 invalid, 1 too long (data.max_seq_len 64), 0 trimmed")
    assert errors[0] == errors[1]
