"""`tear-lora analyze`: each instrument measures what it claims, on models built here.

- A tiny model trained so that its witness copies the response's word must match every pair and be very
  sensitive to the response; a random model, whose predictions ignore the context, gets ~0 margin and ~0
  sensitivity.
- The probe finds valence where the response carries it (yes/no before `<|/response|>`), not in the embedding
  layer (the same tag token on every row), and not with shuffled labels.
"""

import json

import numpy as np
import pytest
import torch

from tear_lora.analyze import Settings, analyze, mismatched_partners
from tear_lora.cli import main

WORDS = [" apple", " stone", " river", " candle", " paper", " horse", " glass", " cloud", " bread", " metal",
         " music", " salt"]
PROMPT = "Say a word."
FAST = Settings(folds=3, bootstrap=200, batch_size=12)


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tagged_tokenizer():
    from tear_lora.tiny import qwen3_tokenizer
    from tear_lora.tokens import add_structural_tokens

    tokenizer = qwen3_tokenizer()
    add_structural_tokens(tokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def random_model_dir(tmp_path_factory, tagged_tokenizer):
    from tear_lora.tiny import tiny_qwen3
    from tear_lora.tokens import fit_embeddings

    model = tiny_qwen3(0)
    fit_embeddings(model, tagged_tokenizer)
    return _save(model, tagged_tokenizer, tmp_path_factory.mktemp("random"))


@pytest.fixture(scope="module")
def copy_model_dir(tmp_path_factory, tagged_tokenizer):
    """Full fine-tune of the tiny model on `<|input|>Say a word.<|/input|><|response|> w<|/response|><|witness|> w`:
    the witness is the response's word, so it can only be predicted by reading the response."""
    from tear_lora import template
    from tear_lora.tiny import tiny_qwen3
    from tear_lora.tokens import fit_embeddings

    model = tiny_qwen3(0)
    fit_embeddings(model, tagged_tokenizer)
    rows = [template.encode(tagged_tokenizer, template.segments(PROMPT, w, w))[:2] for w in WORDS]
    ids, roles = torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])
    targets = roles[:, 1:] == template.WITNESS
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(70):
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1][targets]  # only the witness positions
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden), ids[:, 1:][targets])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5, loss.item()  # it has learned to copy
    return _save(model.eval(), tagged_tokenizer, tmp_path_factory.mktemp("copy"))


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
    assert matching["pairs"] == 6 and matching["accuracy"] == 1.0 and matching["side_accuracy"] == 1.0
    assert matching["margin_nats"] > 2.0 and matching["margin_ci"][0] > 1.0
    assert sensitivity["rows"] == 12 and sensitivity["nats_per_token"] > 2.0 and sensitivity["ci"][0] > 1.0
    assert sensitivity["swapped_witness_nll"] > sensitivity["true_witness_nll"] + 2.0


def test_model_that_ignores_the_response_gets_zero_margin_and_sensitivity(random_model_dir, pairs_file):
    result = _result(analyze([random_model_dir], [pairs_file], FAST))
    matching, sensitivity = result["matching"], result["sensitivity"]
    assert abs(matching["margin_nats"]) < 0.05 and matching["margin_ci"][0] <= 0.0 <= matching["margin_ci"][1] + 1e-9
    assert abs(sensitivity["nats_per_token"]) < 0.05
    # ~ln(151,936) per token: a context-blind model
    assert sensitivity["true_witness_nll"] == pytest.approx(np.log(151_936), abs=0.5)


def test_probe_finds_valence_only_where_the_response_carries_it(random_model_dir, tmp_path):
    rows = [{"id": f"r{i}", "input": f"Question {i}?", "response": f"{w} {'yes' if i % 2 else 'no'}",
             "witness": " ok", "meta": {"domain": "d", "valence": "helpful" if i % 2 else "harmful"}}
            for i, w in enumerate(WORDS * 2)]
    report = analyze([random_model_dir], [_write(tmp_path / "probe.jsonl", rows)], Settings(folds=4, bootstrap=100))
    probe = _result(report)["probe"]
    assert probe["rows"] == 24 and probe["harmful"] == 12 and probe["folds"] == 4
    by_layer = {r["layer"]: r for r in probe["layers"]}
    assert len(by_layer) == 3  # embeddings + 2 decoder layers
    assert by_layer[0]["auroc"] == pytest.approx(0.5)  # the same tag embedding on every row: nothing to find
    assert probe["best_auroc"] >= 0.9 and probe["best_layer"] > 0
    assert probe["shuffled_auroc_at_best"] < probe["best_auroc"] - 0.2
    assert _result(report)["matching"] == {"skipped": _result(report)["matching"]["skipped"]}  # no pairs here


