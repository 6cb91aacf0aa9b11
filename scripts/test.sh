#!/usr/bin/env bash
# The project's test command: every test of the workspace (unit, property,
# in-process and black-box tests of the real binaries). Fails when a test
# fails, and also when the run executed no test at all.
set -euo pipefail
cd "$(dirname "$0")/.."

# The real default models, fetched once into the cache (tests use them).
scripts/fetch-model.sh >/dev/null
scripts/fetch-embedding-model.sh >/dev/null

log=$(mktemp)
trap 'rm -f "$log"' EXIT

cargo test --workspace --locked 2>&1 | tee "$log"

# Sum the counts of every `test result:` line cargo printed.
read -r passed failed < <(awk '
  /^test result:/ {
    for (i = 1; i <= NF; i++) {
      if ($i == "passed;") p += $(i - 1)
      if ($i == "failed;") f += $(i - 1)
    }
  }
  END { print p + 0, f + 0 }' "$log")

echo "summary: ${passed} passed, ${failed} failed"
if [ "$passed" -eq 0 ]; then
  echo "error: the test run executed zero tests" >&2
  exit 1
fi
