"""How close two models' logits are, over rows of token ids: the one measure behind `merge --verify`, the GGUF
verify and the serving bundle's verify, each with its own tolerance table; and the export dtype's noise floor on
the same rows, which widens that table where a real model's own rounding is larger (calibrated_tolerance).
"""

from __future__ import annotations

import torch

# A correct export may disagree with the trained model by up to this many times the export dtype's own noise on
# the same rows (noise_floor); measured ratios and the wrong merges it refuses: docs/release.md "Verify".
FLOOR_MULTIPLE = 2.0


def logit_agreement(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """max |Δlogit|, summed KL(reference || other), top-1 matches and positions, for [T, V] logits."""
    ref, oth = reference.double(), other.double()  # fp64: fp32 log-softmax over 150k ids has a ~1e-7 KL floor
    kl = torch.nn.functional.kl_div(oth.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
    return {"max_abs_logit": float((ref - oth).abs().max()), "kl_sum": float(kl.sum(-1).clamp(min=0).sum()),
            "top1_matches": int((ref.argmax(-1) == oth.argmax(-1)).sum()), "positions": ref.shape[0]}


def agreement_over_rows(reference, other, rows, device) -> dict[str, float]:
    """Both models over each row (a list of token ids, one sequence at a time): positions, max |Δlogit|, mean KL
    and top-1 agreement of `other` against `reference` over every position."""
    totals = {"max_abs_logit": 0.0, "kl_sum": 0.0, "top1_matches": 0, "positions": 0}
    with torch.no_grad():
        for ids in rows:
            ids = torch.tensor([ids], device=device)
            part = logit_agreement(reference(input_ids=ids).logits[0], other(input_ids=ids).logits[0])
            totals = {k: max(totals[k], part[k]) if k == "max_abs_logit" else totals[k] + part[k] for k in totals}
    positions = max(totals["positions"], 1)
    return {"positions": totals["positions"], "max_abs_logit": totals["max_abs_logit"],
            "mean_kl": totals["kl_sum"] / positions, "top1_agreement": totals["top1_matches"] / positions}


def within_tolerance(result: dict, tolerance: dict) -> bool:
    """mean KL, top-1 agreement and max |Δlogit| within their bounds (a max |Δlogit| bound of None: not bounded)."""
    return (result["mean_kl"] <= tolerance["mean_kl"] and result["top1_agreement"] >= tolerance["top1"]
            and (tolerance["max_abs_logit"] is None or result["max_abs_logit"] <= tolerance["max_abs_logit"]))


def noise_floor(reference, base_model, rows, device) -> dict[str, float]:
    """The export dtype's own disagreement on these rows: `base_model` (the base as exported: dequantized, in the
    export dtype, no adapter) against `reference` (a PEFT model on the base as trained) with its adapters disabled.
    A correct export differs from the trained model by this same rounding, applied to slightly different weights."""
    with reference.disable_adapter():
        return agreement_over_rows(reference, base_model, rows, device)


def calibrated_tolerance(table: dict, floor: dict, multiple: float = FLOOR_MULTIPLE) -> dict:
    """The dtype's fixed bounds, widened to `multiple` times the floor (mean KL, top-1 disagreement, max |Δlogit|)
    where the model's own rounding noise on these rows is larger; never tighter than the table."""
    return {"mean_kl": max(table["mean_kl"], multiple * floor["mean_kl"]),
            "top1": min(table["top1"], 1.0 - multiple * (1.0 - floor["top1_agreement"])),
            "max_abs_logit": (None if table["max_abs_logit"] is None
                              else max(table["max_abs_logit"], multiple * floor["max_abs_logit"]))}


def describe_bounds(tolerance: dict, floor: dict | None) -> str:
    """The bounds in one phrase, with the noise floor they were widened from (for the CLI and the cards)."""
    text = f"mean KL ≤ {tolerance['mean_kl']:.3g}, top-1 ≥ {tolerance['top1']:.4f}" + (
        f", max |Δlogit| ≤ {tolerance['max_abs_logit']:.3g}" if tolerance.get("max_abs_logit") is not None else "")
    if floor:
        text += (f" (the dtype's own noise on these rows: mean KL {floor['mean_kl']:.3g}, top-1 "
                 f"{floor['top1_agreement']:.4f}, max |Δlogit| {floor['max_abs_logit']:.3g})")
    return text
