"""The dual objective, `ResponseLoss + lambda * ConsequenceLoss`, without full-vocabulary logits.

Each span loss is a mean over that span's target tokens. To stay exact under gradient accumulation and data
parallelism the mean's denominator is the span's token count over the whole optimizer step (every
micro-batch, every rank), supplied by the trainer; each micro-batch then contributes its *sum* divided by
that count, and the contributions add up to the true mean.

Per-row response weights (`objective.response_weight`, e.g. 0 for harmful responses) make the response term a
weighted mean: sum_rows w * sum_tokens nll / sum_rows w * n_response_tokens, its denominator again over the whole
optimizer step. A weight-0 row's response tokens are no targets at all (no output-layer work, no gradient); witness
tokens always have weight 1. Without weights every count and loss is exactly the unweighted one.

Memory: a `[batch, seq, vocab]` fp32 logits tensor is 8 x 2048 x 151,936 x 4 bytes = 10 GB. We take the final
hidden states, keep only positions that predict a response or witness token, and push them through the
model's own (PEFT-wrapped) output layer in chunks, so at most one chunk of logits exists at a time. For the usual
output layer (a frozen Linear, tied or not, with PEFT's trainable token rows) `_FusedSpanLoss` reads the frozen
matrix and the trainable rows directly (no merged [V, H] copy, no full-size weight gradient) and finishes each
chunk's gradient while its logits exist, keeping only the [N, H] hidden-state and [6, H] row gradients.
`_ProjectedNLL` (per-token NLL with a recomputing backward) serves `token_nll`'s callers. Any other output module
goes through its own forward under activation checkpointing. No library does span-weighted chunked CE with PEFT's trainable token rows
(cut-cross-entropy, Liger and TRL's fused head take one raw weight), hence this small module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tear_lora.data.template import RESPONSE, WITNESS


@dataclass
class SpanTargets:
    """The positions that carry a loss, flattened across the batch."""

    positions: torch.Tensor  # [N] indices into the flattened [batch * (seq - 1)] prediction positions
    targets: torch.Tensor  # [N] token ids to predict
    roles: torch.Tensor  # [N] RESPONSE or WITNESS
    weights: torch.Tensor | None = None  # [N] float: the row's weight for response targets, 1 for witness; None: all 1

    def counts(self) -> torch.Tensor:
        """[response, witness] target counts; with weights the response count is weighted (float64)."""
        is_response = self.roles == RESPONSE
        if self.weights is None:
            return torch.stack([is_response.sum(), (self.roles == WITNESS).sum()])
        return torch.stack([(self.weights.double() * is_response).sum(), (self.roles == WITNESS).sum().double()])


def _next_token_weights(row_weights: torch.Tensor, span_roles: torch.Tensor) -> torch.Tensor:
    """Weights aligned with the prediction targets `span_roles[:, 1:]`: [B] -> [B, 1] (one per row), [B, T] ->
    [B, T-1] (one per token: packed rows, where each triple's tokens carry that triple's weight)."""
    row_weights = row_weights.to(span_roles.device)
    return row_weights[:, 1:] if row_weights.dim() == 2 else row_weights[:, None]


def span_targets(input_ids: torch.Tensor, span_roles: torch.Tensor,
                 row_weights: torch.Tensor | None = None) -> SpanTargets:
    """Position t predicts token t+1; it carries a loss when token t+1 is in a response or witness span.

    `row_weights` (>= 0) weight the response targets: [B], one per row, or [B, T], one per token (packed rows); a
    weight-0 response token is no target at all.
    """
    next_roles = span_roles[:, 1:]
    is_response = next_roles == RESPONSE
    if row_weights is None:
        mask = is_response | (next_roles == WITNESS)
    else:
        row_weights = _next_token_weights(row_weights, span_roles)
        mask = (is_response & (row_weights > 0)) | (next_roles == WITNESS)
    positions = mask.reshape(-1).nonzero(as_tuple=True)[0]
    targets = SpanTargets(positions, input_ids[:, 1:].reshape(-1)[positions], next_roles.reshape(-1)[positions])
    if row_weights is not None:
        weights = torch.where(is_response, row_weights.float(), torch.ones((), device=row_weights.device))
        targets.weights = weights.reshape(-1)[positions]
    return targets


def count_span_tokens(span_roles: torch.Tensor, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """[response, witness] target counts of a batch (the first token of a row is never a target; in a packed
    row neither is any triple's first token, which the collator makes CONTEXT). With `row_weights` ([B] or
    [B, T], as in `span_targets`) the response count is weighted, sum w * n_response, and both are float64."""
    next_roles = span_roles[:, 1:]
    is_response, is_witness = next_roles == RESPONSE, next_roles == WITNESS
    if row_weights is None:
        return torch.stack([is_response.sum(), is_witness.sum()])
    weights = _next_token_weights(row_weights, span_roles).double()
    return torch.stack([(is_response * weights).sum(), is_witness.sum().double()])


def _chunk_nll(hidden: torch.Tensor, targets: torch.Tensor, output_layer) -> torch.Tensor:
    logits = output_layer(hidden).float()
    return F.cross_entropy(logits, targets, reduction="none")


def projection_parts(output_layer):
    """`(weight, row_ids, rows)` when the output layer is a bias-free `nn.Linear` with a frozen weight, alone or
    under PEFT's trainable-token wrapper (rows replace those ids); None for anything else (generic path).

    Why: pushing each chunk through PEFT's wrapper rebuilds the full merged [V, H] matrix (`index_copy`) in
    forward and again in the recomputation, and its backward computes a full [V, H] weight gradient only to keep
    six rows of it. With the parts in hand we multiply by the frozen matrix and overwrite the six logit columns.
    """
    layer = getattr(output_layer, "token_adapter", output_layer)  # TrainableTokensWrapper -> TrainableTokensLayer
    row_ids = rows = None
    if hasattr(layer, "trainable_tokens_delta") and hasattr(layer, "base_layer"):
        if layer.merged or getattr(output_layer, "disable_adapters", False):
            return None  # merged or switched off through the wrapper: let the module decide
        active = [] if layer.disable_adapters else [a for a in layer.active_adapters if a in layer.token_indices]
        base = layer.base_layer
        if active:
            row_ids = torch.tensor([i for a in active for i in layer.token_indices[a]], device=base.weight.device)
            rows = torch.cat([layer.trainable_tokens_delta[a] for a in active]).to(base.weight.dtype)
    else:
        base = layer
    if type(base) is not torch.nn.Linear or base.bias is not None or base.weight.requires_grad:
        return None
    return base.weight, row_ids, rows


def _project(hidden, weight, row_ids, rows) -> torch.Tensor:
    logits = hidden @ weight.t()
    if row_ids is not None:
        logits[:, row_ids] = hidden @ rows.t()
    return logits


class _ProjectedNLL(torch.autograd.Function):
    """Per-token NLL of `hidden @ W.T` (W = frozen weight with `rows` at `row_ids`), saving no logits.

    Backward recomputes the chunk's logits and turns them into their gradient in place: one fp32 [chunk, V]
    buffer (plus the compute-dtype logits it came from) instead of autograd's logits, log-softmax, their
    gradients and PEFT's two full-size weight copies.
    """

    @staticmethod
    def forward(ctx, hidden, targets, weight, row_ids, rows):
        with torch.autocast(hidden.device.type, enabled=False):
            z = _project(hidden, weight, row_ids, rows).float()  # a no-op copy when the compute dtype is fp32
            target_logit = z.gather(1, targets[:, None]).squeeze(1)
            top = z.amax(dim=1, keepdim=True)
            lse = z.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))  # in place: no second buffer
        ctx.save_for_backward(hidden, targets, weight, row_ids, rows, lse)
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_nll):
        hidden, targets, weight, row_ids, rows, lse = ctx.saved_tensors
        with torch.autocast(hidden.device.type, enabled=False):
            z = _project(hidden, weight, row_ids, rows).float()
            grad = z.sub_(lse[:, None]).exp_()  # softmax
            grad[torch.arange(len(targets), device=grad.device), targets] -= 1.0
            grad = grad.mul_(grad_nll[:, None].float()).to(hidden.dtype)
            grad_rows = None
            if row_ids is not None:
                grad_cols = grad[:, row_ids]
                grad[:, row_ids] = 0  # those columns came from `rows`, not `weight`
                grad_rows = (grad_cols.float().t() @ hidden.float()).to(rows.dtype) if ctx.needs_input_grad[4] else None
            grad_hidden = grad @ weight
            if row_ids is not None:
                grad_hidden += grad_cols @ rows
        return grad_hidden, None, None, None, grad_rows


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the output layer would run in: autocast's when active (bf16/fp16 training), else the input's."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _fused_chunk(h, t, coef, weight, row_ids, rows, nll, grad_hidden, grad_rows) -> None:
    """One chunk of `_FusedSpanLoss.forward`: its NLL into `nll`, its hidden-state gradient into `grad_hidden` and
    its row gradient added to `grad_rows` (both None: NLL only).

    A function of its own so that the chunk's [chunk, V] buffers (fp32 softmax, compute-dtype gradient) are freed
    when it returns. As loop variables they stayed alive while the next chunk's logits were built: two chunks'
    buffers at the peak instead of one (docs/performance.md, "the fused loss's memory")."""
    z = _project(h, weight, row_ids, rows).float()  # a no-op copy when the compute dtype is fp32
    target_logit = z.gather(1, t[:, None]).squeeze(1)
    top = z.amax(dim=1, keepdim=True)
    sum_exp = z.sub_(top).exp_().sum(dim=1)  # in place: z now holds exp(z - max)
    torch.sub(sum_exp.log().add_(top.squeeze(1)), target_logit, out=nll)
    if grad_hidden is None:
        return
    grad = z.div_(sum_exp[:, None])  # softmax
    grad[torch.arange(len(t), device=grad.device), t] -= 1.0
    grad = grad.mul_(coef[:, None]).to(h.dtype)
    del z  # the fp32 buffer (a no-op `.to` in fp32 keeps it as `grad`)
    if row_ids is not None:
        grad_cols = grad[:, row_ids]
        grad[:, row_ids] = 0  # those columns came from `rows`, not `weight`
        grad_rows += grad_cols.float().t() @ h.float()
    torch.mm(grad, weight, out=grad_hidden)
    if row_ids is not None:
        grad_hidden += grad_cols @ rows


class _FusedSpanLoss(torch.autograd.Function):
    """`sum_i coef_i * nll_i` of `hidden @ W.T` (W = frozen weight with `rows` at `row_ids`), and the per-token NLL,
    with the gradients computed chunk by chunk in forward: only the [N, H] hidden-state gradient and the [n_rows, H]
    row gradient are kept, never logits.

    Why not `_ProjectedNLL` + autograd: that computes each chunk's logits twice (forward, then again in backward
    to turn them into their gradient). The loss is linear in each token's NLL with coefficients known before the
    forward (`coef`: the row weight over the step's response count, or lambda over the step's witness count), so
    the gradient can be finished while the logits are still there: two matmuls per chunk instead of three, and a
    saved [N, H] gradient in place of the saved [N, H] input. Backward only scales by the incoming scalar (the
    DDP world-size factor, a loss scale). The same arithmetic as `_ProjectedNLL`'s backward, chunk for chunk.
    TRL's `ChunkedLogProbFunction` recomputes in backward too and knows no token rows.
    """

    @staticmethod
    def forward(ctx, hidden, rows, targets, coef, weight, row_ids, chunk_size, want_grad):
        n = hidden.shape[0]
        nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        grad_rows = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device) \
            if want_grad and rows is not None else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                s = slice(start, min(start + chunk_size, n))
                _fused_chunk(hidden[s], targets[s], coef[s], weight, row_ids, rows, nll[s],
                             grad_hidden[s] if want_grad else None, grad_rows)
        ctx.save_for_backward(grad_hidden, grad_rows)
        ctx.rows_dtype = rows.dtype if rows is not None else None
        ctx.mark_non_differentiable(nll)
        return (nll * coef).sum(), nll

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll):
        grad_hidden, grad_rows = ctx.saved_tensors
        if grad_hidden is None:
            raise RuntimeError("span loss computed without gradients (no input required grad) was backpropagated")
        grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_rows = (grad_rows * grad_loss).to(ctx.rows_dtype) if grad_rows is not None and ctx.needs_input_grad[1] \
            else None
        return grad_hidden, grad_rows, None, None, None, None, None, None


def fused_span_loss(hidden: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor, parts,
                    chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_i coef_i * nll_i, per-token NLL) through the output layer's `projection_parts`, gradients done in
    forward (`_FusedSpanLoss`). Without grad mode, or nothing requiring grad, it computes the NLL only."""
    dtype = compute_dtype(hidden)
    weight, row_ids, rows = parts
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or (rows is not None and rows.requires_grad))
    weight, rows_c = weight.to(dtype), rows.to(dtype) if rows is not None else None  # once, not per chunk
    return _FusedSpanLoss.apply(hidden.to(dtype), rows_c, targets, coef.float(), weight, row_ids, chunk_size,
                                want_grad)


