//! `llm-worker-rbee`'s engine and process with the real default model:
//! reporting to its hive, stall detection (a wedged engine, a long prompt
//! that is not one), its compute threads, crashes, fault injection kept out
//! of the default build, the drain bound and the loading state. The API as
//! clients see it: `worker.rs`.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rbee_system_tests::worker::{
    assert_unavailable, client, complete, metric, post, wait_until, worker, Sse,
};
use rbee_system_tests::DaemonSpec;
use reqwest::StatusCode;
use serde_json::{json, Value};

#[test]
fn the_worker_reports_ready_to_its_hive_retrying_and_then_heartbeats() {
    use rbee_system_tests::{FakeHive, TEST_TOKEN};
    let hive = FakeHive::start(2);
    let w = DaemonSpec::new("llm-worker-rbee")
        .with_token()
        .args([
            "--worker-id",
            "w-7",
            "--hive-url",
            &hive.url(),
            "--heartbeat-interval-s",
            "1",
        ])
        .spawn();
    wait_until(
        "ready accepted and two heartbeats",
        Duration::from_secs(15),
        || {
            let r = hive.requests();
            r.iter().filter(|q| q.path == "/v1/workers/ready").count() == 3
                && r.iter()
                    .filter(|q| q.path == "/v1/workers/heartbeat")
                    .count()
                    >= 2
        },
    );
    let requests = hive.requests();
    for r in &requests {
        assert_eq!(
            r.authorization.as_deref(),
            Some(format!("Bearer {TEST_TOKEN}").as_str()),
            "{}",
            r.path
        );
    }
    let ready = &requests
        .iter()
        .find(|q| q.path == "/v1/workers/ready")
        .unwrap()
        .body;
    assert_eq!(ready["worker_id"], "w-7");
    assert_eq!(ready["url"], format!("http://{}", w.addr));
    assert_eq!(ready["backend"], "cpu");
    assert_eq!(ready["device"], 0);
    // The default: as many sequences of 512 positions as the default pool
    // (four contexts of 4096) holds.
    assert_eq!(ready["slots_total"], 32);
    assert!(ready["model_ref"].as_str().unwrap().starts_with("file:/"));
    let beat = &requests
        .iter()
        .find(|q| q.path == "/v1/workers/heartbeat")
        .unwrap()
        .body;
    assert_eq!(beat["worker_id"], "w-7");
    assert_eq!(beat["state"], "idle");
    assert!(beat["timestamp"].as_str().unwrap().ends_with('Z'));
    assert!(w
        .logs()
        .iter()
        .any(|l| l.contains("ready callback refused; retrying")));
}

