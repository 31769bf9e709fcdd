"""The fast output-layer path of the span loss (`_ProjectedNLL`) against the naive full-logits reference.

The fast path skips PEFT's per-chunk merged-weight rebuild and full weight gradient, so these tests pin that it
computes the same objective: values, hidden-state gradients, token-row gradients and LoRA gradients.
"""

import pytest
import torch
from peft.utils.other import TrainableTokensWrapper

from tear_lora.data.template import CONTEXT, PAD_ROLE, RESPONSE, WITNESS
from tear_lora.train.loss import naive_span_loss, projection_parts, span_loss, span_targets, token_nll

VOCAB, HIDDEN, ROW_IDS = 5_003, 16, [3, 17, 5_000]


def wrapped_head(dtype=torch.float64, seed=0):
    """A frozen bias-free head under PEFT's trainable-token wrapper, its rows moved away from the originals."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False).to(dtype).requires_grad_(False)
    wrapper = TrainableTokensWrapper(head, "default", token_indices=ROW_IDS)
    with torch.no_grad():
        wrapper.token_adapter.trainable_tokens_delta["default"].add_(torch.randn(len(ROW_IDS), HIDDEN).to(dtype))
    return wrapper


def batch(seed=0, b=3, t=24, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (b, t), generator=g)
    input_ids[:, 8:11] = torch.tensor(ROW_IDS)  # some targets are the trainable rows themselves
    roles = torch.full((b, t), CONTEXT)
    roles[:, 6:12] = RESPONSE
    roles[:, 13:20] = WITNESS
    roles[0, 20:] = PAD_ROLE
    return input_ids, roles, torch.randn(b, t, HIDDEN, generator=g, dtype=torch.float64).to(dtype)


def loss_and_grads(head, hidden, input_ids, roles, lam, how):
    rows = head.token_adapter.trainable_tokens_delta["default"]
    hidden = hidden.clone().requires_grad_(True)
    if how == "naive":
        loss = naive_span_loss(head(hidden), input_ids, roles, lam)
    else:
        targets = span_targets(input_ids, roles)
        selected = hidden[:, :-1].reshape(-1, HIDDEN)[targets.positions]
        nll = token_nll(selected, targets.targets, head, chunk_size=7, fast=how == "fast")
        is_response = targets.roles == RESPONSE
        counts = targets.counts().clamp(min=1)
        loss = (nll * is_response).sum() / counts[0] + lam * (nll * ~is_response).sum() / counts[1]
    hidden_grad, rows_grad = torch.autograd.grad(loss, [hidden, rows])
    return loss.detach(), hidden_grad, rows_grad


def test_peft_token_rows_take_the_fast_path():
    head = wrapped_head()
    weight, row_ids, rows = projection_parts(head)
    assert weight is head.token_adapter.base_layer.weight and row_ids.tolist() == ROW_IDS and rows.requires_grad


@pytest.mark.parametrize("lam", [0.0, 1.0, 2.5])
def test_fast_path_equals_naive_and_module_path(lam):
    head = wrapped_head()
    input_ids, roles, hidden = batch()
    fast = loss_and_grads(head, hidden, input_ids, roles, lam, "fast")
    for how in ("naive", "module"):
        ref = loss_and_grads(head, hidden, input_ids, roles, lam, how)
        for a, b in zip(fast, ref):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), how


def test_fast_path_in_bf16_is_no_less_accurate_than_the_module_path():
    """bf16 logits round either way; the fast path must not add error beyond the module path's."""
    head64, head16 = wrapped_head(torch.float64), wrapped_head(torch.bfloat16)
    input_ids, roles, hidden = batch()
    truth = loss_and_grads(head64, hidden, input_ids, roles, 1.0, "naive")
    fast = loss_and_grads(head16, hidden.bfloat16(), input_ids, roles, 1.0, "fast")
    module = loss_and_grads(head16, hidden.bfloat16(), input_ids, roles, 1.0, "module")
    for t, f, m in zip(truth, fast, module):
        err_fast, err_module = (f.double() - t).abs().max(), (m.double() - t).abs().max()
        assert err_fast <= 1.5 * err_module + 1e-3 * t.abs().max()


def test_other_output_layers_use_the_module_path():
    assert projection_parts(torch.nn.Linear(4, 9, bias=True).requires_grad_(False)) is None
    assert projection_parts(torch.nn.Linear(4, 9, bias=False)) is None  # trainable weight: needs its gradient
    plain = torch.nn.Linear(4, 9, bias=False).requires_grad_(False)
    assert projection_parts(plain)[1] is None
    head = wrapped_head()
    head.token_adapter.merge()
    assert projection_parts(head) is None


