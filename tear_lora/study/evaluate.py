"""`tear-lora eval`: per-span NLL and perplexity (response, witness) of adapters, merged models and the base.

Token-weighted means (total NLL over total target tokens), the same quantity the trainer logs as
response_loss / witness_loss, computed with the trainer's own pieces (final hidden states, chunked NLL through
the possibly PEFT-wrapped output layer), so an eval number and a training-log number mean the same thing. The
base row runs the first adapter set with its adapters disabled: same 4-bit weights, no second load.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from tear_lora.adapters import AdapterSet, MergedModel, open_source
from tear_lora.data.prepare import prepare
from tear_lora.data.tokens import tokenizer_hash
from tear_lora.metadata import AdapterError
from tear_lora.train.batch import SpanCollator, final_hidden_states, unwrap_causal_lm
from tear_lora.train.loss import span_loss, span_targets

BASE_LABEL = "base (adapter disabled)"
ROW_KEYS = ("name", "kind", "source", "lambda", "rows", "response_tokens", "witness_tokens", "response_nll",
            "response_ppl", "witness_nll", "witness_ppl")


def _ppl(nll: float) -> float:
    return math.exp(nll) if nll < 700 else math.inf


@torch.no_grad()
def span_nll(model, dataset, pad_token_id: int, batch_size: int = 8, chunk_size: int = 256,
             desc: str = "eval") -> dict[str, float]:
    """Token-weighted mean NLL and perplexity per span over `dataset` (input_ids + span_roles rows)."""
    from tqdm import tqdm

    collate, totals = SpanCollator(pad_token_id), torch.zeros(4, dtype=torch.float64)
    output_layer = unwrap_causal_lm(model).get_output_embeddings()
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(dataset), batch_size), desc=desc, unit="batch", file=sys.stderr):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
        result = span_loss(hidden, span_targets(batch["input_ids"], batch["span_roles"]), output_layer, 1.0,
                           chunk_size=chunk_size)
        totals += torch.stack([result.response_nll_sum, result.witness_nll_sum, *result.counts]).double().cpu()
    response, witness = float(totals[0] / totals[2].clamp(min=1)), float(totals[1] / totals[3].clamp(min=1))
    return {"rows": len(dataset), "response_tokens": int(totals[2]), "witness_tokens": int(totals[3]),
            "response_nll": response, "response_ppl": _ppl(response),
            "witness_nll": witness, "witness_ppl": _ppl(witness)}


def _row(name: str, kind: str, source, lambda_, stats: dict) -> dict:
    return {"name": name, "kind": kind, "source": str(source) if source else None, "lambda": lambda_, **stats}


def source_rows(source, data_file, batch_size: int = 8, base_row: bool = True,
                skip_invalid: bool | None = None) -> list[dict]:
    """One row per model in `source` (an AdapterSet or MergedModel), plus the base row for an AdapterSet.
    `skip_invalid` None: the source recipe's data.skip_invalid."""
    dataset = prepare(data_file, source.tokenizer, source.recipe, skip_invalid=skip_invalid, save=False).dataset
    pad, chunk = source.tokenizer.pad_token_id, source.recipe.objective.loss_chunk_size
    kind = "adapter" if isinstance(source, AdapterSet) else "merged"
    rows = []
    for label in source.labels:
        source.use(label)
        stats = span_nll(source.model, dataset, pad, batch_size, chunk, desc=label)
        meta = source.metadata[label]
        where = source.dirs[label] if kind == "adapter" else meta.get("merged", {}).get("adapter")
        rows.append(_row(label, kind, where, meta.get("lambda"), stats))
    if base_row and kind == "adapter":
        with source.model.disable_adapter():
            rows.append(_row(BASE_LABEL, "base", source.recipe.model.name_or_path, None,
                             span_nll(source.model, dataset, pad, batch_size, chunk, desc="base")))
    return rows


