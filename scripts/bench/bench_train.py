"""Training benchmark: TearTrainer vs stock TRL SFTTrainer + PEFT QLoRA, same model, same data, side by side.

    python scripts/bench/bench_train.py --shape qwen3-1.7b --seq 2048 --micro-batch 1,4,8 --steps 10 --json out.json
    python scripts/bench/bench_train.py --shape tiny --seq 512 --micro-batch 1,4 --steps 3 --device cpu

The model has random weights in exactly the shape's config (qwen3-1.7b: the shipped Qwen3-1.7B-Base
config.json; tiny: `tear_lora.tiny`), saved once as bf16 safetensors and loaded in 4-bit NF4 with double quant
through `from_pretrained` + `BitsAndBytesConfig`, as a real base would be. Both trainers: LoRA r=16 alpha 32
dropout 0.05 on all linear layers, activation checkpointing (non-reentrant), the recipe's optimizer
(paged_adamw_8bit on CUDA, adamw_torch on CPU), bf16. (a) `tear`: our recipe path (structural token rows
trainable, span loss). (b) `stock`: `SFTTrainer(model, peft_config=LoraConfig(...))` on the same token ids as
prompt/completion (completion_only_loss: the response and witness carry the loss, as in ours), nothing else.
(c) `stock-best`: the best plain TRL 1.16 offers without us: (b) plus `packing=True` (bfd, which turns on
padding-free), `activation_offloading` (CUDA) and Liger's RMSNorm/RoPE/SwiGLU kernels (CUDA, when installed).
Switch arms of ours, one recipe override each (TEAR_ARMS): `tear-offload` (training.activation_offloading),
`tear-liger`, `tear-fused-adamw`, `tear-dropout0`.

Each (trainer, micro-batch) runs in a fresh subprocess. Timing: optimizer steps after the first --warmup ones;
the row has the median and min/max (`spread` = (max - min) / median), so a ratio comes with its noise.
Memory, CUDA: max_memory_allocated / max_memory_reserved over training (weights included). CPU: the peak
resident set during training (VmHWM, reset through /proc/self/clear_refs before `train()`) and the resident set
before the model loaded; with --trace-memory also the profiler's traced torch allocations (traced_train), which is
what compares with the plan's estimate, and with --cuda-like a CPU step keeps for backward what a CUDA step would
(emulate_cuda_saved_tensors). Loss: `train_loss` is each trainer's own objective, ours response + lambda *
witness (two means, so about twice stock's single mean over the same tokens); `token_nll` compares
(`comparable_nll`). --replan JSON recomputes the plan figures of an earlier run after the plan changed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEAR_ARMS = {"tear": [], "tear-offload": ["training.activation_offloading=true"],
             "tear-liger": ["training.use_liger_kernel=true"], "tear-fused-adamw": ["training.optim=adamw_torch_fused"],
             "tear-dropout0": ["lora.dropout=0.0"]}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12}


def shape_config(shape: str, layers: int | None):
    from transformers import Qwen3Config

    if shape == "tiny":
        from tear_lora.tiny import tiny_qwen3_config

        config = tiny_qwen3_config()
    else:
        raw = json.loads((REPO / "tear_lora" / "configs" / "Qwen3-1.7B-Base.json").read_text())
        config = Qwen3Config(**{k: v for k, v in raw.items() if k not in ("architectures", "transformers_version")})
    if layers:
        config.num_hidden_layers = config.max_window_layers = layers
        config.layer_types = config.layer_types[:layers] if getattr(config, "layer_types", None) else None
    return config


def build_model_dir(shape: str, layers: int | None, root: Path) -> Path:
    """Random weights in the shape, bf16 safetensors + the real Qwen3 tokenizer; reused when already there."""
    out = root / f"{shape}-L{layers or 'all'}"
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    import torch
    from transformers import Qwen3ForCausalLM

    from tear_lora.tiny import qwen3_tokenizer

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # never materialise fp32 weights (1.7B x 4 B)
    model = Qwen3ForCausalLM(shape_config(shape, layers))
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(out)
    qwen3_tokenizer().save_pretrained(out)
    return out


def rows(n: int, seq: int, seed: int = 0) -> list[dict]:
    """Rows of exactly `seq` tokens in our template: half input, a quarter response, a quarter witness."""
    import random

    from tear_lora.data.template import CONTEXT, RESPONSE, WITNESS
    from tear_lora.tiny import QWEN3_FIRST_ADDED_ID

    tags = list(range(151_669, 151_675))  # where load_tokenizer puts the six structural tokens in Qwen3's vocab
    rng = random.Random(seed)
    text = lambda k: [rng.randrange(QWEN3_FIRST_ADDED_ID) for _ in range(k)]  # noqa: E731
    n_resp = n_wit = (seq - 6) // 4
    n_in = seq - 6 - n_resp - n_wit
    out = []
    for _ in range(n):
        ids = [tags[0], *text(n_in), tags[1], tags[2], *text(n_resp), tags[3], tags[4], *text(n_wit), tags[5]]
        roles = [CONTEXT] * (n_in + 3) + [RESPONSE] * (n_resp + 1) + [CONTEXT] + [WITNESS] * (n_wit + 1)
        out.append({"input_ids": ids, "span_roles": roles,
                    "completion_mask": [int(r != CONTEXT or i > n_in + 2) for i, r in enumerate(roles)]})
    return out


class StepTimer:
    """TrainerCallback timing each optimizer step (synchronised on CUDA)."""

    def __init__(self, cuda: bool):
        from transformers import TrainerCallback

        timer = self
        self.times, self.cuda = [], cuda

        class _Callback(TrainerCallback):
            def on_step_begin(self, *a, **k):
                timer._sync()
                timer.start = time.perf_counter()

            def on_step_end(self, *a, **k):
                timer._sync()
                timer.times.append(time.perf_counter() - timer.start)

        self.callback = _Callback()

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def traced_train(trainer, model):
    """`trainer.train()` under the torch profiler's memory timeline: the peak of live torch tensors (weights,
    their 4-bit quantization state, and everything the step allocates) -- on CPU the analogue of
    `torch.cuda.max_memory_allocated`, free of the allocator caching and library pages that RSS includes."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for param in list(tensors.values()):
        state = getattr(param, "quant_state", None)
        for t in (getattr(state, "absmax", None), getattr(getattr(state, "state2", None), "absmax", None)):
            if t is not None:
                tensors[id(t)] = t
    static = sum(t.untyped_storage().nbytes() for t in tensors.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        result = trainer.train()
    current = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        current += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, current)
    return result, static + peak


