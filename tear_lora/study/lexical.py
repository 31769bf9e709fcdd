"""Lexical controls for `tear-lora analyze`: what the response's words alone give each instrument.

A hidden-state probe that reads helpful vs harmful, or a witness that is likelier after its own response, shows
that a model represents impact only beyond what a model of the surface words gets on the same rows. Two such
controls live here, plus the fold split and the paired bootstrap that put a probe and its control side by side:

- `text_probe_scores`: TF-IDF of the response text + the same logistic regression, on the same folds, out of fold.
- `word_control_scores`: the strongest words-only probes we know of, each with its C tuned inside the folds:
  response words; response words + word pairs; input + response words; input word × response word pairs (the
  one that reads a string match between input and response). "Beyond words" means beyond the best of them.
- `OverlapScorer`: a unigram model of the witness given the response's words (Dirichlet-smoothed word overlap),
  whose per-word NLL goes through exactly the matching / sensitivity arithmetic a model's per-token NLL does.

No torch or model code: fast to test, and usable on a data file before any training (docs/experiments/lambda.md).
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

WORD = re.compile(r"[a-z0-9]+")
OVERLAP_MU = 10.0  # Dirichlet prior mass: a ~30-word response and the background weigh about 3:1


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def probe_folds(labels: np.ndarray, groups: list, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs, stratified by label and never splitting a group (the two sides of a contrast
    pair), so a probe never sees one side of a pair while being scored on the other."""
    from sklearn.model_selection import StratifiedGroupKFold

    codes = np.unique([str(g) for g in groups], return_inverse=True)[1]
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(cv.split(np.zeros(len(labels)), labels, codes))


def out_of_fold(make_model, features, labels: np.ndarray, folds) -> np.ndarray:
    """P(label 1) for every row from a model fitted on the other folds."""
    scores = np.zeros(len(labels))
    for train, test in folds:
        model = make_model().fit(features[train] if not isinstance(features, list) else [features[i] for i in train],
                                 labels[train])
        test_x = features[test] if not isinstance(features, list) else [features[i] for i in test]
        scores[test] = model.predict_proba(test_x)[:, 1]
    return scores


def text_probe_scores(texts: list[str], labels: np.ndarray, folds) -> np.ndarray:
    """The lexical control of the impact probe: TF-IDF (scikit-learn defaults) + logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return out_of_fold(lambda: make_pipeline(TfidfVectorizer(), LogisticRegression(max_iter=2000)), texts, labels,
                       folds)


def _bigrams(text: str) -> list[str]:
    found = words(text)
    return found + [f"{a} {b}" for a, b in zip(found, found[1:])]


WORD_CONTROLS = {  # name: (input, response) -> the tokens a bag-of-words model sees
    "response words": lambda pair: words(pair[1]),
    "response words + word pairs": lambda pair: _bigrams(pair[1]),
    "input + response words": lambda pair: [f"i:{w}" for w in words(pair[0])] + [f"r:{w}" for w in words(pair[1])],
    "input word × response word": lambda pair: WORD_CONTROLS["input + response words"](pair) + [
        f"{a}|{b}" for a in sorted(set(words(pair[0]))) for b in sorted(set(words(pair[1])))],
}
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def word_control_scores(pairs: list[tuple[str, str]], labels: np.ndarray, groups, folds, seed: int) -> dict:
    """{control: out-of-fold score for label 1} for every WORD_CONTROLS entry on the given (train, test) folds, C chosen
    by grouped AUROC inside each training fold (nested), so no control is handicapped by a fixed C."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline

    group_codes = np.unique([str(g) for g in groups], return_inverse=True)[1]
    out = {}
    for name, analyzer in WORD_CONTROLS.items():
        scores = np.zeros(len(labels))
        for train, test in folds:
            inner = min(3, len(set(group_codes[train])))
            search = GridSearchCV(make_pipeline(TfidfVectorizer(analyzer=analyzer), LogisticRegression(max_iter=2000)),
                                  {"logisticregression__C": C_GRID}, scoring="roc_auc",
                                  cv=StratifiedGroupKFold(inner, shuffle=True, random_state=seed))
            search.fit([pairs[i] for i in train], labels[train], groups=group_codes[train])
            # the linear score without its intercept: a fold's intercept (its label balance, its C) would rank
            # whole folds against each other when the out-of-fold scores are pooled
            scores[test] = search.decision_function([pairs[i] for i in test]) - \
                search.best_estimator_[-1].intercept_[0]
        out[name] = scores
    return out


def auroc_difference(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, groups: list,
                     resamples: int, seed: int) -> dict:
    """AUROC(a) − AUROC(b) on the same rows, with a 95% percentile interval from resampling whole groups (pairs
    stay together); resamples that draw a single class are skipped."""
    from sklearn.metrics import roc_auc_score

    difference = float(roc_auc_score(labels, scores_a) - roc_auc_score(labels, scores_b))
    codes = np.unique([str(g) for g in groups], return_inverse=True)[1]
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(resamples):
        weight = np.bincount(rng.integers(0, codes.max() + 1, size=codes.max() + 1), minlength=codes.max() + 1)[codes]
        if len(set(labels[weight > 0])) < 2:
            continue
        stats.append(roc_auc_score(labels, scores_a, sample_weight=weight)
                     - roc_auc_score(labels, scores_b, sample_weight=weight))
    ci = [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))] if stats else None
    return {"difference": difference, "ci": ci}


class OverlapScorer:
    """-log p(witness words | response) under p(w) = (count_in_response(w) + mu · p_bg(w)) / (len(response) + mu).

    The background p_bg is add-one smoothed over every response and witness of the file, so a witness word that
    is common anyway gains little from appearing in the response, and an unseen word still has a probability.
    """

    def __init__(self, texts: list[str], mu: float = OVERLAP_MU):
        self.background = Counter(w for text in texts for w in words(text))
        self.total, self.vocab, self.mu = sum(self.background.values()), len(self.background) + 1, mu

    def nll(self, witness: str, response: str) -> tuple[float, int]:
        """(sum of nats over the witness's words, number of words)."""
        counts, witness_words = Counter(words(response)), words(witness)
        length = sum(counts.values())
        total = 0.0
        for w in witness_words:
            background = (self.background[w] + 1) / (self.total + self.vocab)
            total -= np.log((counts[w] + self.mu * background) / (length + self.mu))
        return total, len(witness_words)

    def nll_rows(self, triples: list[tuple[str, str]]) -> np.ndarray:
        """[n, 2] like Scorer.witness_nll: each (response, witness) pair's NLL sum and word count."""
        return np.array([self.nll(witness, response) for response, witness in triples], dtype=float).reshape(-1, 2)


def crossed_word_scores(inputs: list[str] | None, responses: list[str], labels: np.ndarray, folds,
                        pairs: bool = False, C: float = 1.0) -> np.ndarray:
    """One WORD_CONTROLS entry at a fixed C, out of fold (the data's own test, tests/data/test_quadruples.py):
    the response's words (`inputs` None), the input's and the response's words kept apart, or with `pairs` every
    input-word × response-word pair as well, the features that would read a string match between an input and
    its response. Fold by family: within a family the same pairs recur (docs/data.md)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    name = "response words" if inputs is None else "input word × response word" if pairs else "input + response words"
    texts = list(zip(inputs or [""] * len(responses), responses))
    return out_of_fold(lambda: make_pipeline(TfidfVectorizer(analyzer=WORD_CONTROLS[name]),
                                             LogisticRegression(C=C, max_iter=2000)), texts, labels, folds)
