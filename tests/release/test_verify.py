"""The agreement measure behind every verify (merge, GGUF, serving), on logits whose answer is known by hand."""

import math
from types import SimpleNamespace

import pytest
import torch

from tear_lora.release.verify import agreement_over_rows, logit_agreement, within_tolerance


def test_identical_logits_agree_exactly():
    logits = torch.randn(5, 11)
    result = logit_agreement(logits, logits.clone())
    assert result == {"max_abs_logit": 0.0, "kl_sum": 0.0, "top1_matches": 5, "positions": 5}


def test_hand_computed_kl_max_difference_and_top1():
    reference = torch.tensor([[0.0, 0.0], [2.0, 0.0], [5.0, 1.0]], dtype=torch.float64)
    other = torch.tensor([[0.0, math.log(3.0)], [0.0, 2.0], [5.0, 1.0]], dtype=torch.float64)
    # position 0: P = (1/2, 1/2), Q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3), top-1 0 vs 1 (argmax takes the first
    # of a tie); position 1: top-1 flips; position 2: identical
    p1, q1 = torch.tensor([2.0, 0.0], dtype=torch.float64).softmax(0), torch.tensor([0.0, 2.0], dtype=torch.float64).softmax(0)
    expected_kl = 0.5 * math.log(2) + 0.5 * math.log(2 / 3) + float((p1 * (p1 / q1).log()).sum())
    result = logit_agreement(reference, other)
    assert result["kl_sum"] == pytest.approx(expected_kl, rel=1e-12)
    assert result["max_abs_logit"] == pytest.approx(2.0)
    assert result["positions"] == 3 and result["top1_matches"] == 1


def test_a_shift_of_all_logits_is_no_disagreement_in_kl():
    logits = torch.randn(4, 7)
    result = logit_agreement(logits, logits + 3.0)
    assert result["kl_sum"] == pytest.approx(0.0, abs=1e-12) and result["max_abs_logit"] == pytest.approx(3.0)


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits for a row are a fixed function of its ids (so rows can be told apart)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])


def test_agreement_over_rows_pools_positions_of_every_row():
    table = torch.randn(6, 5)
    flipped = table.clone()
    flipped[3] = -table[3]  # every position reading id 3 disagrees
    rows = [[0, 1, 2], [3, 4], [5]]
    result = agreement_over_rows(FixedLogits(table), FixedLogits(flipped), rows, "cpu")
    assert result["positions"] == 6
    assert result["top1_agreement"] == pytest.approx(5 / 6)
    assert result["max_abs_logit"] == pytest.approx(float(2 * table[3].abs().max()))
    single = logit_agreement(table[3:4], flipped[3:4])
    assert result["mean_kl"] == pytest.approx(single["kl_sum"] / 6)


@pytest.mark.parametrize("result, ok", [
    ({"mean_kl": 1e-7, "top1_agreement": 1.0, "max_abs_logit": 1e-4}, True),
    ({"mean_kl": 2e-6, "top1_agreement": 1.0, "max_abs_logit": 1e-4}, False),
    ({"mean_kl": 1e-7, "top1_agreement": 0.99, "max_abs_logit": 1e-4}, False),
    ({"mean_kl": 1e-7, "top1_agreement": 1.0, "max_abs_logit": 2e-3}, False),
])
def test_within_tolerance_each_bound_can_fail(result, ok):
    assert within_tolerance(result, {"mean_kl": 1e-6, "top1": 0.999, "max_abs_logit": 1e-3}) is ok
    assert within_tolerance(result, {"mean_kl": 1e-6, "top1": 0.999, "max_abs_logit": None}) is (
        ok or result["max_abs_logit"] == 2e-3)


FLOOR = {"mean_kl": 2e-3, "top1_agreement": 0.97, "max_abs_logit": 6.0}
TABLE = {"mean_kl": 1e-3, "top1": 0.95, "max_abs_logit": 1.0}


def test_calibrated_tolerance_widens_to_a_multiple_of_the_floor_and_never_tightens():
    from tear_lora.release.verify import calibrated_tolerance

    wide = calibrated_tolerance(TABLE, FLOOR, multiple=2.0)
    assert wide == pytest.approx({"mean_kl": 4e-3, "top1": 0.94, "max_abs_logit": 12.0})
    quiet = {"mean_kl": 1e-9, "top1_agreement": 1.0, "max_abs_logit": 1e-4}  # a model whose rounding is negligible
    assert calibrated_tolerance(TABLE, quiet, multiple=2.0) == TABLE
    assert calibrated_tolerance({**TABLE, "max_abs_logit": None}, FLOOR)["max_abs_logit"] is None


@pytest.mark.parametrize("result, ok", [
    ({"mean_kl": 3.9e-3, "top1_agreement": 0.941, "max_abs_logit": 11.0}, True),
    ({"mean_kl": 4.1e-3, "top1_agreement": 0.99, "max_abs_logit": 1.0}, False),
    ({"mean_kl": 1e-4, "top1_agreement": 0.939, "max_abs_logit": 1.0}, False),
    ({"mean_kl": 1e-4, "top1_agreement": 0.99, "max_abs_logit": 12.5}, False),
])
def test_calibrated_bounds_can_each_fail(result, ok):
    from tear_lora.release.verify import calibrated_tolerance

    assert within_tolerance(result, calibrated_tolerance(TABLE, FLOOR, multiple=2.0)) is ok


def test_noise_floor_compares_the_reference_with_its_adapter_disabled():
    """The floor is the base against the base: a reference whose adapter changes every logit still has floor 0
    against its own base."""
    from contextlib import contextmanager

    from tear_lora.release.verify import noise_floor

    table = torch.randn(6, 5)

    class WithAdapter(FixedLogits):
        enabled = True

        def forward(self, input_ids):
            return SimpleNamespace(logits=self.table[input_ids] + (3.0 * torch.arange(5.0) if self.enabled else 0))

        @contextmanager
        def disable_adapter(self):
            self.enabled = False
            yield
            self.enabled = True

    reference = WithAdapter(table)
    floor = noise_floor(reference, FixedLogits(table), [[0, 1, 2], [3, 4, 5]], "cpu")
    assert floor == {"positions": 6, "max_abs_logit": 0.0, "mean_kl": 0.0, "top1_agreement": 1.0}
    assert reference.enabled
