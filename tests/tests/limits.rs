//! Limits no client can get around: slow or idle connections, metric label
//! cardinality, oversized prompts.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use rbee_system_tests::queen::metric_at;
use rbee_system_tests::DaemonSpec;

/// Whether the server has closed `stream`: a read sees end of file or a
/// reset rather than waiting.
fn closed_by_server(stream: &mut TcpStream) -> bool {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = [0u8; 256];
    match stream.read(&mut buf) {
        Ok(0) => true,
        // A reserve or refused connection may have had an answer written.
        Ok(_) => stream.read(&mut buf).map_or(true, |n| n == 0),
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn two_thousand_half_sent_requests_neither_silence_the_probes_nor_stay_open() {
    // The test itself holds 2,000 sockets.
    let limit = rlimit::increase_nofile_limit(u64::MAX).expect("read the descriptor limit");
    assert!(
        limit >= 2_200,
        "this test needs 2,200 descriptors; the hard limit is {limit}"
    );
    // The measured failure: a hive at a 1,024-descriptor limit.
    let hive = DaemonSpec::new("rbee-hive")
        .descriptor_limit(1024)
        .args(["--header-read-timeout-s", "3"])
        .spawn();
    let base = hive.url("");

    let started = Instant::now();
    let mut slow: Vec<TcpStream> = Vec::with_capacity(2_000);
    for _ in 0..2_000 {
        let mut stream = TcpStream::connect(hive.addr).expect("the kernel accepts the connection");
        // Half a request line, never finished.
        let _ = stream.write_all(b"GET /v1/sta");
        slow.push(stream);
    }
    let opened = started.elapsed();

    let probe = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(1))
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    for attempt in 0..5 {
        let asked = Instant::now();
        let response = probe
            .get(hive.url("/health/live"))
            .send()
            .unwrap_or_else(|e| panic!("probe {attempt} unanswered with 2,000 slow clients: {e}"));
        assert_eq!(response.status(), 200, "probe {attempt}");
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "probe {attempt} took {:?}",
            asked.elapsed()
        );
    }
    let open = metric_at(&base, "rbee_hive_connections_open").expect("connections gauge");
    assert!(
        open <= 1024.0 / 2.0,
        "{open} connections held at a 1,024-descriptor limit"
    );
    let evicted = metric_at(
        &base,
        "rbee_hive_connections_dropped_total{reason=\"evicted\"}",
    )
    .expect("evictions counter");
    assert!(
        evicted > 0.0,
        "the cap made room by closing idle connections"
    );

    // Every half-sent request is closed: evicted at the cap, or by the
    // 3 s header timeout.
    let deadline = started + opened + Duration::from_secs(15);
    let mut still_open = slow.len();
    while Instant::now() < deadline {
        slow.retain_mut(|s| !closed_by_server(s));
        still_open = slow.len();
        if still_open == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(still_open, 0, "half-sent requests the hive never closed");
    let timed_out = metric_at(
        &base,
        "rbee_hive_connections_dropped_total{reason=\"header_timeout\"}",
    )
    .expect("timeout counter");
    assert!(timed_out > 0.0, "the header timeout closed the survivors");
    assert_eq!(
        metric_at(&base, "rbee_hive_connections_open"),
        Some(1.0),
        "only the scrape's own connection is left"
    );
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let hive = DaemonSpec::new("rbee-hive")
        .args(["--header-read-timeout-s", "1"])
        .spawn();
    let mut stream = TcpStream::connect(hive.addr).expect("connect");
    stream
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("send");
    let mut buf = [0u8; 1024];
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let n = stream.read(&mut buf).expect("the response");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Kept alive, then idle: closed within the timeout and a margin.
    let idle = Instant::now();
    let n = stream
        .read(&mut buf)
        .expect("end of file, not a read timeout");
    assert_eq!(n, 0, "the connection is closed, nothing more is sent");
    assert!(
        idle.elapsed() >= Duration::from_millis(900) && idle.elapsed() < Duration::from_secs(4),
        "closed after {:?}",
        idle.elapsed()
    );
}

/// Series in a `/metrics` page: its sample lines.
fn series(base: &str) -> usize {
    reqwest::blocking::get(format!("{base}/metrics"))
        .and_then(reqwest::blocking::Response::text)
        .expect("metrics")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("the daemon's status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn ten_thousand_bogus_model_names_leave_the_queens_series_and_memory_flat() {
    let queen = DaemonSpec::new("queen-rbee").spawn();
    let base = queen.url("");
    let client = reqwest::blocking::Client::new();
    let ask = |model: &str| {
        let response = client
            .post(queen.url("/v1/inference"))
            .json(&serde_json::json!({"model": model, "prompt": "hi", "stream": false}))
            .send()
            .expect("the queen answers");
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().expect("an error envelope");
        (status, body)
    };
    // A well-formed reference no hive knows, and a name that is none.
    let (status, body) = ask("hf:nobody/model-0");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("MODEL_NOT_FOUND"))
    );
    let (status, body) = ask(&"x".repeat(10_000));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("INVALID_REQUEST"))
    );
    assert_eq!(body["error"]["details"]["fields"][0]["field"], "model");

    // Warm up the allocator and every label the rejects use.
    for i in 0..1_000 {
        let _ = ask(&format!("hf:nobody/warm-{i}"));
        let _ = ask(&format!("warm-{i}"));
    }
    // The scrape counts itself under its route the first time.
    let _ = series(&base);
    let series_before = series(&base);
    let rss_before = rss_kib(queen.pid());
    for i in 0..5_000 {
        assert_eq!(
            ask(&format!("hf:bogus/model-{i}:{}.gguf", "y".repeat(100))).0,
            404
        );
        assert_eq!(ask(&format!("bogus model {i}")).0, 400);
    }
    let series_after = series(&base);
    let rss_after = rss_kib(queen.pid());
    assert_eq!(
        series_before, series_after,
        "10,000 bogus names added series"
    );
    assert!(
        rss_after < rss_before + 2048,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    let metrics = reqwest::blocking::get(format!("{base}/metrics"))
        .and_then(reqwest::blocking::Response::text)
        .expect("metrics");
    assert!(
        metrics.contains("rbee_queen_requests_total{model=\"unknown\",outcome=\"client_error\"}"),
        "rejects for unknown models are counted under one label value"
    );
    assert!(
        !metrics.contains("bogus"),
        "no client-chosen name is a label value"
    );
}

