"""Per-step speed and memory switches of a recipe's `training` section, checked against this machine.

Every switch is an SFTConfig / TrainingArguments field, so the libraries do the work; this module only decides
what a recipe written for a GPU may do on the machine it runs on, and refuses what would silently not happen:

- `activation_offloading` (TRL's torchtune-style `OffloadActivations`: what a step saves for backward, under
  activation checkpointing the layer inputs, goes to pinned host memory on a side stream). It needs an
  accelerator (`torch.accelerator.current_accelerator()`), so on CPU it is switched off with a note: the
  activations are in host memory already.
- `activation_checkpointing_kwargs: {offload: true}` (transformers: each checkpoint under
  `torch.autograd.graph.save_on_cpu(pin_memory=True)`, the copies on the compute stream). On a machine without an
  accelerator transformers 5.24 still asks for pinned memory, which fails at the first step; off on CPU too.
- `use_liger_kernel` + `liger_kernel_config` (Liger's Triton RMSNorm / RoPE / SwiGLU, the `[gpu]` extra): on
  CUDA only. The output-layer kernels (`fused_linear_cross_entropy`, `cross_entropy`) are refused: our span loss
  (loss.py) replaces the model's loss, so they would patch a head that never computes a loss here.
- `optim: adamw_torch_fused` (one multi-tensor kernel for all ~400 LoRA tensors) and `lora.dropout: 0` (PEFT then
  skips the dropout kernel and its saved copy) need no checking: the libraries take them as they are.
"""

from __future__ import annotations

import importlib.util

from tear_lora.recipe import RecipeError

LIGER_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "fused_linear_cross_entropy": False,
                 "cross_entropy": False}  # what Liger may replace under our loss, by apply_liger_kernel_to_* flag
LIGER_LOSS_KERNELS = ("fused_linear_cross_entropy", "cross_entropy")


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def machine_switches(training: dict, cuda: bool, source: str = "recipe") -> list[str]:
    """Adjust `training` (SFTConfig keyword arguments, changed in place) to this machine; returns notes.
    A switch that cannot work anywhere with our loss raises RecipeError (exit 2)."""
    notes = []
    if training.get("activation_offloading") and not cuda:
        training["activation_offloading"] = False
        notes.append("training.activation_offloading: off on CPU (TRL's offloader needs an accelerator; the "
                     "activations are in host memory already)")
    checkpointing = dict(training.get("activation_checkpointing_kwargs") or {})
    if checkpointing.get("offload") and not cuda:
        training["activation_checkpointing_kwargs"] = checkpointing | {"offload": False}
        notes.append("training.activation_checkpointing_kwargs.offload: off on CPU (pinned memory needs an "
                     "accelerator; the checkpoints are in host memory already)")
    if training.get("use_liger_kernel"):
        config = dict(LIGER_KERNELS) | dict(training.get("liger_kernel_config") or {})
        loss_kernels = [k for k in LIGER_LOSS_KERNELS if config.get(k)]
        if loss_kernels:
            raise RecipeError(f"{source}: training.liger_kernel_config.{loss_kernels[0]} must be false: the span "
                              "loss replaces the model's loss, Liger's loss kernels would never run")
        if not cuda:
            training["use_liger_kernel"] = False
            notes.append("training.use_liger_kernel: off on CPU (Liger's kernels are Triton, CUDA only)")
        elif not liger_installed():
            raise RecipeError(f"{source}: training.use_liger_kernel needs the liger-kernel package: "
                              "pip install 'tear_lora[gpu]' (or set it to false)")
        else:
            training["liger_kernel_config"] = config
    return notes
