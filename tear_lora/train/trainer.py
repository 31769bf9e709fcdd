"""TearTrainer: TRL's SFTTrainer with the dual span loss. Everything else (optimizer, schedule, eval loop,
checkpointing, logging, accelerate) stays HF's.

Hooks overridden, each for one reason:
- `compute_loss`: ResponseLoss + lambda * ConsequenceLoss via the chunked loss (loss.py). TRL's own
  compute_loss cannot be used: its fused LM-head path crashes on PEFT's trainable-token wrapper.
- `_get_num_items_in_batch`: HF counts label tokens of the whole accumulation window (all micro-batches,
  all ranks) so a mean stays exact; we count the two spans separately, for the same reason.
- `log`: adds token-weighted response_loss / witness_loss / lambda / token counts to every log line.
  With `objective.response_weight` the training response_loss is the row-weighted mean that is optimised and
  `response_weighted_tokens` (its denominator) is logged beside the plain `response_tokens`; evaluation stays
  the plain per-token NLL of every row, comparable across runs with and without weights.
- `_load_from_checkpoint` / `_run_epoch`: --resume restores the token rows too and never trains past max_steps.
- `_save`: the adapter with its token rows, never whole embedding matrices, never non-finite values.
- `_save_checkpoint`: a completion marker after all of a checkpoint's files, so --resume can trust it.
- `training_step` / `_get_grad_norm`: stop at the first non-finite loss or gradient, before the optimizer
  writes it into the adapter (HF would log around a NaN loss and step on a NaN gradient).
- FSDP (`distributed.fsdp`): the save / load / gradient-sync hooks live beside the rest of FSDP, in
  distributed.FsdpCheckpointing, mixed in here.

The batch side (collator, final hidden states) is batch.py: evaluation and analysis use it without TRL.
"""

from __future__ import annotations

import math
import os
import signal

import torch
from accelerate import PartialState
from transformers import TrainerCallback
from trl import SFTTrainer

from tear_lora.metadata import public_name
from tear_lora.recipe import mask_secrets
from tear_lora.rundir import atomic_write_json, atomic_write_text, usual_permissions, write_complete_marker

from .batch import PACKED_ATTENTION_KEYS, final_hidden_states, unwrap_causal_lm
from .distributed import FsdpCheckpointing, any_rank, is_fsdp_sharded
from .loss import count_span_tokens, span_loss, span_targets
from .model import check_adapter_keys


class NonFiniteError(RuntimeError):
    """A loss, gradient or weight became NaN/Inf; training stops before it reaches a saved adapter."""


