"""The round-3 control arm's training file: every witness moved to another row of its own family (meta.family).

Training on it teaches the witnesses' text, register and family vocabulary as the real file does, but a witness
no longer follows from its input and response: λ 1 on this file controls for merely training on witness text
(docs/experiments/round3_rule.md). A seeded derangement within each family; rows, inputs and responses unchanged.
    python scripts/experiments/shuffle_witnesses.py data/raw/quad_train.jsonl OUT.jsonl [--seed 0]
"""

import argparse
import json
import random
from collections import defaultdict

from tear_lora.data.prepare import load_triples
from tear_lora.rundir import atomic_write_text

parser = argparse.ArgumentParser()
parser.add_argument("source")
parser.add_argument("out")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
rows = [r.fields for r in load_triples(args.source)[0]]
by_family = defaultdict(list)
for k, row in enumerate(rows):
    by_family[(row.get("meta") or {}).get("family")].append(k)
rng = random.Random(args.seed)
moved = 0
for family, members in sorted(by_family.items(), key=lambda kv: str(kv[0])):
    if family is None or len(members) < 2:
        raise SystemExit(f"error: {args.source}: family {family!r} has {len(members)} row(s); every row needs a "
                         "meta.family shared with another row")
    order = members[:]
    rng.shuffle(order)
    witnesses = [rows[k]["witness"] for k in order]
    for k, witness in zip(order, witnesses[1:] + witnesses[:1]):  # each row takes the next one's witness
        moved += witness != rows[k]["witness"]
        rows[k] = {**rows[k], "witness": witness}
atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
print(f"{args.out}: {len(rows)} rows, {moved} witnesses moved within {len(by_family)} families")
