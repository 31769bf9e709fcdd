"""`tear-lora analyze --report DIR`: the JSON, the text table, the study tables (two-level bootstrap intervals,
contrasts, the round-3 rule's verdict) and the plots, in one directory built whole and swapped in.

The directory follows the one replace rule (rundir.check_replaceable): created when absent or empty, replaced only
when it is an earlier report of ours and only with --overwrite; every file is written by rundir's primitives.
"""

from __future__ import annotations

from pathlib import Path

from tear_lora.rundir import (
    atomic_save_figure,
    atomic_write_json,
    atomic_write_text,
    check_replaceable,
    replacing,
    write_complete_marker,
)

from .analyze_report import format_analysis, plot_analysis
from .contrasts import decide, groups_of, two_level

REPORT_KIND = "analyze report"
REPORT_JSON = "analyze.json"


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _ci(low_high) -> str:
    return "-" if not low_high else f"[{low_high[0]:.3f}, {low_high[1]:.3f}]"


def _label(key: tuple) -> str:
    arm, lam = key
    return arm if lam is None else f"{arm} λ{lam:g}"


def study_tables(report: dict, draws: int = 2000, seed: int = 0) -> str:
    """Markdown per data file: each arm's seed-averaged probe AUROC and matching Δ with two-level bootstrap
    intervals (items, then seeds), the probe's null and p per seed, the words controls, and the round-3 contrasts
    and verdict (docs/experiments/round3_rule.md)."""
    parts = []
    for data_file in report["settings"]["data"]:
        probe, matching = two_level(report, data_file, "probe", draws, seed), \
            two_level(report, data_file, "matching", draws, seed)
        probe_runs = groups_of(report, data_file, "probe")
        if not probe and not matching:
            continue
        lines = [f"### `{data_file}`", "", "| arm | seeds | probe AUROC (seed mean) | 95% CI, items then seeds | "
                 "above null (mean) | p per seed | matching Δ nats/token | 95% CI |", "|---|---|---|---|---|---|---|---|"]
        for key in sorted(set(probe) | set(matching), key=lambda k: (k[0] == "base", k[0], k[1] or 0)):
            p, m, runs = probe.get(key, {}), matching.get(key, {}), probe_runs.get(key, [])
            above = sum(r["above_null"] for r in runs) / len(runs) if runs else None
            p_values = " ".join(f"{r['p']:.3f}" for r in runs) or "-"
            lines.append(f"| {_label(key)} | {p.get('seeds', m.get('seeds', '-'))} | {_fmt(p.get('mean'))} | "
                         f"{_ci(p.get('ci'))} | {_fmt(above, '+.3f')} | "
                         f"{p_values} | {_fmt(m.get('mean'), '+.4f')} | "
                         f"{_ci(m.get('ci'))} |")
        first = next((r for rs in probe_runs.values() for r in rs), None)
        if first and first.get("words"):
            lines += ["", "Words-only controls, AUROC on the same scored rows and folds (C tuned inside the folds): "
                      + "; ".join(f"{name} {v:.3f}" for name, v in first["words"].items())
                      + f". Scored rows: {first['n']}, smallest detectable AUROC {_fmt(first['mde_auroc'])}."]
        decision = decide(report, data_file, draws, seed)
        if decision["primary"]:
            lines += ["", "| contrast (probe AUROC) | estimate | Holm level CI | p | p (Holm) | detectable |",
                      "|---|---|---|---|---|---|"]
            for c in decision["primary"] + decision["secondary_matching_delta"]:
                name = c["contrast"] + (" (matching Δ, secondary)" if c in decision["secondary_matching_delta"]
                                        else "")
                lines.append(f"| {name} | {c['estimate']:+.3f} | {c['level']:.3f}: {_ci(c['ci'])} | {c['p']:.3f} | "
                             f"{c['p_holm']:.3f} | ±{c['mde']:.3f} |")
        lines += ["", f"Round-3 rule on this file: **{decision['verdict']}**."]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot_study(report: dict, out: str | Path, draws: int = 2000, seed: int = 0) -> Path:
    """Per data file: each arm's seed-averaged probe AUROC and matching Δ with their two-level intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = report["settings"]["data"]
    fig, axes = plt.subplots(len(files), 2, figsize=(12, 3.6 * len(files)), squeeze=False)
    for r, data_file in enumerate(files):
        for c, (instrument, title, null) in enumerate((("probe", "probe AUROC", 0.5),
                                                       ("matching", "matching Δ (nats/token)", 0.0))):
            ax, groups = axes[r][c], two_level(report, data_file, instrument, draws, seed)
            keys = sorted(groups, key=lambda k: (k[0] == "base", k[0], k[1] or 0))
            for x, key in enumerate(keys):
                g = groups[key]
                ax.errorbar([x], [g["mean"]], yerr=[[g["mean"] - g["ci"][0]], [g["ci"][1] - g["mean"]]], fmt="o",
                            capsize=4)
            ax.axhline(null, color="black", linestyle=":", linewidth=0.8, label="null")
            if instrument == "probe":
                first = next((x for rs in groups_of(report, data_file, "probe").values() for x in rs), {})
                if first.get("words"):
                    ax.axhline(first["words_best_auroc"], color="tab:green", linestyle="-.", label="best words")
            ax.set_xticks(range(len(keys)), [_label(k) for k in keys], fontsize=8)
            ax.set_title(f"{title}, seed mean, 95% two-level CI\n{Path(data_file).name}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = atomic_save_figure(fig, out, dpi=110)
    plt.close(fig)
    return out


def check_report_dir(path: str | Path, overwrite: bool) -> None:
    check_replaceable(path, REPORT_KIND, REPORT_JSON, overwrite, "pass --overwrite")


def write_report(report: dict, path: str | Path, overwrite: bool) -> Path:
    """analyze.json, analyze.txt, tables.md, analyze.png and study.png in `path`, built whole and swapped in
    (rundir.replacing: checked again under the lock and at the swap)."""
    path = Path(path)
    with replacing(path, REPORT_KIND, REPORT_JSON, overwrite, "pass --overwrite", "report") as building:
        atomic_write_json(building / REPORT_JSON, {**report, "report": str(path)})
        atomic_write_text(building / "analyze.txt", format_analysis(report) + "\n")
        atomic_write_text(building / "tables.md", study_tables(report) + "\n")
        plot_analysis(report, building / "analyze.png")
        plot_study(report, building / "study.png")
        write_complete_marker(building, kind=REPORT_KIND)
    return path