def token_nll(hidden: torch.Tensor, targets: torch.Tensor, output_layer, chunk_size: int = 256,
              fast: bool = True) -> torch.Tensor:
    """Per-token NLL of `targets` given `hidden` [N, H], one chunk of logits alive at a time.

    Fast path (a frozen Linear, optionally with PEFT token rows): `_ProjectedNLL`, which recomputes each chunk
    in backward itself. Anything else: the module under activation checkpointing, so each chunk's logits are
    freed after the forward and recomputed in backward.
    """
    parts = projection_parts(output_layer) if fast else None
    if parts is not None:
        dtype = compute_dtype(hidden)
        weight, row_ids, rows = parts
        weight, rows = weight.to(dtype), rows.to(dtype) if rows is not None else None  # once, not per chunk
        hidden = hidden.to(dtype)
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if parts is not None:
            pieces.append(_ProjectedNLL.apply(h, t, weight, row_ids, rows))
        elif torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_chunk_nll, h, t, output_layer, use_reentrant=False))
        else:
            pieces.append(_chunk_nll(h, t, output_layer))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


@dataclass
class SpanLoss:
    loss: torch.Tensor  # what to backpropagate: response_sum / n_resp + lambda * witness_sum / n_wit
    response_nll_sum: torch.Tensor  # detached sums, for logging token-weighted means (response: row-weighted)
    witness_nll_sum: torch.Tensor
    counts: torch.Tensor  # this micro-batch's [response, witness] target counts (response: row-weighted)


