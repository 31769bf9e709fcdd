"""`run(recipe)`: recipe -> data -> 4-bit base + adapters -> TearTrainer -> `adapters/<run_name>/`.

Everything that can fail because of the user's files (recipe, training arguments, data, existing run dir)
fails before the model loads, so a typo costs seconds, not a model download.

How a run treats the disk (rundir.py has the primitives):
- One writer: `adapters/.<run>.lock` is held for the whole run; a second `train` of the same run refuses.
- Training happens in a hidden sibling `adapters/.<run>.tmp-<pid>/` (checkpoints included). Only when the
  adapter, tokenizer and metadata are all written is it swapped in as `adapters/<run>/`, and only then is
  a previous run of that name deleted: a failed, killed or interrupted run leaves the previous adapter as it was.
- A run dir that exists is replaced only if it is a finished adapter of ours, and only with output.overwrite
  (rundir.check_replaceable): a typo in output.dir/run_name never deletes a user's directory.
- `--resume` continues the interrupted attempt (its newest complete checkpoint), else the finished run's; a
  checkpoint of another recipe is refused, naming the keys that differ (workdir.py has these rules).
- Faults end the run with a message and a distinct exit status: non-finite loss/gradient or a full disk
  (TrainingFault, 4), SIGTERM/SIGINT after saving a checkpoint (Interrupted, 143/130).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shlex
import signal
import tempfile
from contextlib import nullcontext, redirect_stdout
from pathlib import Path

from tear_lora.data.prepare import prepare
from tear_lora.data.tokens import structural_token_ids
from tear_lora.metadata import write_run_metadata
from tear_lora.recipe import Recipe, RecipeError
from tear_lora.rundir import (
    atomic_write_text,
    exclusive_lock,
    lock_path_for,
    note_leftovers,
    swap_in,
    write_complete_marker,
)

from .batch import SpanCollator
from .distributed import from_main, process_state, shard_fsdp
from .model import add_adapters, format_breakdown, load_base, load_tokenizer_for, trainable_breakdown
from .plan import check_memory
from .speed import machine_switches
from .trainer import NonFiniteError, StopOnSignal, TearTrainer
from .workdir import (  # noqa: F401 - find_checkpoints and latest_checkpoint are this module's interface too
    CHECKPOINTS,
    check_run_dir,
    checkpoint_problem,
    find_checkpoints,
    keep_or_drop,
    latest_checkpoint,
    start_work_dir,
    step_of,
)


class TrainingFault(RuntimeError):
    """Training stopped by a fault (non-finite numbers, full disk); the message says what to do. Exit 4."""

    exit_code = 4


class Interrupted(RuntimeError):
    """Stopped by SIGTERM / SIGINT after saving a checkpoint; exit 128 + signal number (143 / 130)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def sft_config(recipe: Recipe, output_dir: str | Path | None = None, overrides: dict | None = None,
               notes: list[str] | None = None):
    """The recipe's `training` section as TRL's SFTConfig, plus the settings our data and loss need; switches this
    machine cannot run are turned off (speed.machine_switches), with a line appended to `notes`."""
    import torch
    from trl import SFTConfig

    kwargs = dict(recipe.training) | (overrides or {})
    switched = machine_switches(kwargs, torch.cuda.is_available(), recipe.source or "recipe")
    if notes is not None:
        notes.extend(switched)
    if not torch.cuda.is_available():  # without it HF runs each torchrun process alone instead of DDP over gloo
        kwargs.setdefault("use_cpu", True)
    # every trainable tensor gets a gradient each step (the tag rows too: each row holds tags), so DDP can skip
    # HF's default for PEFT models, a search for unused parameters after every backward
    kwargs.setdefault("ddp_find_unused_parameters", False)
    if kwargs.get("activation_checkpointing", kwargs.get("gradient_checkpointing", True)):
        kwargs.setdefault("activation_checkpointing_kwargs", {"use_reentrant": False})  # no input-grad hack needed
    try:
        return SFTConfig(output_dir=str(output_dir or recipe.run_dir() / CHECKPOINTS),
                         remove_unused_columns=False,  # keep span_roles: the collator needs them
                         dataset_kwargs={"skip_prepare_dataset": True},  # data.py already tokenized and truncated
                         max_length=None, **kwargs)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{recipe.source or 'recipe'}: section 'training' is not a valid SFTConfig: {e}") from None


