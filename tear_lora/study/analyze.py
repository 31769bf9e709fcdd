"""`tear-lora analyze`: does training on witnesses make consequence prediction depend on what was said?

A lower witness NLL at λ > 0 is expected from training on witnesses at all; it says nothing about whether the
model represents the impact of the response. Three instruments ask that more directly, for every source
(adapters on one 4-bit base, merged dirs, and the base with the adapters disabled):

1. Witness matching, on contrast pairs (one input; a helpful and a harmful response, each with its own witness;
   rows linked by `meta.pair`): a pair matches when each witness is likelier, per token, after its own response
   than after the other. Chance is 25% for the pair, 50% per side. The margin (nats per token) is how much the
   right response lowers each witness's NLL, averaged over both sides: a witness that is simply more probable
   on its own cancels out of it.
2. Response sensitivity, on any triples with `meta.domain`: witness NLL after another row's response of the same
   domain minus witness NLL after the true response, per witness token. Zero means the response is ignored.
3. Impact probe, on rows with `meta.valence` helpful/harmful: the hidden state of every layer at `<|/response|>`
   (after the response, before any witness token), a logistic regression per layer, k-fold cross-validated
   with fixed folds grouped by pair (scikit-learn), out-of-fold AUROC, beside the same probe on shuffled labels
   (the floor).

Each instrument has a lexical control (study/lexical.py) on the same rows: the probe's is the same logistic
regression on TF-IDF of the response text, reported as probe AUROC − lexical AUROC ("beyond_lexical") with a
bootstrap interval; matching and sensitivity get a smoothed word-overlap model of the witness given the response.
A model represents impact beyond the words only where it beats these. Intervals are percentile bootstraps over
pairs / rows with a fixed seed. Everything runs the trainer's own pieces (template, tokenize_row, final hidden states, chunked NLL), so numbers mean what eval's numbers mean.
Rows are read as eval reads them (data.read_triples: same rows kept, same counts, under "rows"); a re-paired row
can be too long where both rows fit, and each instrument's "dropped" says what it left out and why.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tear_lora.data.prepare import read_triples, tokenize_row
from tear_lora.data.template import WITNESS
from tear_lora.data.tokens import RESPONSE_CLOSE
from tear_lora.train.batch import SpanCollator, final_hidden_states, unwrap_causal_lm
from tear_lora.train.loss import span_targets, token_nll

from .lexical import OverlapScorer, auroc_difference, out_of_fold, probe_folds, text_probe_scores

VALENCE_LABELS = {"helpful": 0, "harmful": 1}


@dataclass
class Settings:
    folds: int = 5  # probe cross-validation folds (fewer if a class has fewer rows)
    seed: int = 0  # mismatched-response draw, fold split, label shuffle, bootstrap
    bootstrap: int = 1000  # resamples for the 95% intervals
    layers: list[int] | None = None  # hidden-state layers for the probe (0 = embeddings); None = every layer
    batch_size: int = 8


class Scorer:
    """One model + tokenizer + the recipe's data settings: per-row witness NLL and `<|/response|>` states."""

    def __init__(self, model, tokenizer, recipe, settings: Settings, name: str):
        self.model, self.tokenizer, self.settings, self.name = model, tokenizer, settings, name
        data = recipe.data
        self.limits = {"max_seq_len": data.max_seq_len, "truncation": data.truncation,
                       "min_input_tokens": data.min_input_tokens}
        self.chunk = recipe.objective.loss_chunk_size
        self.collate = SpanCollator(tokenizer.pad_token_id)

    def encode(self, input: str, response: str, witness: str):
        """(input_ids, span_roles), or None when the row cannot fit max_seq_len (as training would reject it)."""
        result = tokenize_row(self.tokenizer, {"input": input, "response": response, "witness": witness}, **self.limits)
        return None if isinstance(result, str) else result[:2]

    def _batches(self, encoded: list, what: str):
        from tqdm import tqdm

        device = next(self.model.parameters()).device
        size = self.settings.batch_size
        for start in tqdm(range(0, len(encoded), size), desc=f"{self.name}: {what}", unit="batch", file=sys.stderr,
                          leave=False):
            batch = self.collate([{"input_ids": ids, "span_roles": roles} for ids, roles in encoded[start:start + size]])
            yield {k: v.to(device) for k, v in batch.items()}

    @torch.no_grad()
    def witness_nll(self, encoded: list, what: str = "witness NLL") -> np.ndarray:
        """[n, 2]: each row's witness NLL sum (nats) and witness token count."""
        output_layer = unwrap_causal_lm(self.model).get_output_embeddings()
        out = []
        for batch in self._batches(encoded, what):
            ids, roles = batch["input_ids"], batch["span_roles"]
            hidden = final_hidden_states(self.model, ids, batch["attention_mask"])
            targets = span_targets(ids, roles)
            nll = token_nll(hidden[:, :-1].reshape(-1, hidden.shape[-1])[targets.positions], targets.targets,
                            output_layer, self.chunk)
            row = targets.positions // (ids.shape[1] - 1)
            witness = targets.roles == WITNESS
            sums = torch.zeros(len(ids), dtype=torch.float64, device=ids.device).index_add_(
                0, row[witness], nll[witness].double())
            counts = torch.bincount(row[witness], minlength=len(ids))
            out.append(torch.stack([sums, counts.double()], dim=1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2))

    @torch.no_grad()
    def response_end_states(self, encoded: list) -> np.ndarray:
        """[layers, n, hidden]: hidden states at each row's `<|/response|>` token."""
        close_id = self.tokenizer.convert_tokens_to_ids(RESPONSE_CLOSE)
        layers, out = self.settings.layers, []
        for batch in self._batches(encoded, "hidden states"):
            ids = batch["input_ids"]
            output = self.model(input_ids=ids, attention_mask=batch["attention_mask"], output_hidden_states=True,
                                logits_to_keep=1, use_cache=False)
            position = (ids == close_id).int().argmax(dim=1)  # one per row: tags inside user text stay text
            chosen = output.hidden_states if layers is None else [output.hidden_states[i] for i in layers]
            rows = torch.arange(len(ids), device=ids.device)
            out.append(torch.stack([h[rows, position].float() for h in chosen]).cpu().numpy())
        return np.concatenate(out, axis=1)