class TearTrainer(FsdpCheckpointing, SFTTrainer):
    loss_is_scaled_for_ga = True  # compute_loss divides by the whole window's span counts itself

    def __init__(self, *args, lambda_: float = 1.0, lambda_warmup_steps: int = 0, loss_chunk_size: int = 256,
                 checkpoint_info: dict | None = None, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        initial = {name: p.data for name, p in model.named_parameters() if p.requires_grad and p.dtype.is_floating_point}
        super().__init__(*args, **kwargs)
        # TRL casts a quantized model's adapters to bf16. We keep them fp32 (PEFT's default): they are a few MB,
        # and in bf16 small updates to the token rows round away (and 4-bit gradients lose ~0.5%). Restoring the
        # initial fp32 tensors, not just the dtype, also undoes the rounding of LoRA A and of the fitted tag rows.
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = initial[name].float() if name in initial else param.data.float()
        # distributed.fsdp: the model was sharded by distributed.shard_fsdp and reduces its own gradients. HF's
        # init refuses checkpoints for such a model (no optimizer state); the hooks below save and restore it.
        self._fsdp = is_fsdp_sharded(self.model)
        self.is_distributed_loading_by_transformers |= self._fsdp
        self.lambda_ = lambda_
        self.checkpoint_info = checkpoint_info or {}  # recorded in each checkpoint's marker (resume checks it)
        self.lambda_warmup_steps = lambda_warmup_steps
        self.loss_chunk_size = loss_chunk_size
        # per mode, since the last log: [response NLL sum, witness NLL sum, response tokens, witness tokens,
        # plain response tokens]; with response weights the first and third are row-weighted, the fifth is not
        self._span_totals = {mode: torch.zeros(5, dtype=torch.float64) for mode in ("train", "eval")}
        self._weighted = {mode: False for mode in ("train", "eval")}  # did this log window use response weights?

    def current_lambda(self, training: bool = True) -> float:
        """lambda, ramped linearly from 0 over the warm-up steps during training; evaluation uses the target."""
        if not training or self.lambda_warmup_steps <= 0:
            return self.lambda_
        return self.lambda_ * min(1.0, self.state.global_step / self.lambda_warmup_steps)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """[response, witness] target counts of the whole window; the response count row-weighted (float64)
        when the batches carry `response_weights`, so the weighted mean stays exact under accumulation and DDP."""
        if not batch_samples:
            return None
        counts = sum(count_span_tokens(batch["span_roles"], batch.get("response_weights"))
                     for batch in batch_samples).to(device)
        if self.args.world_size > 1:
            counts = self.accelerator.gather(counts).view(-1, 2).sum(dim=0)
        return counts

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        # Response weights shape what is trained; evaluation measures the plain NLL of every row. TRL's eval step
        # passes no window counts, so an eval batch is its own mean; ignoring any that come keeps them unweighted.
        weights = inputs.get("response_weights") if model.training else None
        if not model.training:
            num_items_in_batch = None
        hidden = final_hidden_states(model, inputs["input_ids"], inputs.get("attention_mask"), inputs.get("position_ids"),
                                     **{key: inputs[key] for key in PACKED_ATTENTION_KEYS if key in inputs})
        targets = span_targets(inputs["input_ids"], inputs["span_roles"], weights)
        result = span_loss(hidden, targets, unwrap_causal_lm(model).get_output_embeddings(),
                           self.current_lambda(model.training), denominators=num_items_in_batch,
                           chunk_size=self.loss_chunk_size)
        loss = result.loss
        if num_items_in_batch is not None and self.args.world_size > 1:
            loss = loss * self.args.world_size  # DDP averages gradients over ranks; the counts were global
        plain = result.counts[0] if weights is None else count_span_tokens(inputs["span_roles"])[0]
        totals = torch.stack([result.response_nll_sum.double(), result.witness_nll_sum.double(),
                              *result.counts.double(), plain.double()])
        # kept on the device until `log`: a .cpu() here would make every micro-batch wait for the GPU
        self._span_totals[mode] = self._span_totals[mode].to(totals.device) + totals
        self._weighted[mode] |= weights is not None
        return (loss, {"loss": loss}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        totals = self._span_totals[mode]
        if self.args.world_size > 1:
            totals = self.accelerator.reduce(totals.to(self.args.device), reduction="sum")
        totals = totals.cpu()  # one device sync per log line
        if totals[4] + totals[3] > 0:
            prefix = "eval_" if mode == "eval" else ""
            # response_loss is the mean that is optimised: row-weighted when weights are on (sum w*nll / sum w*n)
            response_count = totals[2] if totals[2] > 0 else 1.0
            logs[f"{prefix}response_loss"] = round(float(totals[0] / response_count), 6)
            logs[f"{prefix}witness_loss"] = round(float(totals[1] / totals[3].clamp(min=1)), 6)
            # response_tokens stays a count of tokens (comparable across runs and with the data manifest); the
            # weighted count, response_loss's denominator, gets its own key so the logged mean can be checked
            logs[f"{prefix}response_tokens"] = int(totals[4])
            if self._weighted[mode]:
                logs[f"{prefix}response_weighted_tokens"] = round(float(totals[2]), 4)
            logs[f"{prefix}witness_tokens"] = int(totals[3])
            logs[f"{prefix}lambda"] = self.current_lambda(mode == "train")
        self._span_totals[mode].zero_()
        self._weighted[mode] = False
        super().log(logs, start_time)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise NonFiniteError(f"non-finite loss ({float(loss)}) at optimizer step {self.state.global_step + 1}")
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            raise NonFiniteError(f"non-finite gradient norm ({float(grad_norm)}) at optimizer step "
                                 f"{self.state.global_step + 1}")
        return grad_norm

    def last_finite_loss(self) -> float | None:
        """The newest logged training loss that was a number (for fault messages)."""
        losses = [e["loss"] for e in self.state.log_history if isinstance(e.get("loss"), (int, float))]
        return next((v for v in reversed(losses) if math.isfinite(v)), None)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Restore the adapter into the live parameters on --resume, and refuse a checkpoint that lacks any
        trainable one.

        HF resumes PEFT models with `load_adapter`, which restores what the file holds (the token rows too, with
        PEFT 0.21) but reports only missing LoRA keys, and the Trainer does not read the report: a checkpoint
        without its token rows would silently resume them from their initial values.
        """
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        model = model or self.model
        weights = os.path.join(resume_from_checkpoint, "adapter_model.safetensors")
        if not hasattr(model, "peft_config") or not os.path.exists(weights):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self._fsdp:
            return self._load_sharded_adapter(model, load_file(weights), weights)
        result = set_peft_model_state_dict(model, load_file(weights))
        # missing_keys lists every frozen base weight too; only trainable ones must come from the checkpoint
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        check_adapter_keys(weights, result.unexpected_keys, sorted(k for k in result.missing_keys if k in trainable))

    def _run_epoch(self, *args, **kwargs):
        # HF checks max_steps only after an optimizer step, so resuming a checkpoint at max_steps trained one more
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save the adapter with the token rows inside it, never whole embedding matrices or NaN/Inf.

        The training arguments go out as JSON with secrets masked at every depth (HF's `to_dict` masks only
        top-level `*_token`), not as HF's pickled training_args.bin: a pickle can carry a token and runs code
        when loaded. (Recipes may hold no credential at all: recipe.py refuses them in `training`.)
        """
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model)
        trainable = state_dict or {name: p for name, p in model.named_parameters() if p.requires_grad}
        bad = [name for name, p in trainable.items() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteError(f"refusing to save {output_dir}: {len(bad)} trainable tensor(s) hold NaN/Inf "
                                 f"(first: {bad[0]})")
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, state_dict=state_dict, save_embedding_layers=False)
        usual_permissions(output_dir)
        _unpath_card(os.path.join(output_dir, "README.md"), getattr(model, "peft_config", {}))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        atomic_write_json(os.path.join(output_dir, "training_args.json"), mask_secrets(self.args.to_dict()))

    def _save_checkpoint(self, model, trial) -> None:
        """HF's checkpoint, then a completion marker; older checkpoints rotate out only after it is written."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if not self.args.should_save:
            return
        run_dir = self._get_output_dir(trial=trial)
        write_complete_marker(os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"),
                              {"global_step": self.state.global_step, **self.checkpoint_info}, kind="checkpoint")
        rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)


def _unpath_card(card: str, peft_config: dict) -> None:
    """PEFT's model card names the base as it was loaded, often the user's absolute path: name it by its hub id
    or directory name instead (metadata.public_name), as every card we write does."""
    bases = {c.base_model_name_or_path for c in peft_config.values() if c.base_model_name_or_path}
    if not os.path.isfile(card) or not bases:
        return
    with open(card, encoding="utf-8") as f:
        text = f.read()
    for base in bases:
        text = text.replace(base, public_name(base))
    atomic_write_text(card, text)


class StopOnSignal(TrainerCallback):
    """SIGTERM / SIGINT: finish the current optimizer step, save a checkpoint, stop. A second signal aborts.

    Preemptible machines and schedulers send SIGTERM some seconds before they kill; one step plus a
    checkpoint usually fits in that grace period, and `--resume` then continues exactly.
    """

    def __init__(self):
        self.received: int | None = None  # the signal this process got
        self.stopped = False  # the decision, taken by all ranks together: a signal reached at least one of them
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # second signal: no more waiting
            self.uninstall()
            signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        print(f"\n{signal.Signals(signum).name}: finishing this optimizer step and saving a checkpoint "
              "(send it again to abort at once)", flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        # Under a launcher the signal reaches the ranks at slightly different moments; a rank that stopped alone
        # would leave the others waiting in the next gradient all-reduce, so all of them decide together.
        if any_rank(PartialState(), self.received is not None):
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
        return control
