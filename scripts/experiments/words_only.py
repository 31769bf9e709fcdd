"""The words-only classifier on triple files: can valence (helpful vs harmful) be read from the response text alone?

TF-IDF of the response + logistic regression (tear_lora.study.lexical, the same control `tear-lora analyze` runs beside the
hidden-state probe), 5 folds stratified and grouped by meta.pair, out-of-fold AUROC for fold seeds 0-4.
Results: docs/experiments/lambda.md, "Round 2".
    python scripts/experiments/words_only.py data/raw/minimal_pairs.jsonl data/raw/contrast.jsonl
"""

import sys

import numpy as np
from sklearn.metrics import roc_auc_score

from tear_lora.data.prepare import load_triples
from tear_lora.study.lexical import probe_folds, text_probe_scores

for path in sys.argv[1:]:
    rows = [r.fields for r in load_triples(path)[0] if (r.fields.get("meta") or {}).get("valence") in
            ("helpful", "harmful")]
    labels = np.array([r["meta"]["valence"] == "harmful" for r in rows], dtype=int)
    groups = [r["meta"].get("pair", r.get("id", k)) for k, r in enumerate(rows)]
    texts = [r["response"] for r in rows]
    aurocs = [roc_auc_score(labels, text_probe_scores(texts, labels, probe_folds(labels, groups, 5, seed)))
              for seed in range(5)]
    print(f"{path}: {len(rows)} rows ({labels.sum()} harmful), words-only AUROC per fold seed "
          f"{' '.join(f'{a:.3f}' for a in aurocs)}; mean {np.mean(aurocs):.3f}")
