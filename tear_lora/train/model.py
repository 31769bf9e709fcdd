"""The trainable model: base in 4-bit (bitsandbytes NF4), structural tokens, LoRA + the six token rows (PEFT).

Only two kinds of parameters train: the LoRA matrices and the embedding rows of the six structural tokens
(PEFT's `trainable_token_indices`; on tied models the output layer follows the same rows). Every other
weight, including all other embedding rows, stays bit-identical to the base.
"""

from __future__ import annotations

import functools

import torch

from tear_lora.data.tokens import fit_embeddings, load_tokenizer
from tear_lora.metadata import AdapterError
from tear_lora.recipe import ModelConfig, Recipe

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelLoadError(RuntimeError):
    """The base model or tokenizer could not be loaded (missing dir, no hub access, ...)."""


def load_tokenizer_for(recipe: Recipe):
    cfg = recipe.model
    try:
        return load_tokenizer(cfg.name_or_path, cfg.revision, cfg.trust_remote_code)
    except OSError as e:
        raise ModelLoadError(f"cannot load the tokenizer of '{cfg.name_or_path}' (model.name_or_path): {e}") from None


def quantization_config(cfg: ModelConfig, fsdp: bool = False):
    """NF4 per the recipe. Under FSDP the packed 4-bit bytes are stored as `model.dtype` elements: FSDP shards
    floating-point parameters, and one storage dtype across the model is what bitsandbytes' FSDP-QLoRA support
    expects (the bytes, and so every computation, are the same as with the default uint8 storage)."""
    if not cfg.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                              bnb_4bit_use_double_quant=cfg.double_quant,
                              bnb_4bit_compute_dtype=DTYPES[cfg.compute_dtype],
                              bnb_4bit_quant_storage=DTYPES[cfg.dtype] if fsdp else torch.uint8)


def device_map() -> dict[str, int] | None:
    """Where every model we load goes: the current CUDA device (under a launcher, each rank's own), else the CPU.
    One rule for the base, merged models and the serving base, so two models compared in one process never
    land on different devices."""
    return {"": torch.cuda.current_device()} if torch.cuda.is_available() else None


def load_base(recipe: Recipe, tokenizer, quantize: bool | None = None):
    """The frozen base as trained on: quantized per the recipe, tag rows fitted and initialised."""
    from transformers import AutoModelForCausalLM

    cfg = recipe.model
    quantize = cfg.load_in_4bit if quantize is None else quantize
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, dtype=DTYPES[cfg.dtype], device_map=device_map(),
            quantization_config=quantization_config(cfg, recipe.distributed.fsdp) if quantize else None,
            attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise ModelLoadError(f"cannot load the base model '{cfg.name_or_path}' (model.name_or_path): {e}") from None
    guard_bnb_cpu(model)
    fit_embeddings(model, tokenizer, recipe.tokens.init)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def guard_bnb_cpu(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for AVX512-BF16 CPUs; returns how many layers it guarded.

    bitsandbytes 0.50 repacks a Linear4bit's weight into a layout without a backward pass at its first
    eval-mode forward (an eval loop, `generate`) on such CPUs; training after that gets silently wrong
    gradients. With the flag off every forward uses the standard kernel.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def lora_config(recipe: Recipe, token_ids: list[int], model=None):
    from peft import LoraConfig

    lora = recipe.lora
    token_indices: list[int] | dict[str, list[int]] = list(token_ids)
    if model is not None and not _tied(model):  # untied models train the same rows on the output side too
        token_indices = {_module_name(model, model.get_input_embeddings()): list(token_ids),
                         _module_name(model, model.get_output_embeddings()): list(token_ids)}
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                      use_rslora=lora.use_rslora, use_dora=lora.use_dora, bias=lora.bias, task_type="CAUSAL_LM",
                      trainable_token_indices=token_indices)


def add_adapters(model, recipe: Recipe, token_ids: list[int], gradient_checkpointing: bool = True):
    """Wrap the frozen base in a PEFT model with LoRA and the tag rows as the only trainable parameters."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if recipe.model.upcast_to_fp32 and getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    return use_row_lookup(get_peft_model(model, lora_config(recipe, token_ids, model)))


def use_row_lookup(peft_model):
    """Give every PEFT trainable-token layer of the model the forward of `row_lookup_class()` (no merged
    [vocab, hidden] copies); returns the model."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    for module in peft_model.modules():
        if type(module) is TrainableTokensLayer:
            module.__class__ = row_lookup_class()
    return peft_model


