#!/usr/bin/env bash
# Install the llama.cpp baseline for the worker benchmark, once: a virtual
# environment with llama-cpp-python built from source (PyPI has no Linux
# wheel; 8 to 19 minutes on 2 cores). Prints the environment's python.
#
#   RBEE_CACHE_DIR   cache root (default: $XDG_CACHE_HOME/rbee, else ~/.cache/rbee)
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.16}
cache="${RBEE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rbee}"
venv="$cache/bench-venv"

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import llama_cpp' 2>/dev/null; then
  echo "$venv/bin/python"
  exit 0
fi
echo "building llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION into $venv (takes 8-19 minutes on 2 cores)" >&2
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip cmake ninja >&2
# Native CPU flags, as a local llama.cpp build would use; no network features.
CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" \
  "$venv/bin/python" -m pip install --quiet --no-cache-dir "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >&2
echo "$venv/bin/python"
