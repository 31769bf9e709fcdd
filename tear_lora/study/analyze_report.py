"""The text table and the per-file plot for `tear-lora analyze` results (the dict `analyze.analyze` returns, or its
JSON). The study tables, contrasts and the report directory are in study_report.py.

Kept apart from analyze.py so the instruments read on their own; nothing here computes a measurement.
"""

from __future__ import annotations

from pathlib import Path

from .contrasts import arm_of


def _interval(low_high) -> str:
    return "" if not low_high else f" [{low_high[0]:.3f}, {low_high[1]:.3f}]"


def _dropped(result: dict) -> str:
    """An instrument's left-out pairs / rows by reason, e.g. "; dropped: 1 incomplete" (the JSON has every reason,
    zeros too; the table only those that left something out)."""
    dropped = {why: n for why, n in (result.get("dropped") or {}).items() if n}
    return "; dropped: " + ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in dropped.items()) if dropped else ""


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _read(counts: dict) -> str:
    """What reading kept and dropped, in the words rawdata.describe_counts prints."""
    return (f"{counts['rows_read']} rows read: {counts['rows_kept']} kept, {counts['rows_rejected_invalid']} invalid, "
            f"{counts['rows_too_long']} too long (data.max_seq_len {counts['max_seq_len']}), "
            f"{counts['rows_trimmed']} trimmed")


def _cells(result: dict) -> str:
    m, s, p = result["matching"], result["sensitivity"], result["probe"]
    matching = (f"{m['delta_nats']:+.3f}{_interval(m['delta_ci'])}".rjust(24) + f" {m['delta_p']:6.3f}"
                + f" {m['p_positive']:6.3f}" if "delta_nats" in m else f"{'-':>24s} {'-':>6s} {'-':>6s}")
    sensitivity = f"{s['nats_per_token']:+.3f}{_interval(s['ci'])}".rjust(24) if "nats_per_token" in s else \
        f"{'-':>24s}"
    probe = (f"{p['auroc']:.3f} ({p['layer']})".rjust(12) + f" {p['null_mean']:6.3f} {p['p']:6.3f}"
             if "auroc" in p else f"{'-':>12s} {'-':>6s} {'-':>6s}")
    beyond = f"{p['beyond_words']:+.3f}{_interval(p['beyond_words_ci'])}".rjust(24) if p.get("words") else \
        f"{'-':>24s}"
    return f"{matching} | {sensitivity} | {probe} | {beyond}"


def _words_line(first: dict) -> str | None:
    words = []
    if "lexical" in first.get("matching", {}):
        lex = first["matching"]["lexical"]
        words.append(f"matching Δ {lex['delta_nats']:+.3f}{_interval(lex['delta_ci'])} nats/word, P(Δ>0) "
                     f"{lex['p_positive']:.3f}")
    if "lexical" in first.get("sensitivity", {}):
        lex = first["sensitivity"]["lexical"]
        words.append(f"sensitivity {lex['nats_per_word']:+.3f}{_interval(lex['ci'])} nats/word")
    if first.get("probe", {}).get("words"):
        words.append("probe AUROC " + ", ".join(f"{name} {v:.3f}" for name, v in first["probe"]["words"].items()))
    return f"{'words only':30s} " + "; ".join(words) if words else None


def _notes(first: dict) -> str:
    notes = [_read(first["rows"])] if "rows" in first else []
    m, s, p = first.get("matching", {}), first.get("sensitivity", {}), first.get("probe", {})
    if "delta_nats" in m:
        notes.append(f"matching on {m['n']} pairs ({m['witnesses']} witnesses{_dropped(m)}), Δ in nats/token, null: "
                     f"{m['null']}; P(Δ>0) null 0.5; smallest detectable Δ {_num(m['mde']['delta_nats'])}")
    if "nats_per_token" in s:
        notes.append(f"sensitivity: {s['n']} witnesses after {s['partner']}")
    if "auroc" in p:
        notes.append(f"probe: layer chosen on {p['selection_rows']} rows, scored on {p['n']} ({p['folds']}-fold, "
                     f"grouped by {p['grouped_by']}), null: {p['null']}; smallest detectable AUROC "
                     f"{_num(p['mde_auroc'])}; beyond words = probe − best words control on the same folds")
    notes += [f"{k}: {v['skipped']}{_dropped(v)}" for k, v in first.items() if isinstance(v, dict) and "skipped" in v]
    return "(" + "; ".join(notes) + ")"