@functools.cache
def row_lookup_class():
    """The class, built on first use: importing PEFT costs seconds that verbs like `plan` never need."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    class RowLookupTokens(TrainableTokensLayer):
        """PEFT's trainable token rows, computed without a merged copy of the matrix.

        PEFT's layer builds `W' = W.index_copy(rows)`, a new [vocab, hidden] tensor, on every forward (the input
        embedding, and the output layer even for the one position `final_hidden_states` asks for), and backward
        gives W' a dense [vocab, hidden] gradient: for Qwen3 two ~0.6 GB tensors per step that only exist to
        carry six rows. Here the frozen matrix does the lookup / projection and the six rows are put in
        afterwards (embedding: the looked-up vectors at the tag ids; output layer: the tag ids' logit columns),
        so gradients reach the rows and nothing else. Parameters, state dict, saving, merging and
        `merge_and_unload` are PEFT's own (only `forward_adapters` differs); a merged or disabled adapter runs
        PEFT's path unchanged.
        """

        def forward_adapters(self, x: torch.Tensor, active_adapters, *args, **kwargs) -> torch.Tensor:
            if self.disable_adapters or not active_adapters or self.merged or len(active_adapters) != 1:
                return super().forward_adapters(x, active_adapters, *args, **kwargs)
            adapter = active_adapters[0]
            base, rows = self.get_base_layer(), self.trainable_tokens_delta[adapter]
            ids = torch.tensor(self.token_indices[adapter], device=rows.device)
            if isinstance(base, torch.nn.Embedding):
                out = base(x, *args, **kwargs)  # the frozen lookup (and any embed_scale the layer applies)
                scale = self._get_embed_scale()
                row_values = rows.to(out.dtype) * (scale.to(out.dtype) if scale is not None else 1)
                where = (x.unsqueeze(-1) == ids).nonzero()  # [n, x.dim() + 1]: position..., which row
                if where.numel() == 0:
                    return out + 0 * row_values.sum()  # keep the rows in the graph (zero gradient, DDP-safe)
                return out.index_put(tuple(where[:, :-1].T), row_values[where[:, -1]])
            if isinstance(base, torch.nn.Linear):
                # 2-D: a 3-D input can make matmul expand the [vocab, hidden] weight for bmm and copy it whole
                flat = x.reshape(-1, x.shape[-1])
                out = torch.nn.functional.linear(flat, base.weight)  # frozen columns; tag columns replaced below
                out = out.index_copy(-1, ids, torch.nn.functional.linear(flat, rows.to(flat.dtype)).to(out.dtype))
                return out.reshape(*x.shape[:-1], out.shape[-1])
            return super().forward_adapters(x, active_adapters, *args, **kwargs)

    return RowLookupTokens


def _tied(model) -> bool:
    output = model.get_output_embeddings()
    return output is None or output.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def _module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module).rsplit(".", 1)[-1]


def trainable_breakdown(model) -> dict[str, int]:
    """Parameter counts: LoRA, structural token rows, all trainable, and the base model (4-bit packed counted
    as the original number of weights)."""
    counts = {"lora": 0, "token_rows": 0, "other_trainable": 0, "trainable": 0, "base": 0}
    for name, param in model.named_parameters():
        numel = param.numel() * (2 if param.__class__.__name__ == "Params4bit" else 1)  # 2 weights per byte
        if param.requires_grad:
            key = "lora" if "lora_" in name else "token_rows" if "trainable_tokens" in name else "other_trainable"
            counts[key] += numel
            counts["trainable"] += numel
        else:
            counts["base"] += numel
    return counts


def format_breakdown(counts: dict[str, int]) -> str:
    share = 100 * counts["trainable"] / max(counts["base"], 1)
    return (f"trainable parameters: {counts['trainable']:,} ({share:.3f}% of {counts['base']:,} base) = "
            f"LoRA {counts['lora']:,} + structural token rows {counts['token_rows']:,}"
            + (f" + other {counts['other_trainable']:,}" if counts["other_trainable"] else ""))


def check_adapter_keys(source: str, unexpected: list[str], missing: list[str]) -> None:
    """--resume refuses a saved adapter with keys this model lacks, or without one of its trainable tensors: a
    user error (another model's or a damaged checkpoint), so AdapterError, exit 2."""
    if unexpected or missing:
        raise AdapterError(f"{source} does not match this model: unexpected keys {unexpected[:3]}, missing "
                           f"trainable keys {missing[:3]}; resume from a checkpoint of this recipe, or start over")
