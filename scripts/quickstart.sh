#!/usr/bin/env bash
# The README's first command: build the three daemons (release), then bring
# up queen, hive and a worker on loopback with the default model, answer one
# prompt and keep serving until Ctrl-C. Flags go to scripts/quickstart.py
# (--queen-addr, --hive-addr, --state-dir, --prompt, --exit-after-answer).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p queen-rbee -p rbee-hive -p llm-worker-rbee
exec python3 scripts/quickstart.py "$@"
