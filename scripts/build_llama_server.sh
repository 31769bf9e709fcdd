#!/usr/bin/env bash
# llama.cpp's llama-server and convert_lora_to_gguf.py for `tear-lora bundle --gguf` / `tear-lora serve` and the
# slow real-server test (docs/serving.md). llama-server is on neither PyPI nor Debian bookworm; the sdist of
# llama-cpp-python (PyPI) vendors llama.cpp with tools/server and convert_lora_to_gguf.py, so this script
# downloads that sdist with pip, unpacks it and builds the one `llama-server` target with cmake/ninja as a
# standalone binary (-DBUILD_SHARED_LIBS=OFF). Everything lands in .cache/llama.cpp/ (git-ignored):
#   .cache/llama.cpp/src/        the unpacked llama.cpp (convert_lora_to_gguf.py, gguf-py)
#   .cache/llama.cpp/bin/llama-server
# Idempotent: a second run only checks. A llama-server already on PATH is used as it is (only the converter is
# unpacked). Options (environment):
#   LLAMA_CPP_PYTHON_VERSION=0.3.36   JOBS=2   TEAR_LORA_LLAMA_DIR=<dir> (default .cache/llama.cpp)
#   CONVERTER_ONLY=1                  unpack the converter, build nothing (seconds instead of ~10 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DEST="${TEAR_LORA_LLAMA_DIR:-$PWD/.cache/llama.cpp}"
JOBS="${JOBS:-2}"
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
mkdir -p "$DEST"

if [ ! -f "$DEST/src/convert_lora_to_gguf.py" ] || [ "$(cat "$DEST/src/.version" 2>/dev/null)" != "$VERSION" ]; then
  tmp="$(mktemp -d "$DEST/.dl.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download -q --no-deps --no-binary :all: --dest "$tmp" "llama-cpp-python==$VERSION"
  tar -xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp"
  echo "$VERSION" > "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp/.version"
  rm -rf "$DEST/src"
  mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" "$DEST/src"   # rename: a half-unpacked tree never shows
  rm -rf "$DEST/bin"                                                  # a binary from another version is stale
  echo "llama.cpp from llama-cpp-python $VERSION unpacked in $DEST/src"
fi

if [ "${CONVERTER_ONLY:-0}" = 1 ]; then exit 0; fi
if command -v llama-server >/dev/null 2>&1; then
  echo "using llama-server on PATH: $(command -v llama-server)"; exit 0
fi
if [ -x "$DEST/bin/llama-server" ]; then
  echo "llama-server already built: $DEST/bin/llama-server"; exit 0
fi

start=$(date +%s)
cmake -S "$DEST/src" -B "$DEST/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON >/dev/null
cmake --build "$DEST/build" --target llama-server -j "$JOBS"
mkdir -p "$DEST/bin"
cp "$DEST/build/bin/llama-server" "$DEST/bin/llama-server.tmp"
mv "$DEST/bin/llama-server.tmp" "$DEST/bin/llama-server"
rm -rf "$DEST/build"
echo "built $DEST/bin/llama-server in $(( $(date +%s) - start )) s"
