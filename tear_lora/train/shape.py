"""The shape of a causal LM for `tear-lora plan`: sizes from its config, decoder linears from the model itself.

Why build the model: the linears a decoder layer holds, their names (what `lora.target_modules` matches) and their
widths differ by family (q_proj ... down_proj in Llama and Qwen, query_key_value / dense / dense_h_to_4h /
dense_4h_to_h in GPT-NeoX, q_proj / k_proj / v_proj / dense / fc1 / fc2 in Phi), and transformers knows each
family's layer. So the config is instantiated on the meta device (no weights, no memory: tens of ms for a 1.7B config,
plus the first import of the family's modeling module; docs/performance.md) and one decoder layer's linears are read off it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tear_lora.recipe import RecipeError

SUPPORTED = ("the causal LMs transformers ships (AutoModelForCausalLM: Llama, Qwen, Mistral, Gemma, Phi, GPT-NeoX, "
             "GPT-2, ...)")


class PlanError(RecipeError):
    """No config to plan from, a model the plan cannot build, or (when training on CUDA) a recipe that does not fit
    its GPU."""


class TargetModulesError(PlanError):
    """`lora.target_modules` names a module the model does not have: a recipe error that also stops `train` (PEFT
    would only refuse it when no name matches, with a traceback, and silently skip a typo next to a good name)."""


@dataclass
class Shape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    model_type: str = ""
    layer_linears: dict[str, tuple[int, int]] = field(default_factory=dict)  # name in a decoder layer -> (in, out)
    input_groups: list[tuple[str, ...]] = field(default_factory=list)  # linears that read one tensor
    layer_prefix: str = ""  # the first decoder layer's module name ("model.layers.0")
    module_names: frozenset[str] = frozenset()  # every module of the model, for checking LoRA target names

    @classmethod
    def from_config(cls, config: dict, trust_remote_code: bool = False) -> Shape:
        """Sizes from the config (multimodal configs nest the language model's in `text_config`), the decoder
        layer's linears from the model built on the meta device."""
        model = meta_model(config, trust_remote_code)
        text = model.config.get_text_config()
        c = config.get("text_config") or config
        hidden, layers = text.hidden_size, text.num_hidden_layers
        heads = text.num_attention_heads
        prefix, layer = decoder_layer(model, layers)
        linears = linear_shapes(layer)
        if not linears:
            raise PlanError(f"{type(layer).__name__} ({text.model_type}) holds no linear layers to put LoRA on; "
                            f"`tear-lora plan` and training support {SUPPORTED}")
        # GPT-2's n_inner is None (4 x hidden): then the widest linear input, the MLP's down projection
        intermediate = (getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None)
                        or max(i for i, _ in linears.values()))
        output = model.get_output_embeddings()
        return cls(vocab=model.get_input_embeddings().weight.shape[0], hidden=hidden, layers=layers, heads=heads,
                   kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                   head_dim=getattr(text, "head_dim", None) or hidden // heads, intermediate=intermediate,
                   tied=output is None or output.weight is model.get_input_embeddings().weight,
                   model_type=c.get("model_type", text.model_type), layer_linears=linears,
                   input_groups=input_groups(linears, hidden), layer_prefix=prefix,
                   module_names=frozenset(name for name, _ in model.named_modules()))

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each decoder linear, by its module name within the layer."""
        return dict(self.layer_linears)

    def lora_targets(self, target_modules: list[str] | str, where: str = "lora.target_modules") -> set[str]:
        """The decoder linears LoRA goes on, by PEFT's matching (tuners_utils.check_target_module_exists: a list
        entry names a module or a dotted suffix of its name, a string other than "all-linear" is a regex over the
        whole name; re-stated here because importing PEFT costs seconds `plan` does not need). A list entry that
        names no module of the model is a user error: PEFT would refuse it only when no entry matches."""
        if target_modules == "all-linear":
            return set(self.layer_linears)
        full = {f"{self.layer_prefix}.{name}": name for name in self.layer_linears}
        if isinstance(target_modules, str):
            return {name for key, name in full.items() if re.fullmatch(target_modules, key)}
        unknown = [t for t in target_modules
                   if not any(key == t or key.endswith(f".{t}") for key in self.module_names)]
        if unknown:
            leaves = ", ".join(dict.fromkeys(n.rsplit(".", 1)[-1] for n in self.layer_linears))
            raise TargetModulesError(f"{where}: {', '.join(map(repr, unknown))} names no module of this {self.model_type} "
                            f"model; its decoder linears are {leaves} (or use all-linear)")
        return {name for key, name in full.items() if any(key == t or key.endswith(f".{t}") for t in target_modules)}


def meta_model(config: dict, trust_remote_code: bool = False):
    """The causal LM of this config on the meta device: shapes and module names, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = config.get("model_type")
    try:
        hf_config = AutoConfig.for_model(**config)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, AttributeError, AssertionError) as e:
        why = str(e).split("\n")[0][:160]
        raise PlanError(f"cannot build model_type {model_type!r} from its config ({type(e).__name__}: {why}); "
                        f"`tear-lora plan` supports {SUPPORTED}, not models with their own code") from None


def decoder_layer(model, layers: int):
    """(name, module) of the first decoder layer: item 0 of the first module list as long as the layer count,
    searched in the decoder first (multimodal models also hold a vision tower's layers)."""
    import torch

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    decoder = decoder if decoder is not None else model
    prefix = next((name for name, m in model.named_modules() if m is decoder), "")
    for name, module in decoder.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers:
            return ".".join(p for p in (prefix, name, "0") if p), module[0]
    raise PlanError(f"{type(model).__name__}: no list of {layers} decoder layers (num_hidden_layers) in the model; "
                    f"`tear-lora plan` supports {SUPPORTED}")


def linear_shapes(layer) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear in the layer, in registration order: nn.Linear, and GPT-2's transposed Conv1D
    (which PEFT and bitsandbytes treat as linears too)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    shapes = {}
    for name, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear):
            shapes[name] = (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):
            shapes[name] = (module.weight.shape[0], module.nf)
    return shapes


def input_groups(linears: dict[str, tuple[int, int]], hidden: int) -> list[tuple[str, ...]]:
    """Which linears read the same tensor (LoRA without dropout saves one input per tensor), from the layer's
    structure: in each block (the linears' parent module: attention, MLP) the linears before the last that read
    hidden-width inputs read the block's input, and the last one, writing hidden width back, reads its own (Llama:
    q/k/v | o, gate/up | down; GPT-NeoX: query_key_value | dense, dense_h_to_4h | dense_4h_to_h). Any other layout
    counts one input per linear, an upper bound."""
    blocks: dict[str, list[str]] = {}
    for name in linears:
        blocks.setdefault(name.rpartition(".")[0], []).append(name)
    groups: list[tuple[str, ...]] = []
    for names in blocks.values():
        *readers, last = names
        if readers and all(linears[n][0] == hidden for n in readers) and linears[last][1] == hidden:
            groups += [tuple(readers), (last,)]
        else:
            groups += [(n,) for n in names]
    return groups