#[test]
fn a_wedged_engine_turns_readiness_to_engine_stalled_while_liveness_stays_up() {
    let w = DaemonSpec::new("llm-worker-rbee")
        .fault_injection()
        .env("RBEE_FAULT_WEDGE_AFTER_TOKENS", "3")
        .args(["--stall-timeout-s", "1"])
        .spawn();
    w.wait_ready(Duration::from_secs(60));
    let mut sse = Sse::new(post(
        &w,
        "/v1/inference",
        json!({"prompt": "Once upon a time", "max_tokens": 50, "ignore_eos": true}),
    ));
    sse.next_event().expect("started");
    // The watchdog counts the stall without anyone probing readiness.
    wait_until("the stall is counted", Duration::from_secs(5), || {
        metric(&w, "rbee_worker_engine_stalls_total") == 1.0
    });
    wait_until(
        "readiness reports the stall",
        Duration::from_secs(5),
        || {
            client()
                .get(w.url("/health/ready"))
                .send()
                .unwrap()
                .status()
                == StatusCode::SERVICE_UNAVAILABLE
        },
    );
    let body: Value = client()
        .get(w.url("/health/ready"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(body["error"]["code"], "ENGINE_STALLED", "{body}");
    let ready: Value = client()
        .get(w.url("/v1/ready"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(ready["ready"], false);
    let t = Instant::now();
    assert_eq!(
        client().get(w.url("/health/live")).send().unwrap().status(),
        StatusCode::OK
    );
    assert!(t.elapsed() < Duration::from_millis(100));
    assert_eq!(
        metric(&w, "rbee_worker_engine_stalls_total"),
        1.0,
        "counted once per stall"
    );
    drop(sse);
}

#[test]
fn a_prompt_that_outlasts_the_stall_timeout_is_prefilled_in_steps_and_never_called_a_stall() {
    // One compute thread and a 3 s stall timeout: a prompt of about 3,900
    // tokens takes several times that, run as chunks of 256 that each take
    // a fraction of it (under 1 s here, with another test beside it) and
    // count as progress.
    let w = worker(&["--stall-timeout-s", "3", "--threads", "1", "--ctx", "4096"]);
    let url = w.url("/v1/inference");
    let prompt = "The history of the printing press begins in the fifteenth century. ".repeat(300);
    let started = Instant::now();
    let request = std::thread::spawn(move || {
        let response = client()
            .post(url)
            .json(&json!({"prompt": prompt, "max_tokens": 4, "ignore_eos": true}))
            .send()
            .expect("send");
        Sse::new(response).rest()
    });
    let mut probes = 0;
    while !request.is_finished() {
        let response = client().get(w.url("/health/ready")).send().expect("probe");
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "readiness during the prefill: {:?}",
            response.text()
        );
        probes += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let events = request.join().expect("request thread");
    let elapsed = started.elapsed();
    let end = events.last().expect("events");
    assert_eq!(end["type"], "end", "{end}");
    assert!(
        end["tokens_in"].as_u64().expect("tokens_in") > 3500,
        "{end}"
    );
    // Only a prompt slower than the timeout proves anything here.
    assert!(
        elapsed > Duration::from_secs(4),
        "the prompt took {elapsed:?}, not over the stall timeout"
    );
    assert!(probes >= 30, "{probes} probes");
    assert_eq!(metric(&w, "rbee_worker_engine_stalls_total"), 0.0);
}

#[test]
fn the_worker_runs_exactly_the_compute_threads_it_is_given() {
    for (threads, helpers) in [(3usize, 2usize), (1, 0)] {
        let w = worker(&["--threads", &threads.to_string()]);
        let body = complete(
            &w,
            json!({"prompt": "The capital of France is", "temperature": 0, "max_tokens": 3, "stream": false}),
        );
        assert!(
            body["text"].as_str().is_some_and(|t| t.contains("Paris")),
            "{body}"
        );
        let names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", w.pid()))
            .expect("the worker's threads")
            .filter_map(Result::ok)
            .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
            .map(|n| n.trim().to_owned())
            .collect();
        // The engine thread computes too: `--threads` minus one helpers.
        let compute = names.iter().filter(|n| n.starts_with("compute-")).count();
        let engine = names.iter().filter(|n| *n == "engine").count();
        assert_eq!(
            (compute, engine),
            (helpers, 1),
            "--threads {threads}: {names:?}"
        );
    }
}

/// A fault-injection worker with `fault` set to 2 tokens, and the events
/// of one 50-token stream it serves.
fn faulty_stream(fault: &str) -> (rbee_system_tests::RunningDaemon, Vec<Value>) {
    let w = DaemonSpec::new("llm-worker-rbee")
        .fault_injection()
        .env(fault, "2")
        .spawn();
    w.wait_ready(Duration::from_secs(60));
    let events = Sse::new(post(
        &w,
        "/v1/inference",
        json!({"prompt": "Once upon a time", "max_tokens": 50, "ignore_eos": true}),
    ))
    .rest();
    (w, events)
}

#[test]
fn an_injected_crash_ends_the_process_mid_stream_with_a_failure_code() {
    let (mut w, events) = faulty_stream("RBEE_FAULT_EXIT_AFTER_TOKENS");
    assert!(
        events.iter().all(|e| e["type"] != "end"),
        "the stream cannot end cleanly: {events:?}"
    );
    let status = w
        .wait_exit(Duration::from_secs(10))
        .expect("the worker exits");
    assert_eq!(status.code(), Some(101));
}

#[test]
fn a_panic_on_the_engine_thread_ends_its_streams_and_the_process_with_a_failure_code() {
    let (mut w, events) = faulty_stream("RBEE_FAULT_PANIC_AFTER_TOKENS");
    let last = events.last().expect("events");
    assert_eq!(last["type"], "error", "{events:?}");
    assert_eq!(last["code"], "INTERNAL", "{events:?}");
    // No worker left up that looks ready with no engine: it exits non-zero
    // (the hive restarts it), saying why.
    let status = w
        .wait_exit(Duration::from_secs(10))
        .expect("the worker exits");
    assert_eq!(status.code(), Some(1));
    assert!(w.wait_for_log(
        "the engine thread panicked: fault injection",
        Duration::from_secs(1)
    ));
}

#[test]
fn the_default_build_has_no_fault_injection() {
    let mut w = DaemonSpec::new("llm-worker-rbee")
        .env("RBEE_FAULT_EXIT_AFTER_TOKENS", "1")
        .spawn();
    w.wait_ready(Duration::from_secs(60));
    let body = complete(
        &w,
        json!({"prompt": "Once upon a time", "max_tokens": 4, "ignore_eos": true, "stream": false}),
    );
    assert_eq!(body["tokens_out"], 4);
    assert!(
        w.wait_exit(Duration::from_millis(200)).is_none(),
        "still running"
    );
}

#[test]
fn a_generation_that_outlives_the_drain_time_ends_with_an_error_event() {
    let mut w = worker(&["--shutdown-timeout-s", "3"]);
    let mut sse = Sse::new(post(
        &w,
        "/v1/inference",
        json!({"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": true}),
    ));
    sse.next_event().expect("started");
    sse.next_event().expect("a token");
    let t = Instant::now();
    w.signal(Signal::SIGTERM);
    let last = sse.rest().pop().expect("final event");
    assert_eq!(last["type"], "error", "{last}");
    assert_eq!(last["code"], "SHUTTING_DOWN");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert_eq!(
        w.wait_exit(Duration::from_secs(10)).expect("exits").code(),
        Some(0)
    );
}

#[test]
fn while_the_model_loads_readiness_says_so_and_inference_is_refused() {
    let w = DaemonSpec::new("llm-worker-rbee")
        .fault_injection()
        .env("RBEE_FAULT_LOAD_DELAY_MS", "3000")
        .spawn();
    let ready: Value = client()
        .get(w.url("/v1/ready"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        ready,
        json!({"ready": false, "state": "loading", "model_loaded": false})
    );
    let probe = client().get(w.url("/health/ready")).send().unwrap();
    assert_eq!(probe.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(probe.json::<Value>().unwrap()["status"], "loading");
    assert_eq!(
        client().get(w.url("/health/live")).send().unwrap().status(),
        StatusCode::OK
    );
    let refused = post(
        &w,
        "/v1/inference",
        json!({"prompt": "hi", "stream": false}),
    );
    assert_unavailable(refused, "MODEL_LOADING");
    w.wait_ready(Duration::from_secs(60));
    assert_eq!(
        client()
            .get(w.url("/health/ready"))
            .send()
            .unwrap()
            .status(),
        StatusCode::OK
    );
}
