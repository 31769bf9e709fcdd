"""The impact probe with its null computed: selection on one split, scoring on the rest, and a permutation null
that re-runs every selection step.

Round 2 chose the best of 31 layers on the rows it then scored (a null best-of-31 at 64 pairs averages AUROC
≈ 0.57) and compared it with one row-level label shuffle. Here:

1. About a quarter of the groups (pairs, or families when the data has them) form the selection split. On it,
   grouped cross-validation picks the layer and the ridge penalty. Nothing else is chosen.
2. The other groups are scored: grouped out-of-fold AUROC at that one layer and penalty.
3. The null: labels swapped at random within each pair (the unit whose two rows share an input), ≥ 1,000 draws,
   each draw re-running steps 1-2, layer choice included. p = (1 + #null ≥ observed) / (1 + draws).

The probe is a ridge regression on standardised features (a linear probe, like logistic regression: AUROC only
reads the ranking). Its out-of-fold scores are a linear map of the training labels, so one matrix per (layer,
penalty, fold) scores every permuted label vector at once: 1,000 draws over 31 layers take seconds on a CPU.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from .lexical import probe_folds
from .nulls import codes, mde_auroc

ALPHAS = (0.1, 1.0, 10.0)  # ridge penalties, relative to the kernel's scale (features standardised, K = XXᵀ/d)
SELECTION_FRACTION = 0.25


def selection_split(groups: np.ndarray, labels: np.ndarray, seed: int,
                    fraction: float = SELECTION_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(selection rows, scored rows): whole groups, in a seeded order, until `fraction` of the groups and both
    labels are in the selection split."""
    order = np.random.default_rng(seed).permutation(np.unique(groups))
    wanted = max(1, int(round(len(order) * fraction)))
    chosen: list = []
    for group in order:
        chosen.append(group)
        selected = np.isin(groups, chosen)
        if len(chosen) >= wanted and len(set(labels[selected])) == 2:
            break
    return np.flatnonzero(selected), np.flatnonzero(~selected)


class TooFewGroups(ValueError):
    """The data has too few groups for a grouped selection split with grouped folds on each side."""