def _bootstrap(values: np.ndarray, settings: Settings, weights: np.ndarray | None = None) -> list[float]:
    """95% percentile interval of the mean (or of sum(values) / sum(weights)) over resampled rows."""
    rng = np.random.default_rng(settings.seed)
    picks = rng.integers(0, len(values), size=(settings.bootstrap, len(values)))
    stats = (values[picks].sum(1) / weights[picks].sum(1)) if weights is not None else values[picks].mean(1)
    return [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))]


def _matching_stats(per_token: np.ndarray, settings: Settings) -> dict:
    """[pairs, 4] per-token NLL of (wA|A, wB|A, wA|B, wB|B) -> accuracy and margin, model or lexical alike."""
    a_after_a, b_after_a, a_after_b, b_after_b = per_token.T
    side_a, side_b = a_after_a < b_after_a, b_after_b < a_after_b
    match = (side_a & side_b).astype(float)
    margin = ((b_after_a - a_after_a) + (a_after_b - b_after_b)) / 2
    return {"accuracy": float(match.mean()), "accuracy_ci": _bootstrap(match, settings),
            "side_accuracy": float((side_a.mean() + side_b.mean()) / 2), "margin_nats": float(margin.mean()),
            "margin_ci": _bootstrap(margin, settings)}


def _overlap_scorer(rows: list[dict]) -> OverlapScorer:
    return OverlapScorer([r["response"] for r in rows] + [r["witness"] for r in rows])


def witness_matching(scorer: Scorer, rows: list[dict]) -> dict:
    pairs = defaultdict(dict)
    for row in rows:
        meta = row.get("meta") or {}
        if meta.get("pair") is not None and meta.get("valence") in VALENCE_LABELS:
            pairs[str(meta["pair"])][meta["valence"]] = row
    complete = [(p["helpful"], p["harmful"]) for p in pairs.values() if len(p) == 2 and
                p["helpful"]["input"] == p["harmful"]["input"]]
    encoded, texts = [], []
    for a, b in complete:  # NLL(wA|A), NLL(wB|A), NLL(wA|B), NLL(wB|B)
        four = [scorer.encode(a["input"], r["response"], w["witness"]) for r in (a, b) for w in (a, b)]
        if all(four):
            encoded += four
            texts += [(r["response"], w["witness"]) for r in (a, b) for w in (a, b)]
    kept = len(encoded) // 4
    # incomplete: a meta.pair without one helpful and one harmful row of one input among the rows kept (a side
    # dropped at reading, as invalid or too long, lands here); too_long: a witness after the other response
    dropped = {"incomplete": len(pairs) - len(complete), "too_long": len(complete) - kept}
    if not complete:
        return {"skipped": "no contrast pairs (rows sharing meta.pair and input, one helpful and one harmful)",
                "dropped": dropped}
    if not kept:
        return {"skipped": f"none of {len(complete)} contrast pairs fits data.max_seq_len", "dropped": dropped}

    def per_token(nll):  # a witness with no words (punctuation only) scores 0 for the overlap model, not NaN
        return (nll[:, 0] / np.maximum(nll[:, 1], 1)).reshape(kept, 4)

    lexical = _matching_stats(per_token(_overlap_scorer(rows).nll_rows(texts)), scorer.settings)
    return {"pairs": kept, "dropped": dropped, "chance": 0.25,
            **_matching_stats(per_token(scorer.witness_nll(encoded, "matching")), scorer.settings),
            "lexical": {k: lexical[k] for k in ("accuracy", "accuracy_ci", "margin_nats", "margin_ci")}}


