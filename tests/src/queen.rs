//! Helpers for tests of the whole stack: hives with the default model
//! provisioned, a queen in front of them, streaming reads, metrics of any
//! daemon by URL.

use std::io::{BufRead, BufReader, Lines};
use std::time::Duration;

use reqwest::blocking::{RequestBuilder, Response};
use serde_json::{json, Value};

pub use crate::http::{client, default_ref, send, wait_for};
use crate::{DaemonSpec, RunningDaemon};

/// Start `spec` (a hive) and provision the default model on it.
pub fn hive_with_model(spec: DaemonSpec, token: Option<&str>) -> RunningDaemon {
    hive_with_models(spec, token, &[default_ref()])
}

/// Start `spec` (a hive) and provision `models` on it.
pub fn hive_with_models(spec: DaemonSpec, token: Option<&str>, models: &[String]) -> RunningDaemon {
    let hive = spec.spawn();
    for model in models {
        provision(&hive, token, model);
    }
    hive
}

fn provision(hive: &RunningDaemon, token: Option<&str>, model: &str) {
    let (status, body, _) = send(
        client()
            .post(hive.url("/v1/models/provision"))
            .bearer_auth(token.unwrap_or(""))
            .json(&json!({ "model_ref": model })),
    );
    assert_eq!(status, 202, "{body}");
    wait_for(
        Duration::from_secs(60),
        "the model to be provisioned",
        || {
            let (_, list, _) = send(
                client()
                    .get(hive.url("/v1/models/list"))
                    .bearer_auth(token.unwrap_or("")),
            );
            list["models"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["model_ref"] == model))
        },
    );
}

/// Start `spec` (a hive), provision the default model and spawn one
/// worker for it.
pub fn hive_with_a_worker(spec: DaemonSpec) -> RunningDaemon {
    let hive = hive_with_model(spec, None);
    let (status, _, _) = send(
        client()
            .post(hive.url("/v1/workers/spawn"))
            .json(&json!({"model_ref": default_ref()})),
    );
    assert_eq!(status, 202);
    hive
}

/// Assert that a stream's events hold `tokens` tokens, then a
/// `WORKER_FAILED` error event.
pub fn assert_worker_failed_after(events: &[Value], tokens: usize) {
    assert_eq!(
        events.iter().filter(|e| e["type"] == "token").count(),
        tokens,
        "{events:?}"
    );
    let error = events
        .iter()
        .find(|e| e["type"] == "error")
        .expect("an error event");
    assert_eq!(error_code(error), "WORKER_FAILED", "{events:?}");
}

/// A queen that knows `hives` and polls them every 200 ms.
pub fn queen_spec(hives: &[&RunningDaemon]) -> DaemonSpec {
    let mut spec = DaemonSpec::new("queen-rbee").args(["--hive-poll-interval-ms", "200"]);
    for hive in hives {
        spec = spec.args(["--hive".to_owned(), hive.url("")]);
    }
    spec
}

/// Start `spec` (a queen) and wait until it reports ready (a hive answered).
pub fn ready_queen(spec: &DaemonSpec, token: Option<&str>) -> RunningDaemon {
    let queen = spec.spawn();
    wait_for(Duration::from_secs(15), "the queen to be ready", || {
        client()
            .get(queen.url("/health/ready"))
            .bearer_auth(token.unwrap_or(""))
            .send()
            .is_ok_and(|r| r.status() == 200)
    });
    queen
}

