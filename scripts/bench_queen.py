#!/usr/bin/env python3
"""Measure what the queen adds to a stream, against the same load sent
straight to the worker and through nginx as a plain reverse proxy.

Everything runs in this one command, on loopback:

- a real `rbee-hive` spawns `fake-worker` (a test double with the worker's
  API that emits a token every --token-interval-us and has --slots slots);
- a real `queen-rbee` routes to it; nginx (Debian's package) proxies to the
  same worker with buffering off and upstream keep-alive;
- `rbee-loadgen` keeps --concurrency streams open against each target in
  turn, --runs times, interleaved, and reports TTFT and inter-token latency
  (p50/p99) with arrivals spread over one request's duration; `wrk` (Debian's
  package) then measures the most requests/s with one-token streams; the
  queen's CPU time and RSS are read from /proc;
- then a second hive spawns the real `llm-worker-rbee` with the default
  model, and the load (concurrency = its slots) goes to it directly and
  through a second queen.

The load generators are pinned to CPU 0 and the daemons to CPU 1 when the
machine has two or more CPUs; for the real worker, the worker (one compute
thread, RBEE_WORKER_THREADS=1) and its hive get CPU 1 and the queen shares
CPU 0 with the load generator. The queen logs at `warn` (no per-request
lines), as nginx runs with access_log off; RBEE_BENCH_QUEEN_LOG overrides.
Medians over the runs are printed.

Usage: scripts/bench_queen.py [--bin-dir target/release] [--runs 3]
Build first: cargo build --release -p queen-rbee -p rbee-hive -p llm-worker-rbee -p rbee-bench
"""

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import request  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pin(cpu):
    if cpu is None or not shutil.which("taskset"):
        return []
    return ["taskset", "-c", str(cpu)]


def start(argv, cpu, env=None):
    """Start a daemon pinned to `cpu`; return (process, URL)."""
    return benchlib.start(argv, env, pin(cpu))


def wait(what, check, timeout=60):
    started = time.time()
    while time.time() - started < timeout:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def hive_with_worker(bins, models, model, cpu, worker_binary, slots, env):
    hive, url = start(
        [f"{bins}/rbee-hive", "--models-dir", models, "--worker-binary", worker_binary,
         "--disk-reserve-mib", "0"],
        cpu,
        env,
    )
    ref = f"file:{model}"
    status, body = request("POST", f"{url}/v1/models/provision", {"model_ref": ref})
    assert status == 202, body
    wait("the model", lambda: any(m["model_ref"] == ref for m in request("GET", f"{url}/v1/models/list")[1]["models"]))
    status, body = request("POST", f"{url}/v1/workers/spawn", {"model_ref": ref, "slots": slots})
    assert status == 202, body
    worker = {}

    def ready():
        for w in request("GET", f"{url}/v1/workers/list")[1]["workers"]:
            if w["worker_id"] == body["worker_id"] and w["state"] == "idle":
                worker.update(w)
                return True
        return False

    wait("the worker", ready, timeout=120)
    return hive, url, ref, worker["url"]


