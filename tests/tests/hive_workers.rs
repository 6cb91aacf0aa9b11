//! Workers as an operator meets them: the real `rbee-hive` spawning the real
//! `llm-worker-rbee` with the default model, over HTTP on loopback, with
//! real signals. Crash, stall and slow-load cases use the worker's
//! `fault-injection` build or a corrupt model file.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rbee_system_tests::hive::{
    provision_listed as provision, spawn_worker, worker_record as worker,
};
use rbee_system_tests::http::{client, default_ref, send, wait_for};
use rbee_system_tests::{
    alive, binary, default_model, DaemonSpec, FakeHive, RunningDaemon, FAULT_INJECTION_WORKER,
    TEST_TOKEN,
};
use serde_json::{json, Value};

fn spawn(hive: &RunningDaemon, body: Value) -> (u16, Value, reqwest::header::HeaderMap) {
    spawn_worker(hive, &body)
}

/// Wait until worker `id` is idle; returns its record.
fn wait_idle(hive: &RunningDaemon, id: &str, timeout: Duration) -> Value {
    let mut last = None;
    wait_for(timeout, &format!("worker {id} to be idle"), || {
        last = worker(hive, id);
        last.as_ref().is_some_and(|w| w["state"] == "idle")
    });
    last.expect("worker record")
}

/// Spawn `id` for `model_ref` (202) and wait until it is idle.
fn spawn_idle(hive: &RunningDaemon, model_ref: &str, id: &str) -> Value {
    let (status, body, _) = spawn(hive, json!({ "model_ref": model_ref, "worker_id": id }));
    assert_eq!(status, 202, "{body}");
    wait_idle(hive, id, Duration::from_secs(60))
}

