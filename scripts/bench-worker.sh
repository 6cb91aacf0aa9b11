#!/usr/bin/env bash
# Benchmark llm-worker-rbee against llama.cpp on the default model, in one
# command: same GGUF, same 512-token prompt, 128 generated tokens, same
# thread count. Run by hand (not from CI). Prints a table of medians and the
# ratios; see docs/performance.md.
#
#   RUNS=5 THREADS=2 scripts/bench-worker.sh
#   WORKER_ARGS="--kv-cache f32" scripts/bench-worker.sh
#
# TARGET_CPU builds the worker with `-C target-cpu=...` in its own target
# directory (target/<name>), so the default build is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

model=$(scripts/fetch-model.sh)
python=$(scripts/bench-setup-llamacpp.sh)
if [ -n "${TARGET_CPU:-}" ]; then
  target_dir="target/${TARGET_CPU}"
  CARGO_TARGET_DIR="$target_dir" RUSTFLAGS="-C target-cpu=${TARGET_CPU}" \
    cargo build --release --quiet -p llm-worker-rbee
else
  target_dir=target
  cargo build --release --quiet -p llm-worker-rbee
fi
cargo build --release --quiet -p rbee-bench --bin membw
echo "worker: $target_dir/release/llm-worker-rbee ${WORKER_ARGS:-} (target-cpu: ${TARGET_CPU:-default})"
# shellcheck disable=SC2086 # WORKER_ARGS is a list of flags
exec "$python" scripts/bench_worker.py \
  --worker "$target_dir/release/llm-worker-rbee" \
  --model "$model" \
  --runs "${RUNS:-5}" \
  --threads "${THREADS:-2}" \
  --membw target/release/membw \
  -- ${WORKER_ARGS:-}
