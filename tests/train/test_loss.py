import pytest
import torch

from tear_lora.data.template import CONTEXT, PAD_ROLE, RESPONSE, WITNESS
from tear_lora.train.loss import count_span_tokens, naive_span_loss, span_loss, span_targets, token_nll

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


def grads(head, hidden, input_ids, roles, lam, chunked=True, chunk=7, row_weights=None):
    head.zero_grad()
    hidden = hidden.clone().requires_grad_(True)
    if chunked:
        loss = span_loss(hidden, span_targets(input_ids, roles, row_weights), head, lam, chunk_size=chunk).loss
    else:
        loss = naive_span_loss(head(hidden), input_ids, roles, lam, row_weights)
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


@pytest.mark.parametrize("weights", [None, [0.0, 0.5, 1.0, 0.3]])
def test_window_denominators_make_micro_batches_add_up(head, weights):
    input_ids, roles, hidden = batch(b=4)
    w = None if weights is None else torch.tensor(weights)
    whole = span_loss(hidden, span_targets(input_ids, roles, w), head, 0.7).loss
    total = count_span_tokens(roles, w)
    assert torch.equal(total, span_targets(input_ids, roles, w).counts())
    parts = sum(span_loss(hidden[i : i + 1], span_targets(input_ids[i : i + 1], roles[i : i + 1],
                                                          None if w is None else w[i : i + 1]),
                          head, 0.7, denominators=total).loss for i in range(4))
    assert torch.allclose(whole, parts, atol=1e-10)


def test_no_witness_tokens_no_division_by_zero(head):
    input_ids, roles, hidden = batch(witness=False)
    hidden.requires_grad_(True)
    result = span_loss(hidden, span_targets(input_ids, roles), head, 1.0, denominators=torch.tensor([12, 0]))
    result.loss.backward()
    assert torch.isfinite(result.loss) and torch.isfinite(hidden.grad).all()
    assert result.witness_nll_sum == 0 and result.counts.tolist()[1] == 0


# ---- per-row response weights (objective.response_weight) -----------------------------------------------------


def test_weighted_chunked_equals_naive_values_and_gradients(head):
    input_ids, roles, hidden = batch()
    weights = torch.tensor([0.0, 0.5, 1.0])
    ours = grads(head, hidden, input_ids, roles, 0.6, row_weights=weights)
    ref = grads(head, hidden, input_ids, roles, 0.6, chunked=False, row_weights=weights)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    # the definition, by hand: sum_rows w * sum_tokens nll / sum_rows w * n_response + lambda * witness mean
    nll = torch.nn.functional.cross_entropy(head(hidden[:, :-1]).reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1),
                                            reduction="none").view(3, -1).detach()
    is_resp, is_wit = roles[:, 1:] == RESPONSE, roles[:, 1:] == WITNESS
    expected = ((nll * is_resp).sum(1) * weights).sum() / (is_resp.sum(1) * weights).sum() \
        + 0.6 * (nll * is_wit).sum() / is_wit.sum()
    assert torch.allclose(ours[0], expected.float(), atol=1e-5, rtol=1e-6)
    unweighted = grads(head, hidden, input_ids, roles, 0.6)
    assert (unweighted[1] - ours[1]).abs().max() > 1e-6  # the weights change the gradient


def test_weight_zero_row_is_the_row_without_response_targets(head):
    """Weight 0 = the row's response relabelled as context: the same loss and gradients, and no output-layer work."""
    input_ids, roles, hidden = batch()
    relabelled = roles.clone()
    relabelled[0][relabelled[0] == RESPONSE] = CONTEXT
    weighted = span_targets(input_ids, roles, torch.tensor([0.0, 1.0, 1.0]))
    assert torch.equal(weighted.positions, span_targets(input_ids, relabelled).positions)
    ours = grads(head, hidden, input_ids, roles, 1.0, row_weights=torch.tensor([0.0, 1.0, 1.0]))
    ref = grads(head, hidden, input_ids, relabelled, 1.0)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert ours[1][0, :12].abs().max() == 0  # no gradient reaches the positions predicting row 0's response


def test_no_weights_is_the_unweighted_loss_bit_for_bit(head):
    """Without weights (an empty objective.response_weight) the loss is the plain one, bit for bit."""
    input_ids, roles, hidden = batch()
    targets = span_targets(input_ids, roles)
    assert targets.weights is None and targets.counts().dtype == torch.long
    assert count_span_tokens(roles).dtype == torch.long
    result = span_loss(hidden, targets, head, 0.7, chunk_size=7)
    # the formula as it stood before weights existed
    nll = token_nll(hidden[:, :-1].reshape(-1, HIDDEN)[targets.positions], targets.targets, head, 7)
    is_response = targets.roles == RESPONSE
    counts = torch.stack([is_response.sum(), (targets.roles == WITNESS).sum()]).clamp(min=1).to(nll.dtype)
    before = (nll * is_response).sum() / counts[0] + 0.7 * (nll * ~is_response).sum() / counts[1]
    assert torch.equal(result.loss, before)
    assert torch.equal(result.counts, targets.counts())


def test_all_weights_zero_gives_zero_response_term_and_finite_loss(head):
    input_ids, roles, hidden = batch()
    hidden = hidden.clone().requires_grad_(True)
    weights = torch.zeros(3)
    targets = span_targets(input_ids, roles, weights)
    assert (targets.roles == RESPONSE).sum() == 0
    window = count_span_tokens(roles, weights)
    assert window.tolist() == [0.0, float((roles[:, 1:] == WITNESS).sum())]
    result = span_loss(hidden, targets, head, 0.5, denominators=window, chunk_size=7)
    result.loss.backward()
    assert torch.isfinite(result.loss) and torch.isfinite(hidden.grad).all()
    assert result.response_nll_sum == 0 and result.counts[0] == 0
    assert torch.allclose(result.loss, 0.5 * result.witness_nll_sum / result.counts[1].float())


def test_fractional_weighted_count_is_not_clamped_to_one(head):
    """One row of weight 0.1 (weighted count 0.6 < 1): its weighted mean is still its plain mean NLL."""
    input_ids, roles, hidden = batch(b=1)
    weighted = span_loss(hidden, span_targets(input_ids, roles, torch.tensor([0.1])), head, 0.0)
    plain = span_loss(hidden, span_targets(input_ids, roles), head, 0.0)
    assert weighted.counts[0].item() == pytest.approx(0.6)
    assert torch.allclose(weighted.loss, plain.loss, rtol=1e-6)