fn metric(hive: &RunningDaemon, line_start: &str) -> f64 {
    let text = client()
        .get(hive.url("/metrics"))
        .send()
        .expect("metrics")
        .text()
        .expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn pid_of(w: &Value) -> u64 {
    w["pid"].as_u64().expect("pid")
}

#[test]
fn a_spawned_worker_calls_back_serves_and_is_restarted_after_sigkill() {
    let audit = tempfile::tempdir().expect("audit dir");
    let run = tempfile::tempdir().expect("run dir");
    let hive = DaemonSpec::new("rbee-hive")
        .with_token()
        .args(["--run-dir", run.path().to_str().expect("UTF-8")])
        .env("LLORCH_AUDIT_MODE", "local")
        .env("LLORCH_AUDIT_DIR", audit.path().to_str().expect("UTF-8"))
        .env("LLORCH_AUDIT_FLUSH", "immediate")
        .args([
            "--health-interval-s",
            "1",
            "--restart-backoff-base-ms",
            "200",
        ])
        .spawn();
    let auth = |r: reqwest::blocking::RequestBuilder| r.bearer_auth(TEST_TOKEN);
    let model_ref = default_ref();
    let (status, body, _) = send(
        auth(client().post(hive.url("/v1/models/provision")))
            .json(&json!({ "model_ref": model_ref })),
    );
    assert_eq!(status, 202, "{body}");
    wait_for(Duration::from_secs(60), "provisioning", || {
        let (_, list, _) = send(auth(client().get(hive.url("/v1/models/list"))));
        list["models"].as_array().is_some_and(|m| !m.is_empty())
    });

    let (status, body, _) = send(
        auth(client().post(hive.url("/v1/workers/spawn")))
            .json(&json!({ "model_ref": model_ref, "worker_id": "w-paris" })),
    );
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["state"], "loading");
    assert!(body["reserved_bytes"].as_u64().expect("reserved") > 0);

    // One request waits for the worker to leave `loading`: the hive
    // answers it when the ready callback arrives.
    let (status, w, _) = send(auth(
        client().get(hive.url("/v1/workers/w-paris?wait_ms=60000")),
    ));
    assert_eq!(status, 200, "{w}");
    assert_eq!(w["state"], "idle", "{w}");
    let (_, list, _) = send(auth(client().get(hive.url("/v1/workers/list"))));
    assert_eq!(list["workers"][0], w, "the list shows the same worker");
    // An unknown id is 404; a wait is bounded, and the query is checked.
    let (status, body, _) = send(auth(
        client().get(hive.url("/v1/workers/w-nobody?wait_ms=10")),
    ));
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "NOT_FOUND");
    for query in ["wait_ms=60001", "wait_ms=soon", "wait=1"] {
        let (status, body, _) = send(auth(
            client().get(hive.url(&format!("/v1/workers/w-paris?{query}"))),
        ));
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(
            body["error"]["details"]["fields"][0]["field"], "wait_ms",
            "{query}: {body}"
        );
    }
    let url = w["url"].as_str().expect("url").to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    assert!(w["last_heartbeat"]
        .as_str()
        .expect("heartbeat time")
        .ends_with('Z'));
    assert!(w["started_at"].as_str().expect("start time").ends_with('Z'));

    // The worker serves the model and was given the hive's token.
    let (status, answer, _) = send(auth(client().post(format!("{url}/v1/inference"))).json(
        &json!({
            "prompt": "The capital of France is",
            "max_tokens": 4,
            "temperature": 0,
            "stream": false
        }),
    ));
    assert_eq!(status, 200, "{answer}");
    assert!(
        !answer["text"].as_str().expect("text").is_empty(),
        "{answer}"
    );
    let (status, _, _) = send(
        client()
            .post(format!("{url}/v1/inference"))
            .json(&json!({"prompt": "x", "max_tokens": 1, "stream": false})),
    );
    assert_eq!(status, 401, "the worker requires the token");

    let (status, ready, _) = send(client().get(hive.url("/health/ready")));
    assert_eq!(status, 200);
    assert_eq!(ready["workers_ready"], 1);

    // kill -9: a new process, counters up.
    let first_pid = pid_of(&w);
    kill(Pid::from_raw(first_pid as i32), Signal::SIGKILL).expect("kill worker");
    let mut restarted = Value::Null;
    wait_for(Duration::from_secs(60), "the restart", || {
        let (_, list, _) = send(auth(client().get(hive.url("/v1/workers/list"))));
        restarted = list["workers"][0].clone();
        restarted["state"] == "idle" && restarted["pid"].as_u64() != Some(first_pid)
    });
    assert_eq!(restarted["restart_count"], 1);
    assert!(restarted["last_restart"].as_str().is_some());
    assert!(!alive(first_pid), "the killed worker was reaped");
    let model_label = format!("rbee_hive_worker_restarts_total{{model=\"{model_ref}\"}}");
    assert_eq!(metric(&hive, &model_label), 1.0);
    assert_eq!(metric(&hive, "rbee_hive_workers_restart_count"), 1.0);
    assert_eq!(
        metric(&hive, "rbee_hive_workers_total{state=\"idle\"}"),
        1.0
    );

    let trail = rbee_system_tests::read_trail(&audit.path().join("rbee-hive"));
    for event in [
        "worker_spawned",
        "worker_ready",
        "worker_crashed",
        "worker_restarted",
        "config_loaded",
    ] {
        assert!(
            trail.contains(&format!("\"event_type\":\"{event}\"")),
            "{event} missing"
        );
    }
    assert!(trail.contains("\"cause\":\"exited\""));

    // The worker's copy of the token lives as long as the worker.
    let token_file = run.path().join("w-paris").join("api-token");
    assert!(token_file.exists());
    let (status, body, _) = send(
        auth(client().post(hive.url("/v1/workers/shutdown")))
            .json(&json!({ "worker_id": "w-paris" })),
    );
    assert_eq!(status, 200, "{body}");
    wait_for(
        Duration::from_secs(10),
        "the token file to be deleted",
        || !token_file.exists(),
    );
    assert!(
        run.path().join("w-paris").join("worker.log").exists(),
        "the log stays"
    );
}

