"""The round-3 rule's figures again, with whole families resampled instead of quadruples (prints; writes nothing).

The rule (docs/experiments/round3_rule.md) resamples the 64 held-out quadruples; but they come from 8 families,
and quadruples of one family share more than chance, so an effect carried by one family looks certain at the
quadruple level. This re-runs `contrasts.decide` on the same `analyze` JSON with each quadruple mapped to its
family (meta.family of the data file's rows, keyed as `analyze` keys them): a check of the reading, not a second rule. It also prints the
seed-averaged matching Δ of each arm in each family, to see which families carry an effect.
    python scripts/experiments/family_bootstrap.py docs/experiments/lambda_study_r3/analyze.json \
        data/processed/splits/quad-r3/quad_eval.out.jsonl
"""

import argparse
import json
from collections import defaultdict

import numpy as np

from tear_lora.data.prepare import load_triples
from tear_lora.study.analyze import group_key, item_key
from tear_lora.study.contrasts import decide, groups_of

parser = argparse.ArgumentParser()
parser.add_argument("analyze_json")
parser.add_argument("data_file", help="as the analyze JSON names it (the rows' meta.quad and meta.family)")
parser.add_argument("--draws", type=int, default=2000)
args = parser.parse_args()
with open(args.analyze_json, encoding="utf-8") as f:
    report = json.load(f)
# the item and family keys analyze itself resamples and folds by
rows = [row.fields for row in load_triples(args.data_file)[0]]
family = {item_key(row, i): group_key(row, i) for i, row in enumerate(rows)}
if all(item == unit for item, unit in family.items()):
    raise SystemExit(f"error: {args.data_file}: no row has a meta.family")
for unit, cluster in (("quadruples (the rule)", None), (f"families ({len(set(family.values()))})", family)):
    decision = decide(report, args.data_file, args.draws, cluster=cluster)
    print(f"resampling {unit}: verdict {decision['verdict']}")
    named = [(c["contrast"], c) for c in decision["primary"]]
    named += [(f"{c['contrast']} (matching Δ)", c) for c in decision["secondary_matching_delta"]]
    for name, c in named:
        print(f"  {name:<24} {c['estimate']:+.4f}  [{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}] at {c['level']:.3f}"
              f"  p (Holm) {c['p_holm']:.3f}")

per_family = defaultdict(lambda: defaultdict(list))  # {arm: {family: [each seed's mean Δ over its pairs]}}
for (arm, lam), results in groups_of(report, args.data_file, "matching").items():
    label = arm if lam is None else f"{arm} λ{lam:g}"
    for matching in results:
        pairs = defaultdict(list)
        for item, delta in zip(matching["items"], matching["per_pair_delta"]):
            pairs[family.get(item, item)].append(delta)
        for name, deltas in pairs.items():
            per_family[label][name].append(float(np.mean(deltas)))
arms = sorted(per_family)
print("matching Δ (nats/token) per family, seed mean:\n  " + f"{'family':<30}" + "".join(f"{a:>14}" for a in arms))
for name in sorted({f for by in per_family.values() for f in by}):
    print(f"  {name:<30}" + "".join(f"{np.mean(per_family[a][name]):>+14.3f}" for a in arms))
