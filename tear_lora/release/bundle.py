"""`tear-lora bundle`: adapters of one base -> one serving base + one plain LoRA per λ, for inference servers.

Why a rewrite is needed: no serving engine loads our adapters as trained. Besides LoRA they hold the six tag rows
as PEFT `trainable_tokens_delta` (absolute rows R_λ), which llama.cpp's converter and vLLM reject. With E the
serving base's rows for the six ids, Δ_λ = R_λ − E is exactly a rank-≤6 update: of the embedding (one-hot at the
six ids × Δ_λ) and of the output layer (Δ_λ × one-hot). So each adapter becomes plain LoRA, without retraining and
without approximation, on one serving base whose output layer is untied (a tied output layer reads the embedding
by name in llama.cpp, so an embedding LoRA could not also reach the output side).

The serving base is the base dequantized exactly as `merge` does (export.load_merge_base), with the tags at the
rows training started from (`tokens.init`; any fixed E works, since each Δ_λ is taken against it), `lm_head` a
copy of the embedding, the chat template and stop tokens of `merge`. Each LoRA keeps its trained matrices (padded
to one rank r ≥ 6 where needed, B rescaled so the engine's alpha/r gives the trained update) and gains
`embed_tokens` (`lora_embedding_A/B`) and `lm_head` (`lora_A/B`) one-hot updates. With `--gguf`, the base goes
through gguf_export.write_gguf and each LoRA through llama.cpp's own convert_lora_to_gguf.py (llama_server.py).

On disk the bundle is built like a merge output: hidden sibling build dir, verified there when asked, completion
marker last, swapped in under a lock; `bundle.json` (kind "tear_lora-bundle") is its metadata and manifest.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from tear_lora.adapters import open_adapters
from tear_lora.metadata import DEFAULT_SEED, AdapterError, public_name, read_metadata, same_base
from tear_lora.rundir import (
    atomic_write_json,
    atomic_write_text,
    check_run_name,
    replacing,
    usual_permissions,
    write_complete_marker,
)

BUNDLE_FILE = "bundle.json"
BUNDLE_KIND = "tear_lora-bundle"  # bundle.json's own kind field
BUNDLE_KIND_SHORT = "bundle"  # the completion marker's kind (rundir.check_replaceable)
BASE_DIR = "base"
ADAPTERS_DIR = "adapters"
GGUF_TYPES = ("f16", "q8_0")


class BundleError(AdapterError):
    """Adapters that cannot share a serving base, or an --out the bundle must not replace; exit status 2."""


# ---- refusals -------------------------------------------------------------------------------------------------


def check_adapters(adapters: list[Path]) -> list[dict]:
    """Each adapter's tear_lora.json; refuses adapters that cannot share one serving base (reason named)."""
    from peft import LoraConfig

    metas = [read_metadata(a) for a in adapters]
    for path, meta in zip(adapters, metas):
        if "merged" in meta or not (path / "adapter_config.json").is_file():
            raise BundleError(f"{path}: a merged model dir, not an adapter dir; bundle takes the adapters "
                              "(adapters/<run>) it was merged from, or serve the merged dir with `merge --gguf`")
    first, name = metas[0], adapters[0]
    for path, meta in zip(adapters[1:], metas[1:]):
        if not same_base(first["base"], meta["base"]):
            raise BundleError(f"{path}: trained on base {meta['base']['name_or_path']!r}, {name} on "
                              f"{first['base']['name_or_path']!r} (different weights); a bundle serves adapters "
                              "of one base: bundle them separately")
        if meta["tokenizer"]["hash"] != first["tokenizer"]["hash"]:
            raise BundleError(f"{path}: its tokenizer (hash {meta['tokenizer']['hash']}) differs from {name}'s "
                              f"({first['tokenizer']['hash']}); bundle them separately")
        if meta.get("structural_tokens") != first.get("structural_tokens"):
            raise BundleError(f"{path}: its tag ids {meta.get('structural_tokens')} differ from {name}'s "
                              f"{first.get('structural_tokens')}; one serving base has one set of tag ids")
        if meta.get("quantization") != first.get("quantization"):
            raise BundleError(f"{path}: trained on the base quantized as {meta.get('quantization')}, {name} as "
                              f"{first.get('quantization')}; each needs its own dequantized serving base: bundle "
                              "them separately")
    for path in adapters:
        config = LoraConfig.from_pretrained(str(path))
        problem = ("DoRA (use_dora)" if config.use_dora else f"bias={config.bias!r}" if config.bias != "none"
                   else "per-module ranks or alphas" if config.rank_pattern or config.alpha_pattern
                   else "modules_to_save" if config.modules_to_save
                   else "a target_modules pattern" if isinstance(config.target_modules, str) else None)
        if problem:
            raise BundleError(f"{path}/adapter_config.json: {problem} has no plain-LoRA form that llama.cpp and "
                              "vLLM apply; serve it with `tear-lora merge` instead")
    return metas