/// Wait until the queen sees `n` ready workers; returns them.
pub fn wait_ready_workers(queen: &RunningDaemon, n: usize, token: Option<&str>) -> Vec<Value> {
    let mut ready = Vec::new();
    wait_for(
        Duration::from_secs(60),
        "ready workers at the queen",
        || {
            let (_, body, _) = send(
                client()
                    .get(queen.url("/v2/workers/list"))
                    .bearer_auth(token.unwrap_or("")),
            );
            ready = body["workers"]
                .as_array()
                .map(|w| {
                    w.iter()
                        .filter(|w| w["state"] == "idle" || w["state"] == "busy")
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            ready.len() >= n
        },
    );
    ready
}

/// A metric's value from any daemon's `/metrics` (labels included in
/// `name` as Prometheus prints them); `None` when absent.
pub fn metric_at(base_url: &str, name: &str) -> Option<f64> {
    let text = client()
        .get(format!("{base_url}/metrics"))
        .send()
        .ok()?
        .text()
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// A request body that generates exactly `n` tokens, greedily.
pub fn long_request(n: u32, stream: bool) -> Value {
    json!({
        "prompt": "Write a long story about a lighthouse keeper.",
        "max_tokens": n,
        "ignore_eos": true,
        "temperature": 0,
        "stream": stream,
    })
}

/// An SSE response read event by event.
#[derive(Debug)]
pub struct EventStream {
    /// Status of the response.
    pub status: u16,
    /// Its headers.
    pub headers: reqwest::header::HeaderMap,
    lines: Lines<BufReader<Response>>,
}

impl EventStream {
    /// Send `request` and keep the body open.
    pub fn open(request: RequestBuilder) -> Self {
        let response = request.send().expect("streaming request");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        Self {
            status,
            headers,
            lines: BufReader::new(response).lines(),
        }
    }

    /// The next event's data (`"[DONE]"` as a string); `None` at the end
    /// of the body or when reading fails.
    pub fn next_event(&mut self) -> Option<Value> {
        loop {
            let line = self.lines.next()?.ok()?;
            if let Some(data) = line.strip_prefix("data: ") {
                if data == "[DONE]" {
                    return Some(Value::String("[DONE]".into()));
                }
                return Some(serde_json::from_str(data).expect("event is JSON"));
            }
        }
    }

    /// Read until `[DONE]` or the end; every event.
    pub fn rest(&mut self) -> Vec<Value> {
        std::iter::from_fn(|| self.next_event()).collect()
    }

    /// Read until the first `token` event (or the end); the events read.
    pub fn until_token(&mut self) -> Vec<Value> {
        let mut seen = Vec::new();
        while let Some(event) = self.next_event() {
            let token = event["type"] == "token";
            seen.push(event);
            if token {
                break;
            }
        }
        seen
    }
}

/// The python of a virtualenv holding the official `openai` client,
/// made once by `scripts/openai-venv.sh` (from PyPI).
pub fn openai_python() -> std::path::PathBuf {
    static PYTHON: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let out = std::process::Command::new("bash")
                .arg(crate::workspace_root().join("scripts/openai-venv.sh"))
                .stderr(std::process::Stdio::inherit())
                .output()
                .expect("run scripts/openai-venv.sh");
            assert!(out.status.success(), "installing the openai client failed");
            std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        })
        .clone()
}

/// Run `tests/python/<script>` with the official `openai` client against
/// `queen`'s `/v1` and the test token, then `args`; what it prints, as
/// JSON. Panics with its stderr when it fails.
pub fn openai_check(script: &str, queen: &RunningDaemon, args: &[&str]) -> Value {
    let out = std::process::Command::new(openai_python())
        .arg(crate::workspace_root().join("tests/python").join(script))
        .arg(queen.url("/v1"))
        .arg(crate::TEST_TOKEN)
        .args(args)
        .output()
        .expect("run the openai client");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the script prints JSON")
}

/// `POST /v1/inference` to the queen.
pub fn infer(queen: &RunningDaemon, body: &Value) -> (u16, Value, reqwest::header::HeaderMap) {
    send(client().post(queen.url("/v1/inference")).json(body))
}

/// `POST /v1/inference` as a stream; asserts 200.
pub fn stream(queen: &RunningDaemon, body: &Value) -> EventStream {
    let s = EventStream::open(client().post(queen.url("/v1/inference")).json(body));
    assert_eq!(s.status, 200);
    s
}

/// A worker's `rbee_worker_requests_total`, summed over outcomes.
pub fn worker_total(url: &str) -> f64 {
    [
        "ok",
        "client_error",
        "deadline_exceeded",
        "cancelled",
        "busy",
        "error",
    ]
    .iter()
    .filter_map(|o| {
        metric_at(
            url,
            &format!("rbee_worker_requests_total{{outcome=\"{o}\"}}"),
        )
    })
    .sum()
}

/// A worker's `rbee_worker_requests_running`.
pub fn running(url: &str) -> f64 {
    metric_at(url, "rbee_worker_requests_running").expect("running gauge")
}

/// A queen metric's value, 0 when absent.
pub fn queen_metric(queen: &RunningDaemon, name: &str) -> f64 {
    metric_at(&queen.url(""), name).unwrap_or(0.0)
}

/// The `code` of an error event.
pub fn error_code(event: &Value) -> &str {
    event["code"].as_str().unwrap_or("")
}
