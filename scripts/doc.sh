#!/usr/bin/env bash
# The API docs with every rustdoc warning an error (broken intra-doc links,
# bad code blocks). Libraries are documented as their users see them. The
# daemons are documented with their private items, the way contributors
# read them: most of a daemon is crate-private, so its docs link between
# private modules, and the lint that flags such links (they would break
# without --document-private-items) does not apply to that build.
set -euo pipefail
cd "$(dirname "$0")/.."

daemons=(queen-rbee rbee-hive llm-worker-rbee)

exclude=()
for d in "${daemons[@]}"; do exclude+=(--exclude "$d"); done
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked "${exclude[@]}"

packages=()
for d in "${daemons[@]}"; do packages+=(-p "$d"); done
RUSTDOCFLAGS="-D warnings -A rustdoc::private-intra-doc-links" \
  cargo doc --no-deps --locked --document-private-items "${packages[@]}"
