//! The whole system as a user meets it: the quickstart itself, one request
//! followed through every daemon's log and audit trail, and the stack
//! recovering from a killed worker, a killed hive and a restarted queen.
//! Real binaries, the real default model, loopback, temp dirs.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rbee_system_tests::queen::{
    client, error_code, hive_with_model, long_request, queen_spec, ready_queen, send, stream,
    wait_for, wait_ready_workers,
};
use rbee_system_tests::{
    alive, binary, free_port, processes_mentioning, read_trail, verify_trail, workspace_root,
    DaemonSpec, RunningDaemon, TEST_TOKEN,
};
use serde_json::{json, Value};

fn chat_body(stream: bool) -> Value {
    json!({
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."},
            {"role": "user", "content": "What is the capital of France?"}
        ],
        "temperature": 0,
        "max_tokens": 24,
        "stream": stream,
    })
}

/// The quickstart script and the stack it started: on drop (a failed
/// assertion included) the script is asked to stop the stack, and whatever
/// still runs from the state dir after that is killed.
struct Quickstart {
    child: std::process::Child,
    state: String,
}

impl Drop for Quickstart {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM);
            }
            let until = Instant::now() + Duration::from_secs(60);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for pid in processes_mentioning(&self.state) {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

#[test]
fn the_quickstart_answers_paris_and_ctrl_c_leaves_no_process() {
    let state = tempfile::tempdir().expect("state dir");
    let bin_dir = binary("queen-rbee")
        .parent()
        .expect("the binaries' directory")
        .to_path_buf();
    let child = Command::new("python3")
        .arg(workspace_root().join("scripts/quickstart.py"))
        .arg("--bin-dir")
        .arg(&bin_dir)
        .args(["--queen-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--hive-addr", &format!("127.0.0.1:{}", free_port())])
        .arg("--state-dir")
        .arg(state.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the quickstart");
    let mut run = Quickstart {
        child,
        state: state.path().display().to_string(),
    };
    let child = &mut run.child;
    // Wait for the serving banner, then press Ctrl-C (SIGINT to the script).
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut out = Vec::new();
    let started = Instant::now();
    while !out.iter().any(|l: &String| l.starts_with("Ctrl-C stops")) {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => out.push(line),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if started.elapsed() > Duration::from_secs(300) {
            panic!("the quickstart did not serve in 300 s:\n{}", out.join("\n"));
        }
    }
    let text = out.join("\n");
    assert!(text.contains("Paris"), "the answer:\n{text}");
    assert!(text.contains("Authorization: Bearer"), "{text}");
    let token = std::fs::read_to_string(state.path().join("api-token")).expect("token file");
    assert!(token.trim().len() >= 32, "a generated token");
    assert!(text.contains(token.trim()), "the token is printed");
    let state_path = state.path().display().to_string();
    assert!(
        processes_mentioning(&state_path).len() >= 3,
        "queen, hive and worker run from the state dir"
    );

    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, Signal::SIGINT).expect("Ctrl-C");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(400),
            "the quickstart did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let rest: Vec<String> = rx.try_iter().collect();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    assert!(status.success(), "{}\n{stderr}", rest.join("\n"));
    assert!(
        rest.iter().any(|l| l.contains("exited 0")),
        "{}",
        rest.join("\n")
    );
    assert_eq!(
        processes_mentioning(&state_path),
        Vec::<u32>::new(),
        "no process of the stack is left"
    );
    // The tokens never reach a log.
    for log in ["queen-rbee.log", "rbee-hive.log"] {
        let text = std::fs::read_to_string(state.path().join("logs").join(log)).expect("log");
        assert!(!text.contains(token.trim()), "{log} holds the token");
    }
}

/// A hive whose workers log to files under its models dir.
fn worker_logs(models_dir: &Path) -> String {
    let run = models_dir.join("run");
    let mut all = String::new();
    for entry in std::fs::read_dir(&run).into_iter().flatten().flatten() {
        if let Ok(text) = std::fs::read_to_string(entry.path().join("worker.log")) {
            all.push_str(&text);
        }
    }
    all
}

#[test]
fn one_request_id_runs_through_every_log_and_every_audit_trail_verifies() {
    let audit = tempfile::tempdir().expect("audit dir");
    let models = tempfile::tempdir().expect("models dir");
    let audit_dir = audit.path().display().to_string();
    let with_audit = |spec: DaemonSpec| {
        spec.with_token()
            .env("LLORCH_AUDIT_MODE", "local")
            .env("LLORCH_AUDIT_DIR", &audit_dir)
    };
    let hive = hive_with_model(
        with_audit(DaemonSpec::new("rbee-hive")).args([
            "--models-dir".to_owned(),
            models.path().display().to_string(),
        ]),
        Some(TEST_TOKEN),
    );
    let mut queen = ready_queen(&with_audit(queen_spec(&[&hive])), Some(TEST_TOKEN));

    // The first request starts the worker: its id reaches the hive's spawn.
    let id = format!("e2e-trace-{}", std::process::id());
    let mut events = rbee_system_tests::queen::EventStream::open(
        client()
            .post(queen.url("/v1/chat/completions"))
            .bearer_auth(TEST_TOKEN)
            .header("x-request-id", &id)
            .json(&chat_body(true)),
    );
    let all = events.rest();
    let text: String = all
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(text.contains("Paris"), "{all:?}");

    let has = |lines: &[String]| lines.iter().any(|l| l.contains(&id));
    wait_for(Duration::from_secs(5), "the id in the queen's log", || {
        has(&queen.logs())
    });
    assert!(
        has(&hive.logs()),
        "the hive logged the cold-start spawn with the id"
    );
    wait_for(Duration::from_secs(5), "the id in the worker's log", || {
        worker_logs(models.path()).contains(&id)
    });
    for (name, text) in [
        ("queen", queen.logs().join("\n")),
        ("hive", hive.logs().join("\n")),
        ("worker", worker_logs(models.path())),
    ] {
        assert!(
            !text.contains(TEST_TOKEN),
            "the {name}'s log holds the token"
        );
    }

    // Stop the stack gracefully, then check each daemon's chain.
    queen.signal(Signal::SIGTERM);
    assert!(queen
        .wait_exit(Duration::from_secs(30))
        .is_some_and(|s| s.success()));
    let mut hive = hive;
    hive.signal(Signal::SIGTERM);
    assert!(hive
        .wait_exit(Duration::from_secs(40))
        .is_some_and(|s| s.success()));
    let mut services: Vec<String> = std::fs::read_dir(audit.path())
        .expect("audit dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    services.sort();
    assert!(services.iter().any(|s| s == "queen-rbee"), "{services:?}");
    assert!(services.iter().any(|s| s == "rbee-hive"), "{services:?}");
    assert!(
        services.iter().any(|s| s.starts_with("llm-worker-rbee-")),
        "{services:?}"
    );
    for service in &services {
        let dir = audit.path().join(service);
        verify_trail(&dir);
        assert!(
            !read_trail(&dir).contains(TEST_TOKEN),
            "{service}'s trail holds the token"
        );
    }
    let queen_trail = read_trail(&audit.path().join("queen-rbee"));
    for event in [
        "inference_admitted",
        "inference_finished",
        "hive_registered",
    ] {
        assert!(queen_trail.contains(event), "{event} in the queen's trail");
    }
    assert!(read_trail(&audit.path().join("rbee-hive")).contains("worker_spawned"));
}

fn hive_workers(hive: &RunningDaemon) -> Vec<Value> {
    let (_, body, _) = send(client().get(hive.url("/v1/workers/list")));
    body["workers"].as_array().cloned().unwrap_or_default()
}

fn hive_state(queen: &RunningDaemon) -> String {
    let (_, body, _) = send(client().get(queen.url("/v2/hives/list")));
    body["hives"][0]["state"].as_str().unwrap_or("").to_owned()
}

fn ask(queen: &RunningDaemon) -> (u16, Value) {
    let (status, body, _) = send(
        client()
            .post(queen.url("/v1/chat/completions"))
            .json(&chat_body(false)),
    );
    (status, body)
}

#[test]
fn killed_worker_killed_hive_and_restarted_queen_all_come_back() {
    let models = tempfile::tempdir().expect("models dir");
    let hive_addr = format!("127.0.0.1:{}", free_port());
    let hive_spec = DaemonSpec::new("rbee-hive").addr(&hive_addr).args([
        "--models-dir".to_owned(),
        models.path().display().to_string(),
        "--restart-backoff-base-ms".to_owned(),
        "200".to_owned(),
    ]);
    let mut hive = hive_with_model(hive_spec.clone(), None);
    let database = tempfile::tempdir().expect("queen dir");
    let queen_spec = queen_spec(&[&hive]).args([
        "--database".to_owned(),
        database.path().join("queen.sqlite3").display().to_string(),
        "--hive-misses".to_owned(),
        "2".to_owned(),
    ]);
    let mut queen = ready_queen(&queen_spec, None);
    let (status, body) = ask(&queen);
    assert_eq!(status, 200, "{body}");

    // kill -9 the worker mid-stream: the client hears WORKER_FAILED at once,
    // the hive restarts the worker, the next request is answered.
    let before = hive_workers(&hive);
    let pid = before[0]["pid"].as_u64().expect("worker pid");
    let mut s = stream(&queen, &long_request(400, true));
    s.until_token();
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        Signal::SIGKILL,
    )
    .expect("kill the worker");
    let rest = s.rest();
    assert!(
        killed.elapsed() < Duration::from_secs(5),
        "the stream ended promptly"
    );
    assert!(
        rest.iter().any(|e| error_code(e) == "WORKER_FAILED"),
        "{rest:?}"
    );
    wait_for(
        Duration::from_secs(60),
        "the hive to restart the worker",
        || {
            hive_workers(&hive)
                .iter()
                .any(|w| w["state"] == "idle" && w["pid"].as_u64() != Some(pid))
        },
    );
    let (status, body) = ask(&queen);
    assert_eq!(status, 200, "after the restart: {body}");

    // kill -9 the hive: its worker dies with it, the queen marks the hive
    // unreachable; the hive restarted on the same address is back.
    let worker_pid = hive_workers(&hive)[0]["pid"].as_u64().expect("pid");
    hive.signal(Signal::SIGKILL);
    let _ = hive.wait_exit(Duration::from_secs(5));
    wait_for(
        Duration::from_secs(5),
        "the orphaned worker to exit",
        || !alive(worker_pid),
    );
    wait_for(
        Duration::from_secs(10),
        "the queen to mark the hive unreachable",
        || hive_state(&queen) == "unreachable",
    );
    let (status, body) = ask(&queen);
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "NO_CAPACITY", "{body}");
    let hive = hive_spec.spawn();
    wait_for(
        Duration::from_secs(15),
        "the hive to be reachable again",
        || hive_state(&queen) == "reachable",
    );
    let (status, body) = ask(&queen);
    assert_eq!(status, 200, "the restarted hive serves again: {body}");

    // Restart the queen without --hive flags: the registry brings it back.
    queen.signal(Signal::SIGTERM);
    assert!(queen
        .wait_exit(Duration::from_secs(30))
        .is_some_and(|s| s.success()));
    let queen = ready_queen(
        &DaemonSpec::new("queen-rbee").args([
            "--database".to_owned(),
            database.path().join("queen.sqlite3").display().to_string(),
            "--hive-poll-interval-ms".to_owned(),
            "200".to_owned(),
        ]),
        None,
    );
    wait_ready_workers(&queen, 1, None);
    let (status, body) = ask(&queen);
    assert_eq!(status, 200, "{body}");
    drop(hive);
}

