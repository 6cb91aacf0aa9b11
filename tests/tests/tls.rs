//! The whole stack over HTTPS: a CA made by the test signs one certificate
//! for loopback; `rbee-hive` (and the `llm-worker-rbee` it spawns, which get
//! its certificate and CA), and `queen-rbee` serve it, and every call
//! between them (queen to hive and to worker, hive to worker and to queen,
//! worker to hive) verifies its peer against that CA. Real binaries, real
//! TLS (rustls) on loopback.

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use rbee_http::tls::test_ca::{TestCa, TlsFiles};
use rbee_system_tests::http::{default_ref, wait_for};
use rbee_system_tests::{DaemonSpec, RunningDaemon};
use reqwest::blocking::{Client, RequestBuilder};
use serde_json::{json, Value};

/// A client that trusts `ca` (PEM file) only.
fn trusting(ca: &Path) -> Client {
    let pem = std::fs::read(ca).expect("CA file");
    Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("a PEM CA"))
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

fn https(daemon: &RunningDaemon, path: &str) -> String {
    format!("https://{}{path}", daemon.addr)
}

fn send(request: RequestBuilder) -> (u16, Value) {
    let response = request.send().expect("request");
    let status = response.status().as_u16();
    let text = response.text().expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// `spec` serving HTTPS with `files`, verifying its peers with `ca`.
fn with_tls(spec: DaemonSpec, files: &TlsFiles, ca: &Path) -> DaemonSpec {
    let path = |p: &Path| p.to_str().expect("UTF-8").to_owned();
    spec.args([
        "--tls-cert".to_owned(),
        path(&files.cert),
        "--tls-key".to_owned(),
        path(&files.key),
        "--tls-ca".to_owned(),
        path(ca),
    ])
}

/// A hive over HTTPS, registering with `queen`, with the default model and
/// one worker spawned.
fn hive(files: &TlsFiles, client: &Client, queen: &RunningDaemon) -> RunningDaemon {
    let hive = with_tls(DaemonSpec::new("rbee-hive"), files, &files.ca)
        .args(["--queen-url", &https(queen, "")])
        .spawn();
    let model = default_ref();
    let (status, body) = send(
        client
            .post(https(&hive, "/v1/models/provision"))
            .json(&json!({ "model_ref": model })),
    );
    assert_eq!(status, 202, "{body}");
    wait_for(Duration::from_secs(60), "the model", || {
        let (_, list) = send(client.get(https(&hive, "/v1/models/list")));
        list["models"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["model_ref"] == model))
    });
    let (status, body) = send(
        client
            .post(https(&hive, "/v1/workers/spawn"))
            .json(&json!({ "model_ref": model })),
    );
    assert_eq!(status, 202, "{body}");
    hive
}

