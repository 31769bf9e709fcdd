"""`tear-lora analyze`: does training on witnesses make consequence prediction depend on what was said?

A lower witness NLL at λ > 0 is expected from training on witnesses at all; it says nothing about whether the
model represents the impact of the response. Three instruments ask that more directly, for every source
(adapters on one 4-bit base, merged dirs, and the base with the adapters disabled), each beside its null, computed
from the data (tear_lora/study/nulls.py, probe.py), and its words-only control (lexical.py):

1. Witness matching, on pairs (one input, a helpful and a harmful response, each with its own witness; rows linked
   by `meta.pair`, or by `meta.quad` + `meta.input_variant` in crossed quadruples). Each witness on its own:
   Δ = NLL(w | X, partner's response) − NLL(w | X, own response), per token. Mean Δ and P(Δ > 0), against a
   sign-flip null (P's null is 0.5); "both sides" (both witnesses of a pair prefer their own response) against its
   null computed the same way.
2. Response sensitivity: the same swap with the true minimal partner (same input), weighted by witness tokens.
3. Impact probe, on rows labelled helpful/harmful (`meta.valence` or `meta.label`): the hidden state of every
   layer at `<|/response|>`; layer and penalty chosen on a grouped selection split, the rest scored out of fold,
   against a within-pair label-swap null that re-runs the choice. "Beyond words": its AUROC minus the best of four
   words-only controls (C tuned inside the folds) on the same scored rows and folds.

Folds, the selection split and the bootstrap keep a group whole: `meta.family` when the data has it, else the
pair. Intervals resample items (the quadruple, else the pair). Every instrument names its null and its n and
carries the minimum detectable effect at that n. Rows are read as eval reads them (data.read_triples); each
instrument's "dropped" says what it left out and why.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np

from tear_lora.data.prepare import read_triples

from .lexical import OverlapScorer, auroc_difference, word_control_scores
from .nulls import matching_stats, unit_bootstrap
from .probe import TooFewGroups, probe, probe_splits
from .scorer import Scorer, Settings

LABELS = {"helpful": 0, "harmful": 1}
__all__ = ["Settings", "analyze", "label_of", "pair_key"]


def _meta(row: dict) -> dict:
    return row.get("meta") or {}


def label_of(row: dict) -> int | None:
    """1 harmful, 0 helpful (meta.valence, or meta.label in crossed quadruples), None otherwise."""
    meta = _meta(row)
    return LABELS.get(meta.get("valence", meta.get("label")))


def pair_key(row: dict) -> str | None:
    """The rows that share an input and differ in the response: meta.pair, or quad + input variant."""
    meta = _meta(row)
    if meta.get("pair") is not None:
        return f"pair:{meta['pair']}"
    if meta.get("quad") is not None and meta.get("input_variant") is not None:
        return f"quad:{meta['quad']}:{meta['input_variant']}"
    return None


def item_key(row: dict, index: int) -> str:
    """What intervals resample: the quadruple, else the pair, else the row."""
    meta = _meta(row)
    return f"quad:{meta['quad']}" if meta.get("quad") is not None else pair_key(row) or f"row:{index}"


def group_key(row: dict, index: int) -> str:
    """What folds and the selection split keep whole: the family when there is one, else the item."""
    family = _meta(row).get("family")
    return f"family:{family}" if family is not None else item_key(row, index)


def complete_pairs(rows: list[dict]) -> tuple[list[tuple[int, int]], int]:
    """([(helpful index, harmful index)] sharing one input, count of pair keys that are not such a pair)."""
    found = defaultdict(dict)
    for i, row in enumerate(rows):
        if pair_key(row) is not None and label_of(row) is not None:
            found[pair_key(row)][label_of(row)] = i
    complete = [(p[0], p[1]) for p in found.values() if len(p) == 2 and rows[p[0]]["input"] == rows[p[1]]["input"]]
    return complete, len(found) - len(complete)


def _lexical_view(stats: dict) -> dict:
    keys = ("delta_nats", "delta_ci", "delta_p", "p_positive", "p_positive_p", "both_sides", "both_sides_null")
    return {k: stats[k] for k in keys}


def witness_swaps(scorer: Scorer, rows: list[dict]) -> tuple[dict, dict]:
    """(matching, sensitivity): one pass of NLL(wA|A), NLL(wB|A), NLL(wA|B), NLL(wB|B) per pair."""
    complete, incomplete = complete_pairs(rows)
    encoded, texts, kept = [], [], []
    for a, b in complete:
        four = [scorer.encode(rows[a]["input"], rows[r]["response"], rows[w]["witness"]) for r in (a, b) for w in (a, b)]
        if all(four):
            encoded += four
            texts += [(rows[r]["response"], rows[w]["witness"]) for r in (a, b) for w in (a, b)]
            kept.append((a, b))
    # incomplete: a pair key without one helpful and one harmful row of one input among the rows kept;
    # too_long: a witness after the partner's response does not fit data.max_seq_len
    dropped = {"incomplete": incomplete, "too_long": len(complete) - len(kept)}
    if not kept:
        why = "no pairs (rows sharing an input and a pair key, one helpful, one harmful)" if not complete else \
            f"none of {len(complete)} pairs fits data.max_seq_len"
        return {"skipped": why, "dropped": dropped}, {"skipped": why, "dropped": dropped}
    settings, items = scorer.settings, [item_key(rows[a], a) for a, _ in kept]
    nll = scorer.witness_nll(encoded, "witness swaps").reshape(len(kept), 4, 2)
    overlap = OverlapScorer([r["response"] for r in rows] + [r["witness"] for r in rows]).nll_rows(texts)
    overlap = overlap.reshape(len(kept), 4, 2)

    def per_token(values):  # a witness with no words (punctuation only) scores 0 for the overlap model, not NaN
        return values[..., 0] / np.maximum(values[..., 1], 1)

    matching = {"n": len(kept), "n_of": "pairs", "item": items[0].split(":")[0], "dropped": dropped,
                **matching_stats(per_token(nll), items, settings.draws, settings.seed),
                "items": items, "lexical": _lexical_view(matching_stats(per_token(overlap), items, settings.draws,
                                                                          settings.seed))}

    def swap(values):  # per pair: partner-minus-own NLL sums of both witnesses, and their token (word) counts
        sums, counts = values[..., 0], values[..., 1]
        return (sums[:, 2] - sums[:, 0]) + (sums[:, 1] - sums[:, 3]), counts[:, 0] + counts[:, 3]

    difference, tokens = swap(nll)
    lex_difference, lex_words = swap(overlap)
    own = nll[:, [0, 3], 0].sum()
    sensitivity = {"n": 2 * len(kept), "n_of": "witnesses", "partner": "the true minimal partner (same input)",
                   "null": "0 (the witness ignores the response); sign-flip p as matching's delta_p",
                   "dropped": dropped, "witness_tokens": int(tokens.sum()),
                   "nats_per_token": float(difference.sum() / tokens.sum()),
                   "ci": unit_bootstrap(difference, items, settings.bootstrap, settings.seed, tokens),
                   "true_witness_nll": float(own / tokens.sum()),
                   "swapped_witness_nll": float((own + difference.sum()) / tokens.sum()),
                   "lexical": {"nats_per_word": float(lex_difference.sum() / max(lex_words.sum(), 1)),
                               "ci": unit_bootstrap(lex_difference, items, settings.bootstrap, settings.seed,
                                                    np.maximum(lex_words, 1))}}
    return matching, sensitivity


def probe_rows(rows: list[dict]) -> list[int]:
    return [i for i, row in enumerate(rows) if label_of(row) is not None]


def words_controls(rows: list[dict], settings: Settings) -> dict | None:
    """The words-only controls on the probe's scored rows and folds: they read only the data, so once per file."""
    kept = probe_rows(rows)
    labels = np.array([label_of(rows[i]) for i in kept])
    if len(kept) < 8 or min(np.bincount(labels, minlength=2)) < 4:
        return None
    groups = np.unique([group_key(rows[i], i) for i in kept], return_inverse=True)[1]
    try:
        _, score, _, outer = probe_splits(labels, groups, settings.folds, settings.seed)
    except TooFewGroups:
        return None  # the probe says why it is skipped
    pairs = [(rows[kept[i]]["input"], rows[kept[i]]["response"]) for i in score]
    scores = word_control_scores(pairs, labels[score], groups[score], outer, settings.seed)
    return {"rows": [kept[i] for i in score], "scores": scores}


