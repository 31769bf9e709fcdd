"""Packing (`data.packing`): whole tokenized triples back to back in rows of at most `max_seq_len` tokens.

Why pack: a batch padded to its longest triple spends most of its tokens on padding when triples vary in length
(docs/performance.md#packing has the like-for-like measurement). The packer is TRL's; what is ours is keeping each
triple's `id` and `meta` with it, so the collator can restart positions and weight responses per triple.
"""

from __future__ import annotations

from contextlib import contextmanager
from itertools import accumulate
from typing import Any

from datasets import Dataset, Features, List, Value

# A packed row: the tokens of several whole triples back to back; `seq_lengths`, `id` and `meta` have one entry per
# triple, in order, so the collator can restart positions at each triple and weight each triple's response by its
# own meta (objective.response_weight), exactly as if it were a row of its own.
PACKED_FEATURES = Features({"input_ids": List(Value("int32")), "span_roles": List(Value("int8")),
                            "seq_lengths": List(Value("int32")), "id": List(Value("string")),
                            "meta": List(Value("string"))})


def pack_triples(triples: Dataset, max_seq_len: int) -> Dataset:
    """Tokenized triples -> packed rows (PACKED_FEATURES) of at most `max_seq_len` tokens, every triple whole.

    The packer is TRL's `pack_dataset(..., "bfd")`: best fit decreasing over each batch of 1,000 triples, which
    packs every list column alike (`input_ids`, `span_roles`) and adds `seq_lengths`. It only takes per-token
    columns, so each triple's index rides along as a per-token column, and afterwards gives each packed row the
    `id` and `meta` of its triples in order. No triple is cut: tokenize_row already fits each within max_seq_len.
    """
    from trl.data_utils import pack_dataset  # deferred: importing TRL takes seconds and most verbs never pack

    with _quiet_maps():
        tagged = triples.map(_tag_tokens, batched=True, with_indices=True, remove_columns=["id", "meta"])
        packed = pack_dataset(tagged, max_seq_len, strategy="bfd")
        lookup = triples.select_columns(["id", "meta"])
        return packed.map(_triple_fields, batched=True, fn_kwargs={"lookup": lookup}, remove_columns=["triple"],
                          features=PACKED_FEATURES)


@contextmanager
def _quiet_maps():
    """No `Map: 100%` bars: packing takes well under a second per 1,000 triples, and one note reports it."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _tag_tokens(batch: dict, indices: list[int]) -> dict:
    return {"triple": [[index] * len(ids) for index, ids in zip(indices, batch["input_ids"])]}


def _triple_fields(batch: dict, lookup: Dataset) -> dict:
    """Each packed row's triples (the index at each triple's first token) -> their ids and metas."""
    rows = []
    for lengths, tags in zip(batch["seq_lengths"], batch["triple"]):
        rows.append([tags[start] for start in (0, *accumulate(lengths[:-1]))])
    fields = lookup[[index for row in rows for index in row]] if rows else {"id": [], "meta": []}
    out, at = {"id": [], "meta": []}, 0
    for row in rows:
        for name in out:
            out[name].append(fields[name][at : at + len(row)])
        at += len(row)
    return out


def describe_packing(stats: dict[str, Any]) -> str:
    return (f"data.packing: {stats['triples']} triples in {stats['rows']} rows of <= {stats['max_seq_len']} tokens "
            f"({stats['triples_per_row']} per row, {stats['fill']:.0%} full)")


def packing_stats(packed: Dataset, max_seq_len: int) -> dict[str, Any]:
    """What packing did, for the manifest: rows, triples, tokens and how full the rows are."""
    lengths = [sum(row) for row in packed["seq_lengths"]]
    triples = sum(len(row) for row in packed["seq_lengths"])
    return {"max_seq_len": max_seq_len, "rows": len(lengths), "triples": triples, "tokens": sum(lengths),
            "fill": round(sum(lengths) / (len(lengths) * max_seq_len), 4) if lengths else 0.0,
            "triples_per_row": round(triples / len(lengths), 2) if lengths else 0.0}
