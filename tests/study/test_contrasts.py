"""Study intervals and the round-3 rule (tear_lora/study/contrasts.py, study_report.py) on synthetic `analyze`
reports where the difference between arms is planted or absent."""

import numpy as np

from tear_lora.study.contrasts import decide, two_level
from tear_lora.study.nulls import interval
from tear_lora.study.study_report import study_tables

ITEMS = 64  # quadruples: two pairs, four rows each


SHARED = np.random.default_rng(99).normal(size=4 * ITEMS)  # what every model reads alike in each row


def _source(arm, lam, seed, shift, rng, words=0.5):
    """One source's probe and matching results on the same 256 rows: scores = label · shift + a row's shared
    part + the source's own noise (models scored on the same items agree on most of what they read)."""
    labels = np.tile([0, 1], 2 * ITEMS)
    items = [f"quad:{k // 4}" for k in range(4 * ITEMS)]
    scores = labels * shift + SHARED + 0.3 * rng.normal(size=len(labels))
    delta = rng.normal(shift / 10, 0.05, 2 * ITEMS)
    probe = {"auroc": 0.0, "scores": scores.tolist(), "scored_labels": labels.tolist(), "scored_items": items,
             "p": 0.5, "above_null": 0.0, "n": len(labels), "mde_auroc": 0.62,
             "words": {"response words": words, "input word × response word": words},
             "words_best_auroc": words}
    matching = {"per_pair_delta": delta.tolist(), "items": [f"quad:{k // 2}" for k in range(2 * ITEMS)]}
    train = "quad_train.shuffled.jsonl" if arm == "shuffled" else "quad_train.jsonl"
    return {"name": f"{arm}-{seed}-{lam}", "kind": "base" if arm == "base" else "adapter", "lambda": lam,
            "seed": seed, "response_weight": {}, "train_file": train,
            "data": {"held.jsonl": {"probe": probe, "matching": matching}}}


def _report(lambda1_shift, words=0.5, seeds=(42, 7, 1)):
    rng = np.random.default_rng(0)
    sources = [_source("plain", lam, seed, shift, rng, words) for seed in seeds
               for lam, shift in ((0.0, 0.0), (1.0, lambda1_shift))]
    sources += [_source("shuffled", 1.0, seed, 0.0, rng, words) for seed in seeds]
    sources.append(_source("base", None, None, 0.0, rng, words))
    return {"settings": {"data": ["held.jsonl"]}, "sources": sources}


def test_two_level_intervals_cover_the_seed_mean_and_are_not_hulls():
    groups = two_level(_report(1.0), "held.jsonl", "probe", draws=500)
    lambda1 = groups[("plain", 1.0)]
    assert lambda1["seeds"] == 3 and lambda1["ci"][0] < lambda1["mean"] < lambda1["ci"][1]
    assert 0.7 < lambda1["mean"] < 0.85 and groups[("base", None)]["seeds"] == 1
    assert lambda1["ci"][1] - lambda1["ci"][0] < 0.15


def test_the_rule_finds_a_planted_difference_and_calls_no_difference_negative_or_inconclusive():
    planted = decide(_report(1.0), "held.jsonl", draws=500)
    assert planted["verdict"] == "positive", planted
    assert [c["contrast"] for c in planted["primary"]] == ["λ1 − λ0", "λ1 − shuffled"]
    assert all(c["ci"][0] > 0 and c["p_holm"] <= 0.05 for c in planted["primary"])
    assert {c["level"] for c in planted["primary"]} == {0.95, 0.975}  # Holm: the smaller p at α/2
    assert planted["secondary_matching_delta"][0]["estimate"] > 0
    # the same difference, but a words control reads 0.60: never positive
    assert decide(_report(1.0, words=0.60), "held.jsonl", draws=500)["verdict"] == "inconclusive"
    assert decide(_report(0.0), "held.jsonl", draws=500)["verdict"] in ("negative", "inconclusive")
    none = decide(_report(0.0, seeds=tuple(range(8))), "held.jsonl", draws=500)
    assert all(c["ci"][1] < 0.05 for c in none["primary"]) and none["verdict"] == "negative"


def test_study_tables_print_the_two_level_interval_and_the_verdict():
    table = study_tables(_report(1.0), draws=300)
    assert "| plain λ1 | 3 |" in table and "95% CI, items then seeds" in table and "hull" not in table
    assert "| λ1 − shuffled |" in table and "**positive**" in table


def test_seed_to_seed_spread_widens_the_interval():
    """The second level: seeds that disagree widen the interval beyond what resampling items alone gives
    (red when the seeds are averaged instead of resampled)."""
    rng = np.random.default_rng(1)

    def width(shifts):
        report = {"settings": {"data": ["held.jsonl"]},
                  "sources": [_source("plain", 1.0, seed, shift, rng) for seed, shift in enumerate(shifts)]}
        low, high = two_level(report, "held.jsonl", "probe", draws=500)[("plain", 1.0)]["ci"]
        return high - low

    assert width([0.2, 1.0, 1.8]) > 1.3 * width([1.0, 1.0, 1.0])


def test_resampling_families_widens_an_effect_carried_by_one_family():
    """Round 3's held-out matching Δ came mostly from one of 8 families: resampling quadruples calls such an
    effect certain, resampling families (cluster) does not (red when cluster is ignored)."""
    rng = np.random.default_rng(3)
    family = {f"quad:{k}": f"family:{k % 8}" for k in range(ITEMS)}

    def source(lam, seed):
        result = _source("plain", lam, seed, 0.0, rng)
        items = result["data"]["held.jsonl"]["matching"]["items"]
        delta = [0.4 if lam == 0.0 and family[item] == "family:0" else 0.0 for item in items]
        delta = np.array(delta) + rng.normal(0, 0.01, len(items))
        result["data"]["held.jsonl"]["matching"]["per_pair_delta"] = delta.tolist()
        return result

    report = {"settings": {"data": ["held.jsonl"]},
              "sources": [source(lam, seed) for seed in (42, 7, 1) for lam in (0.0, 1.0)]}

    def lower_bound(cluster):  # of λ0 − λ1's 95% interval; the effect is 0.4 / 8 = 0.05
        groups = two_level(report, "held.jsonl", "matching", draws=1000, cluster=cluster)
        return interval(groups[("plain", 0.0)]["draws"] - groups[("plain", 1.0)]["draws"])[0]

    assert lower_bound(None) > 0.01  # a draw of 64 quadruples nearly always holds some of family 0's 8
    assert lower_bound(family) < 0.005  # a draw of 8 families leaves family 0 out a third of the time
