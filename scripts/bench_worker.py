#!/usr/bin/env python3
"""Measure llm-worker-rbee and llama.cpp (llama-cpp-python) on one GGUF.

Both get the same 512-token prompt (built with llama.cpp's tokenizer), greedy
decoding, 128 generated tokens (end-of-sequence ignored) and the same number
of threads. The worker is measured over real HTTP/SSE as a client sees it;
llama.cpp in-process. Each figure is the median of --runs runs.

Then the cost of constrained output: the worker's generation tokens/s on the
same prompt with a JSON Schema (a list of people, at least 40) against
without, runs alternating, median of each.

With --membw, the machine's read bandwidth on the same threads is measured
too, and generation is reported as a fraction of the limit it sets: the
bytes one generated token reads (the worker's packed weights, as its log
reports them, plus its KV cache at the mean context of the generation)
divided into the bandwidth.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request

PROMPT_TOKENS = 512
GEN_TOKENS = 128
# The context both sides allocate (llama.cpp's n_ctx, the worker's --ctx).
N_CTX = 1024
SEED_TEXT = (
    "The history of the printing press begins in the fifteenth century, when "
    "movable type changed how books were made, sold and read across Europe. "
)


def build_prompt(llm, run):
    # Each run's prompt starts differently, so no run finds an earlier one's
    # prompt in the worker's prefix cache.
    text = f"Edition {run + 1}. " + SEED_TEXT * 64
    tokens = llm.tokenize(text.encode(), add_bos=False)[:PROMPT_TOKENS]
    return llm.detokenize(tokens).decode(), tokens


def bench_llamacpp(model, threads, runs):
    from llama_cpp import Llama

    loads, prompt_tps, gen_tps, ttfts = [], [], [], []
    prompt_texts = []
    for run in range(runs):
        t0 = time.perf_counter()
        llm = Llama(model_path=model, n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads,
                    n_batch=PROMPT_TOKENS, verbose=False)
        loads.append(time.perf_counter() - t0)
        prompt_text, prompt_tokens = build_prompt(llm, run)
        prompt_texts.append(prompt_text)
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt_tokens)
        token = llm.sample(top_k=1, temp=0.0)
        t1 = time.perf_counter()
        ttfts.append(t1 - t0)
        prompt_tps.append(len(prompt_tokens) / (t1 - t0))
        t0 = time.perf_counter()
        for _ in range(GEN_TOKENS - 1):
            llm.eval([token])
            token = llm.sample(top_k=1, temp=0.0)
        gen_tps.append((GEN_TOKENS - 1) / (time.perf_counter() - t0))
        del llm
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return prompt_texts, {
        "load_s": statistics.median(loads),
        "prompt_tps": statistics.median(prompt_tps),
        "gen_tps": statistics.median(gen_tps),
        "ttft_s": statistics.median(ttfts),
        "peak_rss": rss,
    }


def start_worker(binary, model, threads, extra):
    env = dict(os.environ, RUST_LOG="warn,rbee_http=info,llm_worker_rbee=info")
    proc = subprocess.Popen(
        [binary, "--model", model, "--addr", "127.0.0.1:0", "--log-format", "json",
         "--threads", str(threads), "--ctx", str(N_CTX), *extra],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, text=True)
    for line in proc.stderr:
        try:
            fields = json.loads(line).get("fields", {})
        except ValueError:
            continue
        if fields.get("message", "").endswith(" listening"):
            addr = fields["addr"]
            break
    else:
        sys.exit("the worker did not start")
    # The model's byte counts come with the "model loaded" line.
    sizes = {}
    for line in proc.stderr:
        try:
            fields = json.loads(line).get("fields", {})
        except ValueError:
            continue
        if fields.get("message", "").startswith("model loaded"):
            sizes = {k: fields.get(k, 0) for k in ("weight_bytes", "kv_bytes_per_position")}
            break
    proc.sizes = sizes
    base = f"http://{addr}"
    deadline = time.time() + 120
    while time.time() < deadline:
        with urllib.request.urlopen(base + "/v1/ready") as r:
            if json.load(r).get("ready"):
                return proc, base
        time.sleep(0.05)
    sys.exit("the worker did not become ready")


def sse_events(base, body):
    req = urllib.request.Request(base + "/v1/inference", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req) as r:
        for raw in r:
            line = raw.decode().rstrip("\n")
            if line.startswith("data: "):
                data = line[6:]
                if data == "[DONE]":
                    return
                yield time.perf_counter(), json.loads(data)


def bench_worker(binary, model, threads, prompt_texts, extra):
    proc, base = start_worker(binary, model, threads, extra)
    try:
        with urllib.request.urlopen(base + "/metrics") as r:
            text = r.read().decode()
        load_s = float(re.search(r"^rbee_worker_model_load_seconds (\S+)", text, re.M).group(1))
        # Warm-up run (page faults, allocator), not counted.
        list(sse_events(base, {"prompt": "Hello", "max_tokens": 8, "temperature": 0}))
        prompt_tps, gen_tps, ttfts, tokens_in = [], [], [], None
        for prompt_text in prompt_texts:
            body = {"prompt": prompt_text, "max_tokens": GEN_TOKENS, "temperature": 0, "ignore_eos": True}
            t0 = time.perf_counter()
            stamps = []
            for t, event in sse_events(base, body):
                if event["type"] == "token":
                    stamps.append(t)
                elif event["type"] == "end":
                    tokens_in = event["tokens_in"]
                    assert event["tokens_out"] == GEN_TOKENS, event
                elif event["type"] == "error":
                    sys.exit(f"worker error: {event}")
            ttft = stamps[0] - t0
            ttfts.append(ttft)
            prompt_tps.append(tokens_in / ttft)
            gen_tps.append((GEN_TOKENS - 1) / (stamps[-1] - stamps[0]))
        with open(f"/proc/{proc.pid}/status") as f:
            rss = int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
        return {
            "load_s": load_s,
            "prompt_tps": statistics.median(prompt_tps),
            "gen_tps": statistics.median(gen_tps),
            "ttft_s": statistics.median(ttfts),
            "peak_rss": rss,
            "tokens_in": tokens_in,
            **proc.sizes,
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# A typical extraction schema, long enough that 128 tokens never complete it.
PEOPLE_SCHEMA = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": 40,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 40},
                    "born": {"type": "integer", "minimum": 1000, "maximum": 2100},
                    "role": {"enum": ["printer", "scribe", "author", "merchant", "reader"]},
                },
                "required": ["name", "born", "role"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["people"],
    "additionalProperties": False,
}


def generation_tps(base, body):
    stamps = []
    text = []
    for t, event in sse_events(base, body):
        if event["type"] == "token":
            stamps.append(t)
            text.append(event["t"])
        elif event["type"] == "error":
            sys.exit(f"worker error: {event}")
    assert len(stamps) == GEN_TOKENS, len(stamps)
    return (GEN_TOKENS - 1) / (stamps[-1] - stamps[0]), "".join(text)


def bench_constrained(binary, model, threads, prompt_texts, extra):
    proc, base = start_worker(binary, model, threads, extra)
    try:
        list(sse_events(base, {"prompt": "Hello", "max_tokens": 8, "temperature": 0}))
        free, constrained, sample = [], [], ""
        for prompt_text in prompt_texts:
            body = {"prompt": prompt_text, "max_tokens": GEN_TOKENS, "temperature": 0, "ignore_eos": True}
            schema = dict(body, response_format={"type": "json_schema", "schema": PEOPLE_SCHEMA})
            free.append(generation_tps(base, body)[0])
            tps, sample = generation_tps(base, schema)
            constrained.append(tps)
        return statistics.median(free), statistics.median(constrained), sample
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--membw", help="the membw binary (bench crate): measure the bandwidth limit")
    ap.add_argument("worker_args", nargs="*", help="extra worker flags, after --")
    a = ap.parse_args()
    prompt_texts, base = bench_llamacpp(a.model, a.threads, a.runs)
    ours = bench_worker(a.worker, a.model, a.threads, prompt_texts, a.worker_args)
    print(f"model: {os.path.basename(a.model)}; threads: {a.threads}; runs: {a.runs} (medians); worker flags: {' '.join(a.worker_args) or '-'}")
    print(f"prompt: {PROMPT_TOKENS} tokens (llama.cpp), {ours['tokens_in']} tokens (rbee); generated: {GEN_TOKENS}")
    rows = [
        ("prompt tokens/s", "prompt_tps", "{:.1f}", True),
        ("generation tokens/s", "gen_tps", "{:.1f}", True),
        ("time to first token (s)", "ttft_s", "{:.3f}", False),
        ("load time (s)", "load_s", "{:.3f}", False),
        ("peak RSS (MiB)", "peak_rss", "{:.0f}", False),
    ]
    print(f"{'metric':28} {'rbee':>10} {'llama.cpp':>10} {'rbee/llama.cpp':>15}")
    for name, key, fmt, _ in rows:
        r, l = ours[key], base[key]
        if key == "peak_rss":
            r, l = r / 2**20, l / 2**20
        print(f"{name:28} {fmt.format(r):>10} {fmt.format(l):>10} {r / l:>15.2f}")
    free, constrained, sample = bench_constrained(a.worker, a.model, a.threads, prompt_texts,
                                                  a.worker_args)
    print(f"constrained output (JSON Schema, {GEN_TOKENS} tokens): {constrained:.1f} tokens/s against "
          f"{free:.1f} without, {constrained / free:.2f}x; it began: {sample[:60]!r}")
    if a.membw and ours.get("weight_bytes"):
        context = ours["tokens_in"] + GEN_TOKENS / 2
        per_token = ours["weight_bytes"] + ours["kv_bytes_per_position"] * context
        # Read a buffer the size of one token's bytes, again and again, as
        # generation does (on machines with a large last-level cache part of
        # it may stay there, for the model as for this measurement).
        mib = str(int(per_token / 2**20) + 1)
        out = subprocess.run([a.membw, "--threads", str(a.threads), "--mib", mib, "--runs", "15"],
                             check=True, capture_output=True, text=True).stdout
        bandwidth = json.loads(out)["gb_per_s"] * 1e9
        limit = bandwidth / per_token
        print(f"read bandwidth, {a.threads} threads, {mib} MiB: {bandwidth / 1e9:.1f} GB/s; one generated token reads "
              f"{per_token / 1e6:.1f} MB ({ours['weight_bytes'] / 1e6:.1f} MB weights + KV at a mean "
              f"context of {context:.0f}): limit {limit:.0f} tokens/s")
        print(f"generation as a fraction of that limit: rbee {ours['gen_tps'] / limit:.2f}, "
              f"llama.cpp {base['gen_tps'] / limit:.2f}")


if __name__ == "__main__":
    main()
