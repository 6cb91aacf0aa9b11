#!/usr/bin/env bash
# Benchmark llm-worker-rbee's continuous batching against llama.cpp's
# llama-server on the default model, in one command: 1, 8 and 32 concurrent
# streams of 128-token prompts and 128 generated tokens, both on the same
# threads; then 8 streams through the queen. Run by hand (not from CI);
# see docs/performance.md.
#
#   RUNS=3 THREADS=2 STREAMS=1,8,32 scripts/bench-batching.sh
set -euo pipefail
cd "$(dirname "$0")/.."

model=$(scripts/fetch-model.sh)
server=$(scripts/bench-setup-llama-server.sh)
cargo build --release --quiet -p llm-worker-rbee -p rbee-hive -p queen-rbee
exec python3 scripts/bench_batching.py \
  --worker target/release/llm-worker-rbee \
  --bin-dir target/release \
  --llama-server "$server" \
  --model "$model" \
  --runs "${RUNS:-3}" \
  --threads "${THREADS:-2}" \
  --streams "${STREAMS:-1,8,32}"
