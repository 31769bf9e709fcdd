"""The study's nulls (tear_lora/study/nulls.py, probe.py, contrasts.py) on synthetic data where the truth is
planted or absent: each null holds at its stated rate, and each goes red when round 2's defect is put back."""

import numpy as np
import pytest

from tear_lora.study.contrasts import holm, weighted_auroc
from tear_lora.study.nulls import matching_stats, mde_auroc, unit_bootstrap
from tear_lora.study.probe import detection_rate, planted_states, probe


def _four(prior_a, prior_b, effect, noise):
    """[pairs, 4] per-token NLL (wA|A, wB|A, wA|B, wB|B): each witness its own prior, `effect` lower after its
    own response."""
    return np.stack([prior_a - effect + noise[:, 0], prior_b + noise[:, 1], prior_a + noise[:, 2],
                     prior_b - effect + noise[:, 3]], axis=1)


def test_a_scorer_that_ignores_the_response_sits_at_every_matching_null():
    """Round 2 compared two witnesses after one response and called 0.25 chance: a response-blind scorer then
    "matches" 0 pairs. Here its Δ is 0, P(Δ > 0) is 0.5 and both-sides sits on its computed null (0 here)."""
    rng = np.random.default_rng(0)
    prior_a, prior_b = rng.uniform(1, 5, 64), rng.uniform(1, 5, 64)
    blind = matching_stats(_four(prior_a, prior_b, 0.0, np.zeros((64, 4))), range(64), 500, 0)
    assert blind["delta_nats"] == 0 and blind["p_positive"] == 0.5 and blind["delta_p"] == 1.0
    assert blind["both_sides"] == blind["both_sides_null"] == 0.0 and blind["both_sides_p"] == 1.0
    assert "sign flip" in blind["null"] and blind["pairs"] == 64 and blind["witnesses"] == 128


def test_matching_null_rejects_at_its_stated_rate_and_finds_a_small_effect():
    """200 response-blind noisy scorers: the sign-flip tests reject about 5% of the time. A response effect ten
    times smaller than the witnesses' prior differences is found by the per-witness Δ (comparing two witnesses
    after one response, as round 2 did, would read the priors instead)."""
    rng = np.random.default_rng(1)
    rejected = {"delta_p": 0, "p_positive_p": 0, "both_sides_p": 0}
    for k in range(200):
        stats = matching_stats(_four(rng.uniform(1, 5, 32), rng.uniform(1, 5, 32), 0.0, rng.normal(0, 0.3, (32, 4))),
                               range(32), 200, k)
        for key in rejected:
            rejected[key] += stats[key] < 0.05
        assert abs(stats["both_sides_null"] - 0.25) < 0.2
    assert all(2 <= n <= 20 for n in rejected.values()), rejected
    prior_a, prior_b = rng.uniform(1, 5, 32), rng.uniform(1, 5, 32)
    found = matching_stats(_four(prior_a, prior_b, 0.2, rng.normal(0, 0.02, (32, 4))), range(32), 500, 0)
    assert found["p_positive"] == 1.0 and found["delta_p"] < 0.01 and found["delta_ci"][0] > 0.15
    assert found["both_sides"] == 1.0 and found["both_sides_p"] < 0.01


def test_unit_bootstrap_resamples_whole_units_and_mde_shrinks_with_n():
    values = np.repeat(np.random.default_rng(0).normal(size=20), 2)  # 20 units, each its two rows alike
    units = np.repeat(np.arange(20), 2)
    whole, rows = unit_bootstrap(values, units, 2000, 0), unit_bootstrap(values, np.arange(40), 2000, 0)
    assert whole[1] - whole[0] > 1.25 * (rows[1] - rows[0])  # ~√2 wider: 20 units, not 40 rows
    assert mde_auroc(48, 48) == pytest.approx(0.66, abs=0.02)  # round 2: 64 pairs, a quarter for selection
    assert mde_auroc(96, 96) < mde_auroc(48, 48) < mde_auroc(16, 16)


def _no_signal(k, layers=8):
    rng = np.random.default_rng(k)
    labels, pairs = np.tile([0, 1], 32), np.repeat(np.arange(32), 2)
    return planted_states(labels, pairs, 0.5, layers, 48, 0, rng), labels, pairs


def test_probe_without_signal_is_unbiased_and_rejects_at_its_stated_rate():
    """No signal in any of 8 layers: the scored AUROC averages 0.5 (round 2 chose the best layer on the rows it
    scored, which averages well above it) and the permutation null rejects about 5% of the time."""
    aurocs, rejected = [], 0
    for k in range(24):
        states, labels, pairs = _no_signal(k)
        result = probe(states, labels, pairs // 4, pairs, folds=4, draws=200, seed=k)
        aurocs.append(result["auroc"])
        rejected += result["p"] < 0.05
        assert result["null"].startswith("within-pair label swap, 200 draws")
        assert result["selection_rows"] + result["scored_rows"] == 64 and abs(result["null_mean"] - 0.5) < 0.05
    assert abs(np.mean(aurocs) - 0.5) < 0.03, np.mean(aurocs)
    assert rejected <= 4, rejected


def test_planted_signal_is_found_and_a_shuffled_one_is_not():
    """The positive control, small: planted AUROC 0.9 in one of 5 layers at 64 pairs is detected; the same states
    with labels swapped within pairs are not. The study-size run: scripts/experiments/planted_control.py."""
    small = {"pairs": 64, "layers": 5, "dim": 64, "draws": 200, "folds": 4, "pairs_per_group": 4}
    assert detection_rate(0.9, repeats=4, seed=0, **small)["rate"] >= 0.75
    assert detection_rate(0.9, repeats=4, seed=0, shuffle=True, **small)["rate"] <= 0.25


def test_holm_and_weighted_auroc():
    assert holm([0.01, 0.04]) == [0.02, 0.04] and holm([0.04, 0.01, 0.5]) == [0.08, 0.03, 0.5]
    scores, labels = np.array([0.1, 0.9, 0.2, 0.8]), np.array([0, 1, 0, 1])
    assert weighted_auroc(scores, labels, np.ones((2, 4))).tolist() == [1.0, 1.0]
    assert weighted_auroc(np.zeros(4), labels, np.array([[1, 2, 0, 1]]))[0] == 0.5
