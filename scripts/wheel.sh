# Sourced by the fetch scripts: download one pinned wheel from PyPI.
#
#   fetch_wheel NAME VERSION SHA256 DIR   downloads NAME==VERSION into DIR,
#                                         checks its SHA-256, prints its path
fetch_wheel() {
  local name=$1 version=$2 sha256=$3 dir=$4 wheel
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$dir" "$name==$version" >&2
  wheel=$(ls "$dir"/*.whl)
  echo "$sha256  $wheel" | sha256sum --check --quiet - >&2 || {
    echo "error: $wheel does not have the expected SHA-256" >&2
    return 1
  }
  echo "$wheel"
}
