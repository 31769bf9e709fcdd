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
#
# The cache dir is ours only when it holds our marker (.tear_lora_llama_cache): a TEAR_LORA_LLAMA_DIR that is
# a symlink, or a non-empty directory without the marker (your ~/.local, say), is refused (exit 2, one line)
# before anything is written. Inside it, the script replaces only what it recorded writing: src/ is moved
# aside, compared with the file list recorded when it was unpacked (src.files), and put back, with a refusal,
# if anything was added or changed (rundir.swap_in's rule, docs/reliability.md); bin/llama-server is the one
# file it replaces in bin/; its download and build dirs are fresh mktemp names, the only things it rm -rf's.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DEST="${TEAR_LORA_LLAMA_DIR:-$PWD/.cache/llama.cpp}"
JOBS="${JOBS:-2}"
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
MARKER=.tear_lora_llama_cache

refuse() { echo "error: $*" >&2; exit 2; }
tmp="" build=""
trap 'rm -rf ${tmp:+"$tmp"} ${build:+"$build"}' EXIT   # our own mktemp dirs, nothing else

# what a directory holds, one line per entry (type, size for files, path): compared before anything is replaced
listing() { (cd "$1" && find . -mindepth 1 -printf '%y %s %p\n' | LC_ALL=C sort); }

if [ -L "$DEST" ]; then
  refuse "TEAR_LORA_LLAMA_DIR $DEST is a symlink; give the directory itself (nothing was changed)"
fi
if [ -e "$DEST" ] && [ ! -d "$DEST" ]; then
  refuse "TEAR_LORA_LLAMA_DIR $DEST is not a directory (nothing was changed)"
fi
if [ -d "$DEST" ] && [ ! -f "$DEST/$MARKER" ] && [ -n "$(ls -A "$DEST")" ]; then
  refuse "TEAR_LORA_LLAMA_DIR $DEST is not empty and has no $MARKER: not a cache this script made; nothing was" \
         "changed: choose an empty or new directory"
fi
mkdir -p "$DEST"
[ -f "$DEST/$MARKER" ] || echo "llama.cpp cache of tear_lora's scripts/build_llama_server.sh" > "$DEST/$MARKER"

if [ ! -f "$DEST/src/convert_lora_to_gguf.py" ] || [ "$(cat "$DEST/src/.version" 2>/dev/null)" != "$VERSION" ]; then
  if [ -e "$DEST/src" ] && { [ ! -f "$DEST/src.files" ] || [ "$(listing "$DEST/src")" != "$(cat "$DEST/src.files")" ]; }; then
    refuse "$DEST/src holds files this script did not unpack (or was changed); nothing was changed: move them" \
           "out of it, or use a new TEAR_LORA_LLAMA_DIR"
  fi
  tmp="$(mktemp -d "$DEST/.dl.XXXXXX")"
  "$PY" -m pip download -q --no-deps --no-binary :all: --dest "$tmp" "llama-cpp-python==$VERSION"
  tar -xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp"
  new="$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp"
  echo "$VERSION" > "$new/.version"
  listing "$new" > "$tmp/src.files"
  if [ -e "$DEST/src" ]; then  # the swap, re-checked: the old src aside, compared, put back if it changed
    mv "$DEST/src" "$tmp/old-src"
    if [ "$(listing "$tmp/old-src")" != "$(cat "$DEST/src.files")" ]; then
      mv "$tmp/old-src" "$DEST/src"
      refuse "$DEST/src changed while the new llama.cpp was downloaded (files added or edited); it was left" \
             "as it is: move your files out of it and run again"
    fi
  fi
  mv "$new" "$DEST/src"   # rename: a half-unpacked tree never shows
  mv "$tmp/src.files" "$DEST/src.files"
  rm -f "$DEST/bin/llama-server"   # a binary from another version is stale (the one file of ours in bin/)
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
build="$(mktemp -d "$DEST/.build.XXXXXX")"
cmake -S "$DEST/src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON >/dev/null
cmake --build "$build" --target llama-server -j "$JOBS"
mkdir -p "$DEST/bin"
cp "$build/bin/llama-server" "$DEST/bin/.llama-server.tmp.$$"
mv "$DEST/bin/.llama-server.tmp.$$" "$DEST/bin/llama-server"
echo "built $DEST/bin/llama-server in $(( $(date +%s) - start )) s"