def format_analysis(report: dict) -> str:
    """One table per data file: matching, sensitivity and probe for every source, each with its null, and the
    words-only controls (the same for every source: they read only the data)."""
    parts = []
    for data_file in report["settings"]["data"]:
        header = (f"{'name':30s} {'λ':>5s} {'arm':>12s} {'seed':>5s} | {'matching Δ [95% CI]':>24s} {'p':>6s} "
                  f"{'P(Δ>0)':>6s} | {'sensitivity [95% CI]':>24s} | {'AUROC (layer)':>12s} {'null':>6s} {'p':>6s} | "
                  f"{'beyond words [95% CI]':>24s}")
        lines = [f"== {data_file}", header, "-" * len(header)]
        for source in report["sources"]:
            lam = "-" if source["lambda"] is None else f"{source['lambda']:g}"
            seed = "-" if source.get("seed") is None else str(source["seed"])
            lines.append(f"{source['name'][:30]:30s} {lam:>5s} {arm_of(source):>12s} {seed:>5s} | "
                         f"{_cells(source['data'][data_file])}")
        first = report["sources"][0]["data"][data_file] if report["sources"] else {}
        words = _words_line(first)
        lines += ([words] if words else []) + [_notes(first)]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


INSTRUMENTS = [("matching", "delta_nats", "witness matching Δ (nats/token)", 0.0),
               ("matching", "p_positive", "P(Δ > 0)", 0.5),
               ("probe", "auroc", "impact probe AUROC (chosen layer)", 0.5)]


def plot_analysis(report: dict, out: str | Path) -> Path:
    """A row per data file, a column per instrument, each against λ: seeds as points (one colour per arm), the
    base dashed, the null dotted, the best words control dash-dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tear_lora.rundir import atomic_save_figure

    files = report["settings"]["data"]
    fig, axes = plt.subplots(len(files), len(INSTRUMENTS), figsize=(14, 3.8 * len(files)), squeeze=False)
    colours = {"plain": "tab:blue", "shuffled": "tab:orange", "witness-only": "tab:red"}
    for r, data_file in enumerate(files):
        for c, (instrument, key, title, null) in enumerate(INSTRUMENTS):
            ax = axes[r][c]
            for arm, colour in colours.items():
                points = sorted((s["lambda"], s["data"][data_file][instrument][key]) for s in report["sources"]
                                if arm_of(s) == arm and s["lambda"] is not None
                                and key in s["data"][data_file][instrument])
                if points:
                    ax.scatter(*zip(*points), color=colour, label=arm, alpha=0.8)
            for s in report["sources"]:
                value = s["data"][data_file][instrument].get(key)
                if s["kind"] == "base" and value is not None:
                    ax.axhline(value, color="gray", linestyle="--", linewidth=1, label="base")
            first = report["sources"][0]["data"][data_file][instrument] if report["sources"] else {}
            if instrument == "probe" and first.get("words"):
                ax.axhline(first["words_best_auroc"], color="tab:green", linestyle="-.", linewidth=1,
                           label="best words control")
            ax.axhline(null, color="black", linestyle=":", linewidth=0.8, label="null")
            ax.set_title(f"{title}\n{Path(data_file).name}", fontsize=9)
            ax.set_xlabel("λ")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = atomic_save_figure(fig, out, dpi=110)
    plt.close(fig)
    return out
