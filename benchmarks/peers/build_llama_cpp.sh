#!/usr/bin/env bash
# Build llama.cpp once, as a same-run peer for `qwen3lab bench generate --peer llama.cpp`.
#
# llama.cpp comes from the llama-cpp-python source distribution on PyPI (it vendors the whole llama.cpp
# tree, with convert_hf_to_gguf.py and gguf-py). Only llama-bench and llama-quantize are built, with the
# CPU's own features (GGML_NATIVE), linked statically so the cached binaries do not depend on the build
# directory. About 10 minutes on 2 cores; never run by `make test` or CI.
#
#   benchmarks/peers/build_llama_cpp.sh [CACHE_DIR]     (default: $QWEN3LAB_PEERS or ~/.cache/qwen3lab/peers)
#
# Leaves CACHE_DIR/llama.cpp/{src,build/bin/llama-bench,build/bin/llama-quantize,VERSION}; a second run with
# the same version does nothing.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${1:-${QWEN3LAB_PEERS:-$HOME/.cache/qwen3lab/peers}}"
DEST="$CACHE/llama.cpp"
PY="${PYTHON:-python3}"

if [ -x "$DEST/build/bin/llama-bench" ] && [ -x "$DEST/build/bin/llama-quantize" ] \
   && [ "$(cat "$DEST/VERSION" 2>/dev/null)" = "$VERSION" ]; then
  echo "llama.cpp (llama-cpp-python $VERSION) already built in $DEST"
  exit 0
fi
command -v cmake >/dev/null || { echo "cmake is needed to build llama.cpp (apt-get install cmake)" >&2; exit 2; }

mkdir -p "$CACHE"
tmp="$(mktemp -d "$CACHE/.download.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$VERSION"
tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
rm -rf "$DEST.new"
mkdir -p "$DEST.new"
mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$DEST.new/src"
cmake -S "$DEST.new/src" -B "$DEST.new/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
cmake --build "$DEST.new/build" --target llama-bench llama-quantize -j "$(nproc)"
echo "$VERSION" > "$DEST.new/VERSION"
rm -rf "$DEST"
mv "$DEST.new" "$DEST"  # the cache holds a complete build or none
echo "llama.cpp (llama-cpp-python $VERSION) built in $DEST"