def adapter_names(metas: list[dict], adapters: list[Path]) -> list[str]:
    """Run names (checked as plain names), made unique: the bundle's sub-directory and server names."""
    names: list[str] = []
    for meta, path in zip(metas, adapters):
        name = label = meta.get("run_name") or path.name
        if check_run_name(name):
            raise BundleError(f"{path}/tear_lora.json: run_name {name!r} {check_run_name(name)}")
        n = 2
        while label in names:
            label, n = f"{name}-{n}", n + 1
        names.append(label)
    return names


# ---- the rewrite ----------------------------------------------------------------------------------------------


def untie(model) -> None:
    """Give the output layer its own copy of the embedding (llama.cpp: an output LoRA needs `output.weight`)."""
    embed, output = model.get_input_embeddings(), model.get_output_embeddings()
    if output.weight.data_ptr() == embed.weight.data_ptr():
        output.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False


def module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def trained_rows(weights: dict, config, module: str, fallback: str | None = None) -> tuple[list[int], torch.Tensor] | None:
    """(ids, absolute rows) PEFT trained for `module` (a full module name); a tied output layer has none of its
    own and follows the embedding's (`fallback`)."""
    for key, rows in weights.items():
        if key.endswith(".token_adapter.trainable_tokens_delta"):
            owner = key.removeprefix("base_model.model.").removesuffix(".token_adapter.trainable_tokens_delta")
            if owner == module:
                indices = config.trainable_token_indices
                if isinstance(indices, dict):
                    indices = next(v for k, v in indices.items() if module == k or module.endswith(f".{k}"))
                return list(indices), rows.float()
    return trained_rows(weights, config, fallback) if fallback else None


