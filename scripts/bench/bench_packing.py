"""Packed vs padded training: real (non-pad) tokens/s and wall time per epoch, interleaved step by step.

    python scripts/bench/bench_packing.py --json docs/bench/packing_demo_cpu.json    # demo recipe, bundled data
    python scripts/bench/bench_packing.py --recipe recipes/tiny-cpu.yaml --set model.name_or_path=DIR \\
        --limit 24 --packed-batch 2 --json out.json

One model (the recipe's: 4-bit base + LoRA + tag rows) and one epoch of the recipe's training file per mode:
`padded` (one triple per row, the recipe's micro-batch) and `packed bN` (data.packing rows, micro-batch N). Each
optimizer step is what TearTrainer does in a step (collate, window span counts, compute_loss, backward, AdamW
step), timed on its own. The modes take turns step by step, always the one furthest behind in its epoch next, so
load from other processes on a shared machine falls on every mode alike; a mode's epoch time is the sum of its
step times. On a shared machine a step's wall time also carries other processes' bursts, so the process's CPU
time per step is recorded too (less sensitive to them), and per-step medians next to the sums. Real tokens are
the triples' tokens (the same for every mode); "positions" are what the model processed, padding included.
Every mode trains the same weights in turn: the point is time, not the loss.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the recipe's model is local: never wait on the hub


def cpu_fit(summary: list[dict]) -> dict:
    """Least squares over every step of every mode: CPU s = fixed + per_position * B*T + per_t2 * B*T^2 / 1000.

    Why: it splits a mode's time into per-step overhead, work per processed position (linear layers, norms) and
    attention, which with a dense [T, T] mask costs T^2 per row whether or not the triples see each other."""
    import numpy as np

    rows = [(b, t, cpu) for m in summary for (b, t), cpu in zip(m["step_shapes"], m["step_cpu_s"])]
    x = np.array([[1.0, b * t, b * t * t / 1000] for b, t, _ in rows])
    coef = np.linalg.lstsq(x, np.array([cpu for *_, cpu in rows]), rcond=None)[0]
    parts = {}
    for m in summary:
        shapes = np.array(m["step_shapes"], dtype=float)
        parts[m["mode"]] = {"fixed_s": round(float(coef[0]) * len(shapes), 1),
                            "positions_s": round(float(coef[1] * (shapes[:, 0] * shapes[:, 1]).sum()), 1),
                            "attention_s": round(float(coef[2] * (shapes[:, 0] * shapes[:, 1] ** 2).sum()) / 1000, 1)}
    return {"fixed_s_per_step": round(float(coef[0]), 4), "s_per_position": round(float(coef[1]), 6),
            "s_per_b_t2_over_1000": round(float(coef[2]), 6), "parts": parts}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/demo-cpu.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--packed-batch", default="3", help="micro-batch sizes (packed rows) to measure, e.g. 3,8")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N triples (0: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default). On a shared "
                        "machine 1 avoids OpenMP threads spinning on each other, so CPU time measures the work")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch
    from transformers.trainer_utils import set_seed

    from tear_lora.data.packing import pack_triples
    from tear_lora.data.prepare import prepare
    from tear_lora.data.tokens import structural_token_ids
    from tear_lora.recipe import load_recipe
    from tear_lora.rundir import atomic_write_json
    from tear_lora.train.batch import SpanCollator
    from tear_lora.train.model import add_adapters, load_base, load_tokenizer_for
    from tear_lora.train.runner import sft_config
    from tear_lora.train.trainer import TearTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load_recipe(REPO / args.recipe, args.overrides)
    tokenizer = load_tokenizer_for(recipe)
    triples = prepare(recipe.data.train_file, tokenizer, recipe, save=False).dataset
    if args.limit:
        triples = triples.select(range(min(args.limit, len(triples))))
    packed = pack_triples(triples, recipe.data.max_seq_len)
    seed = recipe.training.get("seed", 42)
    set_seed(seed)
    model = add_adapters(load_base(recipe, tokenizer), recipe, list(structural_token_ids(tokenizer).values()),
                         gradient_checkpointing=recipe.training.get("activation_checkpointing", True))
    collate = SpanCollator(tokenizer.pad_token_id, response_weight=recipe.objective.response_weight)
    overrides = {"max_steps": 1, "save_strategy": "no", "eval_strategy": "no", "report_to": "none"}
    with tempfile.TemporaryDirectory() as out:
        trainer = TearTrainer(model=model, args=sft_config(recipe, out, overrides), train_dataset=triples,
                              processing_class=tokenizer, data_collator=collate, lambda_=recipe.objective.lambda_,
                              loss_chunk_size=recipe.objective.loss_chunk_size)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.training.get("learning_rate", 1e-4))

    modes = {"padded": (triples, recipe.training.get("per_device_train_batch_size", 8))}
    modes |= {f"packed b{b}": (packed, b) for b in map(int, args.packed_batch.split(","))}
    plans = {}  # mode -> its epoch's batches, shuffled as the trainer's sampler would
    for name, (dataset, batch) in modes.items():
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
        plans[name] = [order[i : i + batch] for i in range(0, len(order), batch)]
    done = {name: 0 for name in modes}
    stats = {name: {"seconds": 0.0, "cpu_seconds": 0.0, "real": 0, "positions": 0, "step_s": [], "step_cpu_s": [],
                    "step_shapes": []} for name in modes}
    while any(done[name] < len(plans[name]) for name in modes):
        name = min((n for n in modes if done[n] < len(plans[n])), key=lambda n: done[n] / len(plans[n]))
        dataset = modes[name][0]
        start, start_cpu = time.perf_counter(), time.process_time()
        features = [dataset[i] for i in plans[name][done[name]]]
        batch = collate(features)
        counts = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
        loss = trainer.compute_loss(model, batch, num_items_in_batch=counts)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        s = stats[name]
        s["seconds"] += seconds
        s["cpu_seconds"] += cpu_seconds
        s["step_s"].append(round(seconds, 3))
        s["step_cpu_s"].append(round(cpu_seconds, 3))
        s["step_shapes"].append(list(batch["input_ids"].shape))
        s["real"] += sum(len(f["input_ids"]) for f in features)
        s["positions"] += batch["input_ids"].numel()
        done[name] += 1
        if done[name] % 10 == 0 or done[name] == len(plans[name]):
            print(f"{name:>10}: step {done[name]}/{len(plans[name])}, {s['seconds']:.1f} s so far", flush=True)

    summary = []
    for name, s in stats.items():
        summary.append({"mode": name, "micro_batch": modes[name][1], "rows": len(modes[name][0]),
                        "steps_per_epoch": len(plans[name]), "real_tokens": s["real"], "positions": s["positions"],
                        "real_fraction": round(s["real"] / s["positions"], 4), "epoch_s": round(s["seconds"], 1),
                        "real_tokens_per_s": round(s["real"] / s["seconds"], 1),
                        "epoch_cpu_s": round(s["cpu_seconds"], 1),
                        "real_tokens_per_cpu_s": round(s["real"] / s["cpu_seconds"], 1),
                        "step_s_median": statistics.median(s["step_s"]),
                        "step_s": s["step_s"], "step_cpu_s": s["step_cpu_s"], "step_shapes": s["step_shapes"]})
    base, base_cpu = summary[0]["epoch_s"], summary[0]["epoch_cpu_s"]
    print("\nmode        micro  rows  steps  real/positions   epoch s  real tok/s  speed-up  epoch CPU s  speed-up (CPU)")
    for s in summary:
        print(f"{s['mode']:<10} {s['micro_batch']:>6} {s['rows']:>5} {s['steps_per_epoch']:>6} "
              f"{s['real_fraction']:>14.0%}  {s['epoch_s']:8.1f}  {s['real_tokens_per_s']:10.1f}  "
              f"{base / s['epoch_s']:7.2f}x  {s['epoch_cpu_s']:11.1f}  {base_cpu / s['epoch_cpu_s']:13.2f}x")
    fit = cpu_fit(summary)
    print(f"CPU s per step = {fit['fixed_s_per_step']} + {fit['s_per_position'] * 1000:.2f} ms x B*T + "
          f"{fit['s_per_b_t2_over_1000'] * 1000:.2f} ms x B*T^2/1000; per epoch: {fit['parts']}")
    if args.json:
        atomic_write_json(Path(args.json), {
            "recipe": args.recipe, "overrides": args.overrides, "triples": len(triples), "packed_rows": len(packed),
            "max_seq_len": recipe.data.max_seq_len, "torch_threads": torch.get_num_threads(),
            "load_average_at_end": os.getloadavg(), "cpu_fit": fit, "modes": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
