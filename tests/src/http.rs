//! Blocking HTTP helpers shared by the black-box tests.

use std::time::{Duration, Instant};

use reqwest::blocking::{Client, RequestBuilder};
use serde_json::Value;

use crate::default_model;

/// A blocking client with a 60 s timeout.
pub fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client")
}

/// Send `request`: status, JSON body (`Null` when empty), headers.
pub fn send(request: RequestBuilder) -> (u16, Value, reqwest::header::HeaderMap) {
    let response = request.send().expect("request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().expect("body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON body, got {text:?}"))
    };
    (status, body, headers)
}

/// The `field` of each entry in an error body's `details.fields`, in order
/// (empty when there are none).
pub fn field_names(body: &Value) -> Vec<&str> {
    body["error"]["details"]["fields"]
        .as_array()
        .map(|fields| fields.iter().filter_map(|f| f["field"].as_str()).collect())
        .unwrap_or_default()
}

/// The default model's reference as the hive catalogs it.
pub fn default_ref() -> String {
    format!(
        "file:{}",
        default_model()
            .canonicalize()
            .expect("default model")
            .display()
    )
}

/// Poll `done` every 50 ms until it holds; panics after `timeout`.
pub fn wait_for(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
