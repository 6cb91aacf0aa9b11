#!/usr/bin/env python3
"""Bring up the whole rbee stack on loopback with the default model, ask it
one question, and keep it serving.

1. fetches the default model once (scripts/fetch-model.sh, cached);
2. writes a fresh random API token (0600) and starts `queen-rbee` and
   `rbee-hive` with it, the hive registered with the queen;
3. provisions the model through the hive's API (a `file:` ref);
4. sends one streaming chat request through the queen, which cold-starts a
   worker on the hive, and prints the answer as it arrives;
5. prints the URLs, the token and ready-to-paste curl commands, and keeps
   serving in the foreground until Ctrl-C (or SIGTERM), which stops the
   queen and the hive gracefully (the hive stops its workers) and leaves no
   process behind.

Usage: scripts/quickstart.sh [--queen-addr 127.0.0.1:8080] [--hive-addr 127.0.0.1:9200]
                             [--state-dir DIR] [--prompt TEXT] [--exit-after-answer]
The binaries are read from --bin-dir (default $CARGO_TARGET_DIR/release or
target/release; the .sh
wrapper builds them first).
"""

import argparse
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import benchlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM = "You are a helpful assistant. Answer in one short sentence."


class Stop(Exception):
    """SIGINT or SIGTERM arrived."""


def on_signal(signum, _frame):
    raise Stop(signal.Signals(signum).name)


def call(method, url, token, body=None, timeout=30):
    """JSON over HTTP with the run's token; returns (status, decoded body)."""
    return benchlib.request(method, url, body, timeout, token=token)


def wait_for(what, check, timeout, procs):
    started = time.time()
    while time.time() - started < timeout:
        for name, p in procs.items():
            if p.poll() is not None:
                raise SystemExit(f"error: {name} exited with {p.returncode} while waiting for {what}; "
                                 f"see its log above")
        try:
            if check():
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"error: timed out after {timeout} s waiting for {what}")


def port_free(addr):
    import socket
    host, port = addr.rsplit(":", 1)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
            return True
        except OSError:
            return False


def stream_chat(queen, token, prompt, out):
    """One streaming chat through the queen; prints deltas as they arrive and
    returns the whole answer."""
    body = {
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": 48,
        "stream": True,
    }
    req = urllib.request.Request(f"{queen}/v1/chat/completions", data=json.dumps(body).encode(), method="POST")
    req.add_header("authorization", f"Bearer {token}")
    req.add_header("content-type", "application/json")
    answer = []
    try:
        r = urllib.request.urlopen(req, timeout=600)
    except urllib.error.HTTPError as e:
        raise SystemExit(f"error: the queen answered {e.code}: {e.read().decode(errors='replace')}")
    with r:
        out.write(f"(request id {r.headers.get('x-request-id')})\n")
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise SystemExit(f"\nerror: {event['error']}")
            for choice in event.get("choices", []):
                piece = (choice.get("delta") or {}).get("content") or ""
                answer.append(piece)
                out.write(piece)
                out.flush()
    out.write("\n")
    return "".join(answer)


