"""How close two models' logits are, over rows of token ids: the one measure behind `merge --verify`, the GGUF
verify and the serving bundle's verify, each with its own tolerance table.
"""

from __future__ import annotations

import torch


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
