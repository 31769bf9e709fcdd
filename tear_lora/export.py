"""`tear-lora merge`: an adapter -> a standalone model directory that plain transformers can load.

Why `dequantized` is the default: the adapter was trained on top of the NF4-rounded weights Wq, not the
original W, so the model that was trained (and evaluated) is Wq + BA. Loading the base exactly as in training,
dequantizing every Linear4bit to a plain Linear and merging there reproduces that model (to rounding in the
export dtype). `original` merges into W instead: W + BA differs from the trained model by the quantization
error W - Wq in every layer, an error the adapter never saw; use it only when you want the unquantized base's
behaviour plus the adapter and accept that gap (`--verify` measures it).

Merging into a model that is still 4-bit is refused: PEFT would add BA to the dequantized weights and round
the sum back to NF4, whose step (~1/8 of each block's largest weight) is larger than most LoRA updates, so
most of the adapter would vanish in the rounding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .adapters import METADATA_FILE, AdapterError, AdapterSet, adapter_recipe, check_base
from .model import load_base, load_tokenizer_for
from .tokens import WITNESS_CLOSE, structural_token_ids

EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# --verify passes when all three hold (merged model vs 4-bit base + adapter, over every position of each row).
# fp32 agrees to float rounding. bf16/fp16 round every merged weight to 8/11 significant bits (~0.2%/0.05%),
# far below NF4's per-weight error (~10%), so their KL bound stays well under what an `original` merge of a real
# model shows; max |Δlogit| is loose because large logits carry large absolute rounding, and top-1 because
# near-ties flip under any rounding (the flat distributions of a random tiny model have many).
TOLERANCES = {
    "fp32": {"max_abs_logit": 1e-3, "mean_kl": 1e-6, "top1": 0.999},
    "fp16": {"max_abs_logit": 0.5, "mean_kl": 5e-4, "top1": 0.97},
    "bf16": {"max_abs_logit": 1.0, "mean_kl": 1e-3, "top1": 0.95},
}
DEFAULT_VERIFY_ROWS = 16


class MergeError(AdapterError):
    """A merge that would produce something other than the trained model, or overwrite a directory."""


def is_4bit(model) -> bool:
    return any(p.__class__.__name__ == "Params4bit" for p in model.parameters())


def load_merge_base(recipe, tokenizer, base_weights: str, dtype: torch.dtype):
    """The base to merge into, in `dtype`: NF4-rounded as in training (`dequantized`) or as published (`original`)."""
    if base_weights not in ("dequantized", "original"):
        raise MergeError(f"--base-weights must be 'dequantized' or 'original', got {base_weights!r}")
    quantize = base_weights == "dequantized" and recipe.model.load_in_4bit  # a 16-bit-trained adapter has no Wq
    model = load_base(recipe, tokenizer, quantize=quantize)
    if quantize:
        model = model.dequantize(dtype=dtype)  # transformers: bnb dequantize_4bit per layer, quantization_config dropped
    return model.to(dtype)


def merge_into(model, adapter_dir: str | Path):
    """LoRA and the trained token rows folded into `model`'s weights; refuses a 4-bit model (see module doc)."""
    from peft import PeftModel

    if is_4bit(model):
        raise MergeError("refusing to merge into a 4-bit model: the merged weights would be re-quantized to NF4, "
                         "whose rounding step is larger than most LoRA updates and erases the adapter; merge into "
                         "the dequantized base instead (--base-weights dequantized, the default)")
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    embed, output = merged.get_input_embeddings(), merged.get_output_embeddings()
    merged.config.tie_word_embeddings = output is None or output.weight.data_ptr() == embed.weight.data_ptr()
    return merged.eval()


def generation_config(model, tokenizer):
    """The base's generation settings, stopping at `<|/witness|>` and at the base EOS."""
    from transformers import GenerationConfig

    config = GenerationConfig.from_dict(model.generation_config.to_dict())
    base_eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    base_eos = base_eos if isinstance(base_eos, list) else [base_eos] if base_eos is not None else []
    config.eos_token_id = list(dict.fromkeys([structural_token_ids(tokenizer)[WITNESS_CLOSE], *base_eos]))
    config.pad_token_id = tokenizer.pad_token_id
    return config


def merge(adapter_dir: str | Path, out_dir: str | Path, base_weights: str = "dequantized", dtype: str = "bf16",
          base: str | None = None) -> Path:
    """Write the merged model, tokenizer, generation config, metadata and model card to `out_dir`."""
    out_dir = Path(out_dir)
    if dtype not in EXPORT_DTYPES:
        raise MergeError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise MergeError(f"{out_dir} exists and is not empty; choose another --out or remove it")
    recipe = adapter_recipe(adapter_dir, base)
    tokenizer = load_tokenizer_for(recipe)
    metadata = check_base(adapter_dir, recipe, tokenizer)
    merged = merge_into(load_merge_base(recipe, tokenizer, base_weights, EXPORT_DTYPES[dtype]), adapter_dir)
    merged.generation_config = generation_config(merged, tokenizer)
    merged.save_pretrained(out_dir)  # safetensors
    tokenizer.save_pretrained(out_dir)
    shutil.copy(Path(adapter_dir) / "recipe.yaml", out_dir / "recipe.yaml")
    metadata["merged"] = {"adapter": str(adapter_dir), "base_weights": base_weights, "dtype": dtype,
                          "base_used": recipe.model.name_or_path}
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    write_model_card(out_dir)
    return out_dir


# ---- verify ---------------------------------------------------------------------------------------------------