def span_loss(hidden: torch.Tensor, targets: SpanTargets, output_layer, lambda_: float,
              denominators: torch.Tensor | None = None, chunk_size: int = 256) -> SpanLoss:
    """ResponseLoss + lambda * ConsequenceLoss over the selected positions of `hidden` [B, T, H].

    `denominators` = [response, witness] token counts of the whole optimizer step (the response count weighted
    like `targets`); None means this batch's own counts (evaluation, or no accumulation). A span with zero
    (weighted) tokens contributes zero, never a division by zero. Each target's coefficient in the loss (its
    row weight over the response count, or lambda over the witness count) scales its gradient.
    """
    selected = hidden[:, :-1].reshape(-1, hidden.shape[-1])[targets.positions]
    is_response = targets.roles == RESPONSE
    response_mask = is_response.float() if targets.weights is None else targets.weights.float() * is_response
    counts = targets.counts()
    denominators = counts if denominators is None else denominators.to(counts.device)
    # not clamp(min=1): a weighted count may be a positive fraction; an empty span (0) divides by 1 instead
    denominators = torch.where(denominators > 0, denominators, torch.ones_like(denominators))
    parts = projection_parts(output_layer)
    if parts is not None:  # the usual output layer: gradients finished in forward, no logits recomputed
        coef = response_mask / denominators[0] + lambda_ * (~is_response) / denominators[1]
        loss, nll = fused_span_loss(selected, targets.targets, coef, parts, chunk_size)
    else:
        nll = token_nll(selected, targets.targets, output_layer, chunk_size, fast=False)
        d = denominators.to(nll.dtype)
        loss = (nll * response_mask).sum() / d[0] + lambda_ * (nll * ~is_response).sum() / d[1]
    nll = nll.detach()
    return SpanLoss(loss, (nll * response_mask).sum(), (nll * ~is_response).sum(), counts)


def naive_span_loss(logits: torch.Tensor, input_ids: torch.Tensor, span_roles: torch.Tensor,
                    lambda_: float, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: the same objective from full `[B, T, V]` logits (tests and benchmarks only)."""
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1),
                          reduction="none")
    roles = span_roles[:, 1:]
    response, witness = (roles == RESPONSE).float(), (roles == WITNESS).reshape(-1)
    if row_weights is not None:
        response = response * row_weights.float()[:, None]
    response = response.reshape(-1)
    n_response = response.sum()
    n_response = torch.where(n_response > 0, n_response, torch.ones_like(n_response))
    return (nll * response).sum() / n_response + lambda_ * (nll * witness).sum() / witness.sum().clamp(min=1)