#[test]
fn repeated_crashes_mark_the_worker_failed_and_open_the_breaker() {
    let dir = tempfile::tempdir().expect("dir");
    let corrupt = dir.path().join("corrupt.gguf");
    std::fs::write(&corrupt, b"GGUF\x03\0\0\0 this is not a model").expect("write");
    let settings = dir.path().join("hive.toml");
    std::fs::write(
        &settings,
        "restart_backoff_base_ms = 50\nrestart_backoff_cap_ms = 100\nrestart_max_attempts = 2\n\
         breaker_threshold = 3\nbreaker_cooldown_s = 300\n",
    )
    .expect("settings");
    let hive = DaemonSpec::new("rbee-hive")
        .args(["--config", settings.to_str().expect("UTF-8")])
        .spawn();
    let model_ref = format!("file:{}", corrupt.canonicalize().expect("path").display());
    provision(&hive, &model_ref);

    let (status, body, _) = spawn(
        &hive,
        json!({ "model_ref": model_ref, "worker_id": "w-bad" }),
    );
    assert_eq!(status, 202, "{body}");
    let mut w = Value::Null;
    wait_for(Duration::from_secs(60), "the worker to be failed", || {
        w = worker(&hive, "w-bad").unwrap_or(Value::Null);
        w["state"] == "failed"
    });
    assert_eq!(w["restart_count"], 2);
    assert!(w["pid"].is_null());
    // The list says why, not only that.
    let failure = w["failure"].as_str().expect("a failure reason");
    assert!(
        failure.contains("its last process ended (exited, exit code 1)")
            && failure.contains("circuit breaker"),
        "{failure}"
    );
    assert_eq!(
        metric(
            &hive,
            // The third failure reaches the breaker's threshold before the
            // attempt limit is consulted: the circuit is open.
            "rbee_hive_worker_restart_failures_total{reason=\"circuit_open\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&hive, "rbee_hive_workers_total{state=\"failed\"}"),
        1.0
    );
    let activations =
        format!("rbee_hive_circuit_breaker_activations_total{{model=\"{model_ref}\"}}");
    assert_eq!(metric(&hive, &activations), 1.0);
    let open = format!("rbee_hive_circuit_breaker_open{{model=\"{model_ref}\",device=\"0\"}}");
    assert_eq!(metric(&hive, &open), 1.0);

    let (status, body, headers) = spawn(
        &hive,
        json!({ "model_ref": model_ref, "worker_id": "w-again" }),
    );
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "CIRCUIT_OPEN");
    assert!(headers.get("retry-after").is_some());
    assert!(hive.wait_for_log("worker failed; not restarting it", Duration::from_secs(1)));
}

/// `target` as a path relative to `base` (both absolute).
fn relative(base: &Path, target: &Path) -> PathBuf {
    let common = base
        .components()
        .zip(target.components())
        .take_while(|(a, b)| a == b)
        .count();
    let mut out = PathBuf::new();
    for _ in base.components().skip(common) {
        out.push("..");
    }
    out.extend(target.components().skip(common));
    out
}