def logit_agreement(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """max |Δlogit|, summed KL(reference || other), top-1 matches and positions, for [T, V] logits."""
    ref, oth = reference.double(), other.double()  # fp64: fp32 log-softmax over 150k ids has a ~1e-7 KL floor
    kl = torch.nn.functional.kl_div(oth.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
    return {"max_abs_logit": float((ref - oth).abs().max()), "kl_sum": float(kl.sum(-1).clamp(min=0).sum()),
            "top1_matches": int((ref.argmax(-1) == oth.argmax(-1)).sum()), "positions": ref.shape[0]}


def verify(adapter_dir: str | Path, merged_dir: str | Path, data: str | Path | None = None,
           rows: int = DEFAULT_VERIFY_ROWS, base: str | None = None) -> dict:
    """Logits of the 4-bit base + adapter (what was trained) vs the merged directory, on the eval set.

    The merged side is loaded back from disk, so the saved files (weights, tie flag, dtype) are what is checked.
    """
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from .data import prepare

    reference = AdapterSet(adapter_dir, base)
    data = data or reference.recipe.data.eval_file
    if not data:
        raise MergeError(f"{adapter_dir}: the recipe has no data.eval_file; pass --data FILE for --verify")
    dataset = prepare(data, reference.tokenizer, reference.recipe, save=False).dataset
    dataset = dataset.select(range(min(rows, len(dataset))))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype="auto", device_map=reference.model.device).eval()
    totals = {"max_abs_logit": 0.0, "kl_sum": 0.0, "top1_matches": 0, "positions": 0}
    with torch.no_grad():
        for row in tqdm(dataset, desc="verify", unit="row"):
            ids = torch.tensor([row["input_ids"]], device=reference.model.device)
            part = logit_agreement(reference.model(input_ids=ids).logits[0], merged(input_ids=ids).logits[0])
            totals = {k: max(totals[k], part[k]) if k == "max_abs_logit" else totals[k] + part[k] for k in totals}
    dtype = json.loads((Path(merged_dir) / METADATA_FILE).read_text())["merged"]["dtype"]
    result = {"rows": len(dataset), "positions": totals["positions"], "max_abs_logit": totals["max_abs_logit"],
              "mean_kl": totals["kl_sum"] / max(totals["positions"], 1),
              "top1_agreement": totals["top1_matches"] / max(totals["positions"], 1),
              "dtype": dtype, "tolerance": TOLERANCES[dtype]}
    tol = TOLERANCES[dtype]
    result["passed"] = (result["max_abs_logit"] <= tol["max_abs_logit"] and result["mean_kl"] <= tol["mean_kl"]
                        and result["top1_agreement"] >= tol["top1"])
    (Path(merged_dir) / "verify.json").write_text(json.dumps(result, indent=2))
    write_model_card(merged_dir)
    return result


# ---- model card -----------------------------------------------------------------------------------------------


def write_model_card(out_dir: str | Path) -> Path:
    """README.md from the directory's own tear_lora.json (and verify.json when present)."""
    from . import template

    out_dir = Path(out_dir)
    meta = json.loads((out_dir / METADATA_FILE).read_text())
    verified = json.loads((out_dir / "verify.json").read_text()) if (out_dir / "verify.json").exists() else None
    merged, base = meta["merged"], meta["base"]
    shape = template.render(template.segments("{input}", "{response}", "{witness}"))
    data_lines = [f"- {split}: `{d['source']}` (sha256 {d['source_sha256'][:16]}), {d['rows']} rows, "
                  f"{d['rows_rejected']} rejected, tokens {d['tokens']}" for split, d in meta["data"].items() if d]
    metric_lines = [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in meta["metrics"].items()]
    check = ("not run (`tear-lora merge ... --verify`)" if verified is None else
             f"{'passed' if verified['passed'] else 'FAILED'} on {verified['rows']} rows: max |Δlogit| "
             f"{verified['max_abs_logit']:.3g}, mean KL {verified['mean_kl']:.3g}, top-1 agreement "
             f"{verified['top1_agreement']:.4f} (tolerance {verified['tolerance']})")
    card = f"""---
base_model: {base['name_or_path']}
library_name: transformers
tags: [tear_lora, lora-merged]
---

# {meta['run_name']} (merged)

A tear_lora adapter (Loss = ResponseLoss + λ·WitnessLoss, **λ = {meta['lambda']}**) merged into its base.

- Base: `{base['name_or_path']}` (revision {base.get('revision')}, commit {base.get('commit_hash')}, content sha256 {base.get('content_sha256')})
- Merge: `--base-weights {merged['base_weights']}`, dtype {merged['dtype']}. `dequantized` folds the adapter into the
  NF4-rounded weights it was trained on (reproduces the trained model); `original` folds it into the unquantized
  weights (differs from the trained model by the quantization error).
- Verify (merged vs 4-bit base + adapter): {check}

## Data
{chr(10).join(data_lines)}

## Metrics (from training)
| metric | value |
|---|---|
{chr(10).join(metric_lines)}

## How to prompt it
Every example has this shape; the six tags are single special tokens in the tokenizer:

    {shape}

Generate the response from `<|input|>…<|/input|><|response|>` and stop at `<|/response|>`; then append
`<|/response|><|witness|>` and generate the witness, which stops at `<|/witness|>` (`generation_config.json`
stops there and at the base EOS). Encode user text with `split_special_tokens=True` so tag strings inside it
stay text.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("{out_dir.name}")
model = AutoModelForCausalLM.from_pretrained("{out_dir.name}")
prompt = "<|input|>My question<|/input|><|response|>"
ids = tok(prompt, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=128, eos_token_id=tok.convert_tokens_to_ids("<|/response|>"))
response = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
ids = tok(prompt + response + "<|/response|><|witness|>", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=128)  # stops at <|/witness|>
witness = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
```
"""
    (out_dir / "README.md").write_text(card)
    return out_dir / "README.md"
