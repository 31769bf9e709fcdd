"""Checks for the hand-written minimal pairs, data/raw/minimal_pairs.jsonl (fast, no model).

Each pair is one input and two responses that differ by a small edit (a number, a unit, a negation, the order of
two steps, one item) which changes what happens; each response has its own witness. The pairs exist so the
instruments of `tear-lora analyze` can fail: valence must not be readable from the response words (the
words-only classifier stays near chance) and a witness must not be matchable by copying words from its response.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from tear_lora.data.prepare import load_triples
from tear_lora.study.lexical import probe_folds, text_probe_scores, words

from ..conftest import REPO
from .test_contrast_data import DOMAINS, VALENCE_WORDS, content_words, near_duplicates

MINIMAL = REPO / "data/raw/minimal_pairs.jsonl"
OTHERS = tuple(REPO / "data/raw" / name for name in ("consequences.jsonl", "eval.jsonl", "contrast.jsonl"))
EDITS = {"number", "unit", "negation", "order", "item"}
MAX_EDIT_FRACTION = 0.20  # word edit distance / words in the shorter response
MAX_LEXICAL_AUROC = 0.65
# Words that carry the outcome or the tone rather than the content; none may appear in a minimal-pair response.
GIVEAWAY_WORDS = VALENCE_WORDS | frozenset("""
safe unsafe safer safety dangerous danger risky risk risks mistake mistakes careful careless warning hazard
hazardous idea fatal deadly toxic poison poisonous harmless recommended ideal perfect smart wise foolish stupid
reckless disaster ruin ruined damage injury injured legal illegal protect protected scam fraud secure insecure
""".split())


def edit_distance(a: list[str], b: list[str]) -> int:
    """Levenshtein distance over word tokens (insert, delete, substitute one word)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


def overlap(witness: str, response: str) -> int:
    """Content words (4+ letters, not stop/valence words) a witness shares with a response."""
    return len(content_words(witness, 4) & content_words(response, 4))


@pytest.fixture(scope="module")
def rows():
    kept, rejects = load_triples(MINIMAL, skip_invalid=True)
    assert not rejects, [r.as_dict() for r in rejects]
    return [row.fields for row in kept]


@pytest.fixture(scope="module")
def pairs(rows):
    grouped = defaultdict(dict)
    for row in rows:
        grouped[row["meta"]["pair"]][row["meta"]["valence"]] = row
    return dict(grouped)


def test_pairs_are_complete_and_cover_every_domain(rows, pairs):
    assert len(pairs) >= 64 and len(rows) == 2 * len(pairs)
    counts = defaultdict(int)
    for pair_id, sides in pairs.items():
        assert set(sides) == {"helpful", "harmful"}, pair_id
        helpful, harmful = sides["helpful"], sides["harmful"]
        assert helpful["input"] == harmful["input"] and helpful["meta"]["domain"] == harmful["meta"]["domain"]
        assert helpful["meta"]["edit"] == harmful["meta"]["edit"] and helpful["meta"]["edit"] in EDITS, pair_id
        assert helpful["response"] != harmful["response"] and helpful["witness"] != harmful["witness"], pair_id
        for side in sides.values():
            assert side["id"] == f"{pair_id}-{side['meta']['valence']}"
        counts[helpful["meta"]["domain"]] += 1
    assert set(counts) == DOMAINS and min(counts.values()) >= 6, dict(counts)


def test_responses_differ_by_a_small_edit(pairs):
    too_far = {}
    for pair_id, sides in pairs.items():
        a, b = words(sides["helpful"]["response"]), words(sides["harmful"]["response"])
        distance = edit_distance(a, b)
        if not 0 < distance <= MAX_EDIT_FRACTION * min(len(a), len(b)):
            too_far[pair_id] = f"{distance} of {min(len(a), len(b))} words"
    assert not too_far, too_far


def test_no_response_carries_a_giveaway_word(rows):
    found = {row["id"]: sorted(set(words(row["response"])) & GIVEAWAY_WORDS) for row in rows}
    assert not {k: v for k, v in found.items() if v}


def test_inputs_are_new_and_not_near_duplicates(pairs):
    inputs = [sides["helpful"]["input"].lower() for sides in pairs.values()]
    others = [r.fields["input"].lower() for path in OTHERS for r in load_triples(path)[0]]
    assert len(set(inputs)) == len(inputs) and not set(inputs) & set(others)
    assert not near_duplicates(inputs, others)
    assert not [hit for i, a in enumerate(inputs) for hit in near_duplicates([a], inputs[i + 1:])]


def test_witnesses_cannot_be_matched_by_copying_words(pairs):
    """A witness shares no more content words with its own response than with the other one."""
    copied = [side["id"] for sides in pairs.values() for valence, side in sides.items()
              if overlap(side["witness"], side["response"])
              > overlap(side["witness"], sides["harmful" if valence == "helpful" else "helpful"]["response"])]
    assert not copied, copied


def test_words_only_classifier_is_near_chance(rows):
    """TF-IDF + logistic regression on the responses, 5 folds grouped by pair, over five fold seeds
    (measured: docs/experiments/lambda.md, "Round 2")."""
    from sklearn.metrics import roc_auc_score

    labels = np.array([row["meta"]["valence"] == "harmful" for row in rows], dtype=int)
    groups = [row["meta"]["pair"] for row in rows]
    texts = [row["response"] for row in rows]
    aurocs = [roc_auc_score(labels, text_probe_scores(texts, labels, probe_folds(labels, groups, 5, seed)))
              for seed in range(5)]
    assert max(aurocs) <= MAX_LEXICAL_AUROC, aurocs


def test_edit_distance():
    assert edit_distance("a b c".split(), "a b c".split()) == 0
    assert edit_distance("a b c".split(), "a x c".split()) == 1
    assert edit_distance("before after".split(), "after before".split()) == 2
    assert edit_distance([], "a b".split()) == 2 and edit_distance("a b c d".split(), "a c d".split()) == 1
