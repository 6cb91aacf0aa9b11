//! Black-box tests of what every daemon shares: flags, probes, metrics,
//! auth, deadlines, request ids, error envelope, startup policy, shutdown.

use std::time::Duration;

use nix::sys::signal::Signal;
use rbee_system_tests::{token_fingerprint, DaemonSpec, RunningDaemon, DAEMONS, TEST_TOKEN};
use reqwest::blocking::Client;
use reqwest::StatusCode;
use serde_json::Value;

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("build HTTP client")
}

/// POST with a declared body one byte over the 1 MiB limit, sent the way
/// careful clients do (`Expect: 100-continue`), so the daemon answers from
/// the headers and no test races a half-written body against the 413.
fn oversized_post(daemon: &RunningDaemon, path: &str) -> (u16, Value) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(daemon.addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {TEST_TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\
         Connection: close\r\n\r\n",
        1024 * 1024 + 1
    )
    .expect("write request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn bearer() -> String {
    format!("Bearer {TEST_TOKEN}")
}

fn json(response: reqwest::blocking::Response) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().expect("read response body");
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, headers, body)
}

fn assert_envelope(body: &Value, code: &str) {
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(body["error"]["retriable"].is_boolean(), "{body}");
}

fn stderr_lines(output: &std::process::Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_daemon_answers_help_and_version() {
    for name in DAEMONS {
        let help = DaemonSpec::new(name)
            .args(["--help"])
            .run_to_exit(Duration::from_secs(10));
        assert!(help.status.success(), "{name} --help failed");
        let text = String::from_utf8_lossy(&help.stdout);
        for flag in [
            "--addr",
            "--api-token-file",
            "--log-format",
            "--shutdown-timeout-s",
        ] {
            assert!(text.contains(flag), "{name} --help lacks {flag}:\n{text}");
        }
        let version = DaemonSpec::new(name)
            .args(["--version"])
            .run_to_exit(Duration::from_secs(10));
        assert!(version.status.success());
        assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
    }
}

#[test]
fn public_probes_and_metrics_answer_without_a_token() {
    let http = client();
    for name in DAEMONS {
        let daemon = DaemonSpec::new(name).with_token().spawn();
        let (status, _, body) = json(http.get(daemon.url("/health")).send().unwrap());
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["status"], "ok");
        assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));

        let (status, _, body) = json(http.get(daemon.url("/health/live")).send().unwrap());
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, serde_json::json!({"status": "alive"}));

        let metrics = http.get(daemon.url("/metrics")).send().unwrap();
        assert_eq!(metrics.status(), StatusCode::OK);
        let text = metrics.text().unwrap();
        assert!(text.contains("rbee_build_info{"), "{name}: {text}");
        assert!(
            text.contains("rbee_auth_failures_total{reason=\"missing\"} 0"),
            "{name}: {text}"
        );
    }
}

