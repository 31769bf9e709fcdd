"""One markdown page from the JSON files gpu_suite.sh wrote: every benchmark's headline numbers side by side.

    python scripts/bench/gpu_suite_table.py --dir docs/bench --device cuda    # -> docs/bench/gpu_suite_cuda.md

Reads `<name>_<device>.json` for each stage (loss, train, recipe, long context, distributed) and `suite_<device>.json`
(the suite's own record: machine, commit, each stage's status and seconds). A stage whose file is missing shows as
not run; a row that failed or was skipped shows why. Memory: on CUDA max_memory_allocated (what `tear-lora plan`
estimates); in a CPU smoke run the traced or resident figures the scripts record there instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GIB, MIB = 2**30, 2**20
FILES = {"loss": "loss", "layer": "layer", "train": "train_qwen3-1.7b_seq2048",
         "switches": "switches_qwen3-1.7b_seq2048", "recipe": "recipe_qwen3-1.7b-base", "long": "long_context",
         "multi": "distributed"}


def load(directory: Path, name: str, device: str):
    path = directory / f"{name}_{device}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def peak(row: dict) -> int | None:
    """The measured peak: CUDA allocated, else traced torch allocations, else resident set above start."""
    for key in ("peak_allocated_bytes", "traced_peak_allocated_bytes", "rss_peak_above_start_bytes",
                "rss_peak_train_bytes"):
        if row.get(key) is not None:
            return row[key]
    return None


def gib(b) -> str:
    return f"{b / GIB:.2f}" if b is not None else "–"


def ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "–"


def problem(row: dict) -> str | None:
    why = row.get("error") or row.get("skipped")
    return " ".join(str(why).split())[:160] if why else None


def loss_section(rows: list[dict]) -> list[str]:
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    out = ["## Loss layer (`bench_loss.py`): peak MiB above setup / seconds", "",
           "| tokens | " + " | ".join(impls) + " |", "|---" * (len(impls) + 1) + "|"]
    for n in dict.fromkeys(r["tokens"] for r in rows):
        cells = []
        for impl in impls:
            r = next((r for r in rows if r["tokens"] == n and r["impl"] == impl), None)
            if r is None:
                cells.append("–")
            elif r.get("peak_bytes") is None:
                cells.append(f"skipped: {problem(r) or '?'}")
            else:
                cells.append(f"{r['peak_bytes'] / MIB:,.0f} / {r['time_s']:.3f}")
        out.append(f"| {n:,} | " + " | ".join(cells) + " |")
    return out


def layer_section(row: dict) -> list[str]:
    return ["## One decoder layer, kept for backward (`bench_layer.py`)", "",
            "| tokens | measured B/token | plan B/token | plan / measured | by dtype |", "|---|---|---|---|---|",
            f"| {row['tokens']:,} | {row['measured_saved_bytes_per_token']:,} | {row['plan_saved_bytes_per_token']:,} | "
            f"{row['plan_over_measured']:.2f} | {row['measured_by_dtype_bytes_per_token']} |"]


def train_section(rows: list[dict]) -> list[str]:
    out = ["## Training vs stock SFTTrainer + PEFT QLoRA (`bench_train.py`)", "",
           "| seq × micro-batch | ours GiB | stock GiB | ours / stock | ours tok/s | stock tok/s | speed ours / stock "
           "| MFU ours / stock | plan GiB | plan / ours |", "|---|---|---|---|---|---|---|---|---|---|"]
    for mb in dict.fromkeys(r["micro_batch"] for r in rows):
        ours = next((r for r in rows if r["micro_batch"] == mb and r["trainer"] == "tear"), {})
        stock = next((r for r in rows if r["micro_batch"] == mb and r["trainer"] == "stock"), {})
        seq = ours.get("seq") or stock.get("seq")
        failed = [f"{name}: {problem(r)}" for name, r in (("ours", ours), ("stock", stock)) if problem(r)]
        if failed:
            out.append(f"| {seq} × {mb} | " + "; ".join(failed) + " |" + " |" * 8)
            continue
        mfu = f"{ours.get('mfu')} / {stock.get('mfu')}" if "mfu" in ours else "–"
        out.append(f"| {seq} × {mb} | {gib(peak(ours))} | {gib(peak(stock))} | {ratio(peak(ours), peak(stock))} | "
                   f"{ours.get('tokens_per_s')} | {stock.get('tokens_per_s')} | "
                   f"{ratio(ours.get('tokens_per_s'), stock.get('tokens_per_s'))} | {mfu} | "
                   f"{gib(ours.get('plan_peak_allocated_bytes'))} | "
                   f"{ratio(ours.get('plan_peak_allocated_bytes'), peak(ours))} |")
    return out


def arms_table(rows: list[dict]) -> list[str]:
    """Every arm of one run, with its step-time spread; ratios to `stock-best` at the same micro-batch."""
    out = ["### Every arm (median of the timed steps; spread = (max - min) / median)", "",
           "| trainer | micro-batch | seq | peak allocated GiB | peak reserved GiB | tok/s | s/step min–max | spread "
           "| MFU | plan / measured | memory / stock-best | speed / stock-best |", "|---" * 12 + "|"]
    best = {r["micro_batch"]: r for r in rows if r.get("trainer") == "stock-best" and not problem(r)}
    for r in rows:
        if problem(r):
            out.append(f"| {r.get('trainer')} | {r.get('micro_batch')} | {r.get('seq')} | {problem(r)} |" + " |" * 8)
            continue
        b = best.get(r["micro_batch"], {})
        out.append(f"| {r['trainer']} | {r['micro_batch']} | {r['seq']} | {gib(peak(r))} | "
                   f"{gib(r.get('peak_reserved_bytes'))} | {r.get('tokens_per_s')} | "
                   f"{r.get('step_s_min', '–')}–{r.get('step_s_max', '–')} | {r.get('spread', '–')} | {r.get('mfu', '–')} | "
                   f"{ratio(r.get('plan_peak_allocated_bytes'), peak(r))} | {ratio(peak(r), peak(b))} | "
                   f"{ratio(r.get('tokens_per_s'), b.get('tokens_per_s'))} |")
    return out


def table(title: str, columns: list[str], rows: list[dict], label: str, cells) -> list[str]:
    """A section: one markdown line per row, `cells(row)` its columns; a failed or skipped row shows why instead."""
    out = [title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        why = problem(r)
        line = [str(r[label]), why, *[""] * (len(columns) - 2)] if why else cells(r)
        out.append("| " + " | ".join(line) + " |")
    return out


def recipe_section(rows: list[dict]) -> list[str]:
    return table("## The 16 GB recipe, as `tear-lora train` runs it (`bench_recipe.py`)",
                 ["mode", "steps", "micro-batch × seq", "peak allocated GiB", "peak reserved GiB", "plan GiB",
                  "plan / measured", "plan card GiB (fits?)", "s/step", "real tok/s"], rows, "mode",
                 lambda r: [r["mode"], str(r["steps"]), f"{r['micro_batch']} × {r['max_seq_len']}", gib(peak(r)),
                            gib(r.get("peak_reserved_bytes")), gib(r["plan_peak_allocated_bytes"]),
                            ratio(r["plan_peak_allocated_bytes"], peak(r)),
                            f"{gib(r['plan_card_bytes'])} ({'yes' if r['plan_fits'] else 'no'})",
                            str(r["time_per_step_s"]), str(r["real_tokens_per_s"])])


def long_section(data: dict) -> list[str]:
    extrapolated = any(r.get("measured_full_is_extrapolated") for r in data["points"])
    full = f"all {data['full_layers']} layers" + (" (extrapolated per layer)" if extrapolated else "")
    return table("## Long context, micro-batch 1 (`bench_long_context.py`)",
                 ["seq", "layers run", "measured GiB", "plan GiB", "plan / measured", f"{full}: measured GiB",
                  "plan GiB", "plan card GiB", "s/step"], data["points"], "seq",
                 lambda r: [f"{r['seq']:,}", str(r["layers"]), gib(peak(r)), gib(r["plan_peak_allocated_bytes"]),
                            f"{r['plan_over_measured']:.2f}", gib(r["measured_full_bytes"]),
                            gib(r["plan_full_peak_allocated_bytes"]), gib(r["plan_full_card_bytes"]),
                            str(r["time_per_step_s"])])


def multi_section(rows: list[dict]) -> list[str]:
    out = ["## Several GPUs, per rank (`bench_distributed.py`)", "",
           "| mode | rank | measured GiB | plan GiB | plan / measured |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['mode']} | {r['rank']}/{r['world_size']} | {gib(peak(r))} | "
                   f"{gib(r['plan_peak_allocated_bytes'])} | {ratio(r['plan_peak_allocated_bytes'], peak(r))} |")
    return out


SECTIONS = {"loss": loss_section, "layer": layer_section, "train": lambda rows: train_section(rows) + [""] + arms_table(rows),
            "switches": lambda rows: ["## Switches, one at a time (`bench_train.py`; compare with `tear` above)", ""]
            + arms_table(rows)[2:], "recipe": recipe_section, "long": long_section, "multi": multi_section}


def render(directory: Path, device: str) -> str:
    suite = load(directory, "suite", device) or {}
    lines = [f"# GPU suite results ({device})", ""]
    if suite:
        lines += [f"- machine: {suite.get('machine', '?')}; commit {suite.get('commit', '?')}; "
                  f"{suite.get('started', '?')}; {'smoke run (tiny shapes)' if suite.get('smoke') else 'full run'}",
                  "- stages: " + ", ".join(f"{s['stage']} {s['status']} ({s['seconds']} s)"
                                            for s in suite.get("stages", [])), ""]
    for stage, name in FILES.items():
        data = load(directory, name, device)
        if data is None:
            lines += [f"## {stage}: not run", ""]
            continue
        lines += SECTIONS[stage](data) + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="docs/bench")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", help="default: <dir>/gpu_suite_<device>.md")
    args = parser.parse_args(argv)
    out = Path(args.out or Path(args.dir) / f"gpu_suite_{args.device}.md")
    out.write_text(render(Path(args.dir), args.device))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
