"""A run at a glance: training curves (PNG) and a summary table, from files the other verbs already wrote.

Reads `adapters/<run>/log_history.json` and `tear_lora.json`, plus, when given, the JSON of `tear-lora eval`
and the `verify.json` that `tear-lora merge --verify` leaves in the merged dir. Computes nothing new.
"""

from __future__ import annotations

from pathlib import Path

from tear_lora.metadata import AdapterError, read_metadata
from tear_lora.rundir import atomic_save_figure, read_json

CURVES = ("response_loss", "witness_loss")


def _num(value) -> float:
    """null (how our JSON writes NaN/Inf) prints as nan instead of failing the format."""
    return float("nan") if value is None else value


def plot_training_curves(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Response and witness loss per logged step -> PNG (default: <run>/training_curves.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    meta = read_metadata(run_dir)  # refuses a damaged run dir first
    try:
        history = read_json(run_dir / "log_history.json")
        history = [e for e in history if CURVES[0] in e and "step" in e]
    except (OSError, ValueError, TypeError) as e:
        raise AdapterError(f"{run_dir}/log_history.json: unreadable ({e})") from None
    train = [e for e in history if not any(k.startswith("eval_") for k in e)]
    if not train:
        raise AdapterError(f"{run_dir}/log_history.json has no logged training steps (set training.logging_steps)")
    figure, axis = plt.subplots(figsize=(7, 4))
    for key in CURVES:
        axis.plot([e["step"] for e in train], [e[key] for e in train], marker="o", label=key.replace("_", " "))
    axis.set(xlabel="optimizer step", ylabel="mean token NLL (nats)",
             title=f"{meta['run_name']}: loss = response + {meta['lambda']:g} x witness")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    out = atomic_save_figure(figure, Path(out) if out else run_dir / "training_curves.png", dpi=120)
    plt.close(figure)
    return out


def summary_table(run_dir: str | Path, eval_rows: list[dict] | None = None, verify: dict | None = None) -> str:
    meta = read_metadata(run_dir)
    metrics = meta["metrics"]
    lines = [f"run {meta['run_name']}  (lambda {meta['lambda']:g}, base {meta['base']['name_or_path']})",
             f"  trained {metrics.get('global_step')} steps in {metrics.get('train_runtime_s') or 0:.0f} s; "
             f"final train loss {_num(metrics.get('train_loss')):.4f}; trainable parameters "
             f"{meta['trainable_parameters']['trainable']:,}"]
    if eval_rows:
        lines.append(f"  {'held-out (' + str(eval_rows[0]['rows']) + ' triples)':32s} {'response NLL':>12s} "
                     f"{'witness NLL':>12s} {'witness ppl':>12s}")
        for row in eval_rows:
            lines.append(f"  {row['name'][:32]:32s} {_num(row['response_nll']):12.4f} "
                         f"{_num(row['witness_nll']):12.4f} {_num(row['witness_ppl']):12.2f}")
        base = next((r for r in eval_rows if r["kind"] == "base"), None)
        tuned = next((r for r in eval_rows if r["kind"] != "base"), None)
        if base and tuned:
            lines.append(f"  witness NLL {tuned['witness_nll'] - base['witness_nll']:+.4f} nats vs base, "
                         f"response NLL {tuned['response_nll'] - base['response_nll']:+.4f}")
    if verify:
        lines.append(f"  merge verify ({verify['dtype']}): max |dlogit| {verify['max_abs_logit']:.3g}, mean KL "
                     f"{verify['mean_kl']:.2e}, top-1 agreement {verify['top1_agreement']:.4f} "
                     f"({'pass' if verify['passed'] else 'FAIL'})")
    return "\n".join(lines)
