"""Known nulls for the study's instruments: witness matching, resampling intervals, power.

Round 2 (docs/experiments/lambda.md) read numbers against nulls that were assumed, not computed: matching against
"chance 0.25" for a rule whose null is ~0, intervals that resampled rows where pairs belong together. Here every
statistic comes with the distribution it has when nothing is there, computed from the data:

- `matching_stats`: each witness scored on its own. Δ = NLL(w | X, partner's response) − NLL(w | X, own response),
  per token: the witness's own prior cancels. If the model ignores the response, swapping which response is "own"
  within a pair flips the signs of both of its Δ, so the null is the sign-flip distribution over pairs.
- `unit_bootstrap`: percentile intervals resampling whole units (pairs, quadruples), never single rows.
- `mde_auroc`, `mde_mean`: the smallest effect the test detects at the n used (two-sided α 0.05, power 0.8).

Pure numpy: fast to test, and the same code reads a model's NLLs and the word-overlap model's.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

ALPHA, POWER = 0.05, 0.8


def codes(units) -> np.ndarray:
    """Integer codes 0..k-1 for any hashable unit labels (pairs, quadruples, families)."""
    return np.unique([str(u) for u in units], return_inverse=True)[1]


def interval(stats: np.ndarray, level: float = 0.95) -> list[float]:
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(stats, tail)), float(np.percentile(stats, 100 - tail))]


def unit_weights(units: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """[draws, rows]: how often each row's unit was drawn when resampling units with replacement."""
    count = int(units.max()) + 1
    picks = rng.integers(0, count, size=(draws, count))
    per_unit = np.stack([np.bincount(p, minlength=count) for p in picks])
    return per_unit[:, units]


def unit_bootstrap(values: np.ndarray, units, draws: int, seed: int, weights: np.ndarray | None = None) -> list[float]:
    """95% interval of mean(values) (or sum(values) / sum(weights)) resampling whole units."""
    w = unit_weights(codes(units), draws, np.random.default_rng(seed))
    denominator = w.sum(1) if weights is None else w @ weights
    return interval((w @ values) / np.maximum(denominator, 1e-12))


def sign_flip_p(per_unit: np.ndarray, flipped: np.ndarray, draws: int, seed: int) -> tuple[float, np.ndarray]:
    """Two-sided p of mean(per_unit) against random flips, each unit independently taking `flipped` with
    probability ½ (the null: which side is "own" does not matter). Returns (p, the null's draws)."""
    rng = np.random.default_rng(seed)
    flip = rng.random((draws, len(per_unit))) < 0.5
    null = np.where(flip, flipped, per_unit).mean(1)
    center = (per_unit.mean() + flipped.mean()) / 2  # the null's exact mean
    observed = abs(per_unit.mean() - center)
    return float((1 + np.sum(np.abs(null - center) >= observed - 1e-12)) / (1 + draws)), null


def matching_stats(per_token: np.ndarray, units, draws: int, seed: int) -> dict:
    """[pairs, 4] per-token NLL of (wA|A, wB|A, wA|B, wB|B) -> per-witness Δ, P(Δ > 0) and both-sides, each with
    its null; `units` [pairs] say what the bootstrap resamples (the pair, or its quadruple)."""
    a_after_a, b_after_a, a_after_b, b_after_b = per_token.T
    delta = np.stack([a_after_b - a_after_a, b_after_a - b_after_b], axis=1)  # [pairs, 2]
    positive = (delta > 0) + 0.5 * (delta == 0)  # a tie is half a success: its flip is itself
    both, both_flipped = (delta > 0).all(1).astype(float), (delta < 0).all(1).astype(float)
    pair_delta, pair_positive = delta.mean(1), positive.mean(1)
    p_delta, _ = sign_flip_p(pair_delta, -pair_delta, draws, seed)
    p_positive, _ = sign_flip_p(pair_positive, 1 - pair_positive, draws, seed)
    p_both, _ = sign_flip_p(both, both_flipped, draws, seed)
    sd = float(pair_delta.std(ddof=1)) if len(pair_delta) > 1 else 0.0
    return {"pairs": len(delta), "witnesses": int(delta.size),
            "null": "sign flip within pairs (which response is own), " f"{draws} draws",
            "delta_nats": float(delta.mean()), "delta_ci": unit_bootstrap(pair_delta, units, draws, seed),
            "delta_p": p_delta, "p_positive": float(positive.mean()), "p_positive_null": 0.5,
            "p_positive_ci": unit_bootstrap(pair_positive, units, draws, seed), "p_positive_p": p_positive,
            "both_sides": float(both.mean()), "both_sides_null": float((both + both_flipped).mean() / 2),
            "both_sides_p": p_both,
            "mde": {"delta_nats": mde_mean(sd, len(pair_delta)), "p_positive": mde_mean(0.5, len(pair_delta),
                                                                                        center=0.5)},
            "per_pair_delta": [round(float(v), 6) for v in pair_delta]}


def _z() -> float:
    return float(norm.ppf(1 - ALPHA / 2) + norm.ppf(POWER))


def mde_mean(sd: float, n: int, center: float = 0.0) -> float | None:
    """The mean a two-sided α 0.05 test detects with power 0.8 from n independent units of spread `sd`."""
    return None if n < 2 else float(center + _z() * sd / np.sqrt(n))


def auroc_se(auroc: float, positives: int, negatives: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUROC."""
    q1, q2 = auroc / (2 - auroc), 2 * auroc ** 2 / (1 + auroc)
    return float(np.sqrt((auroc * (1 - auroc) + (positives - 1) * (q1 - auroc ** 2)
                          + (negatives - 1) * (q2 - auroc ** 2)) / (positives * negatives)))


def mde_auroc(positives: int, negatives: int) -> float | None:
    """Smallest AUROC that beats 0.5 (two-sided α 0.05) with power 0.8 on this many rows, by bisection."""
    if min(positives, negatives) < 2:
        return None
    threshold = 0.5 + norm.ppf(1 - ALPHA / 2) * auroc_se(0.5, positives, negatives)
    low, high = 0.5, 0.9999
    for _ in range(60):
        mid = (low + high) / 2
        reached = norm.cdf((mid - threshold) / auroc_se(mid, positives, negatives))
        low, high = (mid, high) if reached < POWER else (low, mid)
    return float(high)
