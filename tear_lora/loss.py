"""The dual objective, `ResponseLoss + lambda * ConsequenceLoss`, without full-vocabulary logits.

Each span loss is a mean over that span's target tokens. To stay exact under gradient accumulation and data
parallelism the mean's denominator is the span's token count over the whole optimizer step (every
micro-batch, every rank), supplied by the trainer; each micro-batch then contributes its *sum* divided by
that count, and the contributions add up to the true mean.

Memory: a `[batch, seq, vocab]` fp32 logits tensor is 8 x 2048 x 151,936 x 4 bytes = 10 GB. We take the final
hidden states, keep only positions that predict a response or witness token, and push them through the
model's own (PEFT-wrapped) output layer in chunks, each under activation checkpointing, so at most one
chunk of logits exists at a time and it is recomputed in backward. No library does span-weighted chunked CE
through an arbitrary wrapped output module (cut-cross-entropy and Liger need a raw weight, which would miss
PEFT's trainable token rows), hence this small function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .template import RESPONSE, WITNESS


@dataclass
class SpanTargets:
    """The positions that carry a loss, flattened across the batch."""

    positions: torch.Tensor  # [N] indices into the flattened [batch * (seq - 1)] prediction positions
    targets: torch.Tensor  # [N] token ids to predict
    roles: torch.Tensor  # [N] RESPONSE or WITNESS

    def counts(self) -> torch.Tensor:
        return torch.stack([(self.roles == RESPONSE).sum(), (self.roles == WITNESS).sum()])


def span_targets(input_ids: torch.Tensor, span_roles: torch.Tensor) -> SpanTargets:
    """Position t predicts token t+1; it carries a loss when token t+1 is in a response or witness span."""
    next_roles = span_roles[:, 1:]
    mask = (next_roles == RESPONSE) | (next_roles == WITNESS)
    positions = mask.reshape(-1).nonzero(as_tuple=True)[0]
    return SpanTargets(positions, input_ids[:, 1:].reshape(-1)[positions], next_roles.reshape(-1)[positions])


def count_span_tokens(span_roles: torch.Tensor) -> torch.Tensor:
    """[response, witness] target counts of a batch (the first token of a row is never a target)."""
    next_roles = span_roles[:, 1:]
    return torch.stack([(next_roles == RESPONSE).sum(), (next_roles == WITNESS).sum()])


def _chunk_nll(hidden: torch.Tensor, targets: torch.Tensor, output_layer) -> torch.Tensor:
    logits = output_layer(hidden).float()
    return F.cross_entropy(logits, targets, reduction="none")


def token_nll(hidden: torch.Tensor, targets: torch.Tensor, output_layer, chunk_size: int = 1024) -> torch.Tensor:
    """Per-token NLL of `targets` given `hidden` [N, H], one chunk of logits alive at a time.

    Under grad, each chunk is checkpointed: its logits are freed after the forward and recomputed in backward.
    """
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_chunk_nll, h, t, output_layer, use_reentrant=False))
        else:
            pieces.append(_chunk_nll(h, t, output_layer))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


@dataclass
class SpanLoss:
    loss: torch.Tensor  # what to backpropagate: response_sum / n_resp + lambda * witness_sum / n_wit
    response_nll_sum: torch.Tensor  # detached sums, for logging token-weighted means
    witness_nll_sum: torch.Tensor
    counts: torch.Tensor  # this micro-batch's [response, witness] target counts


def span_loss(hidden: torch.Tensor, targets: SpanTargets, output_layer, lambda_: float,
              denominators: torch.Tensor | None = None, chunk_size: int = 1024) -> SpanLoss:
    """ResponseLoss + lambda * ConsequenceLoss over the selected positions of `hidden` [B, T, H].

    `denominators` = [response, witness] token counts of the whole optimizer step; None means this batch's own
    counts (evaluation, or no accumulation). A span with zero tokens contributes zero, never a division by zero.
    """
    selected = hidden[:, :-1].reshape(-1, hidden.shape[-1])[targets.positions]
    nll = token_nll(selected, targets.targets, output_layer, chunk_size)
    is_response = targets.roles == RESPONSE
    response_sum = (nll * is_response).sum()
    witness_sum = (nll * ~is_response).sum()
    counts = targets.counts()
    denominators = counts if denominators is None else denominators.to(counts.device)
    denominators = denominators.clamp(min=1).to(nll.dtype)
    loss = response_sum / denominators[0] + lambda_ * witness_sum / denominators[1]
    return SpanLoss(loss, response_sum.detach(), witness_sum.detach(), counts)


def naive_span_loss(logits: torch.Tensor, input_ids: torch.Tensor, span_roles: torch.Tensor,
                    lambda_: float) -> torch.Tensor:
    """Reference: the same objective from full `[B, T, V]` logits (tests and benchmarks only)."""
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1),
                          reduction="none")
    roles = span_roles[:, 1:].reshape(-1)
    response, witness = roles == RESPONSE, roles == WITNESS
    return (nll * response).sum() / response.sum().clamp(min=1) + lambda_ * (nll * witness).sum() / witness.sum().clamp(min=1)