def test_tiny_peft_model_lora_and_row_gradients_match_naive(recipe, tokenizer):
    """End to end on the 4-bit tiny Qwen3 with LoRA + tag rows: the loss the trainer uses vs full logits."""
    from tear_lora.data.tokens import structural_token_ids
    from tear_lora.train.batch import final_hidden_states, unwrap_causal_lm
    from tear_lora.train.model import add_adapters, load_base

    torch.manual_seed(0)
    tag_ids = list(structural_token_ids(tokenizer).values())
    model = add_adapters(load_base(recipe, tokenizer), recipe, tag_ids)
    with torch.no_grad():  # LoRA B starts at zero, which leaves every LoRA A gradient exactly 0: nothing to compare
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 151_600, (2, 40), generator=g)
    input_ids[:, 20:26] = torch.tensor(tag_ids)
    roles = torch.full((2, 40), CONTEXT)
    roles[:, 10:25], roles[:, 26:38] = RESPONSE, WITNESS
    mask = torch.ones_like(input_ids)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    head = unwrap_causal_lm(model).get_output_embeddings()
    assert projection_parts(head) is not None

    fast = span_loss(final_hidden_states(model, input_ids, mask), span_targets(input_ids, roles), head, 0.8,
                     chunk_size=16).loss
    fast_grads = torch.autograd.grad(fast, params)
    naive = naive_span_loss(model(input_ids=input_ids, attention_mask=mask).logits, input_ids, roles, 0.8)
    naive_grads = torch.autograd.grad(naive, params)
    assert torch.allclose(fast, naive, atol=1e-5, rtol=1e-5)
    assert {"lora_A", "lora_B", "trainable_tokens_delta"} <= {k for n in names for k in n.split(".")}
    for name, a, b in zip(names, fast_grads, naive_grads):
        assert b.abs().max() > 0, f"{name}: a zero gradient compares nothing"
        assert torch.allclose(a, b, atol=1e-5 * b.abs().max().item(), rtol=1e-4), name


def test_fast_path_with_row_weights_equals_naive():
    """Per-row response weights multiply the NLL outside `_ProjectedNLL`: its backward gets grad scaled per token."""
    head = wrapped_head()
    rows = head.token_adapter.trainable_tokens_delta["default"]
    input_ids, roles, hidden = batch()
    weights = torch.tensor([0.0, 0.5, 1.0])
    results = []
    for how in ("fast", "naive"):
        h = hidden.clone().requires_grad_(True)
        if how == "fast":
            loss = span_loss(h, span_targets(input_ids, roles, weights), head, 0.8, chunk_size=7).loss
        else:
            loss = naive_span_loss(head(h), input_ids, roles, 0.8, row_weights=weights)
        results.append((loss.detach(), *torch.autograd.grad(loss, [h, rows])))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_tiny_peft_model_weight_zero_row_equals_response_as_context(recipe, tokenizer):
    """Weight 0 on a row leaves the LoRA and token-row gradients of the batch whose row has its response
    relabelled as context (role 0), with its witness still trained."""
    from tear_lora.data.tokens import structural_token_ids
    from tear_lora.train.batch import final_hidden_states, unwrap_causal_lm
    from tear_lora.train.model import add_adapters, load_base

    torch.manual_seed(0)
    tag_ids = list(structural_token_ids(tokenizer).values())
    model = add_adapters(load_base(recipe, tokenizer), recipe, tag_ids)
    with torch.no_grad():  # non-zero LoRA B, so LoRA A has gradients too
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    g = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, 151_600, (2, 40), generator=g)
    input_ids[:, 20:26] = torch.tensor(tag_ids)
    roles = torch.full((2, 40), CONTEXT)
    roles[:, 10:25], roles[:, 26:38] = RESPONSE, WITNESS
    relabelled = roles.clone()
    relabelled[0, 10:25] = CONTEXT
    mask = torch.ones_like(input_ids)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    head = unwrap_causal_lm(model).get_output_embeddings()
    assert projection_parts(head) is not None

    def gradients(span_roles, weights):
        hidden = final_hidden_states(model, input_ids, mask)
        loss = span_loss(hidden, span_targets(input_ids, span_roles, weights), head, 0.8, chunk_size=16).loss
        return torch.autograd.grad(loss, params)

    weighted = gradients(roles, torch.tensor([0.0, 1.0]))
    reference = gradients(relabelled, None)
    unweighted = gradients(roles, None)
    assert any("trainable_tokens_delta" in n for n in names) and any("lora_A" in n for n in names)
    for name, a, b in zip(names, weighted, reference):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    assert max((a - b).abs().max() for a, b in zip(weighted, unweighted)) > 1e-4  # row 0's response did matter
