"""A recipe as `tear-lora train` runs it, for a few optimizer steps: peak memory, time per step, real tokens/s, plan.

    python scripts/bench/bench_recipe.py --steps 20 --modes padded,packed \\
        --json docs/bench/recipe_qwen3-1.7b-base_cuda.json       # the 16 GB recipe on a GPU
    python scripts/bench/bench_recipe.py --shape tiny --steps 2 --device cpu --set training.optim=adamw_torch

There is no model hub on a benchmark machine, so random weights in the recipe model's exact shape stand in for it
(bench_train.build_model_dir: Qwen3-1.7B-Base's config, saved as bf16 and loaded in 4-bit NF4 by the recipe's own
path). Everything else is `tear_lora.train.runner.run(recipe)` unchanged: the recipe's data (data/raw/consequences.jsonl,
tokenized and cached, packed with data.packing), micro-batch, gradient accumulation, optimizer, checkpointing. Only
what a benchmark must not do is overridden: max_steps, no eval or checkpoint saves, outputs in a temp dir.

Modes: `padded` (`data.packing=false`) and `packed` (`data.packing=true`), the recipe otherwise as written. Each
mode runs in a fresh process, one after the other.

Measured per mode: CUDA max_memory_allocated / max_memory_reserved from the start of `train()` (the counters are
reset by a callback), CPU the peak resident set over the same span (VmHWM after /proc/self/clear_refs: it includes
allocator caching, so it is only a rough figure); each optimizer step's time; the real tokens (not padding) the
collator produced, so packed and padded compare in the same unit. Timing and token rate leave out the first step
(warm-up). The plan for the same recipe sits beside the measured peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import REPO, StepTimer, build_model_dir, rss  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is local: never wait on the hub


def instrumented_trainer(timer: StepTimer, batches: list, cuda: bool):
    """TearTrainer with the step timer, the peak counters reset at train begin, and a collator that counts real
    tokens per batch: put in place of tear_lora.train.runner.TearTrainer so `run` builds it as it would its own."""
    import torch
    from transformers import TrainerCallback

    from tear_lora.data.template import PAD_ROLE
    from tear_lora.train.trainer import TearTrainer

    class ResetPeak(TrainerCallback):
        def on_train_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                Path("/proc/self/clear_refs").write_text("5")

    class Instrumented(TearTrainer):
        def __init__(self, *args, callbacks=None, data_collator=None, **kwargs):
            def counting(features):
                batch = data_collator(features)
                batches.append(((batch["span_roles"] != PAD_ROLE).sum().item(), batch["input_ids"].numel()))
                return batch

            super().__init__(*args, callbacks=[*(callbacks or []), timer.callback, ResetPeak()],
                             data_collator=counting, **kwargs)

    return Instrumented


def run_mode(mode: str, model_dir: Path, args, work: Path) -> dict:
    import torch

    import tear_lora.train.runner as train_mod
    from tear_lora.recipe import load_recipe
    from tear_lora.train.plan import plan

    cuda = args.device == "cuda"
    overrides = [f"model.name_or_path={model_dir}", "model.revision=",
                 f"data.train_file={REPO / 'data/raw/consequences.jsonl'}", "data.eval_file=",
                 f"data.processed_dir={work / 'processed'}", f"output.dir={work / 'adapters'}",
                 f"output.run_name=bench-{mode}", f"training.max_steps={args.steps}", "training.save_strategy='no'",
                 "training.eval_strategy='no'", "training.report_to=none", "training.logging_steps=1000",
                 "training.dataloader_num_workers=0"]
    # CPU: bitsandbytes' paged 8-bit optimizer needs CUDA (bench_train does the same)
    overrides += ([] if cuda else ["training.use_cpu=true", "training.optim=adamw_torch"]) + args.overrides
    overrides += [f"data.packing={'true' if mode == 'packed' else 'false'}"]
    recipe = load_recipe(REPO / args.recipe, overrides)
    timer, batches = StepTimer(cuda), []
    original = train_mod.TearTrainer
    train_mod.TearTrainer = instrumented_trainer(timer, batches, cuda)
    try:
        base_rss = rss("VmRSS")
        train_mod.run(recipe, force=True)  # the plan's refusal is what we measure against, not a reason to stop
    finally:
        train_mod.TearTrainer = original
    ga = int(recipe.training.get("gradient_accumulation_steps", 1))
    timed_steps = timer.times[1:] or timer.times
    timed_batches = batches[ga:] if len(timer.times) > 1 else batches
    real = sum(b[0] for b in timed_batches)
    p = plan(recipe)
    row = {"mode": mode, "recipe": args.recipe, "device": args.device, "steps": len(timer.times),
           "micro_batch": int(recipe.training.get("per_device_train_batch_size", 8)), "gradient_accumulation": ga,
           "max_seq_len": recipe.data.max_seq_len, "step_times_s": [round(t, 4) for t in timer.times],
           "time_per_step_s": round(statistics.median(timed_steps), 4),
           "real_tokens": sum(b[0] for b in batches), "positions": sum(b[1] for b in batches),
           "real_tokens_per_s": round(real / sum(timed_steps), 1),
           "plan_peak_allocated_bytes": p.peak_allocated, "plan_card_bytes": p.card_bytes, "plan_phase": p.phase,
           "plan_fits": p.fits, "gpu_memory_gb": recipe.hardware.gpu_memory_gb}
    if cuda:
        row |= {"gpu": torch.cuda.get_device_name(), "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved()}
        row["plan_over_measured"] = round(p.peak_allocated / row["peak_allocated_bytes"], 4)
        torch.cuda.empty_cache()
    else:
        row |= {"rss_peak_train_bytes": rss("VmHWM"), "rss_before_run_bytes": base_rss}
    return row


def run_mode_in_subprocess(mode: str, argv: list[str]) -> dict:
    """One mode in a fresh process, as bench_train runs each case: the first mode's model, optimizer and allocator
    cache would otherwise still be alive under the second one's peak (measured on an H200: 0.58 GiB more)."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--modes", mode, "--worker"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr goes straight through
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RECIPE ")]
    print("\n".join(ln for ln in proc.stdout.splitlines() if not ln.startswith("BENCH_RECIPE ")), flush=True)
    if found:
        return json.loads(found[-1][len("BENCH_RECIPE "):])
    return {"mode": mode, "error": f"worker exited {proc.returncode} without a result (see its log above)"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="recipes/qwen3-1.7b-base.yaml")
    parser.add_argument("--shape", choices=("tiny", "qwen3-1.7b"), default="qwen3-1.7b",
                        help="random weights in this shape stand in for the recipe's model")
    parser.add_argument("--layers", type=int, help="trim the shape (quick CPU runs)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--modes", default="padded,packed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--model-root", default=os.path.join(tempfile.gettempdir(), "tear_lora_bench_models"))
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = build_model_dir(args.shape, args.layers, Path(args.model_root))
    if args.worker:
        (mode,) = args.modes.split(",")
        with tempfile.TemporaryDirectory(prefix="bench_recipe_") as work:
            try:
                row = run_mode(mode, model_dir, args, Path(work) / mode)
            except Exception as e:  # reported as this mode's row: the other mode still runs
                import traceback

                traceback.print_exc()
                row = {"mode": mode, "error": f"{type(e).__name__}: {str(e)[-400:]}"}
        print("BENCH_RECIPE " + json.dumps(row), flush=True)
        return 0
    parent_args = _without_options(argv, ("--modes", "--json", "--device"))
    rows = []
    for mode in args.modes.split(","):
        row = run_mode_in_subprocess(mode, [*parent_args, "--device", args.device])
        rows.append(row)
        print("BENCH_RECIPE " + json.dumps({k: v for k, v in row.items() if k != "step_times_s"}), flush=True)
        if args.json:  # after every mode: a suite that stops this early keeps what it measured
            Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if any("error" in r for r in rows) else 0


def _without_options(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """`argv` without `OPTION VALUE` / `OPTION=VALUE` for each option (the parent passes the rest on to each
    mode's worker)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in options:
            skip = True
        elif not a.startswith(tuple(o + "=" for o in options)):
            out.append(a)
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
