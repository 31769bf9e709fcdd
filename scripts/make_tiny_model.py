"""Write the tiny random Qwen3 (real Qwen3 vocabulary, tied embeddings) that recipes/tiny-cpu.yaml trains.

Usage: python scripts/make_tiny_model.py [OUT_DIR]   (default models/tiny-qwen3; does nothing if it exists)
"""

import sys
from pathlib import Path

from tear_lora.tiny import write_tiny_model

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "models/tiny-qwen3")
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        print(f"{out}: already there")
    else:
        print(f"{out}: written" if write_tiny_model(out) else "")