def check_training_args(recipe: Recipe) -> list[str]:
    """Build the SFTConfig once to catch bad training values; returns notes about this machine."""
    import torch

    notes, overrides = [], {}
    mixed = [k for k in ("bf16", "fp16") if recipe.training.get(k)]
    if mixed and not torch.cuda.is_available():  # the recipe can still be right for the GPU it targets
        overrides = {k: False for k in mixed}
        notes.append(f"{'/'.join(mixed)} needs a GPU: checked without it; training here would fail")
    sft_config(recipe, output_dir=tempfile.gettempdir(), overrides=overrides, notes=notes)
    return notes


def _resume_command(recipe: Recipe) -> str:
    launcher = "tear-lora"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # under a launcher: the same launch again, every process resuming from the same checkpoint
        launcher = f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', world)} -m tear_lora.cli"
    return f"{launcher} train {shlex.quote(recipe.source or 'RECIPE')} --resume"


# ---- the run ----------------------------------------------------------------------------------------------------


def run(recipe: Recipe, resume: str | bool | None = None, force: bool = False) -> Path:
    """Train one adapter; returns its directory. On CUDA, a recipe the memory plan says cannot fit its GPU is
    refused before anything loads unless `force`.

    Under a launcher (torchrun / accelerate launch) every rank calls this; only the main process takes the lock,
    picks the work dir, writes metadata and swaps the result in (distributed.py says who writes what).
    """
    state = process_state(sft_config(recipe))  # bad training values fail here, before anything is written
    check_memory(recipe, force=force, quiet=not state.is_main_process, nproc=state.num_processes)
    run_dir = recipe.run_dir()
    main = state.is_main_process
    from_main(state, lambda: check_run_dir(recipe, resume))  # before the lock file or the data cache is made
    with exclusive_lock(lock_path_for(run_dir), f"run dir {run_dir}") if main else nullcontext():
        tokenizer = load_tokenizer_for(recipe)
        with state.local_main_process_first():  # each node's first process builds the cache, the others reuse it
            with nullcontext() if state.is_local_main_process else redirect_stdout(io.StringIO()):  # notices once
                train_data = prepare(recipe.data.train_file, tokenizer, recipe, packed=recipe.data.packing)
                eval_data = prepare(recipe.data.eval_file, tokenizer, recipe) if recipe.data.eval_file else None
        if main:
            _report_rejects(train_data, eval_data)
        work, checkpoint, checked = from_main(state, lambda: start_work_dir(recipe, resume))
        try:
            _train_in(work, recipe, tokenizer, train_data, eval_data, checkpoint, state)
        except BaseException:
            if main:
                keep_or_drop(work)
            raise
        if main:
            try:
                swap_in(work, run_dir, checked)  # re-checks the run dir: a file added since the check stops it
            except BaseException:
                keep_or_drop(work)
                raise
            note_leftovers(run_dir, "tmp", "training of this run (superseded by this one: never resumed)")
        state.wait_for_everyone()  # every rank returns once the adapter is in place
    if main:
        print(f"adapter saved to {run_dir}", flush=True)
    return run_dir