#[test]
fn hive_http_metrics_use_the_contract_names_and_route_templates() {
    let http = client();
    let hive = DaemonSpec::new("rbee-hive").spawn();
    http.get(hive.url("/health")).send().unwrap();
    http.get(hive.url("/no/such/path/12345")).send().unwrap();
    let text = http
        .get(hive.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        text.contains("rbee_hive_requests_total{route=\"/health\",status=\"200\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("rbee_hive_requests_total{route=\"unmatched\",status=\"404\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("rbee_hive_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(
        !text.contains("12345"),
        "raw paths must never become labels"
    );
}

#[test]
fn unknown_routes_wrong_methods_and_big_bodies_answer_in_the_envelope() {
    let http = client();
    for name in DAEMONS {
        let daemon = DaemonSpec::new(name).with_token().spawn();
        let (status, _, body) = json(
            http.get(daemon.url("/v1/nope"))
                .header("authorization", bearer())
                .send()
                .unwrap(),
        );
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_envelope(&body, "NOT_FOUND");

        let (status, headers, body) = json(http.delete(daemon.url("/health")).send().unwrap());
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_envelope(&body, "METHOD_NOT_ALLOWED");
        assert!(headers.contains_key("allow"));

        let (status, body) = oversized_post(&daemon, "/v1/admin/shutdown");
        assert_eq!(status, 413);
        assert_envelope(&body, "PAYLOAD_TOO_LARGE");
    }
}

#[test]
fn protected_routes_require_the_token_and_count_failures() {
    let http = client();
    for name in DAEMONS {
        let mut daemon = DaemonSpec::new(name).with_token().spawn();
        let (status, headers, body) = json(
            http.post(daemon.url("/v1/admin/shutdown"))
                .json(&serde_json::json!({}))
                .send()
                .unwrap(),
        );
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(headers["www-authenticate"], "Bearer");
        assert_envelope(&body, "MISSING_API_KEY");

        let (status, headers, body) = json(
            http.post(daemon.url("/v1/admin/shutdown"))
                .json(&serde_json::json!({}))
                .header("authorization", "Bearer wrong-token-000000000000")
                .send()
                .unwrap(),
        );
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(headers["www-authenticate"], "Bearer");
        assert_envelope(&body, "INVALID_API_KEY");

        // Unknown routes are not revealed to the unauthenticated.
        let (status, _, _) = json(http.get(daemon.url("/v1/nope")).send().unwrap());
        assert_eq!(status, StatusCode::UNAUTHORIZED);

        let text = http
            .get(daemon.url("/metrics"))
            .send()
            .unwrap()
            .text()
            .unwrap();
        assert!(
            text.contains("rbee_auth_failures_total{reason=\"missing\"} 2"),
            "{name}: {text}"
        );
        assert!(
            text.contains("rbee_auth_failures_total{reason=\"invalid\"} 1"),
            "{name}: {text}"
        );

        let response = http
            .post(daemon.url("/v1/admin/shutdown"))
            .json(&serde_json::json!({}))
            .header("authorization", bearer())
            .send()
            .unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let status = daemon
            .wait_exit(Duration::from_secs(10))
            .expect("daemon exits after admin shutdown");
        assert_eq!(
            status.code(),
            Some(0),
            "{name} must exit 0 after a graceful drain"
        );
    }
}

#[test]
fn no_log_line_contains_the_raw_token() {
    let http = client();
    let wrong = "wrong-but-secret-token-123456";
    for name in DAEMONS {
        let mut daemon = DaemonSpec::new(name)
            .with_token()
            .env("RUST_LOG", "trace")
            .spawn();
        for auth in [
            None,
            Some(format!("Bearer {wrong}")),
            Some("Basic abc".to_owned()),
            Some(bearer()),
        ] {
            let mut request = http.get(daemon.url("/v1/nothing-here"));
            if let Some(a) = auth {
                request = request.header("authorization", a);
            }
            request.send().unwrap();
        }
        http.post(daemon.url("/v1/admin/shutdown"))
            .json(&serde_json::json!({}))
            .header("authorization", bearer())
            .send()
            .unwrap();
        daemon.wait_exit(Duration::from_secs(10)).expect("exit");
        let logs = daemon.logs().join("\n");
        assert!(
            logs.contains("authentication failed"),
            "{name} logged no auth failure:\n{logs}"
        );
        let fp = token_fingerprint(TEST_TOKEN);
        assert!(logs.contains(&fp), "{name} logs lack the token fingerprint");
        assert!(!logs.contains(TEST_TOKEN), "{name} logged the raw token");
        assert!(!logs.contains(wrong), "{name} logged a presented token");
    }
}

#[test]
fn deadlines_are_enforced_before_any_handler() {
    let http = client();
    for name in DAEMONS {
        let mut daemon = DaemonSpec::new(name).with_token().spawn();
        let (status, _, body) = json(
            http.post(daemon.url("/v1/admin/shutdown"))
                .json(&serde_json::json!({}))
                .header("authorization", bearer())
                .header("x-deadline", "1700000000000")
                .send()
                .unwrap(),
        );
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert_envelope(&body, "DEADLINE_EXCEEDED");
        assert_eq!(body["error"]["retriable"], true);

        let (status, _, body) = json(
            http.post(daemon.url("/v1/admin/shutdown"))
                .json(&serde_json::json!({}))
                .header("authorization", bearer())
                .header("x-timeout-ms", "soon")
                .send()
                .unwrap(),
        );
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_envelope(&body, "INVALID_DEADLINE");
        assert_eq!(
            body["error"]["details"]["fields"][0]["field"],
            "X-Timeout-Ms"
        );

        // Neither request reached the handler: the daemon is still serving.
        assert!(
            daemon.wait_exit(Duration::from_millis(300)).is_none(),
            "{name} shut down"
        );
        let ok = http
            .post(daemon.url("/v1/admin/shutdown"))
            .json(&serde_json::json!({}))
            .header("authorization", bearer())
            .header("x-timeout-ms", "5000")
            .send()
            .unwrap();
        assert_eq!(ok.status(), StatusCode::ACCEPTED);
    }
}

#[test]
fn request_ids_are_accepted_or_minted_echoed_and_logged() {
    let http = client();
    for name in DAEMONS {
        let daemon = DaemonSpec::new(name).spawn();
        let response = http
            .get(daemon.url("/v1/unknown"))
            .header("x-request-id", "client-req-42")
            .send()
            .unwrap();
        assert_eq!(response.headers()["x-request-id"], "client-req-42");
        let minted = http
            .get(daemon.url("/v1/unknown"))
            .header("x-request-id", "bad id with spaces")
            .send()
            .unwrap();
        let minted_id = minted.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            minted_id.len(),
            36,
            "a UUID replaces an unacceptable id: {minted_id}"
        );
        assert!(
            daemon.wait_for_log("client-req-42", Duration::from_secs(5)),
            "{name} did not log the request id"
        );
        let line = daemon
            .logs()
            .into_iter()
            .find(|l| l.contains("client-req-42"))
            .unwrap();
        let parsed: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["span"]["request_id"], "client-req-42");
    }
}

#[test]
fn non_loopback_bind_without_a_token_refuses_to_start_with_one_line() {
    for name in DAEMONS {
        let out = DaemonSpec::new(name)
            .addr("0.0.0.0:0")
            .run_to_exit(Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(1), "{name}");
        let lines = stderr_lines(&out);
        assert_eq!(lines.len(), 1, "{name}: {lines:?}");
        assert!(
            lines[0].contains("refusing to listen on 0.0.0.0:0"),
            "{lines:?}"
        );
    }
}

#[test]
fn short_or_badly_protected_tokens_refuse_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let readable = dir.path().join("token");
    std::fs::write(&readable, TEST_TOKEN).unwrap();
    std::fs::set_permissions(
        &readable,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    for name in DAEMONS {
        let out = DaemonSpec::new(name)
            .env("LLORCH_API_TOKEN", "short")
            .run_to_exit(Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(1), "{name}");
        let lines = stderr_lines(&out);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("at least 16"), "{lines:?}");

        let out = DaemonSpec::new(name)
            .args(["--api-token-file", readable.to_str().unwrap()])
            .run_to_exit(Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(1), "{name}");
        let lines = stderr_lines(&out);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("must not be accessible to group or others"),
            "{lines:?}"
        );
    }
}