def probe_splits(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> tuple:
    """(selection rows, scored rows, folds inside the selection split, folds inside the scored split), every one
    grouped: they depend on the groups and the seed only, so every source and every words control shares them.
    Each side needs two groups or more (folds keep a group whole), else TooFewGroups says so."""
    select, score = selection_split(groups, labels, seed)
    for side, rows in (("selection", select), ("scored", score)):
        if len(set(groups[rows])) < 2:
            raise TooFewGroups(f"needs rows from more groups (families, else pairs): {len(set(groups))} here, "
                               f"which leaves the {side} split {len(set(groups[rows]))} (a quarter of the groups "
                               "choose the layer, the rest are scored, each side in grouped folds)")
    inner = probe_folds(labels[select], groups[select], min(folds, len(set(groups[select]))), seed)
    outer = probe_folds(labels[score], groups[score], min(folds, len(set(groups[score]))), seed)
    return select, score, inner, outer


def within_unit_permutations(labels: np.ndarray, units: np.ndarray, draws: int, seed: int) -> np.ndarray:
    """[rows, draws]: labels shuffled within each unit (a pair's two rows swap with probability ½)."""
    rng = np.random.default_rng(seed)
    by_unit = np.argsort(units, kind="stable")
    out = np.empty((len(labels), draws), dtype=labels.dtype)
    for d in range(draws):
        shuffled = np.lexsort((rng.random(len(labels)), units))  # rows in unit order, random within a unit
        out[by_unit, d] = labels[shuffled]
    return out


def fold_maps(features: np.ndarray, folds, alphas=ALPHAS) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per fold (train, test, maps [alphas, test, train]): ridge out-of-fold scores = maps @ y[train],
    standardised on the training rows only."""
    out = []
    for train, test in folds:
        mean, scale = features[train].mean(0), features[train].std(0)
        scale[scale <= 1e-6 * np.maximum(np.abs(mean), 1.0)] = np.inf  # a constant feature carries nothing
        x_train, x_test = (features[train] - mean) / scale, (features[test] - mean) / scale
        kernel, cross = x_train @ x_train.T / features.shape[1], x_test @ x_train.T / features.shape[1]
        values, vectors = np.linalg.eigh(kernel)
        centering = np.eye(len(train)) - 1.0 / len(train)
        # no intercept: the training fold's label mean would rank whole folds against each other (a known
        # negative bias of cross-validated AUROC); only the ranking inside the fit matters
        maps = np.stack([(cross @ (vectors / (values + alpha)) @ vectors.T) @ centering for alpha in alphas])
        out.append((train, test, maps))
    return out


def auroc_columns(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of every column of scores [rows, k] against the same column of 0/1 labels (ties count ½)."""
    ranks = rankdata(scores, axis=0)
    positives = labels.sum(0)
    negatives = len(labels) - positives
    return ((ranks * labels).sum(0) - positives * (positives + 1) / 2) / (positives * negatives)


def _oof_aurocs(features: np.ndarray, folds, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([alphas, columns] out-of-fold AUROC, [alphas, rows, columns] scores) for every label column at once."""
    scores = np.zeros((len(ALPHAS), *labels.shape))
    for train, test, maps in fold_maps(features, folds):
        scores[:, test] = maps @ labels[train]
    return np.stack([auroc_columns(s, labels) for s in scores]), scores


def probe(states: np.ndarray, labels: np.ndarray, groups, units, folds: int = 5, draws: int = 1000,
          seed: int = 0) -> dict:
    """states [layers, rows, hidden]; labels 0/1; groups keep rows together in every split (pair or family);
    units are what the null swaps labels within (the pair). Everything chosen is chosen on the selection split."""
    labels = np.asarray(labels, dtype=int)
    group_codes, unit_codes = codes(groups), codes(units)
    select, score, inner, outer = probe_splits(labels, group_codes, folds, seed)
    null_kind = "within-pair label swap"
    if np.bincount(unit_codes).max() < 2:  # no pairs: shuffle within the fold groups, else within each split
        unit_codes, null_kind = group_codes, "label shuffle within fold groups"
        if np.bincount(unit_codes).max() < 2:
            unit_codes = np.isin(np.arange(len(labels)), select).astype(int)
            null_kind = "label shuffle across rows within each split (no pairs or groups)"
    all_labels = np.column_stack([labels, within_unit_permutations(labels, unit_codes, draws, seed + 1)])
    layers = states.shape[0]
    chosen_on = np.zeros((layers, len(ALPHAS), all_labels.shape[1]))
    scored = np.zeros_like(chosen_on)
    kept_scores = {}
    for layer in range(layers):
        chosen_on[layer] = _oof_aurocs(states[layer][select], inner, all_labels[select])[0]
        scored[layer], scores = _oof_aurocs(states[layer][score], outer, all_labels[score])
        kept_scores[layer] = scores[:, :, 0]
    flat = chosen_on.reshape(layers * len(ALPHAS), -1).argmax(0)  # per draw: its own best (layer, penalty)
    result = scored.reshape(layers * len(ALPHAS), -1)[flat, np.arange(len(flat))]
    observed, null = float(result[0]), result[1:]
    layer, alpha = divmod(int(flat[0]), len(ALPHAS))
    score_labels = labels[score]
    positives = int(score_labels.sum())
    return {"auroc": observed, "layer": layer, "alpha": ALPHAS[alpha],
            "null": f"{null_kind}, {draws} draws, layer and penalty re-chosen in each",
            "null_mean": float(null.mean()), "null_95": float(np.percentile(null, 95)),
            "p": float((1 + np.sum(null >= observed - 1e-12)) / (1 + draws)),
            "above_null": float(observed - null.mean()),
            "selection_rows": len(select), "scored_rows": len(score), "scored_harmful": positives,
            "folds": len(outer), "mde_auroc": mde_auroc(positives, len(score) - positives),
            "layer_auroc_scored": [float(v) for v in scored[:, ALPHAS.index(1.0), 0]],  # descriptive only
            "scored_index": score.tolist(), "scores": [round(float(v), 6) for v in kept_scores[layer][alpha]]}


def planted_states(labels: np.ndarray, pairs: np.ndarray, auroc: float, layers: int, dim: int, planted_layer: int,
                   rng: np.random.Generator, rank: int = 32) -> np.ndarray:
    """Synthetic hidden states whose best linear read-out of the label has population AUROC `auroc` in one layer
    (0.5 in every other). Each layer is `rank` latent factors (half their variance shared by a pair's two rows:
    same input) spread over `dim` features, as a language model's states are low-rank; the signal is a shift
    along one random latent direction, so the optimal score's AUROC is Φ(shift / √2) exactly."""
    states = np.empty((layers, len(labels), dim))
    shift = np.sqrt(2) * float(_probit(auroc))
    for layer in range(layers):
        latent = (rng.standard_normal((int(pairs.max()) + 1, rank))[pairs]
                  + rng.standard_normal((len(labels), rank))) / np.sqrt(2)
        if layer == planted_layer:
            direction = rng.standard_normal(rank)
            latent += np.outer(labels - 0.5, direction / np.linalg.norm(direction) * shift)
        states[layer] = latent @ rng.standard_normal((rank, dim))
    return states


def _probit(p: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(p))


def detection_rate(auroc: float, pairs: int, repeats: int, seed: int, layers: int = 31, dim: int = 576,
                   pairs_per_group: int = 2, draws: int = 1000, folds: int = 5, shuffle: bool = False) -> dict:
    """How often the probe's null rejects at p < 0.05 on planted states (`shuffle`: the labels the states were
    built from are replaced by a within-pair swap, so nothing is there to find)."""
    rng = np.random.default_rng(seed)
    labels = np.tile([0, 1], pairs)
    pair_ids = np.repeat(np.arange(pairs), 2)
    groups = pair_ids // pairs_per_group
    hits, aurocs = 0, []
    for k in range(repeats):
        states = planted_states(labels, pair_ids, auroc, layers, dim, int(rng.integers(layers)), rng)
        used = within_unit_permutations(labels, pair_ids, 1, seed + k)[:, 0] if shuffle else labels
        result = probe(states, used, groups, pair_ids, folds=folds, draws=draws, seed=seed + k)
        hits += result["p"] < 0.05
        aurocs.append(result["auroc"])
    return {"planted_auroc": auroc, "pairs": pairs, "repeats": repeats, "shuffled": shuffle,
            "rate": hits / repeats, "mean_auroc": float(np.mean(aurocs))}
