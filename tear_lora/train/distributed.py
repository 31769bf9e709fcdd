"""Several processes (`torchrun`, `accelerate launch`): which rank touches the disk, and FSDP sharding.

The engines do the distributed work: torchrun / accelerate start the processes, accelerate's `PartialState`
(created when the SFTConfig is first asked for its device) owns the process group, and DDP reduces the
gradients. What they cannot know is which of our files may be written by whom: the run-dir lock, the work dir,
metadata and the swap belong to the main process alone; the processed-data cache is built by each node's
first process (under its lock, so a shared filesystem builds it once) and read by the others.

FSDP-QLoRA (`distributed.fsdp`): `shard_fsdp` applies torch's own FSDP2 (`fully_shard`) to each decoder layer
and to the root before the Trainer sees the model. accelerate's FSDP2 preparation cannot be used: it fails once
the tied embedding carries PEFT's trainable token rows (its tie detection compares weight identity, and PEFT's
wrapper builds a new merged tensor on each access), leaves uint8-stored 4-bit weights unsharded, and is never
enabled on CPU. A model that already reduces its own gradients is one transformers' Trainer knows how to train
(`is_distributed_loading_by_transformers`: no DDP wrapper, deferred reduction under gradient accumulation);
TearTrainer saves and restores its adapter and optimizer state with torch.distributed.checkpoint's full state dicts
(the `FsdpCheckpointing` hooks below, mixed into TearTrainer).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def process_state(args):
    """accelerate's process state for these training arguments (initialises the process group under a launcher).

    TrainingArguments sets up devices lazily; asking for `args.device` here, before the base model loads, is
    what maps each rank to its own GPU (`load_base` places the model on the current device).
    """
    from accelerate import PartialState

    args.device  # noqa: B018 - the property's side effect is the point
    return PartialState()


def from_main(state, make: Callable[[], T]) -> T:
    """`make()` run on the main process only; every rank gets its (picklable) result.

    If `make` raises on the main process the others wait in the broadcast until the launcher, seeing the main
    process exit with an error, stops them: torchrun's default is to tear the whole group down.
    """
    if state.num_processes == 1:
        return make()
    from accelerate.utils import broadcast_object_list

    box = [make() if state.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def any_rank(state, flag: bool) -> bool:
    """True on every rank when `flag` is true on any of them (for decisions all ranks must take together)."""
    if state.num_processes == 1:
        return flag
    import torch
    from accelerate.utils import reduce

    return bool(reduce(torch.tensor([float(flag)], device=state.device), reduction="sum").item() > 0)


def shard_fsdp(peft_model, state) -> None:
    """Shard a PEFT-wrapped causal LM in place over all ranks: one FSDP2 unit per decoder layer, the input
    embedding as a unit of its own when it is not tied to the output layer, and the root.

    The root (output layer with its tag rows, final norm; the embedding too when tied) is not resharded after
    forward: the span loss projects hidden states through the output layer's weight after the model's forward
    has returned, and it needs the whole weight there, not this rank's shard.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(state.device.type, (state.num_processes,))
    causal_lm = peft_model.get_base_model()
    for layer in causal_lm.get_decoder().layers:
        fully_shard(layer, mesh=mesh)
    if not causal_lm.config.get_text_config().tie_word_embeddings:
        fully_shard(causal_lm.get_input_embeddings(), mesh=mesh)  # PEFT's wrapper: frozen matrix + tag rows
    fully_shard(causal_lm, mesh=mesh, reshard_after_forward=False)


def is_fsdp_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def reshard(model) -> None:
    """Put every FSDP unit back in its sharded state. The root stays unsharded after a forward with no backward
    (an evaluation), and state-dict code must see the sharded parameters the optimizer holds."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_trainable_state(model) -> dict:
    """Every trainable tensor whole, on CPU, keyed by parameter name. Collective: all ranks call it, in the
    same order; gathering only the adapter keeps the frozen 4-bit base sharded."""
    from torch.distributed.tensor import DTensor

    reshard(model)
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            value = param.detach()
            state[name] = (value.full_tensor() if isinstance(value, DTensor) else value).cpu()
    return state


def teardown() -> None:
    """Destroy the process group a launcher run created, so the processes exit without gloo/NCCL warnings."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class FsdpCheckpointing:
    """Trainer hooks for a model sharded by `shard_fsdp` (mixed in before SFTTrainer; `self._fsdp` says whether
    this run is sharded, and every hook defers to HF's own when it is not).

    HF would write rank 0's shard alone and cannot defer gradient reduction for a model it did not shard: these
    gather / scatter the whole adapter and optimizer state with torch.distributed.checkpoint instead.
    """

    _fsdp = False

    def _load_sharded_adapter(self, model, saved: dict, source: str) -> None:
        """--resume under FSDP: the saved adapter's keys are parameter names without the adapter-name segment;
        torch.distributed.checkpoint scatters each whole tensor into this rank's shard."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from .model import check_adapter_keys

        adapter = model.active_adapter
        names = {".".join(part for part in name.split(".") if part != adapter): name
                 for name, p in model.named_parameters() if p.requires_grad}
        check_adapter_keys(source, sorted(set(saved) - set(names)), sorted(set(names) - set(saved)))
        set_model_state_dict(model, {names[key]: tensor for key, tensor in saved.items()},
                             options=StateDictOptions(full_state_dict=True, strict=False))

    @contextlib.contextmanager
    def _defer_fsdp_gradient_reduction(self):
        """Accumulation micro-batches under FSDP keep their gradients local until the window's last one (HF's
        version reads `config.distributed_config`, which only a model sharded by from_pretrained has)."""
        self.model.set_requires_gradient_sync(False)  # PeftModel forwards it to the FSDP root, which recurses
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self._fsdp:
            return super().save_model(output_dir, _internal_call)
        state = full_trainable_state(self.model)  # every rank takes part in the gathers
        self._save(output_dir, state_dict=state)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Under FSDP the optimizer state is sharded like the parameters: gather it whole (every rank), write it
        once. HF's default would write rank 0's shard alone."""
        if not self._fsdp:
            return super()._save_optimizer_and_scheduler(output_dir)
        import torch
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

        reshard(self.model)
        state = get_optimizer_state_dict(self.model, self.optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.args.should_save:
            torch.save(state, os.path.join(output_dir, OPTIMIZER_NAME))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not self._fsdp or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        import torch
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

        state = torch.load(os.path.join(checkpoint, OPTIMIZER_NAME), map_location="cpu", weights_only=True)
        set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))
