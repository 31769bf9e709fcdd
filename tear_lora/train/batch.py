"""The batch side of training and evaluation: collating triples into tensors and running a model to its final
hidden states. `evaluate`, `analyze` and `generate` need this without the trainer, so it lives apart from
trainer.py and imports neither TRL nor the Trainer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from itertools import accumulate

import torch

from tear_lora.data.template import CONTEXT, PAD_ROLE


def row_response_weight(meta, response_weight: Mapping[str, float]) -> float:
    """A row's response-loss weight: `response_weight[meta.valence]`, 1.0 when the row has no meta, no string
    valence, or one the mapping does not name. `meta` is the processed set's JSON text (or None, or a dict)."""
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            meta = None
    valence = meta.get("valence") if isinstance(meta, dict) else None
    return float(response_weight.get(valence, 1.0)) if isinstance(valence, str) else 1.0


class SpanCollator:
    """Right-pads `input_ids` (pad id), `attention_mask` (0) and `span_roles` (PAD_ROLE, never a target).

    With a non-empty `response_weight` ({valence: weight}) it also emits `response_weights`, a float [B] of each
    row's response-loss weight (`row_response_weight` of its `meta`); with none, nothing more than before.

    Packed rows (`data.packing`: rows carry `seq_lengths`, one per triple; packing.pack_triples) are collated padding
    free: `position_ids` restart at 0 at every triple and there is NO attention mask, because transformers builds
    the block-diagonal causal mask from position ids only when the mask is None and no cache is used (sdpa,
    eager, flex: masking_utils.find_packed_sequence_indices); flash attention reads `cu_seq_lens_q/k` and
    `max_length_q/k` instead (the keys TRL's padding-free collator emits), here over the flattened [B * T] batch,
    in which each row's padding tail is one more "sequence" (positions 0, 1, ...) that no real token attends to.
    Each triple's first token gets role CONTEXT: in a row of its own it is position 0, which is never a target, so
    the packed batch has exactly the unpacked targets (the template starts every triple with a context tag anyway).
    `response_weights` is then per token, [B, T]: each triple's tokens carry its own meta's weight.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None,
                 response_weight: Mapping[str, float] | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.response_weight = dict(response_weight or {})

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        if "seq_lengths" in features[0]:
            return self._packed(features, length)
        batch = {"input_ids": [], "attention_mask": [], "span_roles": []}
        for f in features:
            pad = length - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
            batch["span_roles"].append(list(f["span_roles"]) + [PAD_ROLE] * pad)
        out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        if self.response_weight:
            out["response_weights"] = torch.tensor(
                [row_response_weight(f.get("meta"), self.response_weight) for f in features], dtype=torch.float32)
        return out

    def _packed(self, features: list[dict], length: int) -> dict[str, torch.Tensor]:
        batch = {"input_ids": [], "span_roles": [], "position_ids": []}
        weights = []
        for f in features:
            lengths, n = list(f["seq_lengths"]), len(f["input_ids"])
            if sum(lengths) != n or min(lengths, default=0) < 1:
                raise ValueError(f"packed row: seq_lengths {lengths} do not add up to its {n} tokens")
            pad = length - n
            roles = list(f["span_roles"])
            for start in (0, *accumulate(lengths[:-1])):
                roles[start] = CONTEXT
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["span_roles"].append(roles + [PAD_ROLE] * pad)
            batch["position_ids"].append([p for size in (*lengths, pad) for p in range(size)])
            if self.response_weight:
                row = [row_response_weight(meta, self.response_weight) for meta in f["meta"]]
                weights.append([w for w, size in zip(row, lengths) for _ in range(size)] + [0.0] * pad)
        out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        starts = (out["position_ids"].reshape(-1) == 0).nonzero().flatten()
        cu_seq_lens = torch.cat([starts, torch.tensor([out["position_ids"].numel()])]).to(torch.int32)
        out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu_seq_lens
        out["max_length_q"] = out["max_length_k"] = int(cu_seq_lens.diff().max())
        if self.response_weight:
            out["response_weights"] = torch.tensor(weights, dtype=torch.float32)
        return out


def unwrap_causal_lm(model):
    """The transformers model inside PEFT / accelerate wrappers (its layers may be PEFT-wrapped)."""
    model = getattr(model, "module", model)  # DDP
    return model.get_base_model() if hasattr(model, "get_base_model") else model


PACKED_ATTENTION_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # flash attention's


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        position_ids: torch.Tensor | None = None, **packed_attention) -> torch.Tensor:
    """Run the (possibly wrapped) model and return the decoder's final hidden states [B, T, H].

    We call the outermost model so DDP and PEFT hooks run as usual, ask it for the logits of one position
    only (`logits_to_keep=1`), and take the decoder's output with a forward hook, so no full-vocab logits.
    Packed batches pass `position_ids` and no mask (plus flash attention's `packed_attention`, PACKED_ATTENTION_KEYS,
    which sdpa and eager ignore); `use_cache=False` also matters there: with a cache, transformers would not
    derive the per-triple mask from the position ids.
    """
    captured = []
    decoder = unwrap_causal_lm(model).get_decoder()
    handle = decoder.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1,
              use_cache=False, **packed_attention)
    finally:
        handle.remove()
    return captured[-1]
