"""Speed and memory switches (speed.py): each one that changes the computation trains exactly the same step as
without it, and the ones this machine cannot run are off here with a note, or refused with one line."""

import functools
import types
from unittest import mock

import pytest
import torch

from tear_lora.recipe import RecipeError
from tear_lora.train.speed import LIGER_KERNELS, machine_switches

from ..conftest import REPO, SGD, make_recipe, make_trainer, trainable_model, trainable_state


@pytest.fixture(scope="module")
def four_rows(eval_rows):
    return eval_rows.select(range(4))


def one_step(tmp_path, tiny_model_dir, tokenizer, rows, name, training, patch=None):
    """The change one optimizer step makes to every trainable tensor, and the trainer."""
    recipe = make_recipe(tiny_model_dir, tmp_path, training={**SGD, "per_device_train_batch_size": 2,
                                                             "gradient_accumulation_steps": 2, **training})
    model = trainable_model(recipe, tokenizer)
    before = trainable_state(model)
    with patch or mock.patch.dict({}):
        trainer = make_trainer(model, recipe, tokenizer, rows, tmp_path / name)
        trainer.train()
    after = trainable_state(model)
    return {n: after[n] - before[n] for n in before}, trainer


def assert_same_step(a, b, rtol=1e-5):
    assert any(d.abs().max() > 0 for d in a.values())
    for name, delta in a.items():  # relative error of each tensor's update, as tests/train/test_trainer.py measures it
        assert (delta - b[name]).norm() <= rtol * b[name].norm(), name


def test_checkpoint_offload_trains_the_same_step(tmp_path, tiny_model_dir, tokenizer, four_rows):
    """transformers' `activation_checkpointing_kwargs: {offload: true}`: every checkpoint under save_on_cpu, here
    unpinned (pinned memory needs an accelerator): a copy into host memory and back, the same gradients."""
    ref, _ = one_step(tmp_path, tiny_model_dir, tokenizer, four_rows, "plain", {})
    packed = []

    def unpinned(pin_memory, device_type):
        packed.append(device_type)
        return torch.autograd.graph.save_on_cpu(pin_memory=False, device_type=device_type)

    patch = mock.patch("transformers.modeling_utils.save_on_cpu", unpinned)
    with mock.patch("tear_lora.train.runner.machine_switches", lambda training, cuda, source: []):
        offloaded, _ = one_step(tmp_path, tiny_model_dir, tokenizer, four_rows, "offload",
                                {"activation_checkpointing_kwargs": {"offload": True}}, patch)
    assert len(packed) >= 2 * 2  # two layers, two micro-batches: the switch reached every checkpoint
    assert_same_step(offloaded, ref)


def test_trl_activation_offloading_trains_the_same_step(tmp_path, tiny_model_dir, tokenizer, four_rows):
    """TRL's `activation_offloading` (what the recipe switch turns on on a GPU), made to run on CPU: the saved
    tensors go through its pack/unpack hooks (a host copy each), and the step is the same."""
    from trl.models.activation_offloading import get_act_offloading_ctx_manager

    ref, _ = one_step(tmp_path, tiny_model_dir, tokenizer, four_rows, "plain", {})
    made = []

    def cpu_offloader(model):  # the offloader reads the accelerator once, when it is made
        with mock.patch.object(torch.accelerator, "current_accelerator", functools.partial(torch.device, "cpu")):
            made.append(get_act_offloading_ctx_manager(model, use_pin_memory=False, use_streams=False))
        cpu = {name: getattr(torch.cpu, name) for name in dir(torch.cpu) if not name.startswith("_")}
        made[-1].device_module = types.SimpleNamespace(**cpu, empty_cache=lambda: None)  # torch.cpu has no cache
        return made[-1]

    patch = mock.patch.multiple("trl.trainer.sft_trainer", get_act_offloading_ctx_manager=cpu_offloader)
    with mock.patch("tear_lora.train.runner.machine_switches", lambda training, cuda, source: []):
        offloaded, trainer = one_step(tmp_path, tiny_model_dir, tokenizer, four_rows, "trl",
                                      {"activation_offloading": True}, patch)
    assert made and made[0].tensor_id > 0  # tensors were packed by TRL's offloader
    assert_same_step(offloaded, ref)