/// What `--routes` prints: the routes the daemon's router was built from.
fn routes_of(spec: &DaemonSpec) -> Vec<Value> {
    let out = spec
        .clone()
        .args(["--routes"])
        .run_to_exit(Duration::from_secs(30));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON route"))
        .collect()
}

/// `/v1/inference/{job_id}` with every placeholder filled.
fn concrete(path: &str) -> String {
    let mut out = String::new();
    let mut in_param = false;
    for c in path.chars() {
        match c {
            '{' => in_param = true,
            '}' => {
                in_param = false;
                out.push_str("x1");
            }
            c if !in_param => out.push(c),
            _ => {}
        }
    }
    out
}

#[test]
fn every_protected_route_of_every_daemon_refuses_requests_without_the_token() {
    let hive_spec = DaemonSpec::new("rbee-hive").with_token();
    let hive = hive_with_model(hive_spec.clone(), Some(TEST_TOKEN));
    let queen_spec = queen_spec(&[&hive]).with_token();
    let queen = ready_queen(&queen_spec, Some(TEST_TOKEN));
    let worker_spec = DaemonSpec::new("llm-worker-rbee").with_token();
    let worker = worker_spec.spawn();

    for (spec, daemon, must_list) in [
        (&queen_spec, &queen, "/v1/chat/completions"),
        (&hive_spec, &hive, "/v1/workers/spawn"),
        (&worker_spec, &worker, "/v1/inference"),
    ] {
        let routes = routes_of(spec);
        assert!(
            routes.iter().any(|r| r["path"] == must_list),
            "{}: {routes:?}",
            daemon.name()
        );
        assert!(routes.iter().any(|r| r["path"] == "/v1/admin/shutdown"));
        let mut protected = 0;
        for route in &routes {
            let method = route["method"].as_str().expect("method");
            let path = concrete(route["path"].as_str().expect("path"));
            let url = daemon.url(&path);
            let request = |token: Option<&str>| {
                let mut r = client().request(method.parse().expect("a method"), &url);
                if method != "GET" {
                    r = r.json(&json!({}));
                }
                if let Some(t) = token {
                    r = r.bearer_auth(t);
                }
                // Public routes answer in their own formats (/metrics is text).
                let response = r.send().expect("the daemon answers");
                let status = response.status().as_u16();
                let text = response.text().unwrap_or_default();
                (
                    status,
                    serde_json::from_str::<Value>(&text).unwrap_or(Value::Null),
                )
            };
            let (status, body) = request(None);
            if route["auth"] == true {
                protected += 1;
                assert_eq!(status, 401, "{} {method} {path}: {body}", daemon.name());
                assert_eq!(body["error"]["code"], "MISSING_API_KEY", "{method} {path}");
                let (status, body) = request(Some("wrong-token-0123456789abcdef"));
                assert_eq!(status, 401, "{} {method} {path}: {body}", daemon.name());
                assert_eq!(body["error"]["code"], "INVALID_API_KEY", "{method} {path}");
            } else {
                assert_ne!(status, 401, "{} {method} {path} is public", daemon.name());
            }
        }
        assert!(
            protected >= 5,
            "{}: {protected} protected routes",
            daemon.name()
        );
        assert!(
            daemon.logs().iter().all(|l| !l.contains(TEST_TOKEN)),
            "{}'s log holds the token",
            daemon.name()
        );
    }
}
