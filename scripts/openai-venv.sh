#!/usr/bin/env bash
# Make (once) a virtualenv with the official `openai` Python client and
# print its python's path. The black-box tests use it to check that the
# queen's OpenAI-compatible answers parse in the client users run.
#
#   RBEE_CACHE_DIR   cache root (default: $XDG_CACHE_HOME/rbee, else ~/.cache/rbee)
set -euo pipefail

OPENAI_VERSION=2.8.1

cache="${RBEE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rbee}"
venv="$cache/venv-openai-$OPENAI_VERSION"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import openai' 2>/dev/null; then
  echo "$venv/bin/python"
  exit 0
fi
mkdir -p "$cache"
rm -rf "$venv.part"
echo "installing openai==$OPENAI_VERSION from PyPI into $venv" >&2
python3 -m venv "$venv.part" >&2
"$venv.part/bin/python" -m pip install --quiet --disable-pip-version-check "openai==$OPENAI_VERSION" >&2
rm -rf "$venv"
mv "$venv.part" "$venv"
# A venv records its own path; recreate the scripts for the final one.
python3 -m venv --upgrade "$venv" >&2
echo "$venv/bin/python"