#[test]
fn tokens_load_from_a_private_file_and_from_the_credentials_directory() {
    let http = client();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{TEST_TOKEN}\n")).unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("api-token"), TEST_TOKEN).unwrap();

    let from_file = DaemonSpec::new("rbee-hive")
        .args(["--api-token-file", file.to_str().unwrap()])
        .spawn();
    let from_creds = DaemonSpec::new("queen-rbee")
        .env("CREDENTIALS_DIRECTORY", creds.path().to_str().unwrap())
        .spawn();
    for daemon in [&from_file, &from_creds] {
        let denied = http.get(daemon.url("/v1/x")).send().unwrap();
        assert_eq!(
            denied.status(),
            StatusCode::UNAUTHORIZED,
            "{}",
            daemon.name()
        );
        let allowed = http
            .get(daemon.url("/v1/x"))
            .header("authorization", bearer())
            .send()
            .unwrap();
        assert_eq!(allowed.status(), StatusCode::NOT_FOUND, "{}", daemon.name());
    }
}

#[test]
fn loopback_without_a_token_is_open_with_exactly_one_warning() {
    let http = client();
    for name in DAEMONS {
        let mut daemon = DaemonSpec::new(name).spawn();
        let response = http
            .post(daemon.url("/v1/admin/shutdown"))
            .json(&serde_json::json!({}))
            .send()
            .unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        daemon.wait_exit(Duration::from_secs(10)).expect("exit");
        let warnings = daemon
            .logs()
            .iter()
            .filter(|l| l.contains("without authentication"))
            .count();
        assert_eq!(warnings, 1, "{name}");
    }
}

#[test]
fn sigterm_and_sigint_drain_and_exit_zero() {
    for (name, signal) in [
        ("queen-rbee", Signal::SIGTERM),
        ("rbee-hive", Signal::SIGINT),
        ("llm-worker-rbee", Signal::SIGTERM),
    ] {
        let mut daemon: RunningDaemon = DaemonSpec::new(name).spawn();
        daemon.signal(signal);
        let status = daemon
            .wait_exit(Duration::from_secs(10))
            .expect("exits after the signal");
        assert_eq!(status.code(), Some(0), "{name} after {signal:?}");
        assert!(
            daemon
                .logs()
                .iter()
                .any(|l| l.contains("received; draining")),
            "{name}"
        );
    }
}

#[test]
fn a_port_in_use_is_a_one_line_startup_error() {
    let first = DaemonSpec::new("queen-rbee").spawn();
    let out = DaemonSpec::new("queen-rbee")
        .addr(&first.addr.to_string())
        .run_to_exit(Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(1));
    let lines: Vec<String> = stderr_lines(&out)
        .into_iter()
        .filter(|l| !l.contains("without authentication"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("cannot listen on"), "{lines:?}");
}
