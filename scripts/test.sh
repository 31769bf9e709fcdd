#!/usr/bin/env bash
# THE test command: set-up, lint, tests. Fast tests by default (count and time: docs/demo.md);
# `bash scripts/test.sh -m slow` runs the slow ones (real pretrained model), `-m ''` runs everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
python -m pytest "$@"
