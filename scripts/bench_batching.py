#!/usr/bin/env python3
"""Many users at once: llm-worker-rbee's continuous batching against
llama.cpp's `llama-server` (continuous batching, `-np N`), same GGUF, same
threads, in one command. Run by `scripts/bench-batching.sh`; see
docs/performance.md.

For each of 1, 8 and 32 concurrent streams, every stream sends one request
at the same moment: its own 128-token prompt (no two streams share a
prefix), 128 generated tokens, end-of-sequence ignored, greedy. Reported,
medians over --runs:
- aggregate tok/s: all generated tokens / wall time from the first request
  sent to the last token received (prefill included);
- TTFT p50/p99 over the streams; inter-token latency p50/p99 over every gap.
Then the same 8-stream load through a real queen and hive in front of the
worker.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
from benchlib import request, start, stop  # noqa: E402

PROMPT_TOKENS = 128
GEN_TOKENS = 128
WORDS = ("river mountain lantern copper meadow harbor violet engine canyon ember "
         "orchard signal marble falcon prairie thunder compass willow garnet beacon").split()


def prompt(i):
    """Stream i's prompt: about 128 tokens, starting differently for every i."""
    words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(120)]
    return f"Story {i}: " + " ".join(words)


def percentile(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def stream(url, body, parse):
    """Send one streaming request; return (sent time, token arrival times, prompt tokens)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    stamps, tokens_in = [], None
    sent = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().rstrip("\n")
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            kind, n = parse(json.loads(line[6:]))
            if kind == "token":
                stamps.append(time.perf_counter())
            elif kind == "end":
                tokens_in = n
                break
            elif kind == "error":
                raise SystemExit(f"error event: {line}")
    return sent, stamps, tokens_in


def parse_rbee(event):
    t = event.get("type")
    if t == "token":
        return "token", None
    if t == "end":
        return "end", event["tokens_in"]
    if t == "error":
        return "error", None
    return "other", None


def parse_llama(event):
    if event.get("stop"):
        return "end", event.get("tokens_evaluated")
    return "token", None


def rbee_body(i):
    return {"prompt": prompt(i), "max_tokens": GEN_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True}


def llama_body(i):
    return {"prompt": prompt(i), "n_predict": GEN_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True, "cache_prompt": False}


def load(url, body, parse, n, offset):
    """n streams at once; returns the run's figures."""
    results = [None] * n
    barrier = threading.Barrier(n)

    def one(k):
        barrier.wait()
        results[k] = stream(url, body(offset + k), parse)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first_sent = min(r[0] for r in results)
    last_token = max(r[1][-1] for r in results)
    generated = sum(len(r[1]) for r in results)
    ttfts = [r[1][0] - r[0] for r in results]
    gaps = [b - a for r in results for a, b in zip(r[1], r[1][1:])]
    return {
        "agg_tps": generated / (last_token - first_sent),
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p99": percentile(ttfts, 99),
        "itl_p50": percentile(gaps, 50),
        "itl_p99": percentile(gaps, 99),
        "generated": generated,
        "prompt_tokens": statistics.median(r[2] or 0 for r in results),
    }


def runs_of(url, body, parse, n, runs):
    # Warm-up (page faults, allocator), not counted; then fresh prompts
    # for every run so that no run finds another's prompts in a cache.
    load(url, body, parse, n, 10_000)
    rows = [load(url, body, parse, n, 1000 * (r + 1)) for r in range(runs)]
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def wait_http(url, timeout=180):
    started = time.time()
    while time.time() - started < timeout:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not answer")


def llama_server(binary, model, threads, n):
    port = 18000 + n
    ctx = max(4096, 512 * n)
    proc = subprocess.Popen(
        [binary, "-m", model, "-t", str(threads), "-tb", str(threads), "-c", str(ctx),
         "-np", str(n), "--host", "127.0.0.1", "--port", str(port), "--no-webui"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/health")
    return proc, f"http://127.0.0.1:{port}/completion"


def worker_args(n):
    return ["--slots", str(n), "--kv-tokens", str(max(16384, 512 * n))]


def rbee_worker(binary, model, threads, n):
    proc, base = start([binary, "--model", model, "--threads", str(threads), *worker_args(n)],
                       {"RUST_LOG": "warn,rbee_http::server=info"})
    wait_http(base + "/health/ready")
    return proc, base + "/v1/inference"


def queen_stack(bins, worker_binary, model, threads, n, tmp, procs):
    env = {"RUST_LOG": "warn,rbee_http::server=info", "RBEE_WORKER_THREADS": str(threads)}
    # The hive starts workers from their own directories: absolute paths.
    hive, hive_url = start([f"{bins}/rbee-hive", "--models-dir", os.path.join(tmp, "models"),
                            "--worker-binary", os.path.abspath(worker_binary),
                            "--disk-reserve-mib", "0"], env)
    procs.append(hive)
    ref = f"file:{model}"
    status, body = request("POST", f"{hive_url}/v1/models/provision", {"model_ref": ref})
    assert status == 202, body
    deadline = time.time() + 120
    while not any(m["model_ref"] == ref
                  for m in request("GET", f"{hive_url}/v1/models/list")[1]["models"]):
        if time.time() > deadline:
            raise SystemExit("the hive did not provision the model")
        time.sleep(0.1)
    status, body = request("POST", f"{hive_url}/v1/workers/spawn",
                           {"model_ref": ref, "slots": n, "kv_tokens": max(16384, 512 * n)})
    assert status == 202, body
    queen, queen_url = start([f"{bins}/queen-rbee", "--hive", hive_url,
                              "--database", os.path.join(tmp, "queen.sqlite3")], env)
    procs.insert(0, queen)
    deadline = time.time() + 180
    while not any(w["state"] in ("idle", "busy")
                  for w in request("GET", f"{queen_url}/v2/workers/list")[1]["workers"]):
        if time.time() > deadline:
            raise SystemExit("the queen found no worker")
        time.sleep(0.2)
    body = lambda i: {**rbee_body(i), "model": ref}  # noqa: E731
    return f"{queen_url}/v1/inference", body


def show(name, r):
    print(f"  {name:<13} {r['agg_tps']:8.1f} tok/s   TTFT p50 {r['ttft_p50']:6.3f} s  "
          f"p99 {r['ttft_p99']:6.3f} s   ITL p50 {r['itl_p50'] * 1e3:7.1f} ms  "
          f"p99 {r['itl_p99'] * 1e3:7.1f} ms   ({r['generated']:.0f} tokens, "
          f"prompts of {r['prompt_tokens']:.0f})", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True)
    ap.add_argument("--bin-dir", required=True)
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--streams", default="1,8,32")
    args = ap.parse_args()
    results = {}
    for n in (int(s) for s in args.streams.split(",")):
        print(f"{n} concurrent streams:", flush=True)
        servers = [
            ("llama-server", lambda: llama_server(args.llama_server, args.model, args.threads, n),
             llama_body, parse_llama),
            ("rbee", lambda: rbee_worker(args.worker, args.model, args.threads, n),
             rbee_body, parse_rbee),
        ]
        for name, launch, body, parse in servers:
            proc, url = launch()
            try:
                results[(name, n)] = r = runs_of(url, body, parse, n, args.runs)
                show(name, r)
            finally:
                stop([proc])
        ours, theirs = results[("rbee", n)], results[("llama-server", n)]
        print(f"  rbee / llama-server: aggregate {ours['agg_tps'] / theirs['agg_tps']:.2f}x, "
              f"TTFT p50 {ours['ttft_p50'] / theirs['ttft_p50']:.2f}x", flush=True)
    if ("rbee", 1) in results and ("rbee", 8) in results:
        print(f"rbee aggregate at 8 streams / its single stream: "
              f"{results[('rbee', 8)]['agg_tps'] / results[('rbee', 1)]['agg_tps']:.2f}x "
              f"(llama-server: {results[('llama-server', 8)]['agg_tps'] / results[('llama-server', 1)]['agg_tps']:.2f}x)")
    print("8 concurrent streams through the queen:", flush=True)
    tmp = tempfile.mkdtemp(prefix="rbee-bench-batching-")
    procs = []
    try:
        url, body = queen_stack(args.bin_dir, args.worker, args.model, args.threads, 8, tmp, procs)
        r = runs_of(url, body, parse_rbee, 8, args.runs)
        show("queen", r)
        if ("rbee", 8) in results:
            direct = results[("rbee", 8)]
            print(f"  queen / straight to the worker: aggregate {r['agg_tps'] / direct['agg_tps']:.2f}x, "
                  f"TTFT p50 {r['ttft_p50'] - direct['ttft_p50']:+.3f} s")
    finally:
        stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
