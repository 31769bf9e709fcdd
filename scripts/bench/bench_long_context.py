"""Long context: TearTrainer's peak memory at micro-batch 1 and 4k-32k tokens against `tear-lora plan`.

    python scripts/bench/bench_long_context.py --device cpu --cuda-like --layers 2 --seq 4096,8192,16384,32768 \\
        --slope-layers 1 --json docs/bench/long_context_cpu.json        # CPU: traced torch allocations
    python scripts/bench/bench_long_context.py --device cuda --seq 8192,16384,32768 \\
        --json docs/bench/long_context_cuda.json                        # GPU: all 28 layers, max_memory_allocated

Each (layers, seq) point is one bench_train worker (a fresh process): `tear` only, micro-batch 1, one row of
exactly seq tokens (half input, a quarter response, a quarter witness), the 16 GB recipe's settings (4-bit NF4,
LoRA r16 on all linears with dropout 0.05, the six token rows, activation checkpointing, sdpa, loss chunk 256),
random weights in Qwen3-1.7B's exact shape, trimmed to --layers on CPU, where one 32k step of all 28 layers would
take hours on a few cores. Measured peak: on CPU the profiler's traced torch allocations (bench_train.traced_train,
the analogue of max_memory_allocated), on CUDA max_memory_allocated. Plan: `plan(recipe, config=...)` for the same
recipe at the same layer count, and for all layers. The plan models CUDA; `--cuda-like` makes a CPU step keep
for backward what a CUDA step keeps (bench_train.emulate_cuda_saved_tensors: PEFT would otherwise copy every LoRA
input to fp32 on CPU, and CPU dropout keeps a noise tensor instead of a bool mask), which is what makes the CPU
points a check of the plan; without it they are CPU's own figures.

Extrapolating to all layers: each decoder layer adds the same bytes wherever it sits (its checkpointed input,
seq x hidden x 2 B; its 4-bit weights and quantization state; its LoRA weights, gradients and optimizer state),
and only one layer is recomputed at a time. So measured(all) = measured(L) + (all - L) x the plan's per-layer
increment at that seq. `--slope-layers N` also runs N layers at the first seq, which measures that increment
instead of assuming it (the JSON has both).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import REPO, bench_recipe, build_model_dir, run_one, shape_config  # noqa: E402

GIB = 2**30


def measured_bytes(row: dict) -> int | None:
    return row.get("traced_peak_allocated_bytes") or row.get("peak_allocated_bytes")


def full_plan(shape: str, seq: int, args) -> dict:
    """The plan for all the shape's layers at this seq, micro-batch 1 (the bench's recipe overrides)."""
    from tear_lora.train.plan import plan

    args = argparse.Namespace(**{**vars(args), "seq": seq})
    recipe = bench_recipe(Path("unused"), args, 1, args.device == "cuda")
    p = plan(recipe, config=shape_config(shape, None).to_dict(), source=shape)
    return {"plan_full_peak_allocated_bytes": p.peak_allocated, "plan_full_card_bytes": p.card_bytes,
            "plan_full_phase": p.phase, "plan_full_fits_16gib": p.card_bytes <= 16 * GIB,
            "plan_full_components": p.components}


def run_point(shape: str, layers: int | None, seq: int, args) -> dict:
    model_dir = build_model_dir(shape, layers, Path(args.model_root))
    point = argparse.Namespace(**{**vars(args), "seq": seq, "layers": layers})
    row = run_one(model_dir, "tear", 1, point)
    print(describe(row), flush=True)
    return row


def describe(row: dict) -> str:
    if "error" in row:
        return f"seq {row['seq']}: FAILED {row['error'][-400:]}"
    m, p = measured_bytes(row), row["plan_peak_allocated_bytes"]
    return (f"L{row['layers']} seq {row['seq']:6d}: measured {m / GIB:6.2f} GiB, plan {p / GIB:6.2f} GiB "
            f"({row['plan_phase']}), plan/measured {p / m:.2f}, {row['time_per_step_s']:.0f} s/step")


def layer_plan(shape: str, layers: int, seq: int, args) -> dict:
    """The plan for `layers` layers at this seq, micro-batch 1: what the worker records beside its measurement."""
    from tear_lora.train.plan import plan

    args = argparse.Namespace(**{**vars(args), "seq": seq})
    p = plan(bench_recipe(Path("unused"), args, 1, args.device == "cuda"), config=shape_config(shape, layers).to_dict())
    return {"plan_peak_allocated_bytes": p.peak_allocated, "plan_card_bytes": p.card_bytes, "plan_phase": p.phase}


def replan(path: Path, args) -> dict:
    """An earlier run's JSON with every plan figure recomputed by the plan as it is now: the measurements stand,
    the estimate changed (`--replan`)."""
    data = json.loads(path.read_text())
    args.device, args.shape, args.steps = data["device"], data["shape"], args.steps or 1
    points = [*data["points"], *([data["per_layer"]["point"]] if data.get("per_layer") else [])]
    for row in points:
        if "error" not in row:
            row |= layer_plan(data["shape"], row["layers"], row["seq"], args) | full_plan(data["shape"], row["seq"], args)
    extrapolate(data["points"], data["full_layers"], data.get("per_layer"))
    data["marginal_bytes_per_token"] = marginal_bytes_per_token(data["points"])
    return data


def extrapolate(rows: list[dict], full_layers: int, slope: dict | None) -> None:
    """Add the all-layers figures to each row (in place): measured + (full - L) x per-layer bytes."""
    for row in rows:
        if "error" in row:
            continue
        layers, plan_full = row["layers"], row["plan_full_peak_allocated_bytes"]
        per_layer = (plan_full - row["plan_peak_allocated_bytes"]) / (full_layers - layers) if full_layers > layers else 0
        row["plan_per_layer_bytes"] = round(per_layer)
        row["measured_full_bytes"] = round(measured_bytes(row) + (full_layers - layers) * per_layer)
        row["measured_full_is_extrapolated"] = full_layers > layers
        row["plan_over_measured"] = round(row["plan_peak_allocated_bytes"] / measured_bytes(row), 4)
        row["plan_full_over_measured_full"] = round(plan_full / row["measured_full_bytes"], 4)
    if slope:
        seq_rows = [r for r in rows if "error" not in r and r["seq"] == slope["seq"]]
        if seq_rows:
            slope["plan_per_layer_bytes"] = seq_rows[0]["plan_per_layer_bytes"]


def marginal_bytes_per_token(rows: list[dict]) -> list[dict]:
    """Bytes each extra token costs between consecutive seqs: flat means memory grows linearly in seq."""
    ok = sorted((r for r in rows if "error" not in r), key=lambda r: r["seq"])
    return [{"from_seq": a["seq"], "to_seq": b["seq"],
             "measured": round((measured_bytes(b) - measured_bytes(a)) / (b["seq"] - a["seq"])),
             "plan": round((b["plan_peak_allocated_bytes"] - a["plan_peak_allocated_bytes"]) / (b["seq"] - a["seq"]))}
            for a, b in zip(ok, ok[1:])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=("tiny", "qwen3-1.7b"), default="qwen3-1.7b")
    parser.add_argument("--layers", type=int, help="decoder layers to run (default: all)")
    parser.add_argument("--seq", default="4096,8192,16384,32768", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--slope-layers", type=int, help="also run this many layers at the first seq: the measured "
                        "per-layer increment")
    parser.add_argument("--steps", type=int, help="optimizer steps per point (default: 1 on CPU, 2 on CUDA)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--optim", help="default: paged_adamw_8bit on CUDA, adamw_torch on CPU (bench_train)")
    parser.add_argument("--cuda-like", action="store_true", help="CPU: keep for backward what CUDA keeps (PEFT's "
                        "LoRA inputs in bf16, dropout's bool mask): bench_train.emulate_cuda_saved_tensors")
    parser.add_argument("--model-root", default=os.path.join(tempfile.gettempdir(), "tear_lora_bench_models"))
    parser.add_argument("--json", help="write the points here")
    parser.add_argument("--replan", metavar="JSON", help="recompute the plan figures of an earlier run's JSON (in "
                        "place, or into --json) without measuring again")
    args = parser.parse_args(argv)
    args.peak_tflops = None
    if args.replan:
        data = replan(Path(args.replan), args)
        Path(args.json or args.replan).write_text(json.dumps(data, indent=1))
        for row in data["points"]:
            print(describe(row), flush=True)
        return 0
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.steps = args.steps or (2 if args.device == "cuda" else 1)
    args.trace_memory = args.device == "cpu"
    full_layers = shape_config(args.shape, None).num_hidden_layers

    rows = []
    for seq in args.seq:
        row = run_point(args.shape, args.layers, seq, args)
        rows.append(row | full_plan(args.shape, seq, args) if "error" not in row else row)
        write(args, full_layers, rows, None)  # after every point: a suite that stops this early keeps what it measured
    slope = None
    if args.slope_layers and args.slope_layers != (args.layers or full_layers):
        other = run_point(args.shape, args.slope_layers, args.seq[0], args)
        base = next((r for r in rows if r["seq"] == args.seq[0] and "error" not in r), None)
        if base and "error" not in other:
            slope = {"seq": args.seq[0], "layers": [base["layers"], other["layers"]],
                     "measured_per_layer_bytes": round((measured_bytes(base) - measured_bytes(other))
                                                       / (base["layers"] - other["layers"])),
                     "point": other}
    extrapolate(rows, full_layers, slope)
    growth = marginal_bytes_per_token(rows)
    print(f"\nall {full_layers} layers ({'extrapolated per layer' if args.layers else 'measured'}), micro-batch 1:")
    for row in rows:
        if "error" not in row:
            print(f"  seq {row['seq']:6d}: measured {row['measured_full_bytes'] / GIB:6.2f} GiB, plan "
                  f"{row['plan_full_peak_allocated_bytes'] / GIB:6.2f} GiB (card {row['plan_full_card_bytes'] / GIB:.2f}"
                  f" GiB), plan/measured {row['plan_full_over_measured_full']:.2f}")
    for g in growth:
        print(f"  {g['from_seq']} -> {g['to_seq']}: {g['measured']} B/token measured, {g['plan']} B/token plan")
    if slope:
        print(f"  per layer at seq {slope['seq']}: measured {slope['measured_per_layer_bytes'] / 2**20:.1f} MiB, "
              f"plan {slope.get('plan_per_layer_bytes', 0) / 2**20:.1f} MiB")
    write(args, full_layers, rows, slope)
    return 1 if any("error" in r for r in rows) else 0


def write(args, full_layers: int, rows: list[dict], slope: dict | None) -> None:
    if not args.json:
        return
    extrapolate(rows, full_layers, slope)  # idempotent: the points written so far get their all-layer figures
    Path(args.json).write_text(json.dumps({
        "device": args.device, "shape": args.shape, "layers": args.layers,
        "cuda_like": args.cuda_like and args.device == "cpu", "full_layers": full_layers, "points": rows,
        "per_layer": slope, "marginal_bytes_per_token": marginal_bytes_per_token(rows)}, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
