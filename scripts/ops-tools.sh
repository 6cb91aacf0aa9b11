#!/usr/bin/env bash
# Make sure the tools the deployment-file tests run are here, and print
# where the installed ones are, as `python=PATH` (a virtualenv holding
# `kubernetes-validate`, from PyPI) and `node_modules=DIR` (the Prometheus
# Operator's CRD schemas and js-yaml, from npm, for scripts/validate-crds.mjs):
#   systemd-analyze      Debian's systemd (verifies the units)
#   promtool, prometheus Debian's prometheus (rule checks, rule unit tests,
#                        and a real server scraping the stack)
# Debian packages are installed with apt-get when missing (as root, or
# through sudo); the virtualenv is made once under the cache.
#
#   RBEE_CACHE_DIR   cache root (default: $XDG_CACHE_HOME/rbee, else ~/.cache/rbee)
set -euo pipefail

KUBERNETES_VALIDATE_VERSION=1.34.1
PROMETHEUS_OPERATOR_MODELS_VERSION=6.0.0
JS_YAML_VERSION=4.1.1

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
mkdir -p "$cache"

npm_dir="$cache/npm-prometheus-operator-$PROMETHEUS_OPERATOR_MODELS_VERSION"
if [ ! -f "$npm_dir/node_modules/@kubernetes-models/prometheus-operator/package.json" ] ||
  [ ! -f "$npm_dir/node_modules/js-yaml/dist/js-yaml.mjs" ]; then
  echo "installing @kubernetes-models/prometheus-operator@$PROMETHEUS_OPERATOR_MODELS_VERSION from npm into $npm_dir" >&2
  rm -rf "$npm_dir.part"
  mkdir -p "$npm_dir.part"
  (cd "$npm_dir.part" && echo '{"private":true}' > package.json &&
    npm install --silent --no-audit --no-fund \
      "@kubernetes-models/prometheus-operator@$PROMETHEUS_OPERATOR_MODELS_VERSION" \
      "js-yaml@$JS_YAML_VERSION" >&2)
  rm -rf "$npm_dir"
  mv "$npm_dir.part" "$npm_dir"
fi

venv="$cache/venv-kubernetes-validate-$KUBERNETES_VALIDATE_VERSION"
if ! { [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import kubernetes_validate' 2>/dev/null; }; then
  rm -rf "$venv.part"
  echo "installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION from PyPI into $venv" >&2
  python3 -m venv "$venv.part" >&2
  "$venv.part/bin/python" -m pip install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" >&2
  rm -rf "$venv"
  mv "$venv.part" "$venv"
  python3 -m venv --upgrade "$venv" >&2
fi

echo "python=$venv/bin/python"
echo "node_modules=$npm_dir/node_modules"
