#!/usr/bin/env bash
# THE test command: set-up, lint, tests. Fast tests by default (count and time: docs/testing.md);
# `bash scripts/test.sh -m slow` runs the slow ones (real pretrained model), `-m ''` runs everything.
# Tests run in TEST_WORKERS processes (pytest-xdist, default 2: one per core of the 2-core machine it is sized
# for), a whole test file per worker at a time so that a file's module fixtures are built once, in the order
# tests/conftest.py gives (longest first; xdist would otherwise order files by test count); TEST_WORKERS=0
# runs them in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
python -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