def impact_probe(scorer: Scorer, rows: list[dict], words: dict | None) -> dict:
    from sklearn.metrics import roc_auc_score

    kept, encoded = [], []
    for i in probe_rows(rows):
        pair = scorer.encode(rows[i]["input"], rows[i]["response"], rows[i]["witness"])
        if pair:
            kept.append(i)
            encoded.append(pair)
    labels = np.array([label_of(rows[i]) for i in kept], dtype=int)
    if len(kept) < 8 or min(np.bincount(labels, minlength=2)) < 4:
        return {"skipped": "needs at least 4 helpful and 4 harmful rows (meta.valence or meta.label) that fit"}
    groups = [group_key(rows[i], i) for i in kept]
    units = [pair_key(rows[i]) or f"row:{i}" for i in kept]
    settings = scorer.settings
    try:  # before the forward passes: the splits depend on the data only
        probe_splits(labels, np.array(groups), settings.folds, settings.seed)
    except TooFewGroups as e:
        return {"skipped": str(e)}
    states = scorer.response_end_states(encoded)
    result = probe(states, labels, groups, units, settings.folds, settings.draws, settings.seed)
    layer_ids = settings.layers or list(range(states.shape[0]))
    scored = [kept[i] for i in result["scored_index"]]
    result.update(layer=layer_ids[result["layer"]], n=len(scored), n_of="scored rows", rows=len(kept),
                  grouped_by="family" if any("family:" in g for g in groups) else "item",
                  scored_rows_index=scored, scored_labels=labels[result.pop("scored_index")].tolist(),
                  scored_items=[item_key(rows[i], i) for i in scored])
    if words is None or words["rows"] != scored:  # a row too long for this model: the controls' rows differ
        return {**result, "words": None}
    y = np.array(result["scored_labels"])
    word_aurocs = {name: float(roc_auc_score(y, s)) for name, s in words["scores"].items()}
    best = max(word_aurocs, key=word_aurocs.get)
    beyond = auroc_difference(y, np.array(result["scores"]), words["scores"][best], result["scored_items"],
                              settings.bootstrap, settings.seed)
    return {**result, "words": word_aurocs, "words_best": best, "words_best_auroc": word_aurocs[best],
            "beyond_words": beyond["difference"], "beyond_words_ci": beyond["ci"]}