#[test]
fn a_relative_worker_binary_is_taken_from_where_the_hive_started_and_a_missing_one_is_named() {
    // Workers start in their own directories; the hive resolves the path
    // from its own at startup (the tests' working directory, inherited).
    let cwd = std::env::current_dir().expect("cwd");
    let worker_binary = relative(&cwd, &binary("llm-worker-rbee"));
    assert!(worker_binary.is_relative());
    let hive = DaemonSpec::new("rbee-hive")
        .args(["--worker-binary", worker_binary.to_str().expect("UTF-8")])
        .spawn();
    provision(&hive, &default_ref());
    spawn_idle(&hive, &default_ref(), "w-rel");

    // A binary that is gone by the time a worker is spawned: the worker is
    // failed, and the list says why.
    let dir = tempfile::tempdir().expect("dir");
    let copy = dir.path().join("llm-worker-rbee");
    std::fs::copy(binary("llm-worker-rbee"), &copy).expect("copy");
    let hive = DaemonSpec::new("rbee-hive")
        .args(["--worker-binary", copy.to_str().expect("UTF-8")])
        .spawn();
    provision(&hive, &default_ref());
    std::fs::remove_file(&copy).expect("remove");
    let (status, body, _) = spawn(
        &hive,
        json!({ "model_ref": default_ref(), "worker_id": "w-gone" }),
    );
    assert_eq!(status, 202, "{body}");
    let mut w = Value::Null;
    wait_for(Duration::from_secs(20), "the worker to be failed", || {
        w = worker(&hive, "w-gone").unwrap_or(Value::Null);
        w["state"] == "failed"
    });
    let failure = w["failure"].as_str().expect("a failure reason");
    assert!(
        failure.contains("cannot start the worker process")
            && failure.contains(copy.to_str().expect("UTF-8"))
            && failure.contains("No such file"),
        "{failure}"
    );
}

#[test]
fn a_worker_that_never_calls_back_is_killed_after_the_load_timeout() {
    let hive = DaemonSpec::new("rbee-hive")
        .env("RBEE_FAULT_LOAD_DELAY_MS", "120000")
        .args([
            "--worker-binary",
            binary(FAULT_INJECTION_WORKER).to_str().expect("UTF-8"),
            "--load-timeout-s",
            "2",
            "--restart-max-attempts",
            "0",
        ])
        .spawn();
    let model_ref = default_ref();
    provision(&hive, &model_ref);
    let started = Instant::now();
    let (status, body, _) = spawn(
        &hive,
        json!({ "model_ref": model_ref, "worker_id": "w-slow" }),
    );
    assert_eq!(status, 202, "{body}");
    let mut pid = 0;
    wait_for(Duration::from_secs(10), "the process", || {
        pid = worker(&hive, "w-slow")
            .and_then(|w| w["pid"].as_u64())
            .unwrap_or(0);
        pid != 0
    });
    wait_for(Duration::from_secs(30), "the load timeout", || {
        worker(&hive, "w-slow").is_some_and(|w| w["state"] == "failed")
    });
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "{took:?}"
    );
    assert!(!alive(pid), "the slow worker was killed");
    assert!(hive.wait_for_log("load_timeout", Duration::from_secs(1)));
    assert_eq!(
        metric(
            &hive,
            "rbee_hive_worker_restart_failures_total{reason=\"max_attempts\"}"
        ),
        1.0
    );
}

#[test]
fn a_stalled_engine_fails_its_health_checks_and_is_restarted() {
    let hive = DaemonSpec::new("rbee-hive")
        .env("RBEE_FAULT_WEDGE_AFTER_TOKENS", "2")
        .env("RBEE_WORKER_STALL_TIMEOUT_S", "1")
        .args([
            "--worker-binary",
            binary(FAULT_INJECTION_WORKER).to_str().expect("UTF-8"),
            "--health-interval-s",
            "1",
            "--health-failures",
            "2",
            "--restart-backoff-base-ms",
            "100",
        ])
        .spawn();
    let model_ref = default_ref();
    provision(&hive, &model_ref);
    let w = spawn_idle(&hive, &model_ref, "w-stall");
    let first_pid = pid_of(&w);
    let url = w["url"].as_str().expect("url").to_owned();
    // Wedge the engine; the request itself never finishes.
    std::thread::spawn(move || {
        let _ = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client")
            .post(format!("{url}/v1/inference"))
            .json(&json!({"prompt": "Count to ten:", "max_tokens": 50, "ignore_eos": true}))
            .send()
            // Keep reading: a client that hangs up cancels the generation.
            .and_then(reqwest::blocking::Response::text);
    });
    let mut restarted = Value::Null;
    wait_for(
        Duration::from_secs(60),
        "the stalled worker to be replaced",
        || {
            restarted = worker(&hive, "w-stall").unwrap_or(Value::Null);
            restarted["state"] == "idle" && restarted["pid"].as_u64() != Some(first_pid)
        },
    );
    assert_eq!(restarted["restart_count"], 1);
    assert!(!alive(first_pid));
    assert!(hive.wait_for_log("failed_health_checks", Duration::from_secs(1)));
}

