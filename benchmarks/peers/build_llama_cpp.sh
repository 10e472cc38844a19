#!/usr/bin/env bash
# Build llama.cpp once, as a same-run peer (`bench generate --peer llama.cpp`, `bench serve --peer llama.cpp`)
# and as a verify candidate (`verify --candidate llama.cpp:MODEL.gguf`).
#
# llama.cpp comes from the llama-cpp-python source distribution on PyPI (it vendors the whole llama.cpp
# tree, with convert_hf_to_gguf.py and gguf-py). One CMake build, with the CPU's own features (GGML_NATIVE) and
# shared libraries: libllama.so / libggml*.so (what the Python bindings load), llama-bench, llama-quantize and
# llama-server. The build lives in a directory named by the version and is never moved (the tools find their
# libraries there), and `llama.cpp` is a symlink to it, switched only once a build is complete. Then the
# llama-cpp-python package itself is installed into $PYTHON's environment WITHOUT its own llama.cpp build
# (LLAMA_BUILD=OFF): qwen3lab points it at these libraries (LLAMA_CPP_LIB_PATH). About 10-15 minutes on 2 cores;
# never run by `make test` or CI.
#
#   benchmarks/peers/build_llama_cpp.sh [CACHE_DIR]     (default: $QWEN3LAB_PEERS or ~/.cache/qwen3lab/peers)
#
# Leaves CACHE_DIR/llama.cpp -> llama.cpp-VERSION/{src,build/bin/{llama-bench,llama-quantize,llama-server,
# libllama.so,...},VERSION}; a second run with the same version on the same CPU only re-checks the Python package.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${1:-${QWEN3LAB_PEERS:-$HOME/.cache/qwen3lab/peers}}"
DEST="$CACHE/llama.cpp-$VERSION"
LINK="$CACHE/llama.cpp"
PY="${PYTHON:-python3}"
TOOLS="llama-bench llama-quantize llama-server"

# The CPU a native build is for: its feature flags. The cache outlives machines (a build for an AVX-512 CPU dies
# with SIGILL on an AVX2 one), so a build whose CPU differs from this one is rebuilt.
cpu_sig() {
  { grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || uname -m; } | cksum | cut -d' ' -f1
}

built() {
  for t in $TOOLS; do [ -x "$DEST/build/bin/$t" ] || return 1; done
  [ -f "$DEST/build/bin/libllama.so" ] && [ "$(cat "$DEST/VERSION" 2>/dev/null)" = "$VERSION" ] &&
    [ "$(cat "$DEST/CPU" 2>/dev/null)" = "$(cpu_sig)" ]
}

# No AMX: this llama.cpp's AMX kernels (Q4_0 / Q8_0 on Intel Sapphire Rapids and later) die with SIGILL in their
# worker threads on the Xeon VMs measured here (`tilezero` with no tile configuration loaded; upstream PR
# ggml-org/llama.cpp#26954). Without them llama.cpp runs its AVX-512 VNNI repacked kernels for those types.
# (Explicit -mno-* flags win over -march=native in GCC and Clang, whatever their order.)
NO_AMX=""
case "$(uname -m)" in x86_64|amd64) NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" ;; esac

mkdir -p "$CACHE"
tmp="$(mktemp -d "$CACHE/.download.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$VERSION"
tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
sdist="$(echo "$tmp"/llama_cpp_python-*/)"

if built; then
  echo "llama.cpp (llama-cpp-python $VERSION) already built in $DEST"
else
  command -v cmake >/dev/null || { echo "cmake is needed to build llama.cpp (apt-get install cmake)" >&2; exit 2; }
  rm -rf "$DEST"
  mkdir -p "$DEST"
  cp -r "$sdist/vendor/llama.cpp" "$DEST/src"
  cmake -S "$DEST/src" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=ON >/dev/null
  cmake --build "$DEST/build" --target llama $TOOLS -j "$(nproc)"
  echo "$VERSION" > "$DEST/VERSION"
  cpu_sig > "$DEST/CPU"
  echo "llama.cpp (llama-cpp-python $VERSION) built in $DEST"
fi
ln -sfn "$(basename "$DEST")" "$LINK.new" && mv -T "$LINK.new" "$LINK"  # switch only to a complete build

# The Python bindings (ctypes over libllama.so), without building llama.cpp a second time.
if ! "$PY" -c "import llama_cpp" 2>/dev/null || [ "$("$PY" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null)" != "$VERSION" ]; then
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PY" -m pip install -q --disable-pip-version-check "$sdist"
fi
echo "llama-cpp-python $VERSION installed for $PY (loads $LINK/build/bin/libllama.so)"