COUNT_KEYS = ("rows_read", "rows_kept", "rows_rejected_invalid", "rows_too_long", "rows_trimmed")


def analyze_model(scorer: Scorer, rows: list[dict], counts: dict, words: dict | None) -> dict:
    """The three instruments on one file's kept rows; "rows" says what reading kept and dropped (as eval counts)."""
    matching, sensitivity = witness_swaps(scorer, rows)
    return {"rows": {**{k: counts[k] for k in COUNT_KEYS}, "max_seq_len": scorer.limits["max_seq_len"]},
            "matching": matching, "sensitivity": sensitivity, "probe": impact_probe(scorer, rows, words)}


def read_files(data_files: list[str | Path], tokenizer, recipe,
               skip_invalid: bool | None = None) -> dict[str, tuple[list[dict], dict]]:
    """{file: (rows, counts)}, read once per tokenizer and recipe (an AdapterSet's adapters and base share one);
    `skip_invalid` None: the recipe's data.skip_invalid, as in eval."""
    return {str(f): read_triples(f, tokenizer, recipe, skip_invalid) for f in data_files}


def _run_info(adapter_dir: Path | None, text: str | None = None) -> dict:
    """What distinguishes runs in a study: seed, response weights and training file, from the run's own
    recipe.yaml (a study's shuffled-witness arm trains on a file whose name says "shuffled"); `text`: the file as
    the adapter's opening already read it."""
    import yaml

    path = adapter_dir / "recipe.yaml" if adapter_dir else None
    if text is None and (not path or not path.is_file()):
        return dict(NO_RUN_INFO)
    raw = yaml.safe_load(path.read_text(encoding="utf-8") if text is None else text) or {}
    return {"seed": (raw.get("training") or {}).get("seed"),
            "response_weight": (raw.get("objective") or {}).get("response_weight") or {},
            "train_file": (raw.get("data") or {}).get("train_file")}


