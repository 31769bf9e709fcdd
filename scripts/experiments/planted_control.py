"""The probe's planted-signal positive control at the round-3 study's n (docs/experiments/round3_rule.md).

Synthetic hidden states shaped like the demo model's (31 layers: embeddings + 30; 576 features; low-rank, a
pair's two rows sharing half their variance: tear_lora.study.probe.planted_states) carry a signal of population
AUROC `a` in one layer; the full probe pipeline (selection split, scoring, within-pair permutation null with 1,000
draws re-running the layer choice) runs on them at the held-out set's size: 8 families × 8 quadruples = 128 pairs,
256 rows, grouped by family. The detection rate is how often p < 0.05; with the labels swapped within pairs it is
the false-positive rate. Writes docs/experiments/planted_control.json (minutes on one core); `--add A:REPEATS`
runs only that and adds it to the JSON.
    OMP_NUM_THREADS=1 python scripts/experiments/planted_control.py [--add 0.8:4]
"""

import json
import sys
import time
from pathlib import Path

from tear_lora.rundir import atomic_write_json
from tear_lora.study.probe import detection_rate

OUT = Path(__file__).resolve().parents[2] / "docs/experiments/planted_control.json"
STUDY = {"pairs": 128, "pairs_per_group": 16, "layers": 31, "dim": 576, "draws": 1000}
RUNS = [(0.60, 16, False), (0.60, 16, True), (0.70, 8, False)]

started, results = time.time(), []
if sys.argv[1:2] == ["--add"]:
    results = json.loads(OUT.read_text())["results"]
    RUNS = [(float(a), int(n), False) for a, n in (sys.argv[2].split(":"),)]
for auroc, repeats, shuffle in RUNS:
    results.append(detection_rate(auroc, repeats=repeats, seed=100, shuffle=shuffle, **STUDY))
    print(results[-1], f"{time.time() - started:.0f} s", flush=True)
    atomic_write_json(OUT, {"settings": STUDY, "results": results, "seconds": round(time.time() - started)})