def mismatched_partners(rows: list[dict], seed: int) -> list[int | None]:
    """For each row, another row of the same meta.domain with a different response (None when there is none).

    A random order per domain, each row taking the response of the next one (cyclically): no row keeps its own.
    """
    rng = np.random.default_rng(seed)
    by_domain = defaultdict(list)
    for i, row in enumerate(rows):
        by_domain[(row.get("meta") or {}).get("domain")].append(i)
    partner: list[int | None] = [None] * len(rows)
    for domain, members in sorted(by_domain.items(), key=lambda kv: str(kv[0])):
        if domain is None or len(members) < 2:
            continue
        order = [members[k] for k in rng.permutation(len(members))]
        for k, i in enumerate(order):
            j = order[(k + 1) % len(order)]
            partner[i] = j if rows[j]["response"] != rows[i]["response"] else None
    return partner


def response_sensitivity(scorer: Scorer, rows: list[dict]) -> dict:
    partner = mismatched_partners(rows, scorer.settings.seed)
    true_rows, swapped_rows, kept = [], [], []
    for i, j in enumerate(partner):
        if j is None:
            continue
        true, swapped = (scorer.encode(rows[i]["input"], rows[k]["response"], rows[i]["witness"]) for k in (i, j))
        if true and swapped:
            true_rows.append(true)
            swapped_rows.append(swapped)
            kept.append((i, j))
    # no_partner: no other row of its meta.domain with a different response (or no meta.domain);
    # too_long: its witness after the partner's response does not fit data.max_seq_len
    with_partner = sum(j is not None for j in partner)
    dropped = {"no_partner": len(rows) - with_partner, "too_long": with_partner - len(kept)}
    if not true_rows:
        return {"skipped": "no two rows of one meta.domain with different responses that fit data.max_seq_len",
                "dropped": dropped}
    true, swapped = scorer.witness_nll(true_rows, "true responses"), scorer.witness_nll(swapped_rows, "swapped")
    difference, tokens = swapped[:, 0] - true[:, 0], true[:, 1]
    overlap = _overlap_scorer(rows)
    lex_true = overlap.nll_rows([(rows[i]["response"], rows[i]["witness"]) for i, _ in kept])
    lex_swapped = overlap.nll_rows([(rows[j]["response"], rows[i]["witness"]) for i, j in kept])
    lex_difference, lex_words = lex_swapped[:, 0] - lex_true[:, 0], lex_true[:, 1]
    return {"rows": len(true_rows), "dropped": dropped, "witness_tokens": int(tokens.sum()),
            "nats_per_token": float(difference.sum() / tokens.sum()),
            "ci": _bootstrap(difference, scorer.settings, tokens),
            "true_witness_nll": float(true[:, 0].sum() / tokens.sum()),
            "swapped_witness_nll": float(swapped[:, 0].sum() / tokens.sum()),
            "lexical": {"nats_per_word": float(lex_difference.sum() / lex_words.sum()),
                        "ci": _bootstrap(lex_difference, scorer.settings, lex_words)}}


