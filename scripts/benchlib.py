"""Helpers shared by the benchmark scripts and the quickstart: JSON over
HTTP and starting a daemon on a port the OS chooses."""

import json
import os
import re
import subprocess
import urllib.request


def request(method, url, body=None, timeout=30, token=None):
    """Send `body` as JSON (with the bearer `token`, if any); return
    (status, decoded JSON body)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if token is not None:
        req.add_header("authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def stop(procs):
    """Terminate every process, then wait for each (killing one that takes
    over 30 s)."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def start(argv, env=None, prefix=()):
    """Start a daemon (after `prefix`, e.g. taskset) with JSON logs on a
    free port; return (process, base URL) once it logs its address. Its
    stderr keeps being drained so it never blocks on a full pipe."""
    proc = subprocess.Popen(
        list(prefix) + argv + ["--addr", "127.0.0.1:0", "--log-format", "json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        text=True,
    )
    for line in proc.stderr:
        m = re.search(r'listening","addr":"([^"]+)"', line)
        if m:
            subprocess.Popen(["cat"], stdin=proc.stderr, stdout=subprocess.DEVNULL)
            return proc, "http://" + m.group(1)
    raise SystemExit(f"{argv[0]} did not start")