#[test]
fn workers_outlive_the_blocking_pool_but_never_a_sigkilled_hive() {
    let mut hive = DaemonSpec::new("rbee-hive").spawn();
    let model_ref = default_ref();
    provision(&hive, &model_ref);
    let pid = pid_of(&spawn_idle(&hive, &model_ref, "w-early"));
    // tokio's blocking threads exit after 10 s idle; the parent-death signal
    // is tied to the launcher thread, which does not.
    std::thread::sleep(Duration::from_secs(12));
    let still = worker(&hive, "w-early").expect("record");
    assert!(
        alive(pid),
        "the worker survived the blocking pool's idle timeout"
    );
    assert_eq!(pid_of(&still), pid);
    assert_eq!(still["restart_count"], 0);

    hive.signal(Signal::SIGKILL);
    hive.wait_exit(Duration::from_secs(10));
    wait_for(Duration::from_secs(5), "the orphan to die", || !alive(pid));
}

#[test]
fn sigterm_stops_every_worker_in_parallel_and_exits_0() {
    let mut hive = DaemonSpec::new("rbee-hive")
        .args(["--worker-stop-grace-s", "5"])
        .spawn();
    let model_ref = default_ref();
    provision(&hive, &model_ref);
    let mut pids = Vec::new();
    for id in ["w-a", "w-b"] {
        let (status, body, _) = spawn(&hive, json!({ "model_ref": model_ref, "worker_id": id }));
        assert_eq!(status, 202, "{body}");
    }
    for id in ["w-a", "w-b"] {
        pids.push(pid_of(&wait_idle(&hive, id, Duration::from_secs(60))));
    }
    let started = Instant::now();
    hive.signal(Signal::SIGTERM);
    let status = hive.wait_exit(Duration::from_secs(30)).expect("hive exits");
    assert_eq!(status.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    for pid in pids {
        wait_for(Duration::from_secs(2), "worker exit", || !alive(pid));
    }
}

#[test]
fn the_shutdown_route_stops_a_worker_and_eviction_waits_for_it() {
    let hive = DaemonSpec::new("rbee-hive").spawn();
    let model_ref = default_ref();
    provision(&hive, &model_ref);
    let pid = pid_of(&spawn_idle(&hive, &model_ref, "w-stop"));

    let evict = || {
        send(
            client()
                .delete(hive.url("/v1/models/evict"))
                .json(&json!({ "model_ref": model_ref })),
        )
    };
    let (status, body, _) = evict();
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "MODEL_IN_USE");

    let shutdown = |id: &str| {
        send(
            client()
                .post(hive.url("/v1/workers/shutdown"))
                .json(&json!({ "worker_id": id })),
        )
    };
    let (status, body, _) = shutdown("w-stop");
    assert_eq!(status, 200, "{body}");
    assert!(!alive(pid));
    assert!(worker(&hive, "w-stop").is_none());
    let (status, body, _) = shutdown("w-stop");
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "NOT_FOUND");
    let (status, body, _) = evict();
    assert_eq!(status, 200, "{body}");
    assert!(default_model().exists());
    assert_eq!(
        metric(&hive, "rbee_hive_worker_restarts_total"),
        0.0,
        "a requested stop is not a restart"
    );
}

