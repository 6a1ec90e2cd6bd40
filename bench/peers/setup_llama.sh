#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` from the source vendored in the llama-cpp-python sdist on PyPI, for
# `bench/chat.py --peer llama`. Output: bench/.peers/llama/bin/llama-server (git-ignored; nothing fetched
# or built is committed). Portable x86-64 flags: GGML_NATIVE=OFF (with native flags the binary segfaults on
# VMs whose CPUs report AMX tiles), AMX off, AVX2/AVX-512 (F, VNNI, BF16) on, AVX-VNNI (VEX) off as these CPUs lack it. One compile job at nice 19 by default,
# as the bench machine's 2 cores are shared: JOBS=4 to go faster on a free machine.
# Usage: bench/peers/setup_llama.sh [VERSION]   (default: the newest llama-cpp-python on the index)
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS="$PWD/.peers"
PY="${PYTHON:-python3}"  # any Python with pip (only `pip download` is used)
VERSION="${1:-}"
JOBS="${JOBS:-1}"
mkdir -p "$PEERS/src" "$PEERS/llama/bin"

spec="llama-cpp-python${VERSION:+==$VERSION}"
"$PY" -m pip download --quiet --no-binary :all: --no-deps "$spec" -d "$PEERS/src"
sdist=$(ls -t "$PEERS"/src/llama_cpp_python-*.tar.gz | head -1)
src="$PEERS/src/$(basename "$sdist" .tar.gz)"
[ -d "$src" ] || tar -xzf "$sdist" -C "$PEERS/src"
echo "llama.cpp from $(basename "$sdist") (vendor/llama.cpp)"

cmake -S "$src/vendor/llama.cpp" -B "$PEERS/llama/build" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF \
  -DBUILD_SHARED_LIBS=OFF >"$PEERS/llama/cmake.log"
nice -n 19 cmake --build "$PEERS/llama/build" --config Release -j"$JOBS" --target llama-server
cp "$PEERS/llama/build/bin/llama-server" "$PEERS/llama/bin/llama-server"
"$PEERS/llama/bin/llama-server" --version 2>&1 | head -2
echo "built $PEERS/llama/bin/llama-server"
