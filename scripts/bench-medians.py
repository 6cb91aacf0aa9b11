#!/usr/bin/env python3
"""Print criterion medians from target/criterion and ratios against a baseline.

Usage: scripts/bench-medians.py BASELINE_ID [ID ...]
IDs are criterion benchmark ids such as router/bare. With no IDs after the
baseline, every benchmark found is printed.
"""
import json
import pathlib
import sys


def median_ns(root: pathlib.Path, bench_id: str) -> float:
    path = root / bench_id / "new" / "estimates.json"
    with path.open() as f:
        return json.load(f)["median"]["point_estimate"]


def fmt(ns: float) -> str:
    return f"{ns / 1000:.3f} us" if ns >= 1000 else f"{ns:.1f} ns"


def main() -> int:
    root = pathlib.Path(__file__).resolve().parent.parent / "target" / "criterion"
    if len(sys.argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    baseline = sys.argv[1]
    ids = sys.argv[2:] or sorted(
        str(p.parent.parent.relative_to(root)) for p in root.glob("**/new/estimates.json")
    )
    base = median_ns(root, baseline)
    print(f"{'benchmark':40} {'median':>12} {'x baseline':>11} {'minus baseline':>15}")
    for bench_id in ids:
        m = median_ns(root, bench_id)
        print(f"{bench_id:40} {fmt(m):>12} {m / base:>11.2f} {fmt(m - base):>15}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