def write_plain_lora(model, adapter_dir: Path, out_dir: Path, base_path: str) -> dict:
    """The adapter as plain LoRA on the untied serving base `model` (left unchanged): trained LoRA (padded to a
    rank ≥ 6 if needed) + one-hot `embed_tokens` / `lm_head` updates carrying Δ_λ. Returns rank, alpha, ids."""
    from peft import LoraConfig, get_peft_model, load_peft_weights, set_peft_model_state_dict

    trained = LoraConfig.from_pretrained(str(adapter_dir))
    weights = load_peft_weights(str(adapter_dir), device="cpu")
    embed_name = module_name(model, model.get_input_embeddings())
    head_name = module_name(model, model.get_output_embeddings())
    if any(n in set(trained.target_modules) for n in (embed_name, head_name, "embed_tokens", "lm_head")):
        raise BundleError(f"{adapter_dir}: its LoRA already targets the embedding or output layer; serve it with "
                          "`tear-lora merge` instead")
    ids_in, rows_in = trained_rows(weights, trained, embed_name)
    ids_out, rows_out = trained_rows(weights, trained, head_name, fallback=embed_name)
    delta_in = rows_in - model.get_input_embeddings().weight[ids_in].detach().float()
    delta_out = rows_out - model.get_output_embeddings().weight[ids_out].detach().float()

    rank = max(trained.r, len(ids_in), len(ids_out))
    old_scaling = trained.lora_alpha / (trained.r ** 0.5 if trained.use_rslora else trained.r)
    scaling = trained.lora_alpha / rank
    lora = {}
    for key, value in weights.items():
        if ".lora_A." in key:
            lora[key] = torch.cat([value, value.new_zeros(rank - value.shape[0], value.shape[1])])
        elif ".lora_B." in key:
            padded = torch.cat([value, value.new_zeros(value.shape[0], rank - value.shape[1])], dim=1)
            lora[key] = padded if old_scaling == scaling else padded * (old_scaling / scaling)
    config = LoraConfig(r=rank, lora_alpha=trained.lora_alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=sorted(set(trained.target_modules) | {embed_name, head_name}))
    peft_model = get_peft_model(model, config)
    try:
        result = set_peft_model_state_dict(peft_model, lora)
        if result.unexpected_keys:
            raise BundleError(f"{adapter_dir}: LoRA weights the model has no place for: {result.unexpected_keys[:3]}")
        modules = dict(peft_model.base_model.model.named_modules())
        embed, head = modules[embed_name], modules[head_name]
        with torch.no_grad():  # embedding: Δ row k = scaling * B[:, k] * A[k, id_k]; output: row id_k = scaling * A[k]
            a = embed.lora_embedding_A["default"]
            a.zero_()
            a[torch.arange(len(ids_in)), ids_in] = 1.0
            b = embed.lora_embedding_B["default"]
            b.zero_()
            b[:, : len(ids_in)] = (delta_in / scaling).T.to(b.dtype)
            a = head.lora_A["default"].weight
            a.zero_()
            a[: len(ids_out)] = (delta_out / scaling).to(a.dtype)
            b = head.lora_B["default"].weight
            b.zero_()
            b[ids_out, torch.arange(len(ids_out))] = 1.0
        peft_model.peft_config["default"].base_model_name_or_path = base_path
        peft_model.save_pretrained(str(out_dir), save_embedding_layers=False)
        loaded, card = getattr(model, "name_or_path", None), out_dir / "README.md"
        if loaded and card.is_file():  # PEFT's card names the base as loaded (the user's path): the bundle's base/
            atomic_write_text(card, card.read_text(encoding="utf-8").replace(str(loaded), base_path))
    finally:
        peft_model.unload()  # the LoRA layers out again: `model` is the serving base for the next adapter
    return {"r": rank, "lora_alpha": trained.lora_alpha, "trained_r": trained.r, "tag_ids": ids_in}


# ---- the bundle -----------------------------------------------------------------------------------------------


def bundle(adapters, out_dir, gguf: str | None = None, dtype: str = "bf16", base: str | None = None,
           trust_remote_code: bool = False, verify_rows: int | None = None, verify_data=None,
           overwrite: bool = False) -> Path:
    """Write the serving bundle of `adapters` to `out_dir` (with `verify_rows`, verify.json too), all or
    nothing, by rundir's one rule: built in a hidden sibling, marked complete last, swapped in under a lock;
    an existing `out_dir` is replaced only when it is a bundle of ours and `overwrite`, re-checked at the swap."""
    from .llama_server import converter_script
    from .merge import EXPORT_DTYPES

    adapters, out_dir = [Path(a) for a in adapters], Path(out_dir)
    if not adapters:
        raise BundleError("bundle needs at least one adapter dir")
    if dtype not in EXPORT_DTYPES:
        raise BundleError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    if gguf is not None:
        if gguf not in GGUF_TYPES:
            raise BundleError(f"--gguf must be one of {', '.join(GGUF_TYPES)}, got {gguf!r}")
        from .gguf import require_converter

        require_converter()
        converter_script()  # both converters found now, not after the base is written
    metas = check_adapters(adapters)
    names = adapter_names(metas, adapters)
    with replacing(out_dir, BUNDLE_KIND_SHORT, BUNDLE_FILE, overwrite, "pass --overwrite", "bundle",
                   legacy=True) as build:
        opened = open_adapters(adapters, base, trust_remote_code, metas)  # read once: the bundle and --verify
        manifest = _write_bundle(opened, names, build, gguf, dtype, trust_remote_code,
                                 bool(verify_rows) and not verify_data)
        if verify_rows:
            from .bundle_verify import verify_bundle

            verify_bundle(build, opened, manifest, verify_data, verify_rows, trust_remote_code)
        from .bundle_card import write_bundle_card

        write_bundle_card(build, out_dir.name)
        write_complete_marker(build, kind=BUNDLE_KIND_SHORT)
    return out_dir