NO_RUN_INFO = {"seed": None, "response_weight": {}, "train_file": None}


def analyze(sources: list[str | Path], data_files: list[str | Path], settings: Settings | None = None,
            base: str | None = None, trust_remote_code: bool = False, skip_invalid: bool | None = None) -> dict:
    """Every source (and the base) on every data file: {"settings", "sources": [{name, kind, ..., "data"}]}."""
    from tear_lora.adapters import AdapterSet, open_source

    from .evaluate import BASE_LABEL, base_for_merged

    settings = settings or Settings()
    adapters = [Path(s) for s in sources if (Path(s) / "adapter_config.json").exists()]
    results, words = [], {}

    def controls(data_file, rows):  # the words-only controls read only the data: once per file and rows read
        key = (data_file, id(rows))
        if key not in words:
            words[key] = words_controls(rows, settings)
        return words[key]

    def run(model, tokenizer, recipe, name, kind, lambda_, where, info, files=None):
        scorer = Scorer(model, tokenizer, recipe, settings, name)
        files = files or read_files(data_files, tokenizer, recipe, skip_invalid)
        data = {f: analyze_model(scorer, rows, counts, controls(f, rows)) for f, (rows, counts) in files.items()}
        results.append({"name": name, "kind": kind, "source": str(where) if where else None, "lambda": lambda_,
                        **info, "data": data})

    if adapters:
        adapter_set = AdapterSet(adapters[0], base, trust_remote_code)
        for path in adapters[1:]:
            adapter_set.add(path)
        files = read_files(data_files, adapter_set.tokenizer, adapter_set.recipe, skip_invalid)
        for label in adapter_set.labels:
            adapter_set.use(label)
            run(adapter_set.model, adapter_set.tokenizer, adapter_set.recipe, label, "adapter",
                adapter_set.metadata[label].get("lambda"), adapter_set.dirs[label],
                _run_info(adapter_set.dirs[label], adapter_set.opened[label].recipe_text), files)
        with adapter_set.model.disable_adapter():
            run(adapter_set.model, adapter_set.tokenizer, adapter_set.recipe, BASE_LABEL, "base", None,
                adapter_set.recipe.model.name_or_path, dict(NO_RUN_INFO), files)
        del adapter_set
    merged = [Path(s) for s in sources if Path(s) not in adapters]
    for path in merged:
        source = open_source(path, base, trust_remote_code)
        meta = source.metadata[source.labels[0]]
        run(source.model, source.tokenizer, source.recipe, source.labels[0], "merged", meta.get("lambda"), path,
            _run_info(path))
    if merged and not adapters:
        found = base_for_merged(merged[0], base, trust_remote_code)
        if found is not None:
            model, tokenizer, recipe = found
            run(model, tokenizer, recipe, BASE_LABEL, "base", None, recipe.model.name_or_path,
                dict(NO_RUN_INFO))
    return {"settings": {**asdict(settings), "data": [str(f) for f in data_files]}, "sources": results}
