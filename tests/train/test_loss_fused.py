"""The fused span loss (`_FusedSpanLoss`: gradients finished in forward, no logits kept or recomputed) against the
full-logits reference in fp32: loss, hidden-state gradient and token-row gradients, with and without response
weights, tied and untied output layers, under a window denominator and a scaled backward (GA / DDP)."""

from unittest import mock

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tear_lora.data.template import CONTEXT, PAD_ROLE, RESPONSE, WITNESS
from tear_lora.tiny import tiny_qwen3
from tear_lora.train.loss import fused_span_loss, naive_span_loss, projection_parts, span_loss, span_targets
from tear_lora.train.model import use_row_lookup

VOCAB, ROW_IDS = 700, [3, 17, 650, 651, 652, 699]


def peft_model(tied: bool):
    """A tiny fp32 Qwen3 with LoRA and six trainable token rows, as model.lora_config builds them (untied: the
    same rows on the output layer too); the rows and LoRA B moved off their initial values."""
    base = tiny_qwen3(seed=0, vocab_size=VOCAB, tie_word_embeddings=tied, pad_token_id=0, eos_token_id=0)
    rows = ROW_IDS if tied else {"embed_tokens": ROW_IDS, "lm_head": ROW_IDS}
    model = use_row_lookup(get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                           target_modules="all-linear", trainable_token_indices=rows)))
    with torch.no_grad():
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if p.requires_grad and ("trainable_tokens" in name or "lora_B" in name):
                p.add_(0.05 * torch.randn_like(p))
    return model


def batch(seed=0, b=3, t=30):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (b, t), generator=g)
    input_ids[:, 9:15] = torch.tensor(ROW_IDS)  # targets that are the trainable rows themselves
    roles = torch.full((b, t), CONTEXT)
    roles[:, 6:16], roles[:, 17:27] = RESPONSE, WITNESS
    roles[0, 25:] = PAD_ROLE
    return input_ids, roles


def loss_and_grads(model, input_ids, roles, lam, weights, how, denominators=None, scale=1.0):
    """(loss, d/d hidden, d/d every trainable tensor) through the model's own decoder and output layer."""
    from tear_lora.train.batch import final_hidden_states, unwrap_causal_lm

    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    hidden = final_hidden_states(model, input_ids, torch.ones_like(input_ids))
    head = unwrap_causal_lm(model).get_output_embeddings()
    if how == "fused":
        assert projection_parts(head) is not None
        loss = span_loss(hidden, span_targets(input_ids, roles, weights), head, lam, denominators, chunk_size=7).loss
    else:
        loss = naive_span_loss(head(hidden), input_ids, roles, lam, row_weights=weights)
    grads = torch.autograd.grad(loss * scale, [hidden, *params])
    return loss.detach(), grads[0], dict(zip(names, grads[1:]))


def close(a, b, rtol=1e-5):
    return torch.allclose(a, b, rtol=rtol, atol=rtol * b.abs().max().item())


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("weights", [None, torch.tensor([0.0, 0.5, 1.5])])
@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_fused_equals_full_logits(tied, weights, lam):
    model = peft_model(tied)
    model.eval()  # no dropout anywhere: both paths see the same forward
    input_ids, roles = batch()
    loss, d_hidden, d_params = loss_and_grads(model, input_ids, roles, lam, weights, "fused")
    ref_loss, ref_hidden, ref_params = loss_and_grads(model, input_ids, roles, lam, weights, "naive")
    assert close(loss, ref_loss) and close(d_hidden, ref_hidden)
    rows = [n for n in d_params if "trainable_tokens" in n]
    assert len(rows) == (1 if tied else 2) and all(d_params[n].abs().max() > 0 for n in rows)
    for name in d_params:
        assert close(d_params[name], ref_params[name]), name


def test_fused_window_denominators_and_scaled_backward_add_up():
    """Two micro-batches with the window's counts, each backward scaled by 2 (the DDP factor), sum to twice the
    gradient of the whole batch at once: exact under accumulation."""
    from tear_lora.train.loss import count_span_tokens

    model = peft_model(tied=False)
    model.eval()
    input_ids, roles = batch(b=4)
    weights = torch.tensor([1.0, 0.0, 0.5, 2.0])
    window = count_span_tokens(roles, weights)
    parts = [loss_and_grads(model, input_ids[i:i + 2], roles[i:i + 2], 0.7, weights[i:i + 2], "fused", window, 2.0)
             for i in (0, 2)]
    whole = loss_and_grads(model, input_ids, roles, 0.7, weights, "naive")
    assert close(parts[0][0] + parts[1][0], whole[0])
    for name, ref in whole[2].items():
        assert close(parts[0][2][name] + parts[1][2][name], 2 * ref), name


def test_fused_without_grad_computes_the_loss_only():
    """Evaluation (no_grad): the same loss and NLL, and no [N, H] gradient is computed or kept."""
    torch.manual_seed(0)
    weight, hidden = torch.randn(VOCAB, 16), torch.randn(40, 16)
    targets, coef = torch.randint(0, VOCAB, (40,)), torch.rand(40)
    with torch.no_grad():
        loss, nll = fused_span_loss(hidden, targets, coef, (weight, None, None), chunk_size=9)
    ref = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="none")
    assert close(nll, ref) and close(loss, (ref * coef).sum()) and loss.grad_fn is None


def peak_live_bytes(fn) -> int:
    """The most bytes of torch tensors alive at once while `fn` runs, above what was alive before (the profiler's
    allocation timeline: the CPU analogue of CUDA's max_memory_allocated)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    current = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        current += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_holds_one_chunk_at_a_time_no_more_than_the_recompute_path(dtype):
    """Forward + backward of the fused loss keep one chunk's [chunk, V] buffers alive at a time, so its peak is at
    most the recomputing path's (`_ProjectedNLL`, which it replaced). It held two (the previous chunk's softmax and
    gradient stayed referenced while the next chunk's logits were built): 2.0x that peak, in bf16 and in fp32."""
    from tear_lora.data.template import RESPONSE
    from tear_lora.train.loss import token_nll

    vocab, hidden_size, n, chunk = 20_000, 8, 64, 16  # [chunk, V] buffers dominate every [N, H] term
    torch.manual_seed(0)
    weight = (0.02 * torch.randn(vocab, hidden_size)).to(dtype)
    rows, row_ids = torch.randn(6, hidden_size, dtype=dtype, requires_grad=True), torch.arange(6)
    hidden = torch.randn(n, hidden_size, dtype=dtype, requires_grad=True)
    targets, coef = torch.randint(0, vocab, (n,)), torch.full((n,), 1.0 / n)
    roles = torch.full((n,), RESPONSE)

    def fused():
        fused_span_loss(hidden, targets, coef, (weight, row_ids, rows), chunk_size=chunk)[0].backward()

    def recompute():
        with mock.patch("tear_lora.train.loss.projection_parts", lambda layer: (weight, row_ids, rows)):
            nll = token_nll(hidden, targets, None, chunk_size=chunk)  # the output layer as these parts
        ((nll * (roles == RESPONSE)).sum() / n).backward()

    one_chunk = chunk * vocab * (4 + (2 if dtype == torch.bfloat16 else 0))
    fused_peak, recompute_peak = peak_live_bytes(fused), peak_live_bytes(recompute)
    assert recompute_peak >= one_chunk  # the tracer sees the chunk buffers
    assert fused_peak <= recompute_peak, (fused_peak / one_chunk, recompute_peak / one_chunk)
