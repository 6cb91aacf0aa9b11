//! `llm-worker-rbee` with the real default model (SmolLM2-135M-Instruct Q4_1):
//! answers, streaming, sampling, limits, deadlines, cancellation, slots,
//! probes under load and shutdown. Every test starts its own worker.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rbee_system_tests::http::field_names;
use rbee_system_tests::{DaemonSpec, RunningDaemon};
use reqwest::blocking::{Client, Response};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn worker(extra: &[&str]) -> RunningDaemon {
    let daemon = DaemonSpec::new("llm-worker-rbee")
        .args(extra.iter().copied())
        .spawn();
    daemon.wait_ready(Duration::from_secs(60));
    daemon
}

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("build HTTP client")
}

fn post(w: &RunningDaemon, path: &str, body: Value) -> Response {
    client()
        .post(w.url(path))
        .json(&body)
        .send()
        .expect("send request")
}

fn metric(w: &RunningDaemon, name: &str) -> f64 {
    let text = client()
        .get(w.url("/metrics"))
        .send()
        .and_then(Response::text)
        .expect("scrape metrics");
    text.lines()
        .find(|l| {
            l.starts_with(name) && l[name.len()..].starts_with([' ', '{']) && !l.starts_with('#')
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not happen within {timeout:?}");
}

/// Reads an SSE response one `data:` payload at a time, as it arrives.
struct Sse {
    lines: std::io::Lines<BufReader<Response>>,
}

impl Sse {
    fn new(response: Response) -> Self {
        assert_eq!(response.status(), StatusCode::OK);
        Self {
            lines: BufReader::new(response).lines(),
        }
    }

    fn next_data(&mut self) -> Option<String> {
        for line in self.lines.by_ref() {
            let line = line.ok()?;
            if let Some(data) = line.strip_prefix("data: ") {
                return Some(data.to_owned());
            }
        }
        None
    }

    fn next_event(&mut self) -> Option<Value> {
        let data = self.next_data()?;
        if data == "[DONE]" {
            return None;
        }
        Some(serde_json::from_str(&data).expect("SSE data is JSON"))
    }

    /// All remaining events until `[DONE]`.
    fn rest(mut self) -> Vec<Value> {
        std::iter::from_fn(|| self.next_event()).collect()
    }
}

/// Start a generation that runs until it is stopped (2000 tokens, EOS
/// ignored) and return its stream, positioned after the `started` event.
fn long_generation(w: &RunningDaemon) -> Sse {
    let mut sse = Sse::new(post(
        w,
        "/v1/inference",
        json!({"prompt": "Write a long story.", "max_tokens": 2000, "ignore_eos": true}),
    ));
    assert_eq!(sse.next_event().expect("started")["type"], "started");
    sse
}

/// A 503 with `Retry-After: 1` and the given error code.
fn assert_unavailable(response: Response, code: &str) {
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(
        response.json::<Value>().expect("JSON")["error"]["code"],
        code
    );
}

fn paris_chat() -> Value {
    json!({
        "messages": [
            // The quickstart's system message.
            {"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."},
            {"role": "user", "content": "What is the capital of France?"}
        ],
        "temperature": 0,
        "max_tokens": 24
    })
}

#[test]
fn a_chat_request_for_the_capital_of_france_answers_paris() {
    let w = worker(&[]);
    let response = post(&w, "/v1/chat/completions", paris_chat());
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().expect("JSON");
    let answer = body["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert!(answer.contains("Paris"), "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    let usage = &body["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );
}

#[test]
fn openai_streaming_sends_chunks_then_usage_then_done() {
    let w = worker(&[]);
    let mut chat = paris_chat();
    chat["stream"] = json!(true);
    let mut sse = Sse::new(post(&w, "/v1/chat/completions", chat));
    let mut text = String::new();
    let mut saw_role = false;
    let mut usage = None;
    let mut finish = None;
    while let Some(chunk) = sse.next_event() {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        if let Some(choice) = chunk["choices"].get(0) {
            saw_role |= choice["delta"]["role"] == "assistant";
            text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
            if !choice["finish_reason"].is_null() {
                finish = Some(choice["finish_reason"].clone());
            }
        }
        if chunk["usage"].is_object() {
            usage = Some(chunk["usage"].clone());
        }
    }
    assert!(saw_role);
    assert!(text.contains("Paris"), "{text}");
    assert_eq!(finish, Some(json!("stop")));
    assert!(
        usage.expect("a usage chunk")["completion_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );

    let completion = post(
        &w,
        "/v1/completions",
        json!({"prompt": "The capital of France is", "temperature": 0, "max_tokens": 3}),
    );
    let body: Value = completion.json().expect("JSON");
    assert_eq!(body["object"], "text_completion");
    assert!(
        body["choices"][0]["text"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{body}"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "length");
}

#[test]
fn tokens_are_streamed_as_they_are_produced_not_replayed() {
    let w = worker(&[]);
    let before = metric(&w, "rbee_worker_generation_tokens_total");
    let mut sse = Sse::new(post(
        &w,
        "/v1/inference",
        json!({"prompt": "Write a long story about a dragon.", "max_tokens": 100, "temperature": 0, "ignore_eos": true}),
    ));
    let started = sse.next_event().expect("started event");
    assert_eq!(started["type"], "started");
    assert!(started["request_id"]
        .as_str()
        .is_some_and(|r| !r.is_empty()));
    let first = sse.next_event().expect("first token");
    assert_eq!(first["type"], "token");
    assert_eq!(first["i"], 0);
    let generated = metric(&w, "rbee_worker_generation_tokens_total") - before;
    assert!(
        generated < 10.0,
        "{generated} tokens generated when the first arrived: replayed, not streamed"
    );
    let rest = sse.rest();
    let end = rest.last().expect("end event");
    assert_eq!(end["type"], "end", "{end}");
    assert_eq!(end["tokens_out"], 100);
    assert_eq!(end["stop_reason"], "max_tokens");
    let indexes: Vec<u64> = rest
        .iter()
        .filter(|e| e["type"] == "token")
        .map(|e| e["i"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes.first(), Some(&1));
    assert!(indexes.windows(2).all(|p| p[1] >= p[0]), "indexes in order");
}

fn complete(w: &RunningDaemon, body: Value) -> Value {
    let response = post(w, "/v1/inference", body);
    assert_eq!(response.status(), StatusCode::OK);
    response.json().expect("JSON")
}

#[test]
fn greedy_runs_are_identical_and_seeded_runs_reproducible() {
    let w = worker(&[]);
    let greedy =
        json!({"prompt": "Once upon a time", "temperature": 0, "max_tokens": 24, "stream": false});
    assert_eq!(
        complete(&w, greedy.clone())["text"],
        complete(&w, greedy)["text"]
    );
    let seeded = |seed: u64| json!({"prompt": "Once upon a time", "temperature": 1.0, "seed": seed, "max_tokens": 24, "stream": false});
    let a = complete(&w, seeded(42))["text"].clone();
    assert_eq!(a, complete(&w, seeded(42))["text"]);
    let others: Vec<Value> = (43..46)
        .map(|s| complete(&w, seeded(s))["text"].clone())
        .collect();
    assert!(
        others.iter().any(|o| *o != a),
        "different seeds all gave {a}"
    );
}

#[test]
fn stop_sequences_and_max_tokens_end_generation() {
    let w = worker(&[]);
    let stopped = complete(
        &w,
        json!({"prompt": "The capital of France is", "temperature": 0, "max_tokens": 20, "stop": ["."], "stream": false}),
    );
    assert_eq!(stopped["stop_reason"], "stop_sequence", "{stopped}");
    assert_eq!(stopped["text"], " Paris");
    let limited = complete(
        &w,
        json!({"prompt": "Count: one, two,", "temperature": 0, "max_tokens": 5, "stream": false}),
    );
    assert_eq!(limited["stop_reason"], "max_tokens");
    assert_eq!(limited["tokens_out"], 5);
}

#[test]
fn invalid_requests_list_every_bad_field_and_long_prompts_name_the_limit() {
    let w = worker(&[]);
    let response = post(
        &w,
        "/v1/inference",
        json!({"prompt": "", "max_tokens": 0, "temperature": 9, "top_p": 2, "stop": ["a","b","c","d","e"]}),
    );
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().expect("JSON");
    assert_eq!(body["error"]["code"], "INVALID_REQUEST");
    assert_eq!(
        field_names(&body),
        ["prompt", "max_tokens", "temperature", "top_p", "stop"]
    );

    let response = post(
        &w,
        "/v1/inference",
        json!({"prompt": "x", "max_tokens": "many"}),
    );
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        response.json::<Value>().unwrap()["error"]["code"],
        "INVALID_JSON"
    );

    let long = "hello ".repeat(5000);
    let response = post(&w, "/v1/inference", json!({"prompt": long}));
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().expect("JSON");
    assert_eq!(body["error"]["code"], "PROMPT_TOO_LONG");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("4096"),
        "{body}"
    );

    let response = post(
        &w,
        "/v1/chat/completions",
        json!({"messages": [{"role": "wizard", "content": "hi"}], "temperature": -1, "max_completion_tokens": 0, "stream": "yes"}),
    );
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().expect("JSON");
    assert_eq!(
        field_names(&body),
        [
            "messages[0].role",
            "stream",
            "max_completion_tokens",
            "temperature"
        ],
        "{body}"
    );
    let response = post(
        &w,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "n": 2}),
    );
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

#[test]
fn an_expired_deadline_is_refused_without_work_and_a_short_one_stops_generation() {
    let w = worker(&[]);
    let before = metric(&w, "rbee_worker_prompt_tokens_total");
    let response = client()
        .post(w.url("/v1/inference"))
        .header("x-deadline", "1700000000000")
        .json(&json!({"prompt": "hi"}))
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        metric(&w, "rbee_worker_prompt_tokens_total"),
        before,
        "no work was done"
    );

    let response = client()
        .post(w.url("/v1/inference"))
        .header("x-timeout-ms", "1500")
        .json(&json!({"prompt": "Write a long story about a dragon.", "max_tokens": 2000, "temperature": 0, "ignore_eos": true}))
        .send()
        .unwrap();
    let mut sse = Sse::new(response);
    let mut stamps = Vec::new();
    let mut last = Value::Null;
    while let Some(event) = sse.next_event() {
        if event["type"] == "token" {
            stamps.push(Instant::now());
        }
        last = event;
    }
    assert_eq!(last["type"], "error", "{last}");
    assert_eq!(last["code"], "DEADLINE_EXCEEDED");
    assert!(
        stamps.len() >= 2,
        "generation ran before the deadline: {} tokens",
        stamps.len()
    );
    let step = (stamps[stamps.len() - 1] - stamps[0]) / (stamps.len() as u32 - 1);
    wait_until("slot freed", step * 2 + Duration::from_millis(300), || {
        metric(&w, "rbee_worker_requests_running") == 0.0
    });
    assert_eq!(
        metric(
            &w,
            "rbee_worker_requests_total{outcome=\"deadline_exceeded\"}"
        ),
        1.0
    );
}

/// Receive `n` token events after the next one and return the mean time
/// between them: the token time on this machine, now.
fn token_time(sse: &mut Sse, n: u32) -> Duration {
    sse.next_event().expect("a token");
    let t = Instant::now();
    for _ in 0..n {
        assert_eq!(sse.next_event().expect("a token")["type"], "token");
    }
    t.elapsed() / n
}

#[test]
fn a_client_that_disconnects_frees_its_slot_within_two_token_times() {
    let w = worker(&[]);
    let mut sse = long_generation(&w);
    let step = token_time(&mut sse, 4);
    assert_eq!(metric(&w, "rbee_worker_requests_running"), 1.0);
    drop(sse);
    // Two token steps, plus the time to notice the closed socket.
    wait_until(
        "slot freed after disconnect",
        step * 2 + Duration::from_millis(300),
        || metric(&w, "rbee_worker_requests_running") == 0.0,
    );
    assert_eq!(
        metric(&w, "rbee_worker_requests_total{outcome=\"cancelled\"}"),
        1.0
    );
}

#[test]
fn delete_cancels_a_running_job_and_is_idempotent() {
    let w = worker(&[]);
    let mut sse = Sse::new(post(
        &w,
        "/v1/inference",
        json!({"job_id": "job-to-cancel", "prompt": "Write a long story.", "max_tokens": 2000, "ignore_eos": true}),
    ));
    assert_eq!(
        sse.next_event().expect("started")["job_id"],
        "job-to-cancel"
    );
    sse.next_event().expect("a token");
    for _ in 0..2 {
        let response = client()
            .delete(w.url("/v1/inference/job-to-cancel"))
            .send()
            .unwrap();
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
    }
    let last = sse.rest().pop().expect("final event");
    assert_eq!(last["type"], "error");
    assert_eq!(last["code"], "CANCELLED");
    wait_until("slot freed", Duration::from_millis(500), || {
        metric(&w, "rbee_worker_requests_running") == 0.0
    });
    let unknown = client()
        .delete(w.url("/v1/inference/never-existed"))
        .send()
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NO_CONTENT);
}

#[test]
fn a_busy_worker_answers_503_all_slots_busy_and_probes_stay_fast() {
    let w = worker(&["--slots", "1"]);
    let mut sse = long_generation(&w);
    sse.next_event().expect("a token");
    let busy = post(
        &w,
        "/v1/inference",
        json!({"prompt": "hi", "stream": false}),
    );
    assert_unavailable(busy, "ALL_SLOTS_BUSY");

    let ready: Value = client()
        .get(w.url("/v1/ready"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(ready["state"], "busy");
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        let live = client().get(w.url("/health/live")).send().unwrap();
        assert_eq!(live.status(), StatusCode::OK);
        slowest = slowest.max(t.elapsed());
    }
    assert!(
        slowest < Duration::from_millis(100),
        "a probe took {slowest:?} during generation"
    );
    drop(sse);
}

#[test]
fn sigterm_lets_the_running_generation_finish_then_exits_zero() {
    let mut w = worker(&[]);
    let mut sse = Sse::new(post(
        &w,
        "/v1/inference",
        json!({"prompt": "Once upon a time", "max_tokens": 30, "temperature": 0}),
    ));
    sse.next_event().expect("started");
    sse.next_event().expect("a token");
    w.signal(Signal::SIGTERM);
    let last = sse.rest().pop().expect("final event");
    assert_eq!(last["type"], "end", "{last}");
    assert_eq!(last["tokens_out"], 30);
    let status = w.wait_exit(Duration::from_secs(10)).expect("exits");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_model_that_cannot_be_loaded_exits_1_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("not-a-model.gguf");
    std::fs::write(&bogus, b"definitely not gguf").unwrap();
    let out = DaemonSpec::new("llm-worker-rbee")
        .model(bogus.to_str().unwrap())
        .run_to_exit(Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("llm-worker-rbee: error: cannot load model"),
        "{stderr}"
    );
}

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
    assert_eq!(ready["slots_total"], 1);
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

#[test]
fn an_injected_crash_ends_the_process_mid_stream_with_a_failure_code() {
    let mut w = DaemonSpec::new("llm-worker-rbee")
        .fault_injection()
        .env("RBEE_FAULT_EXIT_AFTER_TOKENS", "2")
        .spawn();
    w.wait_ready(Duration::from_secs(60));
    let events = Sse::new(post(
        &w,
        "/v1/inference",
        json!({"prompt": "Once upon a time", "max_tokens": 50, "ignore_eos": true}),
    ))
    .rest();
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
