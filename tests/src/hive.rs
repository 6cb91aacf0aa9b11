//! Client helpers for the hive's model routes, shared by the black-box
//! tests: provisioning, following a progress stream, listing, metrics.

use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use serde_json::{json, Value};

use crate::RunningDaemon;

/// A blocking client with a 120 s timeout.
pub fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("http client")
}

/// Send `request`; the status and the JSON body (panics on a non-JSON body).
pub fn send(request: reqwest::blocking::RequestBuilder) -> (u16, Value) {
    let response = request.send().expect("request");
    let status = response.status().as_u16();
    let text = response.text().expect("body");
    let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON body, got {text:?}"));
    (status, body)
}

/// `POST /v1/models/provision {model_ref}`.
pub fn provision(hive: &RunningDaemon, model_ref: &str) -> (u16, Value) {
    send(
        client()
            .post(hive.url("/v1/models/provision"))
            .json(&json!({ "model_ref": model_ref })),
    )
}

/// Read a progress stream to its end: each event with when it arrived.
pub fn follow(hive: &RunningDaemon, id: &str) -> Vec<(Instant, Value)> {
    follow_until(hive, id, |_| false)
}

/// Read a progress stream until `[DONE]` or until `stop` says so.
pub fn follow_until(
    hive: &RunningDaemon,
    id: &str,
    stop: impl Fn(&Value) -> bool,
) -> Vec<(Instant, Value)> {
    use std::io::BufRead;
    let response = client()
        .get(hive.url(&format!("/v1/models/download/progress?id={id}")))
        .send()
        .expect("progress stream");
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .expect("content type")
        .starts_with("text/event-stream"));
    let mut events = Vec::new();
    for line in std::io::BufReader::new(response).lines() {
        let line = line.expect("stream line");
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            events.push((Instant::now(), Value::String("[DONE]".into())));
            break;
        }
        let event: Value = serde_json::from_str(data).expect("event is JSON");
        let done = stop(&event);
        events.push((Instant::now(), event));
        if done {
            break;
        }
    }
    events
}

/// Provision `model_ref` and follow it to the end; returns the final event.
pub fn provision_to_end(hive: &RunningDaemon, model_ref: &str) -> Value {
    let (status, body) = provision(hive, model_ref);
    assert_eq!(status, 202, "{body}");
    let events = follow(hive, body["download_id"].as_str().expect("download_id"));
    assert_eq!(
        events.last().map(|e| &e.1),
        Some(&json!("[DONE]")),
        "{events:?}"
    );
    events[events.len() - 2].1.clone()
}

/// `GET /v1/models/list`: the provisioned models.
pub fn list(hive: &RunningDaemon) -> Vec<Value> {
    let (status, body) = send(client().get(hive.url("/v1/models/list")));
    assert_eq!(status, 200);
    body["models"].as_array().expect("models array").clone()
}

/// The value of the unlabelled metric `name` (panics when absent).
pub fn metric(hive: &RunningDaemon, name: &str) -> f64 {
    let text = client()
        .get(hive.url("/metrics"))
        .send()
        .expect("metrics")
        .text()
        .expect("metrics text");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

/// Provision `model_ref` on `hive` and wait until it is in the catalog.
pub fn provision_listed(hive: &RunningDaemon, model_ref: &str) {
    let (status, body) = provision(hive, model_ref);
    assert_eq!(status, 202, "{body}");
    crate::http::wait_for(
        Duration::from_secs(60),
        "the model to be provisioned",
        || list(hive).iter().any(|m| m["model_ref"] == model_ref),
    );
}

/// `POST /v1/workers/spawn` with `body`: status, JSON body, headers.
pub fn spawn_worker(
    hive: &RunningDaemon,
    body: &Value,
) -> (u16, Value, reqwest::header::HeaderMap) {
    crate::http::send(
        crate::http::client()
            .post(hive.url("/v1/workers/spawn"))
            .json(body),
    )
}

/// Worker `id`'s record in `GET /v1/workers/list`, if it is there.
pub fn worker_record(hive: &RunningDaemon, id: &str) -> Option<Value> {
    let (_, list, _) = crate::http::send(crate::http::client().get(hive.url("/v1/workers/list")));
    list["workers"]
        .as_array()
        .and_then(|w| w.iter().find(|w| w["worker_id"] == id).cloned())
}
