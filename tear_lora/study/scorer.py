"""One model's view of a triple file, for `tear-lora analyze`: per-row witness NLL and the hidden states at
`<|/response|>`, computed with the trainer's own pieces (template, tokenize_row, final hidden states, chunked NLL),
so the numbers mean what eval's numbers mean."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from tear_lora.data.prepare import tokenize_row
from tear_lora.data.template import WITNESS
from tear_lora.data.tokens import RESPONSE_CLOSE
from tear_lora.train.batch import SpanCollator, final_hidden_states, unwrap_causal_lm
from tear_lora.train.loss import span_targets, token_nll


@dataclass
class Settings:
    folds: int = 5  # probe cross-validation folds inside the scored split (fewer if there are fewer groups)
    seed: int = 0  # selection split, folds, permutation and sign-flip draws, bootstrap
    bootstrap: int = 1000  # resamples for the 95% intervals
    draws: int = 1000  # permutation / sign-flip draws for every null
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
