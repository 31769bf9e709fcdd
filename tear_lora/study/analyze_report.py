"""Tables and the plot for `tear-lora analyze` results (the dict `analyze.analyze` returns, or its JSON).

Kept apart from analyze.py so the instruments read on their own; nothing here computes a measurement.
"""

from __future__ import annotations

from pathlib import Path


def _arm(source: dict) -> str:
    weights = source.get("response_weight") or {}
    return "witness-only" if weights else "plain"


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _interval(low_high) -> str:
    return "" if not low_high else f" [{low_high[0]:.3f}, {low_high[1]:.3f}]"


def _dropped(result: dict) -> str:
    """An instrument's left-out pairs / rows by reason, e.g. "; dropped: 1 incomplete" (the JSON has every reason,
    zeros too; the table only those that left something out)."""
    dropped = {why: n for why, n in (result.get("dropped") or {}).items() if n}
    return "; dropped: " + ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in dropped.items()) if dropped else ""


def _read(counts: dict) -> str:
    """What reading kept and dropped, in the words rawdata.describe_counts prints."""
    return (f"{counts['rows_read']} rows read: {counts['rows_kept']} kept, {counts['rows_rejected_invalid']} invalid, "
            f"{counts['rows_too_long']} too long (data.max_seq_len {counts['max_seq_len']}), "
            f"{counts['rows_trimmed']} trimmed")


