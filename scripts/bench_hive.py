#!/usr/bin/env python3
"""Measure what the hive adds around a worker, against the worker alone.

Baseline: `llm-worker-rbee` started directly, from exec to `/health/ready`
200. Hive: `POST /v1/workers/spawn` to the worker listed `idle` (the hive
forks it, the worker loads and calls back). Also: SIGKILL of the worker to
its replacement listed `idle` (restart backoff set to 100 ms), the shutdown
route, `file:` provisioning of the default model (hashing it), and SIGTERM
of a hive with two ready workers to its exit. Medians of --runs runs.

Usage: scripts/bench_hive.py [--bin-dir target/release] [--runs 5]
"""

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import request, start  # noqa: E402

MODEL = os.path.join(
    os.environ.get("RBEE_CACHE_DIR", os.path.expanduser("~/.cache/rbee")),
    "models",
    "SmolLM2-135M-Instruct.Q4_1.gguf",
)


def wait(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise SystemExit("timed out")


def worker_alone(bin_dir):
    t0 = time.monotonic()
    proc, url = start([os.path.join(bin_dir, "llm-worker-rbee"), "--model", MODEL])
    wait(lambda: request("GET", url + "/health/ready")[0] == 200)
    took = time.monotonic() - t0
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    return took


def listed(hive, worker_id):
    _, body = request("GET", hive + "/v1/workers/list")
    return next((w for w in body["workers"] if w["worker_id"] == worker_id), None)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", default="target/release")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    results = {k: [] for k in ["worker_alone", "spawn_to_idle", "sigkill_to_idle", "shutdown_route", "provision_file", "sigterm_two_workers"]}
    for run in range(args.runs):
        results["worker_alone"].append(worker_alone(args.bin_dir))
        with tempfile.TemporaryDirectory() as models:
            hive_proc, hive = start(
                [os.path.join(args.bin_dir, "rbee-hive"), "--models-dir", models, "--restart-backoff-base-ms", "100"]
            )
            t0 = time.monotonic()
            status, body = request("POST", hive + "/v1/models/provision", {"model_ref": "file:" + MODEL})
            assert status == 202, body
            wait(lambda: request("GET", hive + "/v1/models/list")[1]["models"])
            results["provision_file"].append(time.monotonic() - t0)

            t0 = time.monotonic()
            status, body = request("POST", hive + "/v1/workers/spawn", {"model_ref": "file:" + MODEL, "worker_id": "w-a"})
            assert status == 202, body
            first = wait(lambda: (w := listed(hive, "w-a")) and w["state"] == "idle" and w)
            results["spawn_to_idle"].append(time.monotonic() - t0)

            t0 = time.monotonic()
            os.kill(first["pid"], signal.SIGKILL)
            wait(lambda: (w := listed(hive, "w-a")) and w["state"] == "idle" and w["pid"] != first["pid"])
            results["sigkill_to_idle"].append(time.monotonic() - t0)

            t0 = time.monotonic()
            status, _ = request("POST", hive + "/v1/workers/shutdown", {"worker_id": "w-a"})
            assert status == 200
            results["shutdown_route"].append(time.monotonic() - t0)

            for wid in ["w-b", "w-c"]:
                request("POST", hive + "/v1/workers/spawn", {"model_ref": "file:" + MODEL, "worker_id": wid})
            for wid in ["w-b", "w-c"]:
                wait(lambda: (w := listed(hive, wid)) and w["state"] == "idle")
            t0 = time.monotonic()
            hive_proc.send_signal(signal.SIGTERM)
            code = hive_proc.wait(timeout=60)
            assert code == 0, code
            results["sigterm_two_workers"].append(time.monotonic() - t0)
        print(f"run {run + 1}/{args.runs} done", file=sys.stderr)

    alone = statistics.median(results["worker_alone"])
    for name, values in results.items():
        median = statistics.median(values)
        extra = f"  ({median / alone:.2f}x the worker alone)" if name == "spawn_to_idle" else ""
        print(f"{name:22s} median {median * 1000:8.1f} ms  over {len(values)} runs{extra}")


if __name__ == "__main__":
    main()