def impact_probe(scorer: Scorer, rows: list[dict]) -> dict:
    """Folds are stratified and grouped by meta.pair (a row without one is its own group); the lexical control is
    the same logistic regression on TF-IDF of the response text, on the same folds. "beyond_lexical" compares them
    at the best layer, which was picked on the same rows: an optimistic choice for the probe, never for the words."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    encoded, labels, texts, groups = [], [], [], []
    for k, row in enumerate(rows):
        meta = row.get("meta") or {}
        valence = meta.get("valence")
        pair = scorer.encode(row["input"], row["response"], row["witness"]) if valence in VALENCE_LABELS else None
        if pair:
            encoded.append(pair)
            labels.append(VALENCE_LABELS[valence])
            texts.append(row["response"])
            groups.append(("pair", str(meta["pair"])) if meta.get("pair") is not None else ("row", k))
    labels = np.array(labels)
    folds = min(scorer.settings.folds, int(np.bincount(labels, minlength=2).min()) if len(labels) else 0)
    if folds < 2:
        return {"skipped": "needs at least 2 helpful and 2 harmful rows (meta.valence)"}
    states = scorer.response_end_states(encoded)
    layer_ids = scorer.settings.layers or list(range(states.shape[0]))
    shuffled = np.random.default_rng(scorer.settings.seed).permutation(labels)
    splits = probe_folds(labels, groups, folds, scorer.settings.seed)

    def scores(features, y):
        return out_of_fold(lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)), features, y,
                           splits)

    layer_scores = [scores(states[k], labels) for k in range(len(layer_ids))]
    per_layer = [{"layer": layer, "auroc": float(roc_auc_score(labels, layer_scores[k])),
                  "shuffled_auroc": float(roc_auc_score(shuffled, scores(states[k], shuffled)))}
                 for k, layer in enumerate(layer_ids)]
    best_k = max(range(len(per_layer)), key=lambda k: per_layer[k]["auroc"])
    best = per_layer[best_k]
    lexical = text_probe_scores(texts, labels, splits)
    beyond = auroc_difference(labels, layer_scores[best_k], lexical, groups, scorer.settings.bootstrap,
                              scorer.settings.seed)
    return {"rows": len(labels), "harmful": int(labels.sum()), "folds": folds, "grouped_by_pair": len(set(groups))
            < len(groups), "layers": per_layer, "best_layer": best["layer"], "best_auroc": best["auroc"],
            "shuffled_auroc_at_best": best["shuffled_auroc"],
            "shuffled_auroc_max": max(r["shuffled_auroc"] for r in per_layer),
            "lexical_auroc": float(roc_auc_score(labels, lexical)), "beyond_lexical": beyond["difference"],
            "beyond_lexical_ci": beyond["ci"]}


COUNT_KEYS = ("rows_read", "rows_kept", "rows_rejected_invalid", "rows_too_long", "rows_trimmed")


def analyze_model(scorer: Scorer, rows: list[dict], counts: dict) -> dict:
    """The three instruments on one file's kept rows; "rows" says what reading kept and dropped (as eval counts)."""
    return {"rows": {**{k: counts[k] for k in COUNT_KEYS}, "max_seq_len": scorer.limits["max_seq_len"]},
            "matching": witness_matching(scorer, rows), "sensitivity": response_sensitivity(scorer, rows),
            "probe": impact_probe(scorer, rows)}


def read_files(data_files: list[str | Path], tokenizer, recipe,
               skip_invalid: bool | None = None) -> dict[str, tuple[list[dict], dict]]:
    """{file: (rows, counts)}, read once per tokenizer and recipe (an AdapterSet's adapters and base share one);
    `skip_invalid` None: the recipe's data.skip_invalid, as in eval."""
    return {str(f): read_triples(f, tokenizer, recipe, skip_invalid) for f in data_files}


def _run_info(adapter_dir: Path | None) -> dict:
    """What distinguishes runs in a study: seed and response weights, from the run's own recipe.yaml."""
    import yaml

    path = adapter_dir / "recipe.yaml" if adapter_dir else None
    if not path or not path.is_file():
        return {"seed": None, "response_weight": {}}
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {"seed": (raw.get("training") or {}).get("seed"),
            "response_weight": (raw.get("objective") or {}).get("response_weight") or {}}


def analyze(sources: list[str | Path], data_files: list[str | Path], settings: Settings | None = None,
            base: str | None = None, trust_remote_code: bool = False, skip_invalid: bool | None = None) -> dict:
    """Every source (and the base) on every data file: {"settings", "sources": [{name, kind, ..., "data"}]}."""
    from tear_lora.adapters import AdapterSet, open_source

    from .evaluate import BASE_LABEL, base_for_merged

    settings = settings or Settings()
    adapters = [Path(s) for s in sources if (Path(s) / "adapter_config.json").exists()]
    results = []

    def run(model, tokenizer, recipe, name, kind, lambda_, where, info, files=None):
        scorer = Scorer(model, tokenizer, recipe, settings, name)
        files = files or read_files(data_files, tokenizer, recipe, skip_invalid)
        data = {f: analyze_model(scorer, rows, counts) for f, (rows, counts) in files.items()}
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
                adapter_set.metadata[label].get("lambda"), adapter_set.dirs[label], _run_info(adapter_set.dirs[label]),
                files)
        with adapter_set.model.disable_adapter():
            run(adapter_set.model, adapter_set.tokenizer, adapter_set.recipe, BASE_LABEL, "base", None,
                adapter_set.recipe.model.name_or_path, {"seed": None, "response_weight": {}}, files)
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
                {"seed": None, "response_weight": {}})
    return {"settings": {**asdict(settings), "data": [str(f) for f in data_files]}, "sources": results}