def queen_for(bins, hive_url, cpu, db):
    # Per-request log lines off, as nginx's access_log is off below; the
    # listening line stays on (the script reads the port from it).
    queen, url = start([f"{bins}/queen-rbee", "--hive", hive_url, "--database", db], cpu,
                       {"RUST_LOG": os.environ.get("RBEE_BENCH_QUEEN_LOG", "warn,rbee_http::server=info")})
    wait("the queen's worker", lambda: any(
        w["state"] in ("idle", "busy") for w in request("GET", f"{url}/v2/workers/list")[1]["workers"]))
    return queen, url


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nginx(tmp, upstream, cpu):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        raise SystemExit("nginx is not installed: apt-get install nginx-light")
    port = free_port()
    host = upstream.removeprefix("http://")
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  upstream worker {{ server {host}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://worker;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 300s;
    }}
  }}
}}
""")
    proc = subprocess.Popen(pin(cpu) + [nginx, "-p", tmp, "-c", conf, "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait("nginx", lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True)
    return proc, url


def proc_cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mib(pid, key="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def loadgen(bins, cpu, url, model, concurrency, requests, max_tokens, warmup, stagger_ms=0):
    argv = pin(cpu) + [f"{bins}/rbee-loadgen", "--url", url, "--concurrency", str(concurrency),
                       "--requests", str(requests), "--max-tokens", str(max_tokens),
                       "--warmup", str(warmup), "--stagger-ms", str(stagger_ms)]
    if model:
        argv += ["--model", model]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def wrk_ms(text):
    m = re.match(r"([\d.]+)(us|ms|s)$", text)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]


def wrk(cpu, url, model, concurrency, seconds, tmp):
    """Max requests/s: wrk keeps `concurrency` connections busy with
    one-token streaming requests (each a complete SSE answer)."""
    body = {"prompt": "Hi", "max_tokens": 1, "ignore_eos": True, "stream": True}
    if model:
        body["model"] = model
    script = os.path.join(tmp, "post.lua")
    with open(script, "w") as f:
        f.write('wrk.method = "POST"\n')
        f.write('wrk.headers["Content-Type"] = "application/json"\n')
        f.write(f"wrk.body = {json.dumps(json.dumps(body))}\n")
    out = subprocess.run(pin(cpu) + ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency",
                                     "-s", script, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = wrk_ms(re.search(r"\s50%\s+(\S+)", out).group(1))
    p99 = wrk_ms(re.search(r"\s99%\s+(\S+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "ttft_p50_ms": p50, "ttft_p99_ms": p99, "itl_p50_ms": None, "itl_p99_ms": None,
            "errors": int(errors.group(1)) if errors else 0, "wall_s": float(seconds),
            "socket_errors": socket_errors.group(1) if socket_errors else None}


def median_of(runs, key):
    values = [r[key] for r in runs if r[key] is not None]
    return statistics.median(values) if values else None


def scenario(name, targets, runs, queen_pid, run):
    """Run `run(url, model)` against each target, interleaved, `runs` times."""
    results = {t: [] for t in targets}
    cpu = []
    for _ in range(runs):
        for target, (url, model) in targets.items():
            before = proc_cpu_s(queen_pid) if target == "queen" else None
            r = run(url, model)
            if before is not None:
                cpu.append((proc_cpu_s(queen_pid) - before) / max(r["wall_s"], 1e-9))
            if r["errors"]:
                print(f"warning: {name}/{target}: {r['errors']} errors", file=sys.stderr)
            results[target].append(r)
    summary = {}
    for target, rs in results.items():
        summary[target] = {k: median_of(rs, k) for k in
                           ("rps", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "errors")}
    summary["queen_cpu_cores"] = statistics.median(cpu) if cpu else None
    summary["queen_rss_mib"] = proc_rss_mib(queen_pid)
    summary["queen_peak_rss_mib"] = proc_rss_mib(queen_pid, "VmHWM")
    return summary


def fmt(v, width, digits):
    return f"{'-':>{width}}" if v is None or v != v else f"{v:{width}.{digits}f}"


def delta(a, b):
    return "n/a" if a is None or b is None or a != a or b != b else f"{a - b:+.3f} ms"


def show(name, s, baseline="direct"):
    print(f"\n## {name}")
    print(f"{'target':8} {'req/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}  (ms)")
    for t in ("direct", "nginx", "queen"):
        if t in s:
            r = s[t]
            print(f"{t:8} {fmt(r['rps'], 9, 1)} {fmt(r['ttft_p50_ms'], 9, 3)} {fmt(r['ttft_p99_ms'], 9, 3)} "
                  f"{fmt(r['itl_p50_ms'], 8, 3)} {fmt(r['itl_p99_ms'], 8, 3)}")
    q, b = s["queen"], s[baseline]
    print(f"queen - {baseline}: TTFT p50 {delta(q['ttft_p50_ms'], b['ttft_p50_ms'])}, "
          f"p99 {delta(q['ttft_p99_ms'], b['ttft_p99_ms'])}, ITL p50 {delta(q['itl_p50_ms'], b['itl_p50_ms'])}, "
          f"p99 {delta(q['itl_p99_ms'], b['itl_p99_ms'])}")
    if "nginx" in s:
        n = s["nginx"]
        print(f"nginx - {baseline}: TTFT p50 {delta(n['ttft_p50_ms'], b['ttft_p50_ms'])}; "
              f"queen/nginx req/s: {q['rps'] / n['rps']:.3f}")
    print(f"queen CPU {s['queen_cpu_cores']:.3f} cores during its runs; RSS {s['queen_rss_mib']:.1f} MiB "
          f"(peak {s['queen_peak_rss_mib']:.1f} MiB)")


class Daemons(list):
    """Processes to stop (SIGTERM, then SIGKILL after 30 s) on leaving."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        benchlib.stop(self)