def test_mismatched_partners_stay_in_domain_and_never_self():
    rows = [{"response": f"r{i}", "meta": {"domain": "ab"[i % 2]}} for i in range(10)]
    rows.append({"response": "alone", "meta": {"domain": "c"}})
    partners = mismatched_partners(rows, seed=3)
    assert partners == mismatched_partners(rows, seed=3) and partners != mismatched_partners(rows, seed=4)
    assert partners[-1] is None
    for i, j in enumerate(partners[:-1]):
        assert j is not None and j != i and rows[j]["meta"]["domain"] == rows[i]["meta"]["domain"]
    assert sorted(partners[:-1]) == list(range(10))  # each response used once: a permutation


def test_adapters_share_one_base_and_the_cli_writes_json_and_plot(tmp_path_factory, tiny_model_dir, pairs_file,
                                                                  tmp_path, capsys):
    from .release_helpers import trained_pair

    pair = trained_pair(tmp_path_factory, tiny_model_dir)
    capsys.readouterr()  # training's own output, when this test trained the pair
    plot = tmp_path / "analyze.png"
    assert main(["analyze", str(pair["a"]), str(pair["b"]), "--data", str(pairs_file), "--folds", "3",
                 "--bootstrap", "100", "--layers", "0,2", "--json", "--plot", str(plot)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["kind"] for s in report["sources"]] == ["adapter", "adapter", "base"]
    assert sorted(s["lambda"] for s in report["sources"][:2]) == [0.0, 2.0]
    for source in report["sources"]:
        result = source["data"][str(pairs_file)]
        assert result["matching"]["pairs"] == 6 and result["sensitivity"]["rows"] == 12
        assert [r["layer"] for r in result["probe"]["layers"]] == [0, 2]
    assert report["settings"]["folds"] == 3 and plot.stat().st_size > 10_000
    assert main(["analyze", str(pair["a"]), "--data", str(pairs_file), "--folds", "3", "--bootstrap", "50"]) == 0
    text = capsys.readouterr().out
    assert "match acc" in text and "base (adapter disabled)" in text and "6 pairs (chance 0.25)" in text


def test_study_tables_group_seeds_and_arms():
    from tear_lora.analyze_report import study_tables

    def source(name, kind, lam, seed, accuracy, weights=None):
        result = {"matching": {"accuracy": accuracy, "margin_nats": 0.1}, "sensitivity": {"nats_per_token": 0.2},
                  "probe": {"best_auroc": 0.8}}
        return {"name": name, "kind": kind, "lambda": lam, "seed": seed, "response_weight": weights or {},
                "data": {"c.jsonl": result}}

    report = {"settings": {"data": ["c.jsonl"]},
              "sources": [source("a", "adapter", 1.0, 42, 0.5), source("b", "adapter", 1.0, 7, 0.7),
                          source("c", "adapter", 0.0, 42, 0.25), source("w", "adapter", 1.0, 42, 0.9, {"harmful": 0}),
                          source("base", "base", None, None, 0.3)]}
    table = study_tables(report).splitlines()[:8]  # the first table: title, blank, header, rule, 4 rows
    assert table[2] == "| arm | λ | seed 42 | seed 7 | mean | ± half-range |"
    assert table[4:] == ["| plain | 0 | 0.250 | - | 0.250 | - |", "| plain | 1 | 0.500 | 0.700 | 0.600 | 0.100 |",
                         "| witness-only | 1 | 0.900 | - | 0.900 | - |", "| base | - | - | - | 0.300 | - |"]
