"""Checks for the hand-written contrast set, data/raw/contrast.jsonl (fast, no model).

Every pair is one input with a helpful and a harmful response, each with its own witness, stored as two ordinary
triple lines (`meta.pair` links them). Beyond loading cleanly, the checks make sure the pairs are useful as
contrasts: inputs are new (not near-copies of the bundled data or of each other), and which witness belongs to
which response is recoverable from content, not only from tone.
"""

from __future__ import annotations

import re
from collections import defaultdict
from difflib import SequenceMatcher

import pytest

from tear_lora.data.prepare import load_triples

from ..conftest import REPO

CONTRAST = REPO / "data/raw/contrast.jsonl"
BUNDLED = (REPO / "data/raw/consequences.jsonl", REPO / "data/raw/eval.jsonl")
DOMAINS = {"advice", "health", "money", "code", "relationships", "work", "safety", "education/parenting/environment"}
NEAR_DUPLICATE = 0.8

STOP_WORDS = frozenset("""
a about after again all also am an and any are as at be because been before being both but by can could
did do does doesn don down each even ever every few for from had has have he her here hers him his how i if in
into is it its itself just let ll me more most my no nor not now of off on once one only or other our out over own
re s same she should so some still such t than that the their them then there these they this those through to
too under until up very was we were what when where which while who whom why will with would you your yours
""".split())
VALENCE_WORDS = frozenset("""
good bad well badly helped help helps helpful hurt hurts harm harmed harmful worse worst better best great
terrible awful happy unhappy angry upset fine wrong right safe safely unsafe correct correctly success successful
failed failure luckily unfortunately glad sad nice poor lucky
""".split())
NON_CONTENT = STOP_WORDS | VALENCE_WORDS


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def content_words(text: str, min_len: int = 3) -> set[str]:
    """Lowercased words minus stop and valence words (and very short tokens)."""
    return {w for w in words(text) if len(w) >= min_len and w not in NON_CONTENT}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def overlap(witness: str, response: str) -> int:
    """Content words (4+ letters, not stop/valence) a witness shares with a response."""
    return len(content_words(witness, 4) & content_words(response, 4))


def near_duplicates(inputs: list[str], others: list[str]) -> list[tuple[float, str, str]]:
    """Every (ratio, a, b) with SequenceMatcher(None, a, b).ratio() >= NEAR_DUPLICATE, a in inputs, b in others.

    quick_ratio() is an upper bound on ratio(), so pairs below the threshold on it are skipped exactly."""
    found = []
    matcher = SequenceMatcher(None)
    for b in others:
        matcher.set_seq2(b)  # caches b's index, reused for every a
        for a in inputs:
            matcher.set_seq1(a)
            if matcher.real_quick_ratio() >= NEAR_DUPLICATE and matcher.quick_ratio() >= NEAR_DUPLICATE:
                ratio = matcher.ratio()
                if ratio >= NEAR_DUPLICATE:
                    found.append((round(ratio, 3), a, b))
    return found


@pytest.fixture(scope="module")
def rows():
    kept, rejects = load_triples(CONTRAST, skip_invalid=True)
    assert not rejects, [r.as_dict() for r in rejects]
    return kept


@pytest.fixture(scope="module")
def pairs(rows):
    grouped = defaultdict(list)
    for row in rows:
        grouped[row.fields["meta"]["pair"]].append(row.fields)
    result = {}
    for pair_id, sides in grouped.items():
        by_valence = {side["meta"]["valence"]: side for side in sides}
        assert len(sides) == 2 and set(by_valence) == {"helpful", "harmful"}, (pair_id, [s["id"] for s in sides])
        result[pair_id] = by_valence
    return result


def test_loads_without_rejects_and_has_enough_pairs(rows, pairs):
    assert len(rows) == 2 * len(pairs)
    assert len(pairs) >= 60
    for row in rows:
        meta = row.fields["meta"]
        assert meta["valence"] in {"helpful", "harmful"} and meta["domain"] in DOMAINS, row.fields["id"]
        assert row.fields["id"] == f"{meta['pair']}-{meta['valence']}"


def test_each_pair_shares_input_and_domain_and_has_distinct_responses(pairs):
    for pair_id, sides in pairs.items():
        helpful, harmful = sides["helpful"], sides["harmful"]
        assert helpful["input"] == harmful["input"], pair_id
        assert helpful["meta"]["domain"] == harmful["meta"]["domain"], pair_id
        assert helpful["response"] != harmful["response"] and helpful["witness"] != harmful["witness"], pair_id


def test_all_domains_are_covered(pairs):
    counts = defaultdict(int)
    for sides in pairs.values():
        counts[sides["helpful"]["meta"]["domain"]] += 1
    assert set(counts) == DOMAINS
    assert min(counts.values()) >= 6, dict(counts)


def test_inputs_are_new_and_not_near_duplicates(pairs):
    inputs = [sides["helpful"]["input"].lower() for sides in pairs.values()]
    bundled = [r.fields["input"].lower() for path in BUNDLED for r in load_triples(path)[0]]
    assert not set(inputs) & set(bundled)
    assert len(set(inputs)) == len(inputs)
    assert not near_duplicates(inputs, bundled)
    assert not [hit for i, a in enumerate(inputs) for hit in near_duplicates([a], inputs[i + 1:])]


def test_pair_witnesses_differ_in_substance_not_just_valence(pairs):
    scores = {pair_id: jaccard(content_words(s["helpful"]["witness"]), content_words(s["harmful"]["witness"]))
              for pair_id, s in pairs.items()}
    too_similar = {p: round(score, 2) for p, score in scores.items() if score >= 0.5}
    assert not too_similar, too_similar


def test_witnesses_pick_up_their_own_response(pairs):
    unanchored = [side["id"] for sides in pairs.values() for side in sides.values()
                  if overlap(side["witness"], side["response"]) < 1]
    assert not unanchored, unanchored

    def matchable(sides):
        helpful, harmful = sides["helpful"], sides["harmful"]
        return (overlap(helpful["witness"], helpful["response"]) > overlap(helpful["witness"], harmful["response"])
                and overlap(harmful["witness"], harmful["response"]) > overlap(harmful["witness"], helpful["response"]))

    passing = sum(matchable(sides) for sides in pairs.values())
    assert passing >= 0.75 * len(pairs), f"{passing}/{len(pairs)} pairs matchable from content"


def test_content_helpers():
    assert content_words("It helped, and the outcome was GOOD; the 401k grew.") == {"outcome", "grew", "401k"}
    assert jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)
    assert overlap("She filed the chargeback.", "File a chargeback with your issuer.") == 1