def fake_scenarios(args, bins, model, tmp, load_cpu, daemon_cpu, procs, out):
    hive, hive_url, ref, worker = hive_with_worker(
        bins, os.path.join(tmp, "models"), model, daemon_cpu,
        f"{bins}/fake-worker", args.concurrency,
        {"RBEE_FAKE_TOKEN_INTERVAL_US": str(args.token_interval_us)})
    procs.append(hive)
    queen, queen_url = queen_for(bins, hive_url, daemon_cpu, os.path.join(tmp, "queen.sqlite3"))
    procs.append(queen)
    nginx, nginx_url = start_nginx(tmp, worker, daemon_cpu)
    procs.append(nginx)
    targets = {
        "direct": (f"{worker}/v1/inference", None),
        "nginx": (f"{nginx_url}/v1/inference", None),
        "queen": (f"{queen_url}/v1/inference", ref),
    }
    c = args.concurrency
    tokens = 32
    stagger = tokens * args.token_interval_us // 1000
    out["fake_latency"] = scenario(
        "latency", targets, args.runs, queen.pid,
        lambda url, model: loadgen(bins, load_cpu, url, model, concurrency=c, requests=c * 10,
                                   max_tokens=tokens, warmup=c, stagger_ms=stagger))
    show(f"fake worker, {c} streams x {tokens} tokens, one every {args.token_interval_us} us "
         f"(first at once), arrivals spread over {stagger} ms", out["fake_latency"])
    if shutil.which("wrk"):
        out["fake_throughput"] = scenario(
            "throughput", targets, args.runs, queen.pid,
            lambda url, model: wrk(load_cpu, url, model, c, args.wrk_seconds, tmp))
        show(f"fake worker, wrk -c{c}, one-token streams (max requests/s; latency is the whole answer)",
             out["fake_throughput"])
    else:
        print("wrk is not installed (apt-get install wrk): max requests/s skipped", file=sys.stderr)


def real_scenario(args, bins, model, tmp, load_cpu, daemon_cpu, procs, out):
    # The worker (one compute thread) and its hive on one CPU, the queen
    # with the load generator on the other, so the model's compute does
    # not steal the queen's CPU.
    hive, hive_url, ref, worker = hive_with_worker(
        bins, os.path.join(tmp, "models-real"), model, daemon_cpu,
        f"{bins}/llm-worker-rbee", 1, {"RBEE_WORKER_THREADS": "1"})
    procs.append(hive)
    queen, queen_url = queen_for(bins, hive_url, load_cpu, os.path.join(tmp, "queen-real.sqlite3"))
    procs.append(queen)
    targets = {
        "direct": (f"{worker}/v1/inference", None),
        "queen": (f"{queen_url}/v1/inference", ref),
    }
    out["real"] = scenario(
        "real", targets, args.runs, queen.pid,
        lambda url, model: loadgen(bins, load_cpu, url, model, concurrency=1,
                                   requests=args.real_requests, max_tokens=32, warmup=2))
    show(f"real worker (SmolLM2-135M Q4_1, CPU, 1 slot, 1 thread), 1 stream x 32 tokens, "
         f"{args.real_requests} requests a run", out["real"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--token-interval-us", type=int, default=10000)
    ap.add_argument("--wrk-seconds", type=int, default=10)
    ap.add_argument("--skip-real", action="store_true", help="only the fake worker")
    ap.add_argument("--only-real", action="store_true", help="only the real worker")
    ap.add_argument("--real-requests", type=int, default=30)
    args = ap.parse_args()
    bins = args.bin_dir
    model = subprocess.run(["bash", os.path.join(ROOT, "scripts", "fetch-model.sh")],
                           capture_output=True, text=True, check=True).stdout.strip()
    cpus = os.cpu_count() or 1
    load_cpu, daemon_cpu = (0, 1) if cpus >= 2 else (None, None)
    print(f"CPUs: {cpus}; load generator on {load_cpu}, daemons on {daemon_cpu}")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.only_real:
            with Daemons() as procs:
                fake_scenarios(args, bins, model, tmp, load_cpu, daemon_cpu, procs, out)
        if not args.skip_real:
            with Daemons() as procs:
                real_scenario(args, bins, model, tmp, load_cpu, daemon_cpu, procs, out)
    print("\n" + json.dumps(out))


if __name__ == "__main__":
    main()