def test_fused_adamw_is_the_same_update(tmp_path, tiny_model_dir, tokenizer, four_rows):
    """`optim: adamw_torch_fused` (one multi-tensor kernel) makes the same AdamW update as `adamw_torch`."""
    adam = {"optim": "adamw_torch", "learning_rate": 1e-3, "max_steps": 2}
    ref, _ = one_step(tmp_path, tiny_model_dir, tokenizer, four_rows, "foreach", adam)
    fused, trainer = one_step(tmp_path, tiny_model_dir, tokenizer, four_rows, "fused",
                              adam | {"optim": "adamw_torch_fused"})
    assert trainer.optimizer.defaults.get("fused") is True
    assert_same_step(fused, ref, rtol=1e-5)


def test_switches_off_on_cpu_with_a_note():
    training = {"activation_offloading": True, "use_liger_kernel": True,
                "activation_checkpointing_kwargs": {"offload": True, "use_reentrant": False}}
    notes = machine_switches(training, cuda=False)
    assert training == {"activation_offloading": False, "use_liger_kernel": False,
                        "activation_checkpointing_kwargs": {"offload": False, "use_reentrant": False}}
    assert len(notes) == 3
    on_gpu = {"activation_offloading": True, "activation_checkpointing_kwargs": {"offload": True}}
    assert machine_switches(on_gpu, cuda=True) == [] and on_gpu["activation_offloading"]


def test_liger_on_cuda_gets_our_kernel_set_or_a_clear_refusal():
    with mock.patch("tear_lora.train.speed.liger_installed", lambda: True):
        training = {"use_liger_kernel": True, "liger_kernel_config": {"rope": False}}
        assert machine_switches(training, cuda=True) == []
        assert training["liger_kernel_config"] == LIGER_KERNELS | {"rope": False}
    with mock.patch("tear_lora.train.speed.liger_installed", lambda: False):
        with pytest.raises(RecipeError, match=r"pip install 'tear_lora\[gpu\]'"):
            machine_switches({"use_liger_kernel": True}, cuda=True)
    for cuda in (False, True):  # refused everywhere: our loss replaces the model's
        with pytest.raises(RecipeError, match="fused_linear_cross_entropy must be false"):
            machine_switches({"use_liger_kernel": True, "liger_kernel_config": {"fused_linear_cross_entropy": True}},
                             cuda=cuda)


def test_liger_recipe_switch_is_not_applied_on_cpu(tmp_path, tiny_model_dir, tokenizer, four_rows):
    """A GPU recipe with Liger on trains on CPU with the model's own modules (HF would otherwise import Liger)."""
    from tear_lora.train.runner import sft_config

    recipe = make_recipe(tiny_model_dir, tmp_path, training={**SGD, "use_liger_kernel": True})
    notes = []
    assert sft_config(recipe, tmp_path / "o", notes=notes).use_liger_kernel is False and "Triton" in notes[0]
    model = trainable_model(recipe, tokenizer)
    make_trainer(model, recipe, tokenizer, four_rows, tmp_path / "out").train()
    assert not any("liger" in type(m).__name__.lower() for m in model.modules())


def test_validate_refuses_liger_loss_kernels_in_one_line(tmp_path, tiny_model_dir, capsys):
    import yaml

    from tear_lora.cli import main

    path = tmp_path / "r.yaml"
    raw = yaml.safe_load((REPO / "recipes" / "tiny-cpu.yaml").read_text())
    raw["model"]["name_or_path"] = str(tiny_model_dir)
    raw["training"] |= {"use_liger_kernel": True, "liger_kernel_config": {"cross_entropy": True}}
    path.write_text(yaml.safe_dump(raw))
    assert main(["recipe", "validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "liger_kernel_config.cross_entropy must be false" in err[0]