def emulate_cuda_saved_tensors() -> None:
    """Make a CPU step keep for backward what the same step keeps on CUDA, by undoing two CPU-only differences
    (`--cuda-like`; the long-context plan check uses it, docs/performance.md):

    1. PEFT copies each LoRA input to the adapter's fp32 unless `torch.is_autocast_enabled()` is true, and that
       call, made without a device, asks about CUDA only: under CPU autocast every LoRA input (and so its dropout
       copy) is kept in fp32. Here the device-less call also sees CPU autocast, as it sees CUDA's on a GPU.
    2. CPU dropout multiplies by a noise tensor in the input's dtype and keeps it for backward; CUDA's fused kernel
       keeps a bool mask. Here dropout goes through `torch.native_dropout`, which keeps the bool mask on CPU too.
    Both change only what is saved, not the values' distribution: the loss stays a random-weight loss."""
    import torch

    is_enabled = torch.is_autocast_enabled

    def autocast_enabled(device_type=None):
        return is_enabled(device_type) if device_type is not None else (is_enabled() or is_enabled("cpu"))

    def dropout(input, p=0.5, training=True, inplace=False):
        return torch.native_dropout(input, p, True)[0] if training and p > 0 else input

    torch.is_autocast_enabled = autocast_enabled
    torch.nn.functional.dropout = dropout


def bench_recipe(model_dir: Path, args, micro_batch: int, cuda: bool, arm: str = "tear"):
    from tear_lora.recipe import load_recipe

    return load_recipe(REPO / "recipes" / "qwen3-1.7b-base.yaml", [
        f"model.name_or_path={model_dir}", "model.revision=", f"data.max_seq_len={args.seq}",
        f"objective.loss_chunk_size={args.chunk}", f"training.per_device_train_batch_size={micro_batch}",
        "training.gradient_accumulation_steps=1", f"training.max_steps={args.steps}", "training.logging_steps=1000",
        "training.save_strategy='no'", "training.eval_strategy='no'", "training.report_to=none",
        f"training.optim={args.optim or ('paged_adamw_8bit' if cuda else 'adamw_torch')}", "training.warmup_steps=0",
        "training.dataloader_num_workers=0"] + ([] if cuda else ["training.use_cpu=true"]) + TEAR_ARMS.get(arm, []))


