"""The words-only controls on triple files: can valence (helpful vs harmful) be read from the words alone?

Five controls (tear_lora.study.lexical, the ones `tear-lora analyze` runs beside the hidden-state probe):
round 2's TF-IDF of the response with C = 1, and the four of WORD_CONTROLS with C tuned inside the folds. Folds
grouped by meta.family when the rows have one, else by meta.pair (5, stratified), out-of-fold AUROC for fold
seeds 0-4. Results: docs/experiments/lambda.md.
    python scripts/experiments/words_only.py data/raw/minimal_pairs.jsonl data/raw/contrast.jsonl
"""

import sys

import numpy as np
from sklearn.metrics import roc_auc_score

from tear_lora.data.prepare import load_triples
from tear_lora.study.lexical import probe_folds, text_probe_scores, word_control_scores

for path in sys.argv[1:]:
    rows = [r.fields for r in load_triples(path)[0] if (r.fields.get("meta") or {}).get("valence") in
            ("helpful", "harmful")]
    labels = np.array([r["meta"]["valence"] == "harmful" for r in rows], dtype=int)
    groups = [r["meta"].get("family", r["meta"].get("pair", r.get("id", k))) for k, r in enumerate(rows)]
    results: dict[str, list[float]] = {}
    for seed in range(5):
        folds = probe_folds(labels, groups, 5, seed)
        scores = {"response words, C = 1 (round 2)": text_probe_scores([r["response"] for r in rows], labels, folds),
                  **word_control_scores([(r["input"], r["response"]) for r in rows], labels, groups, folds, seed)}
        for name, s in scores.items():
            results.setdefault(name, []).append(roc_auc_score(labels, s))
    print(f"{path}: {len(rows)} rows ({labels.sum()} harmful)")
    for name, aurocs in results.items():
        print(f"  {name:34s} {' '.join(f'{a:.3f}' for a in aurocs)}  mean {np.mean(aurocs):.3f}")
