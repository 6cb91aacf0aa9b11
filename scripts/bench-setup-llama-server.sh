#!/usr/bin/env bash
# Build llama.cpp's `llama-server` for the batching benchmark, once: from
# the llama.cpp source vendored in the PyPI source distribution of
# llama-cpp-python (the same version the worker benchmark's baseline is
# built from; `tools/server` included), native CPU flags, into the cache.
# Prints the binary's path. Takes 5 to 15 minutes on 2 cores.
#
#   RBEE_CACHE_DIR   cache root (default: $XDG_CACHE_HOME/rbee, else ~/.cache/rbee)
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.16}
cache="${RBEE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rbee}"
dir="$cache/llama-server-$LLAMA_CPP_PYTHON_VERSION"
bin="$dir/build/bin/llama-server"

if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
echo "building llama-server from llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION into $dir" >&2
mkdir -p "$dir"
name="llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
if [ ! -f "$dir/$name" ]; then
  url=$(curl -fsSL https://pypi.org/simple/llama-cpp-python/ |
    grep -o "href=\"[^\"]*/$name[^\"]*\"" | head -1 | sed 's/^href="//; s/#.*//; s/"$//')
  [ -n "$url" ] || { echo "no source distribution $name on PyPI" >&2; exit 1; }
  curl -fsSL -o "$dir/$name.part" "$url"
  mv "$dir/$name.part" "$dir/$name"
fi
tar -xzf "$dir/$name" -C "$dir"
src="$dir/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
cmake=cmake
command -v cmake >/dev/null 2>&1 || {
  python3 -m venv "$dir/venv" && "$dir/venv/bin/python" -m pip install --quiet cmake >&2
  cmake="$dir/venv/bin/cmake"
}
"$cmake" -S "$src" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF >&2
"$cmake" --build "$dir/build" --target llama-server -j "$(nproc)" >&2
echo "$bin"