def adapter_seed(adapter) -> int:
    """The seed an adapter was trained with: tear_lora.json records it; an adapter older than that field has it
    in its own recipe.yaml (an adapter opened `like` another carries the first one's recipe, so read its own)."""
    if adapter.metadata.get("seed") is not None:
        return adapter.metadata["seed"]
    from tear_lora.adapters import adapter_recipe

    return adapter_recipe(adapter.dir).training.get("seed", DEFAULT_SEED)


def public_meta(meta: dict) -> dict:
    """An adapter's tear_lora.json as the bundle publishes it: the base by hub id or directory name, data files
    by file name (as merge's cards do, metadata.public_name): never the user's absolute paths."""
    meta = copy.deepcopy(meta)
    meta["base"]["name_or_path"] = public_name(meta["base"]["name_or_path"])
    for split in (meta.get("data") or {}).values():
        if isinstance(split, dict) and isinstance(split.get("source"), str):
            split["source"] = Path(split["source"]).name
    return meta


def _write_bundle(opened, names, build: Path, gguf, dtype, trust_remote_code,
                  needs_eval_file: bool) -> dict:
    """Serving base (HF dir, GGUF), one plain LoRA (and LoRA GGUF) per adapter, bundle.json; returns the manifest.
    `opened`: the adapters as open_adapters read them (one base, checked)."""
    from tear_lora.data import template

    from .llama_server import convert_lora
    from .merge import EXPORT_DTYPES, generation_config, load_merge_base

    recipe, tokenizer = opened[0].recipe, opened[0].tokenizer
    if needs_eval_file and not recipe.data.eval_file:
        raise BundleError(f"{opened[0].dir}: the recipe has no data.eval_file; pass --data FILE for --verify")
    model = load_merge_base(recipe, tokenizer, "dequantized", EXPORT_DTYPES[dtype]).eval()
    untie(model)
    model.generation_config = generation_config(model, tokenizer)
    model.save_pretrained(build / BASE_DIR)
    tokenizer.chat_template = template.chat_template_for(tokenizer)
    tokenizer.save_pretrained(build / BASE_DIR)
    entries = []
    for adapter, name in zip(opened, names):
        peft_dir = f"{ADAPTERS_DIR}/{name}"
        lora = write_plain_lora(model, adapter.dir, build / peft_dir, BASE_DIR)  # its base: the bundle's base/
        seed = adapter_seed(adapter)  # page headers
        entries.append({"name": name, "lambda": adapter.metadata.get("lambda"), "seed": seed, "peft_dir": peft_dir,
                        "gguf": None, "source": adapter.dir.name, "lora": lora, "tear_lora": public_meta(adapter.metadata)})
    del model
    base_gguf = None
    if gguf:
        from .gguf import write_gguf

        base_gguf = f"{BASE_DIR}-{gguf}.gguf"
        write_gguf(build / BASE_DIR, gguf, build / base_gguf, name=f"{opened[0].metadata['run_name']}-serving-base")
        for entry in entries:
            entry["gguf"] = f"{ADAPTERS_DIR}/{entry['name']}-{gguf}.gguf"
            convert_lora(build / entry["peft_dir"], build / BASE_DIR, gguf, build / entry["gguf"], trust_remote_code)
    for pattern in ("**/*.safetensors", "**/*.gguf"):  # safetensors writes 0600: the usual modes, as merge's
        usual_permissions(build, pattern)
    manifest = {"kind": BUNDLE_KIND, "format_version": 1, "base": BASE_DIR, "base_gguf": base_gguf,
                "gguf_type": gguf, "dtype": dtype, "base_model": public_meta(opened[0].metadata)["base"],
                "structural_tokens": opened[0].metadata.get("structural_tokens"), "adapters": entries}
    atomic_write_json(build / BUNDLE_FILE, manifest)
    return manifest
