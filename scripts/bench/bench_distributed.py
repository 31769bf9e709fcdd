"""Per-rank memory of a two-step DDP and FSDP run vs `tear-lora plan --nproc`, on CPU (gloo) or GPUs (NCCL).

    torchrun --standalone --nproc_per_node 2 scripts/bench/bench_distributed.py --layers 4 --seq 256 \
        --json docs/bench/distributed_cpu.json                      # CPU: traced torch allocations per rank
    torchrun --standalone --nproc_per_node 2 scripts/bench/bench_distributed.py --seq 2048 --micro-batch 4 \
        --json docs/bench/distributed_cuda.json                     # GPUs: max_memory_allocated per rank

The model is Qwen3-1.7B's exact shape with random weights (bench_train.build_model_dir; `--layers` trims it for
CPU), in 4-bit NF4 through the recipe's own loading path, trained by TearTrainer with the recipe's LoRA. Each mode
(`ddp`, `fsdp`) gets a fresh model. CPU memory is traced with the torch profiler (bench_train.traced_train's
method): this rank's resident weights (its shards under FSDP, their 4-bit quantization state included) plus the
peak of what the step allocates, the analogue of torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import bench_recipe, build_model_dir, rows  # noqa: E402


def resident_bytes(model) -> int:
    """This rank's weights and buffers (local shards of DTensors) and the 4-bit quantization state."""
    from torch.distributed.tensor import DTensor

    tensors = {}
    for t in [*model.parameters(), *model.buffers()]:
        local = t.to_local() if isinstance(t, DTensor) else t
        tensors[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    import bitsandbytes as bnb

    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        state = getattr(module, "quant_state", None) or getattr(module.weight, "quant_state", None)
        for t in (getattr(state, "absmax", None), getattr(getattr(state, "state2", None), "absmax", None)):
            if t is not None:
                tensors[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(tensors.values())


def traced_train(trainer) -> tuple[int, int]:
    """(resident bytes, peak of the running sum of every CPU allocation and free) over the training steps.

    Tracing starts at `on_train_begin`, after the Trainer has prepared the model: on CPU accelerate's
    `model.to("cpu:0")` under DDP copies every weight once, a start-up transient with no GPU counterpart. The
    profiler's raw allocation events are summed in time order (its memory timeline, which bench_train uses,
    asserts on FSDP's DTensor ops)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                   with_stack=bool(os.environ.get("BENCH_DEBUG")))
    resident = []

    class StartTracing(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            resident.append(resident_bytes(trainer.model))
            prof.start()

    trainer.add_callback(StartTracing())
    trainer.train()
    prof.stop()
    allocations, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.typed[0] == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.typed[1].alloc_size))
            if os.environ.get("BENCH_DEBUG") and event.typed[1].alloc_size > 2**27:
                chain, e = [], event.parent
                while e is not None and len(chain) < 40:
                    if e.typed[0] == _EventType.PyCall or len(chain) < 4:
                        chain.append(e.name[-70:])
                    e = e.parent
                print("BIG", event.typed[1].alloc_size / 2**30, chain, flush=True)
    current = peak = 0
    for _, size in sorted(allocations):
        current += size
        peak = max(peak, current)
    return resident[0], peak


def run_mode(mode: str, args, model_dir: Path, state) -> dict:
    import torch
    from datasets import Dataset

    from tear_lora.data.tokens import structural_token_ids
    from tear_lora.train.batch import SpanCollator
    from tear_lora.train.distributed import shard_fsdp
    from tear_lora.train.model import add_adapters, load_base, load_tokenizer_for
    from tear_lora.train.plan import plan
    from tear_lora.train.runner import sft_config
    from tear_lora.train.trainer import TearTrainer

    cuda = torch.cuda.is_available()
    recipe = bench_recipe(model_dir, args, args.micro_batch, cuda)
    recipe.distributed.fsdp = mode == "fsdp"  # quant storage follows it (model.quantization_config)
    tokenizer = load_tokenizer_for(recipe)
    torch.manual_seed(0)
    model = add_adapters(load_base(recipe, tokenizer), recipe, list(structural_token_ids(tokenizer).values()))
    if mode == "fsdp":
        shard_fsdp(model, state)
    data = Dataset.from_list([{k: r[k] for k in ("input_ids", "span_roles")}
                              for r in rows(args.micro_batch * args.steps * state.num_processes, args.seq)])
    trainer = TearTrainer(model=model, args=sft_config(recipe, output_dir=tempfile.mkdtemp(prefix="bench_dist_")),
                          train_dataset=data, processing_class=tokenizer,
                          data_collator=SpanCollator(tokenizer.pad_token_id), lambda_=1.0,
                          loss_chunk_size=recipe.objective.loss_chunk_size)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        trainer.train()
        measured = {"peak_allocated_bytes": torch.cuda.max_memory_allocated()}
    else:
        resident, peak = traced_train(trainer)
        measured = {"resident_bytes": resident, "traced_peak_allocated_bytes": resident + peak}
    config = json.loads((model_dir / "config.json").read_text())
    p = plan(recipe, config=config, source=str(model_dir), nproc=state.num_processes)
    return {"mode": mode, "rank": state.process_index, "world_size": state.num_processes, "layers": config[
        "num_hidden_layers"], "seq": args.seq, "micro_batch": args.micro_batch, "device": "cuda" if cuda else "cpu",
            "plan_peak_allocated_bytes": p.peak_allocated, "plan_phase": p.phase, **measured}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, help="trim Qwen3-1.7B to this many layers (CPU)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--optim", default="adamw_torch")
    parser.add_argument("--modes", default="ddp,fsdp")
    parser.add_argument("--model-root", default=os.path.join(tempfile.gettempdir(), "tear_lora_bench_models"))
    parser.add_argument("--json", help="write the rows here (rank 0)")
    args = parser.parse_args(argv)

    from accelerate import PartialState
    from accelerate.utils import gather_object

    from tear_lora.train.distributed import teardown

    state = PartialState(cpu=not __import__("torch").cuda.is_available())
    with state.main_process_first():  # one rank writes the random model, the others reuse it
        model_dir = build_model_dir("qwen3-1.7b", args.layers, Path(args.model_root))
    results = []
    for mode in args.modes.split(","):
        results += gather_object([run_mode(mode, args, model_dir, state)])
    if state.is_main_process:
        key = "peak_allocated_bytes" if results[0]["device"] == "cuda" else "traced_peak_allocated_bytes"
        for r in results:
            print(f"{r['mode']:4s} rank {r['rank']}/{r['world_size']}: L{r['layers']} seq {r['seq']} mb "
                  f"{r['micro_batch']}: measured {r[key] / 2**30:.3f} GiB, plan {r['plan_peak_allocated_bytes'] / 2**30:.3f}"
                  f" GiB ({r['plan_peak_allocated_bytes'] / r[key] - 1:+.1%})", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