#[test]
fn status_probes_and_metrics_describe_the_host_and_stay_stable() {
    let hive = DaemonSpec::new("rbee-hive")
        .args(["--ready-requires-worker"])
        .spawn();
    let (status, ready, _) = send(client().get(hive.url("/health/ready")));
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["status"], "no_ready_worker");
    assert_eq!(ready["workers_total"], 0);
    let (status, health, _) = send(client().get(hive.url("/v1/health")));
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ok");

    let (status, s, _) = send(client().get(hive.url("/v1/status")));
    assert_eq!(status, 200);
    assert!(!s["hostname"].as_str().expect("hostname").is_empty());
    assert!(s["cpu_count"].as_u64() >= Some(1));
    assert!(s["ram_total_bytes"].as_u64() >= s["ram_available_bytes"].as_u64());
    assert_eq!(s["backends"], json!(["cpu"]));
    assert!(s["gpus"].is_array());
    assert!(s["workers"].is_array() && s["models"].is_array() && s["downloads"].is_array());

    let scrape = || {
        client()
            .get(hive.url("/metrics"))
            .send()
            .expect("metrics")
            .text()
            .expect("text")
            .lines()
            .filter(|l| l.starts_with("rbee_hive_workers"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let first = scrape();
    assert!(
        first
            .iter()
            .any(|l| l == "rbee_hive_workers_total{state=\"idle\"} 0"),
        "{first:?}"
    );
    assert_eq!(first, scrape(), "scrapes do not change the gauges");
}

#[test]
fn the_hive_registers_with_the_queen_and_keeps_registering() {
    let queen = FakeHive::start(0);
    let hive = DaemonSpec::new("rbee-hive")
        .with_token()
        .args([
            "--queen-url",
            &queen.url(),
            "--node-name",
            "gpu-node-1",
            "--queen-register-interval-s",
            "1",
        ])
        .spawn();
    wait_for(Duration::from_secs(10), "two registrations", || {
        queen
            .requests()
            .iter()
            .filter(|r| r.path == "/v2/hives/register")
            .count()
            >= 2
    });
    let first = queen
        .requests()
        .into_iter()
        .find(|r| r.path == "/v2/hives/register")
        .expect("registration");
    assert_eq!(first.body["node_name"], "gpu-node-1");
    assert_eq!(first.body["url"], format!("http://{}", hive.addr));
    assert_eq!(
        first.authorization.as_deref(),
        Some(format!("Bearer {TEST_TOKEN}").as_str())
    );
}

#[test]
fn a_bad_settings_file_is_refused_with_every_problem() {
    let dir = tempfile::tempdir().expect("dir");
    let settings: PathBuf = dir.path().join("hive.toml");
    std::fs::write(
        &settings,
        "load_timeout_s = 5\nno_such_setting = 1\nalso_bad = true\n",
    )
    .expect("write");
    let out = DaemonSpec::new("rbee-hive")
        .args(["--config", settings.to_str().expect("UTF-8")])
        .run_to_exit(Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no_such_setting") && stderr.contains("also_bad"),
        "{stderr}"
    );
}

#[test]
fn a_worker_whose_heartbeats_stop_is_declared_dead_and_restarted() {
    // Workers are told to beat every 60 s; the hive expects one every 2 s.
    let hive = DaemonSpec::new("rbee-hive")
        .args([
            "--worker-heartbeat-interval-s",
            "60",
            "--heartbeat-timeout-s",
            "2",
            "--restart-backoff-base-ms",
            "100",
        ])
        .spawn();
    let model_ref = default_ref();
    provision(&hive, &model_ref);
    let first_pid = pid_of(&spawn_idle(&hive, &model_ref, "w-quiet"));
    let ready_at = Instant::now();
    wait_for(
        Duration::from_secs(30),
        "the silent worker to be restarted",
        || worker(&hive, "w-quiet").is_some_and(|w| w["restart_count"].as_u64() >= Some(1)),
    );
    // Measured from when the test saw `idle`, a poll after the callback.
    let noticed = ready_at.elapsed();
    assert!(
        noticed >= Duration::from_millis(1500) && noticed < Duration::from_secs(8),
        "{noticed:?}"
    );
    assert!(!alive(first_pid), "the silent worker was killed");
    assert!(hive.wait_for_log("missed_heartbeats", Duration::from_secs(1)));
}