def evaluate(sources: list[str | Path], data_file: str | Path, base: str | None = None,
             batch_size: int = 8, trust_remote_code: bool = False, skip_invalid: bool | None = None) -> list[dict]:
    """Rows for every SOURCE: adapters share one 4-bit base (refused if trained on different bases)."""
    adapters = [Path(s) for s in sources if (Path(s) / "adapter_config.json").exists()]
    others = [Path(s) for s in sources if Path(s) not in adapters]
    rows, vocab = [], set()
    if adapters:
        adapter_set = AdapterSet(adapters[0], base, trust_remote_code)
        for path in adapters[1:]:
            adapter_set.add(path)
        rows += source_rows(adapter_set, data_file, batch_size, skip_invalid=skip_invalid)
        vocab.add(tokenizer_hash(adapter_set.tokenizer))
        del adapter_set
    for path in others:
        merged = open_source(path, base, trust_remote_code)
        vocab.add(tokenizer_hash(merged.tokenizer))
        rows += source_rows(merged, data_file, batch_size, skip_invalid=skip_invalid)
        del merged
    if len(vocab) > 1:
        raise AdapterError("the sources use different vocabularies; their NLLs are not comparable")
    if not adapters and others:
        rows += _base_rows_for_merged(others[0], data_file, batch_size, base, trust_remote_code, skip_invalid)
    return rows


def _base_rows_for_merged(merged_dir: Path, data_file, batch_size: int, base: str | None,
                          trust_remote_code: bool = False, skip_invalid: bool | None = None) -> list[dict]:
    """Without an adapter to disable, the base row loads the base the merged model records (4-bit, as trained)."""
    found = base_for_merged(merged_dir, base, trust_remote_code)
    if found is None:
        return []
    model, tokenizer, recipe = found
    dataset = prepare(data_file, tokenizer, recipe, skip_invalid=skip_invalid, save=False).dataset
    stats = span_nll(model, dataset, tokenizer.pad_token_id, batch_size, recipe.objective.loss_chunk_size, desc="base")
    return [_row(BASE_LABEL, "base", recipe.model.name_or_path, None, stats)]


def base_for_merged(merged_dir: Path, base: str | None, trust_remote_code: bool = False):
    """(4-bit base model, tokenizer, recipe) that a merged dir records, checked against it; None if it records none."""
    from tear_lora.adapters import check_base
    from tear_lora.recipe import load_recipe
    from tear_lora.train.model import load_base

    if not (merged_dir / "recipe.yaml").exists() or not (merged_dir / "tear_lora.json").exists():
        print(f"note: {merged_dir} records no recipe/base (recipe.yaml, tear_lora.json): no base row", file=sys.stderr)
        return None
    recipe = load_recipe(merged_dir / "recipe.yaml", saved=True)
    recipe.model.trust_remote_code = trust_remote_code  # the caller's, never the merged dir's recipe.yaml
    if base is not None:
        recipe.model.name_or_path, recipe.model.revision = str(base), None
    tokenizer = MergedModel.load_tokenizer(merged_dir, trust_remote_code)
    check_base(merged_dir, recipe, tokenizer)
    return load_base(recipe, tokenizer), tokenizer, recipe


def _num(value) -> float:
    """A metric as printed: null (how JSON carries NaN/Inf, e.g. rows read back from `eval --json`) as nan."""
    return float("nan") if value is None else value


def format_table(rows: list[dict]) -> str:
    header = f"{'name':32s} {'kind':8s} {'lambda':>7s} {'resp NLL':>9s} {'resp PPL':>10s} {'wit NLL':>9s} {'wit PPL':>10s}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lam = "-" if r["lambda"] is None else f"{r['lambda']:g}"
        lines.append(f"{r['name'][:32]:32s} {r['kind']:8s} {lam:>7s} {_num(r['response_nll']):9.4f} "
                     f"{_num(r['response_ppl']):10.4g} {_num(r['witness_nll']):9.4f} {_num(r['witness_ppl']):10.4g}")
    tokens = rows[0] if rows else None
    if tokens:
        lines.append(f"({tokens['rows']} rows; {tokens['response_tokens']} response and {tokens['witness_tokens']} "
                     "witness target tokens; NLL in nats per token, token-weighted)")
    return "\n".join(lines)