#[test]
fn a_web_page_cannot_stop_a_daemon_serving_without_a_token_on_loopback() {
    let hive = DaemonSpec::new("rbee-hive").spawn();
    let client = reqwest::blocking::Client::new();
    // What a form or a no-cors fetch from any page can send to loopback.
    for content_type in [
        "application/x-www-form-urlencoded",
        "text/plain",
        "multipart/form-data; boundary=x",
    ] {
        let response = client
            .post(hive.url("/v1/admin/shutdown"))
            .header("content-type", content_type)
            .header("origin", "https://evil.example")
            .body("a=1")
            .send()
            .expect("answered");
        assert_eq!(response.status(), 415, "{content_type}");
        let body: serde_json::Value = response.json().expect("envelope");
        assert_eq!(body["error"]["code"], "UNSUPPORTED_MEDIA_TYPE");
    }
    let response = client
        .post(hive.url("/v1/admin/shutdown"))
        .send()
        .expect("answered");
    assert_eq!(response.status(), 415, "no content type at all");
    assert_eq!(
        client
            .get(hive.url("/health/live"))
            .send()
            .expect("alive")
            .status(),
        200
    );
    // What curl or another daemon sends.
    let response = client
        .post(hive.url("/v1/admin/shutdown"))
        .json(&serde_json::json!({}))
        .send()
        .expect("answered");
    assert_eq!(response.status(), 202);
}
