"""The bundle's README.md: how to serve it (llama-server, vLLM, Ollama), each adapter's λ and metrics, the
verify figures and the source adapters' tear_lora.json records; written from bundle.json (and verify.json)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from tear_lora.rundir import atomic_write_text, read_json


def write_bundle_card(bundle_dir: Path, name: str | None = None) -> Path:
    """README.md of `bundle_dir`; `name` is the bundle's final directory name the commands use."""
    from .llama_server import lora_field

    bundle_dir = Path(bundle_dir)
    name = name or bundle_dir.name
    manifest = read_json(bundle_dir / "bundle.json")
    verify_path = bundle_dir / "verify.json"
    verified = read_json(verify_path) if verify_path.exists() else None
    entries = manifest["adapters"]
    rows = []
    for i, e in enumerate(entries):
        metrics = e["tear_lora"].get("metrics") or {}
        nll = {k: metrics.get(k) for k in ("eval_response_loss", "eval_witness_loss")}
        gguf = f"`{e['gguf']}`" if e["gguf"] else "-"
        rows.append(f"| {i} | `{e['name']}` | {e['lambda']} | {_num(nll['eval_response_loss'])} | "
                    f"{_num(nll['eval_witness_loss'])} | `{e['peft_dir']}` | {gguf} | "
                    f"{_verify_cell(verified, e['name'])} |")
    if manifest["base_gguf"]:
        loras = " ".join(f"--lora {e['gguf']}" for e in entries)
        requests = "\n".join(
            f"    # {e['name']} (λ = {e['lambda']})\n    curl -s http://127.0.0.1:8080/v1/chat/completions "
            f"-H 'Content-Type: application/json' \\\n      -d {shlex.quote(json.dumps(_chat(lora_field(manifest, e['name']))))}"
            for e in entries)
        llama = f"""## llama.cpp's server: one base, every λ, chosen per request

    tear-lora serve {name}          # the same, started and stopped for you (prints these requests)
    llama-server -m {manifest['base_gguf']} {loras} \\
      --lora-init-without-apply --jinja --host 127.0.0.1 --port 8080

`--lora-init-without-apply` starts every adapter at scale 0; each request picks one by its id (the order of the
`--lora` options, the `#` column above). Send the whole list, zeros included: llama-server keeps a slot's previous
scales for adapters a request leaves out. Requests with different scales are not batched together.

{requests}

`/completion` takes the same `lora` list; with `"prompt"` given as token ids nothing is re-tokenized.

## Ollama (one adapter per model)
Ollama applies one ADAPTER per model and has no per-request choice: one Modelfile per λ over the same base GGUF,

    FROM ./{manifest['base_gguf']}
    ADAPTER ./{entries[0]['gguf']}

plus the TEMPLATE and stop parameters of a `tear-lora merge --gguf` Modelfile (docs/serving.md).
"""
    else:
        llama = "## llama.cpp\nNo GGUF files in this bundle: make it with `tear-lora bundle ... --gguf f16`.\n"
    modules = " ".join(f"{e['name']}={e['peft_dir']}" for e in entries)
    card = f"""# {name}: a tear_lora serving bundle

One serving base and {len(entries)} plain LoRA adapters (one per λ) for inference servers. Written by
`tear-lora bundle`; `bundle.json` lists every file for scripts. The base (`{manifest['base']}/`, {manifest['dtype']})
is `{manifest['base_model']['name_or_path']}` dequantized as `tear-lora merge` does, with the six tags at their
initial rows and an untied output layer. Each adapter's trained tag rows became plain LoRA on `embed_tokens` and
`lm_head` (one-hot updates), next to its trained LoRA: the same model as `tear-lora merge` of that adapter.

| # | adapter | λ | eval response NLL | eval witness NLL | PEFT dir | LoRA GGUF | verify |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Verify: {_verify_line(verified)}

{llama}
## vLLM (the OpenAI `model` field picks the adapter)

    vllm serve {manifest['base']} --enable-lora --max-lora-rank {max(e['lora']['r'] for e in entries)} \\
      --lora-modules {modules}
    curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d {shlex.quote(json.dumps({"model": entries[0]["name"], "messages": [{"role": "user", "content": "My question"}]}))}

vLLM must support LoRA on `embed_tokens` and `lm_head` for this architecture (recent releases for Qwen3);
see docs/serving.md.

## Plain transformers + PEFT

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("{name}/{manifest['base']}")
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{name}/{manifest['base']}"),
                                  "{name}/{entries[0]['peft_dir']}")
```

## Prompt format
The chat template turns `[{{"role": "user", "content": x}}]` into `<|input|>x<|/input|><|response|>`; generation
stops at `<|/response|>`. For the witness of a response y, send the user turn and an assistant turn with y.

## Source adapters (tear_lora.json)
{chr(10).join(f"### {e['name']}{chr(10)}```json{chr(10)}{json.dumps(e['tear_lora'], indent=1)}{chr(10)}```" for e in entries)}
"""
    return atomic_write_text(bundle_dir / "README.md", card)


def _chat(lora: list[dict]) -> dict:
    return {"messages": [{"role": "user", "content": "My question"}], "temperature": 0, "lora": lora}


def _num(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "-"


def _verify_cell(verified: dict | None, name: str) -> str:
    if not verified:
        return "not run"
    check = verified["adapters"][name]
    gguf = check.get("gguf")
    return (f"{'passed' if check['passed'] else 'FAILED'}: mean KL {check['mean_kl']:.2g}, top-1 "
            f"{check['top1_agreement']:.4f}" + (f"; GGUF {'ok' if gguf['passed'] else 'FAILED'}" if gguf else ""))


def _verify_line(verified: dict | None) -> str:
    from .verify import describe_bounds

    if not verified:
        return "not run (`tear-lora bundle ... --verify`)."
    base = verified.get("base_gguf")
    return (f"{'passed' if verified['passed'] else 'FAILED'} on {verified['rows']} held-out rows: each adapter's "
            f"serving base + plain LoRA against the adapter on its 4-bit base, as trained: "
            f"{describe_bounds(verified['tolerance'], verified.get('floor'))}"
            + (f"; base GGUF {'passed' if base['passed'] else 'FAILED'}" if base else "") + ".")
