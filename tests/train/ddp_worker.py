"""Trains the tiny model for two optimizer steps and saves what a run must reproduce (run by test_distributed.py).

    python -m tests.train.ddp_worker MODEL_DIR OUT_DIR [UNTIED_MODEL_DIR]        # single process: every window layout
    torchrun --standalone --nproc_per_node 2 -m tests.train.ddp_worker MODEL_DIR OUT_DIR   # 2 ranks x micro-batch 2,
                                                                                      # DDP and FSDP

Each case writes `<OUT_DIR>/<case>.safetensors` (every trainable tensor: LoRA and token rows) and
`<case>.json` (the logged losses and counts), from the main process only. Sequential sampling makes the
assignment of rows to micro-batches and ranks known: accelerate gives rank r the (r+1)-th batch of each group of
`world_size` batches, the same rows a single process sees as its (r+1)-th accumulation micro-batch.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from tear_lora.data.packing import pack_triples
from tear_lora.data.prepare import prepare
from tear_lora.data.template import CONTEXT, WITNESS
from tear_lora.data.tokens import load_tokenizer
from tear_lora.train.distributed import full_trainable_state, shard_fsdp, teardown

from ..conftest import REPO, make_recipe, make_trainer, trainable_model

# SGD with a large rate moves each weight by exactly lr x its gradient, so the saved tensors compare gradients.
# (Adam's first steps are ~lr x sign(g): an entry whose gradient is ~0 turns float noise into a full step.)
TRAINING = {"optim": "sgd", "learning_rate": 0.5, "max_grad_norm": 0.0, "lr_scheduler_type": "constant",
            "max_steps": 2, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
            "train_sampling_strategy": "sequential", "seed": 11, "activation_checkpointing": True}
LAYOUTS = {"1x4": (4, 1), "1x2x2": (2, 2)}  # single process: (micro-batch, accumulation)


@functools.cache
def rows(model_dir: Path, work: Path, unequal: bool):
    """8 triples (two optimizer steps of 4). With `unequal`, rows 2 and 3 (rank 1's first batch) lose their witness
    targets, so the ranks' span counts differ and one rank has none at all."""
    recipe = make_recipe(model_dir, work)
    dataset = prepare(REPO / "data/raw/eval.jsonl", load_tokenizer(str(model_dir)), recipe, save=False).dataset
    dataset = dataset.select(range(8))
    if not unequal:
        return dataset

    def drop_witness(row, index):
        if index in (2, 3):
            row["span_roles"] = [CONTEXT if r == WITNESS else r for r in row["span_roles"]]
        return row

    return dataset.map(drop_witness, with_indices=True)


@functools.cache
def packed_rows(model_dir: Path, work: Path):
    """4 packed rows (data.packing: whole triples, 2-3 to a row, rows of unequal length and span counts): two
    optimizer steps of 2 rows."""
    recipe = make_recipe(model_dir, work)
    dataset = prepare(REPO / "data/raw/eval.jsonl", load_tokenizer(str(model_dir)), recipe, save=False).dataset
    return pack_triples(dataset.select(range(12)), 256).select(range(4))


def train_case(model_dir: Path, out: Path, case: str, micro: int, accum: int, unequal: bool,
               fsdp: bool = False, packed: bool = False) -> None:
    from safetensors.torch import save_file

    recipe = make_recipe(model_dir, out / "work", lora={"dropout": 0.0}, distributed={"fsdp": fsdp},
                         training={**TRAINING, "per_device_train_batch_size": micro,
                                   "gradient_accumulation_steps": accum})
    tokenizer = load_tokenizer(str(model_dir))
    data = packed_rows(model_dir, out / "work") if packed else rows(model_dir, out / "work", unequal)
    model = trainable_model(recipe, tokenizer, seed=11)
    if fsdp:
        shard_fsdp(model, PartialState())
    trainer = make_trainer(model, recipe, tokenizer, data, out / "work" / case)
    trainer.train()
    state = full_trainable_state(trainer.accelerator.unwrap_model(trainer.model))  # collective under FSDP
    if trainer.accelerator.is_main_process:
        save_file({n: t.contiguous() for n, t in state.items()}, str(out / f"{case}.safetensors"))
        logs = [e for e in trainer.state.log_history if "response_loss" in e]
        (out / f"{case}.json").write_text(json.dumps({"logs": logs, "world_size": trainer.args.world_size}))
    trainer.accelerator.wait_for_everyone()


def main(model_dir: str, out_dir: str, untied_dir: str | None = None) -> None:
    model_dir, out = Path(model_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for unequal in (False, True):
        suffix = "-unequal" if unequal else ""
        from tear_lora.train.runner import sft_config

        args = sft_config(make_recipe(model_dir, out / "work", training=TRAINING), output_dir=out / "work" / "probe")
        if args.world_size > 1:
            train_case(model_dir, out, f"2x2{suffix}", 2, 1, unequal)
            train_case(model_dir, out, f"fsdp2x2{suffix}", 2, 1, unequal, fsdp=True)
        else:
            for name, (micro, accum) in LAYOUTS.items():
                train_case(model_dir, out, f"{name}{suffix}", micro, accum, unequal)
    if args.world_size > 1:  # packed rows: 2 ranks x 1 row == 1 process x 1 row x accumulation 2
        train_case(model_dir, out, "packed-2x1", 1, 1, False, packed=True)
    else:
        train_case(model_dir, out, "packed-1x1x2", 1, 2, False, packed=True)
    if untied_dir:  # an untied output layer: FSDP shards the input embedding as a unit of its own
        if args.world_size > 1:
            train_case(Path(untied_dir), out, "untied-fsdp2x2", 2, 1, False, fsdp=True)
        else:
            train_case(Path(untied_dir), out, "untied-1x2x2", 2, 2, False)
    teardown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
