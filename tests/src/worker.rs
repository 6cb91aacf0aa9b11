//! Helpers for the black-box tests of `llm-worker-rbee`: start one with
//! the default model, send requests, read SSE streams and metrics.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use reqwest::blocking::{Client, Response};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::{DaemonSpec, RunningDaemon};

/// Start `llm-worker-rbee` with the default model and `extra` flags; wait until ready.
pub fn worker(extra: &[&str]) -> RunningDaemon {
    let daemon = DaemonSpec::new("llm-worker-rbee")
        .args(extra.iter().copied())
        .spawn();
    daemon.wait_ready(Duration::from_secs(60));
    daemon
}

/// A blocking HTTP client with a two-minute timeout.
pub fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("build HTTP client")
}

/// POST `body` as JSON to `path` of the worker.
pub fn post(w: &RunningDaemon, path: &str, body: Value) -> Response {
    client()
        .post(w.url(path))
        .json(&body)
        .send()
        .expect("send request")
}

/// The value of metric `name` (its first series) in the worker's `/metrics`.
pub fn metric(w: &RunningDaemon, name: &str) -> f64 {
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

/// Poll `check` every 20 ms until it holds; panic naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
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
#[derive(Debug)]
pub struct Sse {
    lines: std::io::Lines<BufReader<Response>>,
}

impl Sse {
    /// Read `response` (200 asserted).
    pub fn new(response: Response) -> Self {
        assert_eq!(response.status(), StatusCode::OK);
        Self {
            lines: BufReader::new(response).lines(),
        }
    }

    /// The next `data:` payload; `None` at the end of the stream.
    pub fn next_data(&mut self) -> Option<String> {
        for line in self.lines.by_ref() {
            let line = line.ok()?;
            if let Some(data) = line.strip_prefix("data: ") {
                return Some(data.to_owned());
            }
        }
        None
    }

    /// The next event as JSON; `None` at `[DONE]` or the end.
    pub fn next_event(&mut self) -> Option<Value> {
        let data = self.next_data()?;
        if data == "[DONE]" {
            return None;
        }
        Some(serde_json::from_str(&data).expect("SSE data is JSON"))
    }

    /// All remaining events until `[DONE]`.
    pub fn rest(mut self) -> Vec<Value> {
        std::iter::from_fn(|| self.next_event()).collect()
    }
}

/// Start a generation that runs until it is stopped (2000 tokens, EOS
/// ignored) and return its stream, positioned after the `started` event.
pub fn long_generation(w: &RunningDaemon) -> Sse {
    let mut sse = Sse::new(post(
        w,
        "/v1/inference",
        json!({"prompt": "Write a long story.", "max_tokens": 2000, "ignore_eos": true}),
    ));
    assert_eq!(sse.next_event().expect("started")["type"], "started");
    sse
}

/// A 503 with `Retry-After: 1` and the given error code.
pub fn assert_unavailable(response: Response, code: &str) {
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(
        response.json::<Value>().expect("JSON")["error"]["code"],
        code
    );
}

/// The chat request of the quickstart: the capital of France, greedy.
pub fn paris_chat() -> Value {
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

/// A non-streaming `/v1/inference` answer (200 asserted).
pub fn complete(w: &RunningDaemon, body: Value) -> Value {
    let response = post(w, "/v1/inference", body);
    assert_eq!(response.status(), StatusCode::OK);
    response.json().expect("JSON")
}

/// Receive `n` token events after the next one and return the mean time
/// between them: the token time on this machine, now.
pub fn token_time(sse: &mut Sse, n: u32) -> Duration {
    sse.next_event().expect("a token");
    let t = Instant::now();
    for _ in 0..n {
        assert_eq!(sse.next_event().expect("a token")["type"], "token");
    }
    t.elapsed() / n
}
