"""The words-only controls (tear_lora/study/lexical.py) on hand-made rows: fast, no model."""

import numpy as np
import pytest

from tear_lora.study.lexical import OverlapScorer, auroc_difference, probe_folds, text_probe_scores


def test_folds_keep_each_pair_together_and_stay_stratified():
    labels = np.array([0, 1] * 20)
    groups = [f"p{k // 2}" for k in range(40)]  # the two sides of a pair: one helpful, one harmful
    folds = probe_folds(labels, groups, 5, seed=0)
    assert sorted(np.concatenate([test for _, test in folds]).tolist()) == list(range(40))
    for train, test in folds:
        assert not {groups[i] for i in train} & {groups[i] for i in test}
        assert labels[test].sum() * 2 == len(test)
    assert [t.tolist() for _, t in folds] != [t.tolist() for _, t in probe_folds(labels, groups, 5, seed=1)]


def test_text_probe_reads_words_and_nothing_else():
    labels = np.array([0, 1] * 12)
    groups = [f"p{k // 2}" for k in range(24)]
    spelled = [f"row {k} {'calm' if y == 0 else 'storm'}" for k, y in enumerate(labels)]
    unseen = [f"take {10 + k} mg" for k in range(24)]  # the label is in a number that is new in every row
    from sklearn.metrics import roc_auc_score

    folds = probe_folds(labels, groups, 4, seed=0)
    assert roc_auc_score(labels, text_probe_scores(spelled, labels, folds)) == 1.0
    assert roc_auc_score(labels, text_probe_scores(unseen, labels, folds)) == pytest.approx(0.5)


def test_auroc_difference_and_its_interval():
    labels = np.array([0, 1] * 15)
    groups = [k // 2 for k in range(30)]
    perfect, noise = labels + 0.1 * np.arange(30) / 30, np.random.default_rng(0).random(30)
    same = auroc_difference(labels, perfect, perfect, groups, resamples=200, seed=0)
    assert same == {"difference": 0.0, "ci": [0.0, 0.0]}
    better = auroc_difference(labels, perfect, noise, groups, resamples=200, seed=0)
    assert better["difference"] > 0.3 and 0 < better["ci"][0] <= better["difference"] <= better["ci"][1]


def test_overlap_scorer_prefers_a_witness_that_reuses_the_response_words():
    scorer = OverlapScorer(["the kettle boiled", "the pan burned", "tea was served", "smoke filled the room"])
    kettle, pan = "Fill the kettle.", "Heat the pan."
    assert scorer.nll("The kettle boiled.", kettle)[0] < scorer.nll("The kettle boiled.", pan)[0]
    assert scorer.nll("Smoke filled the room.", kettle) == scorer.nll("Smoke filled the room.", pan)  # no overlap
    assert scorer.nll_rows([(kettle, "tea was served")]).shape == (1, 2)
    assert scorer.nll("Never seen words.", kettle)[0] > 0 and scorer.nll("", kettle) == (0.0, 0)


def test_auroc_difference_resamples_whole_pairs(monkeypatch):
    """Every bootstrap resample weighs the two sides of a pair alike: with single rows resampled (the pair codes
    replaced by np.arange(len(labels))), a resample can keep one side of a pair and drop the other."""
    import sklearn.metrics

    weights = []
    real = sklearn.metrics.roc_auc_score

    def spy(labels, scores, sample_weight=None):
        if sample_weight is not None:
            weights.append(np.asarray(sample_weight))
        return real(labels, scores, sample_weight=sample_weight)

    monkeypatch.setattr(sklearn.metrics, "roc_auc_score", spy)
    labels = np.array([0, 1] * 10)
    groups = [f"p{k // 2}" for k in range(20)]
    rng = np.random.default_rng(0)
    auroc_difference(labels, rng.random(20), rng.random(20), groups, resamples=50, seed=0)
    assert len(weights) >= 50
    for weight in weights:
        assert (weight[0::2] == weight[1::2]).all()  # a pair is drawn whole or not at all


def test_word_controls_read_what_their_features_carry():
    """Each control reads valence where its features carry it, on the same grouped folds: the response words when
    a response word decides; only the input × response control when the combination decides (the crossed
    design: every response word is once helpful and once harmful)."""
    from sklearn.metrics import roc_auc_score

    from tear_lora.study.lexical import word_control_scores

    inputs, responses, labels, groups = [], [], [], []
    for k in range(16):  # quadruples: (cast iron | non-stick) × (steel wool | soak), helpful when they agree
        for x, pan in enumerate(("castiron", "nonstick")):
            for r, tool in enumerate(("steelwool", "soak")):
                inputs.append(f"case {k} my {pan} pan")
                responses.append(f"use {tool} now {k}")
                labels.append(int(x != r))
                groups.append(f"q{k}")
    labels = np.array(labels)
    folds = probe_folds(labels, groups, 4, seed=0)
    scores = word_control_scores(list(zip(inputs, responses)), labels, groups, folds, seed=0)
    auroc = {name: roc_auc_score(labels, s) for name, s in scores.items()}
    assert auroc["input word × response word"] >= 0.95
    for name in ("response words", "response words + word pairs", "input + response words"):
        assert auroc[name] <= 0.6, auroc