def _train_in(work: Path, recipe: Recipe, tokenizer, train_data, eval_data, checkpoint: Path | None,
              state) -> None:
    args = sft_config(recipe, output_dir=work / CHECKPOINTS)
    main = state.is_main_process
    # LoRA A is drawn from torch's RNG (randomly seeded per process); Trainer seeds only after the model exists.
    # Every rank uses the same seed: identical initial adapters, and the same data order (accelerate's sampler).
    from transformers.trainer_utils import enable_full_determinism, set_seed

    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)
    model = load_base(recipe, tokenizer)
    token_ids = list(structural_token_ids(tokenizer).values())
    model = add_adapters(model, recipe, token_ids, gradient_checkpointing=args.activation_checkpointing)
    breakdown = trainable_breakdown(model)
    sharded = recipe.distributed.fsdp and state.num_processes > 1
    if sharded:
        shard_fsdp(model, state)
    weights = recipe.objective.response_weight
    if main:
        print(format_breakdown(breakdown), flush=True)
        if recipe.distributed.fsdp:
            print(f"FSDP: base and adapters sharded over {state.num_processes} processes" if sharded else
                  "note: distributed.fsdp is on but this is one process: training unsharded", flush=True)
        if weights:
            print(describe_response_weights(train_data.dataset, weights), flush=True)
    stop = StopOnSignal()
    trainer = TearTrainer(
        model=model, args=args, train_dataset=train_data.training_rows,  # packed rows with data.packing
        eval_dataset=eval_data.dataset if eval_data else None, processing_class=tokenizer,
        data_collator=SpanCollator(tokenizer.pad_token_id, response_weight=weights), lambda_=recipe.objective.lambda_,
        lambda_warmup_steps=recipe.objective.lambda_warmup_steps, loss_chunk_size=recipe.objective.loss_chunk_size,
        checkpoint_info={"recipe_sha256": recipe.hash(), "recipe": recipe.trained_dict()}, callbacks=[stop])
    stop.install()
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except NonFiniteError as e:
        raise TrainingFault(f"{e}; last finite logged loss {trainer.last_finite_loss()}; {_newest(work)}. "
                            "Nothing with NaN/Inf was saved. Lower training.learning_rate or check the data, then "
                            f"resume with `{_resume_command(recipe)}` or start over") from None
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise TrainingFault(f"disk full while writing under {work} ({e}); {_newest(work)}; free some space, then "
                            f"`{_resume_command(recipe)}`") from None
    finally:
        stop.uninstall()
    if stop.stopped or stop.received is not None:
        signum = stop.received or signal.SIGTERM  # a rank the signal has not reached yet stops with the others
        raise Interrupted(f"{signal.Signals(signum).name}: stopped after optimizer step {trainer.state.global_step}; "
                          f"{_newest(work)}. Continue with: {_resume_command(recipe)}", signum)

    metrics = {"train_loss": result.training_loss, "global_step": result.global_step,
               "train_runtime_s": result.metrics.get("train_runtime")}
    if eval_data is not None:
        metrics.update(trainer.evaluate())  # every rank: the eval loop is collective
    trainer.save_model(str(work))  # writes on the main process only
    if main:
        atomic_write_text(work / "recipe.yaml", recipe.to_yaml())
        write_run_metadata(work, recipe, tokenizer, train_data.manifest,
                           eval_data.manifest if eval_data else None, metrics, breakdown,
                           log_history=trainer.state.log_history, world_size=state.num_processes)
        write_complete_marker(work, kind="adapter")  # last: what makes it a finished adapter of ours


def describe_response_weights(dataset, weights: dict[str, float]) -> str:
    """How many training rows each `objective.response_weight` key matched: a misspelled valence matches none
    and would otherwise train unweighted without a word."""
    from collections import Counter

    found = Counter(json.loads(m).get("valence") if m else None for m in dataset["meta"])
    parts = [f"{key} x{weight:g} on {found.get(key, 0)} rows" for key, weight in weights.items()]
    line = f"response weights: {', '.join(parts)}; weight 1 on {len(dataset) - sum(found.get(k, 0) for k in weights)}"
    unmatched = [key for key in weights if not found.get(key)]
    if unmatched:
        seen = ", ".join(sorted(str(v) for v in found if v is not None)) or "none"
        line += f"\nwarning: objective.response_weight key(s) {', '.join(unmatched)} match no training row " \
                f"(meta.valence values in the data: {seen})"
    return line


def _newest(work: Path) -> str:
    good = [p for p in (work / CHECKPOINTS).glob("checkpoint-*") if checkpoint_problem(p) is None]
    newest = max(good, key=step_of, default=None)
    return f"newest good checkpoint: {newest}" if newest else "no complete checkpoint yet"


def _report_rejects(*prepared) -> None:
    for p in prepared:
        if p is not None and p.manifest["rows_rejected"]:
            print(f"warning: {p.manifest['source']}: {p.manifest['rows_rejected']} row(s) rejected, "
                  f"listed in {p.out_dir / 'rejects.jsonl'}", flush=True)

