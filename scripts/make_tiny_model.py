"""Write the tiny random Qwen3 (real Qwen3 vocabulary, tied embeddings) that recipes/tiny-cpu.yaml trains, or
(--family gpt_neox) a tiny GPT-NeoX with the same vocabulary, to try a non-Llama family.

Usage: python scripts/make_tiny_model.py [OUT_DIR] [--family qwen3|gpt_neox]
       (default models/tiny-<family>; does nothing if it exists)
"""

import argparse
from pathlib import Path

from tear_lora.tiny import TINY_CONFIGS, write_tiny_model

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?")
    parser.add_argument("--family", choices=sorted(TINY_CONFIGS), default="qwen3")
    args = parser.parse_args()
    out = Path(args.out or f"models/tiny-{args.family.replace('_', '-')}")
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        print(f"{out}: already there")
    else:
        print(f"{out}: written" if write_tiny_model(out, family=args.family) else "")