def format_analysis(report: dict) -> str:
    """One table per data file: matching, sensitivity, probe for every source, each beside its words-only control
    (the same for every source: it reads only the data)."""
    parts = []
    for data_file in report["settings"]["data"]:
        header = (f"{'name':30s} {'λ':>5s} {'arm':>12s} {'seed':>5s} | {'match acc [95% CI]':>24s} {'margin':>7s} | "
                  f"{'sensitivity [95% CI]':>26s} | {'probe AUROC (layer)':>19s} {'floor':>6s} | "
                  f"{'probe − words [95% CI]':>27s}")
        lines = [f"== {data_file}", header, "-" * len(header)]
        for source in report["sources"]:
            result = source["data"][data_file]
            m, s, p = result["matching"], result["sensitivity"], result["probe"]
            matching = (f"{m['accuracy']:.3f}{_interval(m['accuracy_ci'])}".rjust(24) + f" {m['margin_nats']:7.3f}"
                        if "accuracy" in m else f"{'-':>24s} {'-':>7s}")
            sensitivity = (f"{s['nats_per_token']:.3f}{_interval(s['ci'])}".rjust(26) if "nats_per_token" in s
                           else f"{'-':>26s}")
            probe = (f"{p['best_auroc']:.3f} ({p['best_layer']})".rjust(19) + f" {p['shuffled_auroc_max']:6.3f}"
                     if "best_auroc" in p else f"{'-':>19s} {'-':>6s}")
            beyond = (f"{p['beyond_lexical']:+.3f}{_interval(p['beyond_lexical_ci'])}".rjust(27)
                      if "beyond_lexical" in p else f"{'-':>27s}")
            lam = "-" if source["lambda"] is None else f"{source['lambda']:g}"
            arm = "-" if source["kind"] == "base" else _arm(source)
            lines.append(f"{source['name'][:30]:30s} {lam:>5s} {arm:>12s} {_fmt(source.get('seed'), '')!s:>5s} | "
                         f"{matching} | {sensitivity} | {probe} | {beyond}")
        first = report["sources"][0]["data"][data_file] if report["sources"] else {}
        words = []
        if "lexical" in first.get("matching", {}):
            lex = first["matching"]["lexical"]
            words.append(f"match acc {lex['accuracy']:.3f}{_interval(lex['accuracy_ci'])}, margin "
                         f"{lex['margin_nats']:.3f} nats/word")
        if "lexical" in first.get("sensitivity", {}):
            lex = first["sensitivity"]["lexical"]
            words.append(f"sensitivity {lex['nats_per_word']:.3f}{_interval(lex['ci'])} nats/word")
        if "lexical_auroc" in first.get("probe", {}):
            words.append(f"TF-IDF probe AUROC {first['probe']['lexical_auroc']:.3f}")
        if words:
            lines.append(f"{'words only (overlap / TF-IDF)':30s} " + "; ".join(words))
        notes = [f"{k}: {v['skipped']}{_dropped(v)}" for k, v in first.items() if "skipped" in v]
        counts = [_read(first["rows"])] if "rows" in first else []
        if "pairs" in first.get("matching", {}):
            counts.append(f"{first['matching']['pairs']} pairs (chance 0.25{_dropped(first['matching'])})")
        if "rows" in first.get("sensitivity", {}):
            counts.append(f"sensitivity on {first['sensitivity']['rows']} rows, nats per witness token"
                          f"{_dropped(first['sensitivity'])}")
        if "rows" in first.get("probe", {}):
            counts.append(f"probe on {first['probe']['rows']} rows, {first['probe']['folds']}-fold"
                          f"{' grouped by pair' if first['probe'].get('grouped_by_pair') else ''}; floor = max "
                          "AUROC over layers with shuffled labels; probe − words at the best layer")
        lines.append("(" + "; ".join(counts + notes) + ")")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot_analysis(report: dict, out: str | Path) -> Path:
    """A row per data file, a column per instrument, each against λ; seeds as points, the base dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tear_lora.rundir import atomic_save_figure

    instruments = [("matching", "accuracy", "witness matching accuracy", 0.25),
                   ("sensitivity", "nats_per_token", "response sensitivity (nats/token)", 0.0),
                   ("probe", "best_auroc", "impact probe: best-layer AUROC", 0.5)]
    files = report["settings"]["data"]
    fig, axes = plt.subplots(len(files), 3, figsize=(14, 3.8 * len(files)), squeeze=False)
    for r, data_file in enumerate(files):
        for c, (instrument, key, title, chance) in enumerate(instruments):
            ax = axes[r][c]
            for arm, marker, color in (("plain", "o", "tab:blue"), ("witness-only", "^", "tab:red")):
                points = sorted((s["lambda"], s["data"][data_file][instrument][key]) for s in report["sources"]
                                if s["kind"] != "base" and _arm(s) == arm and s["lambda"] is not None
                                and key in s["data"][data_file][instrument])
                if points:
                    ax.scatter(*zip(*points), marker=marker, color=color, label=arm, alpha=0.8)
                    lambdas = sorted({lam for lam, _ in points})
                    means = [sum(v for lam2, v in points if lam2 == lam) / sum(1 for lam2, _ in points if lam2 == lam)
                             for lam in lambdas]
                    ax.plot(lambdas, means, color=color, linewidth=1)
            for s in report["sources"]:
                value = s["data"][data_file][instrument].get(key)
                if s["kind"] == "base" and value is not None:
                    ax.axhline(value, color="gray", linestyle="--", linewidth=1, label="base")
            control = {"matching": ("lexical", "accuracy"), "probe": ("lexical_auroc",)}.get(instrument)
            words = (_lookup(report["sources"][0]["data"][data_file][instrument], control)
                     if control and report["sources"] else None)  # the same for every source
            if words is not None:
                ax.axhline(words, color="tab:green", linestyle="-.", linewidth=1, label="words only")
            ax.axhline(chance, color="black", linestyle=":", linewidth=0.8, label="chance / none")
            ax.set_title(f"{title}\n{Path(data_file).name}", fontsize=9)
            ax.set_xlabel("λ")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = atomic_save_figure(fig, out, dpi=110)
    plt.close(fig)
    return out


STUDY_INSTRUMENTS = [  # (instrument, key, its CI key, the words-only control's path, title)
    ("matching", "accuracy", "accuracy_ci", ("lexical", "accuracy"), "witness matching accuracy (chance 0.25)"),
    ("matching", "margin_nats", "margin_ci", None, "witness matching margin, nats/token (none 0)"),
    ("sensitivity", "nats_per_token", "ci", None, "response sensitivity, nats/witness token (none 0)"),
    ("probe", "best_auroc", None, ("lexical_auroc",), "impact probe, best-layer AUROC (none 0.5)"),
    ("probe", "beyond_lexical", "beyond_lexical_ci", None,
     "impact probe AUROC − words-only AUROC, best layer (beyond the words: > 0)"),
]


def _lookup(result: dict, path: tuple):
    for key in path:
        result = result.get(key) if isinstance(result, dict) else None
    return result


def study_tables(report: dict) -> str:
    """Markdown tables for a λ × seed study: one per instrument and data file, a row per (arm, λ) with each seed's
    value, the mean, the half-range across seeds (the spread a difference must exceed to mean anything) and the
    bootstrap interval (the hull of the seeds' 95% intervals); the words-only control as its own row."""
    parts = []
    for data_file in report["settings"]["data"]:
        for instrument, key, ci_key, lexical_path, title in STUDY_INSTRUMENTS:
            groups: dict[tuple, dict] = {}
            intervals: dict[tuple, list] = {}
            lexical = None
            for s in report["sources"]:
                result = s["data"][data_file][instrument]
                value = result.get(key)
                if value is None:
                    continue
                arm = "base" if s["kind"] == "base" else _arm(s)
                groups.setdefault((arm, s["lambda"]), {})[s.get("seed")] = value
                if ci_key and result.get(ci_key):
                    intervals.setdefault((arm, s["lambda"]), []).append(result[ci_key])
                if lexical_path:
                    lexical = _lookup(result, lexical_path)
            if not groups:
                continue
            seeds = sorted({seed for g in groups.values() for seed in g if seed is not None}, key=str)
            lines = [f"**{title}** — `{Path(data_file).name}`", "",
                     "| arm | λ | " + " | ".join(f"seed {seed}" for seed in seeds)
                     + " | mean | ± half-range | 95% CI |",
                     "|---|---|" + "---|" * (len(seeds) + 3)]
            order = sorted(groups, key=lambda k: (k[0] == "base", k[0] != "plain", k[1] if k[1] is not None else -1))
            for arm, lam in order:
                values = groups[(arm, lam)]
                cells = [_fmt(values.get(seed)) for seed in seeds] if arm != "base" else ["-"] * len(seeds)
                numbers = list(values.values())
                mean = sum(numbers) / len(numbers)
                spread = (max(numbers) - min(numbers)) / 2 if len(numbers) > 1 else None
                cis = intervals.get((arm, lam))
                hull = _interval([min(c[0] for c in cis), max(c[1] for c in cis)]).strip() if cis else "-"
                lines.append(f"| {arm} | {'-' if lam is None else f'{lam:g}'} | " + " | ".join(cells)
                             + f" | {mean:.3f} | {_fmt(spread)} | {hull} |")
            if lexical is not None:
                lines.append("| words only | - | " + " | ".join(["-"] * len(seeds)) + f" | {lexical:.3f} | - | - |")
            parts.append("\n".join(lines))
    return "\n\n".join(parts)