#[test]
fn the_whole_stack_serves_and_calls_over_https_with_a_ca_the_test_made() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("rbee test CA");
    let files = ca.write(dir.path(), &["localhost", "127.0.0.1"]);
    let client = trusting(&files.ca);
    // The queen learns of the hive from its registration, over HTTPS.
    let queen = with_tls(DaemonSpec::new("queen-rbee"), &files, &files.ca)
        .args(["--hive-poll-interval-ms", "200"])
        .spawn();
    let hive = hive(&files, &client, &queen);
    // The worker called the hive back over HTTPS (verifying it with the
    // CA) and serves HTTPS itself.
    let mut worker_url = String::new();
    wait_for(Duration::from_secs(60), "a ready worker", || {
        let (_, list) = send(client.get(https(&hive, "/v1/workers/list")));
        let ready = list["workers"][0]["state"] == "idle";
        if ready {
            worker_url = list["workers"][0]["url"].as_str().unwrap_or("").to_owned();
        }
        ready
    });
    assert!(worker_url.starts_with("https://127.0.0.1:"), "{worker_url}");
    let (status, _) = send(client.get(format!("{worker_url}/v1/ready")));
    assert_eq!(status, 200);

    wait_for(Duration::from_secs(15), "the queen to be ready", || {
        send(client.get(https(&queen, "/health/ready"))).0 == 200
    });
    // Queen to worker over HTTPS, whole and streamed.
    let (status, body) =
        send(client.post(https(&queen, "/v1/inference")).json(
            &json!({"prompt": "Hi", "max_tokens": 3, "stream": false, "model": default_ref()}),
        ));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["tokens_out"], 3, "{body}");
    let response = client
        .post(https(&queen, "/v1/chat/completions"))
        .json(
            &json!({"model": default_ref(), "max_tokens": 3, "stream": true,
            "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .send()
        .expect("stream");
    assert_eq!(response.status(), 200);
    let text = response.text().expect("events");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(text.contains("chat.completion.chunk"), "{text}");

    // Plain HTTP gets no answer from an HTTPS port.
    assert!(Client::new()
        .get(queen.url("/health/live"))
        .timeout(Duration::from_secs(5))
        .send()
        .is_err());
    // No daemon warned about plain HTTP.
    for daemon in [&hive, &queen] {
        assert!(
            !daemon.logs().iter().any(|l| l.contains("plain HTTP")),
            "{}",
            daemon.name()
        );
    }
}

#[test]
fn a_peer_with_a_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("rbee test CA");
    let files = ca.write(dir.path(), &["localhost", "127.0.0.1"]);
    let hive = with_tls(DaemonSpec::new("rbee-hive"), &files, &files.ca).spawn();

    // A queen that trusts another CA only: the hive never counts as
    // reachable, and the reason is in the queen's log.
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other = TestCa::new("another CA");
    let other_files = other.write(other_dir.path(), &["127.0.0.1"]);
    let queen = with_tls(DaemonSpec::new("queen-rbee"), &other_files, &other_files.ca)
        .args([
            "--hive-poll-interval-ms",
            "200",
            "--hive",
            &https(&hive, ""),
        ])
        .spawn();
    let to_queen = trusting(&other_files.ca);
    assert!(
        queen.wait_for_log("UnknownIssuer", Duration::from_secs(10)),
        "{:?}",
        queen.logs()
    );
    let (status, body) = send(to_queen.get(https(&queen, "/health/ready")));
    assert_eq!(
        (status, body["status"].as_str()),
        (503, Some("no_reachable_hive")),
        "{body}"
    );

    // A client that trusts the other CA cannot talk to the hive either.
    let err = to_queen
        .get(https(&hive, "/health/live"))
        .send()
        .expect_err("the hive's certificate is from another CA");
    assert!(format!("{err:?}").contains("UnknownIssuer"), "{err:?}");
}

#[test]
fn a_new_certificate_is_served_after_sighup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("first CA");
    let files = ca.write(dir.path(), &["127.0.0.1"]);
    let queen = with_tls(DaemonSpec::new("queen-rbee"), &files, &files.ca).spawn();
    let first = trusting(&files.ca);
    assert_eq!(send(first.get(https(&queen, "/health/live"))).0, 200);

    // The files now hold a certificate from another CA.
    let second_ca = TestCa::new("second CA");
    let (cert, key) = second_ca.leaf(&["127.0.0.1"]);
    std::fs::write(&files.cert, cert).expect("cert");
    std::fs::write(&files.key, key).expect("key");
    let second_pem = dir.path().join("second-ca.pem");
    std::fs::write(&second_pem, second_ca.pem()).expect("CA");
    queen.signal(Signal::SIGHUP);
    assert!(queen.wait_for_log(
        "TLS certificate and key read again",
        Duration::from_secs(10)
    ));
    let second = trusting(&second_pem);
    assert_eq!(send(second.get(https(&queen, "/health/live"))).0, 200);
    assert!(trusting(&files.ca)
        .get(https(&queen, "/health/live"))
        .send()
        .is_err());
}

#[test]
fn a_plain_http_peer_on_another_host_draws_a_warning_at_startup() {
    let queen = DaemonSpec::new("queen-rbee")
        .args(["--hive", "http://192.0.2.10:9200"])
        .spawn();
    assert!(queen.wait_for_log("plain HTTP to another host", Duration::from_secs(10)));
    let local = DaemonSpec::new("queen-rbee")
        .args(["--hive", "http://127.0.0.1:9"])
        .spawn();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!local.logs().iter().any(|l| l.contains("plain HTTP")));
}