def worker(args) -> dict:
    """One (trainer, micro-batch) run in this process."""
    import bitsandbytes  # noqa: F401  (imported before the baseline: library memory is not training memory)
    import peft  # noqa: F401
    import torch
    import trl  # noqa: F401
    from datasets import Dataset

    import tear_lora.train.trainer  # noqa: F401

    cuda = args.device == "cuda"
    if args.cuda_like and not cuda:
        emulate_cuda_saved_tensors()
    model_dir, micro_batch = Path(args.model_dir), args.micro_batch[0]
    base_rss = rss("VmRSS")
    recipe = bench_recipe(model_dir, args, micro_batch, cuda, args.trainer)
    data = rows(micro_batch * args.steps, args.seq)
    timer = StepTimer(cuda)
    out_dir = tempfile.mkdtemp(prefix="bench_train_")
    if args.trainer == "tear":
        from tear_lora.data.tokens import structural_token_ids
        from tear_lora.train.batch import SpanCollator
        from tear_lora.train.model import add_adapters, load_base, load_tokenizer_for
        from tear_lora.train.runner import sft_config
        from tear_lora.train.trainer import TearTrainer

        tokenizer = load_tokenizer_for(recipe)
        assert list(structural_token_ids(tokenizer).values()) == list(range(151_669, 151_675))
        model = add_adapters(load_base(recipe, tokenizer), recipe, list(structural_token_ids(tokenizer).values()))
        dataset = Dataset.from_list([{k: r[k] for k in ("input_ids", "span_roles")} for r in data])
        trainer = TearTrainer(model=model, args=sft_config(recipe, output_dir=out_dir), train_dataset=dataset,
                              processing_class=tokenizer, data_collator=SpanCollator(tokenizer.pad_token_id),
                              lambda_=1.0, loss_chunk_size=recipe.objective.loss_chunk_size,
                              callbacks=[timer.callback])
    else:
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTConfig, SFTTrainer

        from tear_lora.train.model import DTYPES, guard_bnb_cpu, quantization_config

        best = args.trainer == "stock-best"
        from tear_lora.train.speed import LIGER_KERNELS, liger_installed

        liger = best and cuda and liger_installed()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=DTYPES[recipe.model.dtype], quantization_config=quantization_config(recipe.model),
            attn_implementation=recipe.model.attn_implementation, device_map={"": 0} if cuda else None)
        guard_bnb_cpu(model)
        t = recipe.training
        sft_args = SFTConfig(
            output_dir=out_dir, per_device_train_batch_size=micro_batch, gradient_accumulation_steps=1,
            max_steps=args.steps, learning_rate=t["learning_rate"], lr_scheduler_type=t["lr_scheduler_type"],
            optim=t["optim"], bf16=t["bf16"], activation_checkpointing=True,
            activation_checkpointing_kwargs={"use_reentrant": False}, completion_only_loss=True,
            max_length=args.seq, logging_steps=1000, save_strategy="no", report_to="none", use_cpu=not cuda,
            packing=best, activation_offloading=best and cuda, use_liger_kernel=liger,
            liger_kernel_config=LIGER_KERNELS if liger else None)
        lora = recipe.lora
        peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=lora.target_modules, task_type="CAUSAL_LM")
        dataset = Dataset.from_list([{k: r[k] for k in ("input_ids", "completion_mask")} for r in data])
        trainer = SFTTrainer(model=model, args=sft_args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[timer.callback])
    setup_rss = rss("VmRSS")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (VmHWM)
    if args.trace_memory:
        result, traced = traced_train(trainer, model)
    else:
        result, traced = trainer.train(), None
    timed = timer.times[args.warmup:] or timer.times
    step_s = statistics.median(timed)
    row = {"trainer": args.trainer, "shape": args.shape, "layers": shape_config(args.shape, args.layers).num_hidden_layers,
           "seq": args.seq, "micro_batch": micro_batch, "steps": len(timer.times), "step_times_s": timer.times,
           "time_per_step_s": round(step_s, 4), "tokens_per_s": round(micro_batch * args.seq / step_s, 1),
           "warmup_steps": min(args.warmup, len(timer.times)), "timed_steps": len(timed),
           "step_s_min": round(min(timed), 4), "step_s_max": round(max(timed), 4),
           "spread": round((max(timed) - min(timed)) / step_s, 4),
           "train_loss": round(result.training_loss, 4), "device": args.device, "chunk": args.chunk,
           "cuda_like": bool(args.cuda_like and not cuda)}
    if cuda:
        from trl.trainer.utils import compute_flops_per_token

        name = torch.cuda.get_device_name()
        peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
            (v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        flops = compute_flops_per_token(shape_config(args.shape, args.layers), args.seq)
        row |= {"gpu": name, "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
                "mfu": round(row["tokens_per_s"] * flops / peak, 4) if peak else None}
    else:
        row |= {"rss_before_load_bytes": base_rss, "rss_after_setup_bytes": setup_rss,
                "rss_peak_train_bytes": rss("VmHWM"), "rss_peak_above_start_bytes": rss("VmHWM") - base_rss}
    if traced is not None:
        row |= {"traced_peak_allocated_bytes": traced, "timing_under_profiler": True}
    row |= comparable_nll(trainer.state.log_history, args.trainer, row["train_loss"])
    if args.trainer == "stock-best":
        row["liger"] = liger
    if args.trainer.startswith("tear"):
        from tear_lora.train.plan import plan

        config = json.loads((model_dir / "config.json").read_text())
        p = plan(recipe, config=config, source=str(model_dir))
        row |= {"plan_peak_allocated_bytes": p.peak_allocated, "plan_card_bytes": p.card_bytes, "plan_phase": p.phase}
    return row


def comparable_nll(log_history: list[dict], trainer: str, train_loss: float) -> dict:
    """The figure that compares across trainers: `token_nll`, the mean NLL per loss-carrying token.

    `train_loss` is each trainer's own objective, and they differ by definition. Ours is the sum of two means,
    response_loss + lambda * witness_loss: at lambda 1, with random weights (every NLL near ln V), about 2 ln V.
    Stock SFTTrainer's is one mean over all completion tokens (the response and witness spans together), about
    ln V. So ours reads twice stock's at the same per-token NLL: a difference of definition, not a wrong value.
    Ours gets its token-weighted mean from the span totals every log line carries; stock's loss already is one."""
    if not trainer.startswith("tear"):
        return {"token_nll": train_loss}
    lines = [e for e in log_history if "response_tokens" in e]  # each log line holds the spans since the last one
    n_r, n_w = sum(e["response_tokens"] for e in lines), sum(e["witness_tokens"] for e in lines)
    sum_r = sum(e["response_loss"] * e["response_tokens"] for e in lines)
    sum_w = sum(e["witness_loss"] * e["witness_tokens"] for e in lines)
    return {"response_loss": round(sum_r / max(n_r, 1), 4), "witness_loss": round(sum_w / max(n_w, 1), 4),
            "lambda": lines[-1]["lambda"] if lines else None, "token_nll": round((sum_r + sum_w) / max(n_r + n_w, 1), 4)}


def run_one(model_dir: Path, trainer: str, micro_batch: int, args) -> dict:
    """One (trainer, micro-batch) run in a fresh worker process: its row, or {"error": ...} when it failed.

    A fresh process per run: CPU peak RSS never goes down, and on CUDA nothing of one run's allocator state
    carries into the next. `args` are this script's parsed arguments (bench_long_context passes its own)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--trainer", trainer, "--model-dir",
           str(model_dir), "--micro-batch", str(micro_batch), "--shape", args.shape, "--seq", str(args.seq),
           "--steps", str(args.steps), "--device", args.device, "--chunk", str(args.chunk),
           "--warmup", str(getattr(args, "warmup", 1))]
    for flag, value in (("--layers", args.layers), ("--optim", args.optim), ("--peak-tflops", args.peak_tflops)):
        cmd += [flag, str(value)] if value is not None else []
    cmd += ["--trace-memory"] if args.trace_memory else []
    cmd += ["--cuda-like"] if getattr(args, "cuda_like", False) else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_ROW ")]
    if found:
        return json.loads(found[-1][10:])
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else (proc.stderr.strip() or "failed")[-600:]
    return {"trainer": trainer, "micro_batch": micro_batch, "seq": args.seq, "error": why}


def replan(rows: list[dict]) -> list[dict]:
    """Rows of an earlier run with each `tear` row's plan figures recomputed by the plan as it is now (`--replan`):
    the measurements stand, the estimate changed."""
    from tear_lora.train.plan import plan

    for row in rows:
        if not row.get("trainer", "").startswith("tear") or "error" in row:
            continue
        cuda = row["device"] == "cuda"
        args = argparse.Namespace(seq=row["seq"], chunk=row["chunk"], steps=row["steps"], optim=None)
        recipe = bench_recipe(Path("unused"), args, row["micro_batch"], cuda, row["trainer"])
        p = plan(recipe, config=shape_config(row["shape"], row["layers"]).to_dict(), source=row["shape"])
        row |= {"plan_peak_allocated_bytes": p.peak_allocated, "plan_card_bytes": p.card_bytes, "plan_phase": p.phase}
    return rows


def fmt_gb(b):
    return f"{b / 2**30:7.2f}" if b is not None else f"{'-':>7s}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=("tiny", "qwen3-1.7b"), default="qwen3-1.7b")
    parser.add_argument("--layers", type=int, help="override the number of layers (quick CPU runs)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", default="1,4,8", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps, warm-up included")
    parser.add_argument("--warmup", type=int, default=1, help="first steps not timed")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--trainers", default="tear,stock", help=f"comma-separated: stock, stock-best, {', '.join(TEAR_ARMS)}")
    parser.add_argument("--chunk", type=int, default=256, help="objective.loss_chunk_size for ours")
    parser.add_argument("--optim", help="override the optimizer (default paged_adamw_8bit on CUDA, adamw_torch CPU)")
    parser.add_argument("--peak-tflops", type=float, help="GPU bf16 dense peak for MFU (default: from the name)")
    parser.add_argument("--model-root", default=os.path.join(tempfile.gettempdir(), "tear_lora_bench_models"))
    parser.add_argument("--trace-memory", action="store_true",
                        help="CPU: also trace torch allocations with the profiler (slows the steps down)")
    parser.add_argument("--cuda-like", action="store_true",
                        help="CPU: keep for backward what CUDA keeps (emulate_cuda_saved_tensors), for plan checks")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trainer", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--replan", metavar="JSON", help="recompute the plan figures of an earlier run's JSON (in "
                        "place, or into --json) without measuring again")
    args = parser.parse_args(argv)
    if args.replan:
        rows = replan(json.loads(Path(args.replan).read_text()))
        Path(args.json or args.replan).write_text(json.dumps(rows, indent=1))
        for row in rows:
            print_row(row, row.get("device", "cpu"))
        return 0
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        print("BENCH_ROW " + json.dumps(worker(args)), flush=True)
        return 0

    model_dir = build_model_dir(args.shape, args.layers, Path(args.model_root))
    results = []
    for mb in args.micro_batch:
        for trainer in args.trainers.split(","):
            row = run_one(model_dir, trainer, mb, args)
            results.append(row)
            print_row(row, args.device)
            if args.json:  # after every run: a suite that stops this script early keeps what it measured
                Path(args.json).write_text(json.dumps(results, indent=1))
    print_ratios(results, args.device)
    return 1 if any("error" in r for r in results) else 0


def print_row(row: dict, device: str) -> None:
    if "error" in row:
        print(f"{row['trainer']:5s} mb={row['micro_batch']}: FAILED {row['error'][-300:]}", flush=True)
        return
    mem = (f"alloc {fmt_gb(row['peak_allocated_bytes'])} GiB  reserved {fmt_gb(row['peak_reserved_bytes'])} GiB  "
           f"MFU {row['mfu']}" if device == "cuda" else
           f"RSS peak {fmt_gb(row['rss_peak_train_bytes'])} GiB  above start {fmt_gb(row['rss_peak_above_start_bytes'])} GiB")
    plan = f"  plan {fmt_gb(row['plan_peak_allocated_bytes'])} GiB" if "plan_peak_allocated_bytes" in row else ""
    if "traced_peak_allocated_bytes" in row:
        mem += f"  traced alloc {fmt_gb(row['traced_peak_allocated_bytes'])} GiB"
    print(f"{row['trainer']:5s} {row['shape']} L{row['layers']} seq {row['seq']} mb {row['micro_batch']}: "
          f"{row['time_per_step_s']:8.2f} s/step {row['tokens_per_s']:9.1f} tok/s  {mem}{plan}  "
          f"loss {row['train_loss']} (per-token NLL {row.get('token_nll')})", flush=True)


def print_ratios(results: list[dict], device: str) -> None:
    key = "peak_allocated_bytes" if device == "cuda" else "rss_peak_above_start_bytes"
    by = {(r["trainer"], r["micro_batch"]): r for r in results if "error" not in r}
    for (trainer, mb), ours in by.items():
        for name in ("stock", "stock-best"):
            other = by.get((name, mb))
            if trainer.startswith("tear") and other:
                print(f"mb {mb}: {trainer}/{name} memory {ours[key] / other[key]:.2f}x, speed "
                      f"{ours['tokens_per_s'] / other['tokens_per_s']:.2f}x (spread {ours['spread']:.0%} / "
                      f"{other['spread']:.0%})", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