def stop_all(procs, grace):
    """SIGTERM the queen first (it drains), then the hive (it stops its
    workers); SIGKILL what is still there after `grace` seconds."""
    for name in ("queen-rbee", "rbee-hive"):
        p = procs.get(name)
        if p and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop within {grace} s; killing it", file=sys.stderr)
                p.kill()
                p.wait()
    codes = {name: p.returncode for name, p in procs.items()}
    return codes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    ap.add_argument("--bin-dir", default=os.path.join(os.path.join(ROOT, target), "release"))
    ap.add_argument("--queen-addr", default=os.environ.get("RBEE_QUICKSTART_QUEEN_ADDR", "127.0.0.1:8080"))
    ap.add_argument("--hive-addr", default=os.environ.get("RBEE_QUICKSTART_HIVE_ADDR", "127.0.0.1:9200"))
    cache = os.environ.get("RBEE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rbee")
    ap.add_argument("--state-dir", default=os.path.join(cache, "quickstart"),
                    help="the queen's registry, the hive's catalog, logs and the token")
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--exit-after-answer", action="store_true",
                    help="stop the stack after the first answer instead of serving")
    args = ap.parse_args()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    for addr, flag in ((args.queen_addr, "--queen-addr"), (args.hive_addr, "--hive-addr")):
        if not port_free(addr):
            raise SystemExit(f"error: {addr} is already in use; pick another with {flag} HOST:PORT")
    for name in ("queen-rbee", "rbee-hive", "llm-worker-rbee"):
        if not os.access(os.path.join(args.bin_dir, name), os.X_OK):
            raise SystemExit(f"error: {args.bin_dir}/{name} is missing; run scripts/quickstart.sh, "
                             f"which builds it")

    model = subprocess.run(["bash", os.path.join(ROOT, "scripts", "fetch-model.sh")],
                           check=True, capture_output=True, text=True).stdout.strip()
    state = os.path.abspath(args.state_dir)
    logs = os.path.join(state, "logs")
    os.makedirs(logs, exist_ok=True)
    token = secrets.token_urlsafe(32)
    token_file = os.path.join(state, "api-token")
    fd = os.open(token_file + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(token_file + ".tmp", token_file)

    env = {**os.environ, "LLORCH_API_TOKEN_FILE": token_file}
    env.setdefault("RUST_LOG", "info")
    queen = f"http://{args.queen_addr}"
    hive = f"http://{args.hive_addr}"
    procs = {}

    def start(name, argv):
        log = open(os.path.join(logs, f"{name}.log"), "ab")
        # Own process group: a Ctrl-C reaches this script only, which then
        # stops the daemons in order.
        procs[name] = subprocess.Popen([os.path.join(args.bin_dir, name)] + argv, env=env,
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    code = 0
    try:
        start("queen-rbee", ["--addr", args.queen_addr, "--database", os.path.join(state, "queen.sqlite3")])
        wait_for("the queen", lambda: call("GET", f"{queen}/health/live", token)[0] == 200, 30, procs)
        start("rbee-hive", ["--addr", args.hive_addr, "--models-dir", os.path.join(state, "models"),
                            "--queen-url", queen, "--disk-reserve-mib", "256"])
        wait_for("the hive", lambda: call("GET", f"{hive}/health/live", token)[0] == 200, 30, procs)
        print(f"queen-rbee  {queen}   (log {logs}/queen-rbee.log)")
        print(f"rbee-hive   {hive}   (log {logs}/rbee-hive.log, workers under {state}/models/run)")

        ref = f"file:{model}"
        status, body = call("POST", f"{hive}/v1/models/provision", token, {"model_ref": ref})
        if status not in (200, 202):
            raise SystemExit(f"error: provisioning {ref} failed ({status}): {body}")
        wait_for("the model in the hive's catalog", lambda: any(
            m["model_ref"] == ref for m in call("GET", f"{hive}/v1/models/list", token)[1]["models"]), 120, procs)
        wait_for("the queen to see the hive", lambda: any(
            h["state"] == "reachable" for h in call("GET", f"{queen}/v2/hives/list", token)[1]["hives"]), 30, procs)
        wait_for("the queen to see the model", lambda: any(
            m["id"] == ref for m in call("GET", f"{queen}/v1/models", token)[1]["data"]), 30, procs)
        print(f"model       {ref}")

        print(f"\n> {args.prompt}\n(the queen starts a worker on the hive for the first request)")
        started = time.time()
        stream_chat(queen, token, args.prompt, sys.stdout)
        print(f"({time.time() - started:.1f} s, including the worker's cold start)")

        curl_auth = f"-H \"Authorization: Bearer $(cat {shlex.quote(token_file)})\""
        print(f"""
The stack is serving. API token (also in {token_file}):
  {token}

  curl -sN {queen}/v1/inference {curl_auth} -H 'content-type: application/json' \\
    -d '{{"prompt":"Write a haiku about bees.","max_tokens":48,"stream":true}}'

  curl -s {queen}/v1/chat/completions {curl_auth} -H 'content-type: application/json' \\
    -d '{{"messages":[{{"role":"system","content":"{SYSTEM}"}},{{"role":"user","content":"What is the capital of Italy?"}}],"temperature":0,"max_tokens":48}}'

  curl -s {queen}/v2/workers/list {curl_auth}
  curl -s {queen}/metrics | grep rbee_queen_

Ctrl-C stops the queen, the hive and its workers.""", flush=True)
        if not args.exit_after_answer:
            while True:
                for name, p in procs.items():
                    if p.poll() is not None:
                        raise SystemExit(f"error: {name} exited with {p.returncode}; see {logs}/{name}.log")
                time.sleep(1)
    except Stop as s:
        print(f"\n{s}: stopping", flush=True)
    except SystemExit as e:
        print(e, file=sys.stderr)
        code = 1
    finally:
        # Ignore a second Ctrl-C while stopping: a half-stopped stack is
        # what this avoids.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        codes = stop_all(procs, grace=40)
        bad = {n: c for n, c in codes.items() if c != 0}
        if bad:
            print(f"error: exit codes {bad}; logs in {logs}", file=sys.stderr)
            code = code or 1
        elif procs:
            print("stopped: queen-rbee and rbee-hive exited 0")
    return code


if __name__ == "__main__":
    sys.exit(main())
