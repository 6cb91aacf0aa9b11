#!/usr/bin/env bash
# Make sure the tools the deployment-file tests run are here, and print the
# python of a virtualenv holding `kubernetes-validate` (from PyPI):
#   systemd-analyze      Debian's systemd (verifies the units)
#   promtool, prometheus Debian's prometheus (rule checks, rule unit tests,
#                        and a real server scraping the stack)
# Debian packages are installed with apt-get when missing (as root, or
# through sudo); the virtualenv is made once under the cache.
#
#   RBEE_CACHE_DIR   cache root (default: $XDG_CACHE_HOME/rbee, else ~/.cache/rbee)
set -euo pipefail

KUBERNETES_VALIDATE_VERSION=1.34.1

missing=()
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
{ command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; } || missing+=(prometheus)
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo -n)
  echo "installing ${missing[*]} from Debian's packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq >&2 || true
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  # The package's own service is not ours to run.
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    "${sudo[@]}" systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi

cache="${RBEE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rbee}"
venv="$cache/venv-kubernetes-validate-$KUBERNETES_VALIDATE_VERSION"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import kubernetes_validate' 2>/dev/null; then
  echo "$venv/bin/python"
  exit 0
fi
mkdir -p "$cache"
rm -rf "$venv.part"
echo "installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION from PyPI into $venv" >&2
python3 -m venv "$venv.part" >&2
"$venv.part/bin/python" -m pip install --quiet --disable-pip-version-check \
  "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" >&2
rm -rf "$venv"
mv "$venv.part" "$venv"
python3 -m venv --upgrade "$venv" >&2
echo "$venv/bin/python"
