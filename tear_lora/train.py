"""`run(recipe)`: recipe -> data -> 4-bit base + adapters -> TearTrainer -> `adapters/<run_name>/`.

Everything that can fail because of the user's files (recipe, training arguments, data, existing run dir)
fails before the model loads, so a typo costs seconds, not a model download.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .adapters import write_run_metadata
from .data import prepare
from .model import add_adapters, format_breakdown, load_base, load_tokenizer_for, trainable_breakdown
from .plan import check_memory
from .recipe import Recipe, RecipeError
from .tokens import structural_token_ids
from .trainer import SpanCollator, TearTrainer

CHECKPOINTS = "checkpoints"


class RunDirError(RecipeError):
    """The run directory is in a state the requested action would damage."""


def sft_config(recipe: Recipe, output_dir: str | Path | None = None, overrides: dict | None = None):
    """The recipe's `training` section as TRL's SFTConfig, plus the settings our data and loss need."""
    from trl import SFTConfig

    kwargs = dict(recipe.training) | (overrides or {})
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
    sft_config(recipe, output_dir=tempfile.gettempdir(), overrides=overrides)
    return notes


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest *complete* checkpoint: trainer_state.json is written last, so a run killed mid-save is skipped."""
    candidates = [p for p in (run_dir / CHECKPOINTS).glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(candidates, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _resolve_resume(recipe: Recipe, resume: str | bool | None) -> Path | None:
    run_dir = recipe.run_dir()
    if resume in (None, False):
        if (run_dir / "adapter_config.json").exists() or latest_checkpoint(run_dir):
            if not recipe.output.overwrite:
                raise RunDirError(f"{run_dir} already holds a run; pass --resume to continue it, or "
                                  "--set output.overwrite=true (or another output.run_name) to start over")
            shutil.rmtree(run_dir)
        return None
    checkpoint = latest_checkpoint(run_dir) if resume is True else Path(resume)
    if checkpoint is None or not checkpoint.exists():
        raise RunDirError(f"nothing to resume: no complete checkpoint {'in ' + str(run_dir / CHECKPOINTS) if resume is True else str(resume)}")
    return checkpoint


def run(recipe: Recipe, resume: str | bool | None = None, force: bool = False) -> Path:
    """Train one adapter; returns its directory. On CUDA, a recipe the memory plan says cannot fit its GPU is
    refused before anything loads unless `force`."""
    args = sft_config(recipe)
    check_memory(recipe, force=force)
    checkpoint = _resolve_resume(recipe, resume)
    tokenizer = load_tokenizer_for(recipe)
    train_data = prepare(recipe.data.train_file, tokenizer, recipe)
    eval_data = prepare(recipe.data.eval_file, tokenizer, recipe) if recipe.data.eval_file else None
    _report_rejects(train_data, eval_data)

    # LoRA A is drawn from torch's RNG (randomly seeded per process); Trainer seeds only after the model exists
    from transformers.trainer_utils import enable_full_determinism, set_seed

    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)
    model = load_base(recipe, tokenizer)
    token_ids = list(structural_token_ids(tokenizer).values())
    model = add_adapters(model, recipe, token_ids, gradient_checkpointing=args.activation_checkpointing)
    breakdown = trainable_breakdown(model)
    print(format_breakdown(breakdown), flush=True)

    trainer = TearTrainer(
        model=model, args=args, train_dataset=train_data.dataset,
        eval_dataset=eval_data.dataset if eval_data else None, processing_class=tokenizer,
        data_collator=SpanCollator(tokenizer.pad_token_id), lambda_=recipe.objective.lambda_,
        lambda_warmup_steps=recipe.objective.lambda_warmup_steps, loss_chunk_size=recipe.objective.loss_chunk_size)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    metrics = {"train_loss": result.training_loss, "global_step": result.global_step,
               "train_runtime_s": result.metrics.get("train_runtime")}
    if eval_data is not None:
        metrics.update(trainer.evaluate())

    run_dir = recipe.run_dir()
    trainer.save_model(str(run_dir))
    (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    write_run_metadata(run_dir, recipe, tokenizer, train_data.manifest,
                       eval_data.manifest if eval_data else None, metrics, breakdown,
                       log_history=trainer.state.log_history)
    print(f"adapter saved to {run_dir}", flush=True)
    return run_dir


def _report_rejects(*prepared) -> None:
    for p in prepared:
        if p is not None and p.manifest["rows_rejected"]:
            print(f"warning: {p.manifest['source']}: {p.manifest['rows_rejected']} row(s) rejected, "
                  f"listed in {p.out_dir / 'rejects.jsonl'}", flush=True)
