import pytest
import torch

from tear_lora.loss import naive_span_loss, span_loss, span_targets
from tear_lora.template import CONTEXT, PAD_ROLE, RESPONSE, WITNESS

VOCAB, HIDDEN = 151_936, 32


def batch(seed=0, b=3, t=24, witness=True):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (b, t), generator=g)
    roles = torch.full((b, t), CONTEXT)
    roles[:, 6:12] = RESPONSE
    if witness:
        roles[:, 13:20] = WITNESS
    roles[0, 20:] = PAD_ROLE
    hidden = torch.randn(b, t, HIDDEN, generator=g, dtype=torch.float64)
    return input_ids, roles, hidden


@pytest.fixture(scope="module")
def head():
    torch.manual_seed(0)
    return torch.nn.Linear(HIDDEN, VOCAB, bias=False).double()


def grads(head, hidden, input_ids, roles, lam, chunked=True, chunk=7):
    head.zero_grad()
    hidden = hidden.clone().requires_grad_(True)
    if chunked:
        loss = span_loss(hidden, span_targets(input_ids, roles), head, lam, chunk_size=chunk).loss
    else:
        loss = naive_span_loss(head(hidden), input_ids, roles, lam)
    loss.backward()
    return loss.detach(), hidden.grad.clone(), head.weight.grad.clone()


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 3.0])
def test_chunked_equals_naive_values_and_gradients(head, lam):
    input_ids, roles, hidden = batch()
    ours = grads(head, hidden, input_ids, roles, lam)
    ref = grads(head, hidden, input_ids, roles, lam, chunked=False)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_lambda_zero_ignores_witness_and_lambda_scales_it(head):
    input_ids, roles, hidden = batch()
    other_targets = input_ids.clone()
    other_targets[roles == WITNESS] = (other_targets[roles == WITNESS] + 17) % VOCAB
    _, g0, _ = grads(head, hidden, input_ids, roles, 0.0)
    _, g0_other, _ = grads(head, hidden, other_targets, roles, 0.0)
    assert torch.equal(g0, g0_other)  # witness tokens have no effect at lambda = 0
    _, g1, _ = grads(head, hidden, input_ids, roles, 1.0)
    _, g2, _ = grads(head, hidden, input_ids, roles, 2.0)
    assert torch.allclose(g2 - g0, 2 * (g1 - g0), atol=1e-10)
    assert (g1 - g0).abs().max() > 1e-6


def test_window_denominators_make_micro_batches_add_up(head):
    input_ids, roles, hidden = batch(b=4)
    whole = span_loss(hidden, span_targets(input_ids, roles), head, 0.7).loss
    total = span_targets(input_ids, roles).counts()
    parts = sum(span_loss(hidden[i : i + 1], span_targets(input_ids[i : i + 1], roles[i : i + 1]), head, 0.7,
                          denominators=total).loss for i in range(4))
    assert torch.allclose(whole, parts, atol=1e-10)


def test_no_witness_tokens_no_division_by_zero(head):
    input_ids, roles, hidden = batch(witness=False)
    hidden.requires_grad_(True)
    result = span_loss(hidden, span_targets(input_ids, roles), head, 1.0, denominators=torch.tensor([12, 0]))
    result.loss.backward()
    assert torch.isfinite(result.loss) and torch.isfinite(hidden.grad).all()
    assert result.witness_nll_sum == 0 and result.counts.tolist()[1] == 0
