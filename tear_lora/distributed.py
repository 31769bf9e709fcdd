"""Several processes (`torchrun`, `accelerate launch`): which rank touches the disk, and FSDP sharding.

The engines do the distributed work: torchrun / accelerate start the processes, accelerate's `PartialState`
(created when the SFTConfig is first asked for its device) owns the process group, and DDP reduces the
gradients. What they cannot know is which of our files may be written by whom: the run-dir lock, the work dir,
metadata and the swap belong to the main process alone; the processed-data cache is built by each node's
first process (under its lock, so a shared filesystem builds it once) and read by the others.
"""

from __future__ import annotations

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


def teardown() -> None:
    """Destroy the process group a launcher run created, so the processes exit without gloo/NCCL warnings."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
