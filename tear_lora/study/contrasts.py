"""Study-level intervals and the round-3 decision rule (docs/experiments/round3_rule.md), from `analyze` JSON.

Round 2's "95% CI" column was the hull of per-seed intervals: not an interval of anything. Here a study figure is
the seed average of a per-source statistic, and its interval comes from a two-level bootstrap: resample the
evaluation items (quadruples, else pairs; the same draw for every arm, since every arm is scored on the same
items), then resample seeds within each arm. Contrasts between arms are differences of those draws; p-values are
two-sided bootstrap p-values, Holm-corrected over the contrasts a rule names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .nulls import interval, unit_weights

ALPHA = 0.05
RULE = {"auroc_min": 0.60, "words_max": 0.55, "negative_max": 0.05}  # round3_rule.md, fixed before the run
PRIMARY = (("λ1 − λ0", ("plain", 1.0), ("plain", 0.0)), ("λ1 − shuffled", ("plain", 1.0), ("shuffled", 1.0)))


def arm_of(source: dict) -> str:
    """base; witness-only (response weights); shuffled (trained on a file named *shuffled*); else plain."""
    if source["kind"] == "base":
        return "base"
    if source.get("response_weight"):
        return "witness-only"
    return "shuffled" if "shuffled" in Path(source.get("train_file") or "").name else "plain"


def groups_of(report: dict, data_file: str, instrument: str) -> dict[tuple, list[dict]]:
    """{(arm, λ): [that instrument's result for each seed]} for the sources where it ran."""
    found: dict[tuple, list[dict]] = {}
    for source in report["sources"]:
        result = source["data"][data_file][instrument]
        if "skipped" not in result:
            lam = None if source["lambda"] is None else float(source["lambda"])
            found.setdefault((arm_of(source), lam), []).append(result)
    return found


def weighted_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[draws] AUROC of one score vector under each row of weights [draws, rows] (ties count ½)."""
    positive, negative = scores[labels == 1], scores[labels == 0]
    wins = (positive[:, None] > negative[None, :]) + 0.5 * (positive[:, None] == negative[None, :])
    w_pos, w_neg = weights[:, labels == 1], weights[:, labels == 0]
    return ((w_pos @ wins) * w_neg).sum(1) / np.maximum(w_pos.sum(1) * w_neg.sum(1), 1e-12)


def _per_seed_draws(instrument: str, results: list[dict], weights_for) -> tuple[np.ndarray, np.ndarray]:
    """(observed per seed [seeds], item-resampled statistic per seed [seeds, draws])."""
    observed, draws = [], []
    for result in results:
        if instrument == "probe":
            labels, scores = np.array(result["scored_labels"]), np.array(result["scores"])
            weights = weights_for(result["scored_items"])
            observed.append(weighted_auroc(scores, labels, np.ones((1, len(labels))))[0])
            draws.append(weighted_auroc(scores, labels, weights))
        else:
            delta = np.array(result["per_pair_delta"])
            weights = weights_for(result["items"])
            observed.append(delta.mean())
            draws.append((weights @ delta) / np.maximum(weights.sum(1), 1e-12))
    return np.array(observed), np.stack(draws)


def two_level(report: dict, data_file: str, instrument: str, draws: int = 2000, seed: int = 0,
              cluster: dict[str, str] | None = None) -> dict:
    """{(arm, λ): {"mean", "ci", "seeds", "draws"}}: seed-averaged probe AUROC ("probe") or matching Δ
    ("matching"), items resampled first (one draw shared by every arm), then seeds within the arm. cluster maps
    an item to a coarser unit drawn whole instead (its family): items of one family share more than chance, so
    a claim about new families needs the families resampled, not the quadruples."""
    groups = groups_of(report, data_file, instrument)
    if not groups:
        return {}
    key = "scored_items" if instrument == "probe" else "items"
    unit_of = cluster or {}
    all_units = {unit_of.get(item, item) for results in groups.values() for result in results for item in result[key]}
    universe = {unit: k for k, unit in enumerate(sorted(all_units))}
    rng = np.random.default_rng(seed)
    unit_draws = unit_weights(np.arange(len(universe)), draws, rng)  # [draws, units]

    def weights_for(items):
        return unit_draws[:, [universe[unit_of.get(i, i)] for i in items]]

    out = {}
    for key, results in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] if kv[0][1] is not None else -1)):
        observed, per_seed = _per_seed_draws(instrument, results, weights_for)
        picks = rng.integers(0, len(results), size=(draws, len(results)))
        stats = per_seed[picks, np.arange(draws)[:, None]].mean(1)
        out[key] = {"mean": float(observed.mean()), "ci": interval(stats), "seeds": len(results), "draws": stats}
    return out


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values, in the given order."""
    order = np.argsort(p_values)
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, k in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[k]))
        adjusted[k] = running
    return adjusted


def contrasts(groups: dict, named: tuple = PRIMARY) -> list[dict]:
    """Each named difference a − b of two_level groups: estimate, bootstrap p, Holm-adjusted p, and an interval at
    the Holm level of its rank (1 − α/m for the smallest p, ..., 1 − α for the largest)."""
    found = [(name, groups[a], groups[b]) for name, a, b in named if a in groups and b in groups]
    if not found:
        return []
    rows = []
    for name, a, b in found:
        difference = a["draws"] - b["draws"]
        p = min(1.0, 2 * min((difference <= 0).mean(), (difference >= 0).mean()))
        rows.append({"contrast": name, "estimate": a["mean"] - b["mean"], "p": max(p, 1 / len(difference)),
                     "sd": float(difference.std()), "_draws": difference})
    adjusted = holm([r["p"] for r in rows])
    for rank, k in enumerate(np.argsort([r["p"] for r in rows])):
        level = 1 - ALPHA / (len(rows) - rank)
        rows[k].update(p_holm=adjusted[k], level=level, ci=interval(rows[k].pop("_draws"), level),
                       mde=float(2.8 * rows[k]["sd"]))  # (z_0.975 + z_0.8) · SD: detectable with power ≈ 0.8
    return rows


def decide(report: dict, data_file: str, draws: int = 2000, seed: int = 0,
           cluster: dict[str, str] | None = None) -> dict:
    """The round-3 rule on one data file (the held-out families): positive, negative or inconclusive, with the
    figures it was decided on. cluster: as in two_level (the rule itself resamples quadruples)."""
    probe = two_level(report, data_file, "probe", draws, seed, cluster)
    primary = contrasts(probe)
    lambda1 = probe.get(("plain", 1.0), {}).get("mean")
    words = next((r.get("words") for rs in groups_of(report, data_file, "probe").values() for r in rs), None) or {}
    if len(primary) < len(PRIMARY) or lambda1 is None or not words:
        verdict = "not applicable (needs λ 0, λ 1 and shuffled arms with probe scores and words controls)"
    elif all(c["ci"][0] > 0 for c in primary) and lambda1 >= RULE["auroc_min"] and \
            all(v <= RULE["words_max"] for v in words.values()):
        verdict = "positive"
    elif all(c["ci"][1] < RULE["negative_max"] for c in primary):
        verdict = "negative"
    else:
        verdict = "inconclusive"
    secondary = contrasts(two_level(report, data_file, "matching", draws, seed, cluster), (PRIMARY[0],))
    return {"data": data_file, "verdict": verdict, "rule": RULE, "lambda1_auroc": lambda1, "words": words,
            "primary": primary, "secondary_matching_delta": secondary,
            "groups": {f"{arm} λ{lam:g}" if lam is not None else arm: {k: v for k, v in g.items() if k != "draws"}
                       for (arm, lam), g in probe.items()}}

