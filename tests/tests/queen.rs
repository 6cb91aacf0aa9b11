//! The queen as users and operators meet it: the real `queen-rbee` in front
//! of real `rbee-hive`s spawning real `llm-worker-rbee`s with the default
//! model, over HTTP on loopback, with real signals.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rbee_system_tests::http::field_names;
use rbee_system_tests::queen::{
    client, default_ref, error_code, hive_with_model, infer, long_request, metric_at, queen_metric,
    queen_spec, ready_queen, running, send, stream, wait_for, wait_ready_workers, worker_total,
    EventStream,
};
use rbee_system_tests::{DaemonSpec, RunningDaemon, TEST_TOKEN};
use serde_json::{json, Value};

#[test]
fn a_cold_start_spawns_one_worker_for_many_requests_then_load_goes_to_the_least_busy() {
    let hive = hive_with_model(DaemonSpec::new("rbee-hive"), None);
    let queen = ready_queen(&queen_spec(&[&hive]), None);
    wait_for(Duration::from_secs(10), "the hive to be reachable", || {
        send(client().get(queen.url("/health/ready"))).0 == 200
    });

    // Three requests at once, no worker yet: one spawn serves them all.
    let answers: Vec<(u16, Value, _)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|i| {
                let queen = &queen;
                s.spawn(move || {
                    infer(
                        queen,
                        &json!({"prompt": format!("Number {i} is"), "max_tokens": 4, "ignore_eos": true, "stream": false}),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    for (status, body, headers) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(body["tokens_out"], 4);
        assert_eq!(headers["x-job-id"].to_str().ok(), body["job_id"].as_str());
    }
    let (_, list, _) = send(client().get(hive.url("/v1/workers/list")));
    assert_eq!(list["workers"].as_array().map(Vec::len), Some(1), "{list}");
    // The queen learned of readiness by waiting on the hive's worker route,
    // not by polling the list.
    let waits = client()
        .get(hive.url("/metrics"))
        .send()
        .and_then(|r| r.text())
        .expect("hive metrics")
        .lines()
        .filter(|l| {
            l.starts_with("rbee_hive_requests_total{")
                && l.contains(r#"route="/v1/workers/{worker_id}""#)
                && l.contains(r#"status="200""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    assert!(waits >= 1.0, "the queen waited on the hive's worker route");

    // A second worker; two concurrent streams land on different workers.
    let (status, _, _) = send(
        client()
            .post(hive.url("/v1/workers/spawn"))
            .json(&json!({"model_ref": default_ref()})),
    );
    assert_eq!(status, 202);
    let workers = wait_ready_workers(&queen, 2, None);
    let urls: Vec<String> = workers
        .iter()
        .map(|w| w["url"].as_str().expect("worker url").to_owned())
        .collect();
    let mut a = EventStream::open(
        client()
            .post(queen.url("/v1/inference"))
            .header("x-request-id", "trace-me-0001")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .json(&long_request(40, true)),
    );
    assert_eq!(a.headers["x-request-id"], "trace-me-0001");
    // (Another prompt: the same one would follow `a` to its worker, whose
    // cache holds it.)
    let mut other = long_request(40, true);
    other["prompt"] = json!("Write a long story about a mountain guide.");
    let mut b = stream(&queen, &other);
    let first_a = a.until_token();
    b.until_token();
    assert_eq!(first_a[0]["type"], "started");
    assert_eq!(
        first_a[0]["request_id"], "trace-me-0001",
        "the worker got the request id"
    );
    assert_eq!(first_a[1]["type"], "token");
    for url in &urls {
        assert_eq!(running(url), 1.0, "each worker runs exactly one stream");
    }
    let end = a.rest();
    assert_eq!(end[end.len() - 2]["type"], "end", "{end:?}");
    assert_eq!(end[end.len() - 1], "[DONE]");
    b.rest();

    let model = default_ref();
    let ok = queen_metric(
        &queen,
        &format!("rbee_queen_requests_total{{model=\"{model}\",outcome=\"ok\"}}"),
    );
    assert_eq!(ok, 5.0);
    let ttft = queen_metric(
        &queen,
        &format!("rbee_queen_time_to_first_token_seconds_count{{model=\"{model}\"}}"),
    );
    assert_eq!(ttft, 2.0);
    assert_eq!(
        queen_metric(&queen, "rbee_queen_hives{state=\"reachable\"}"),
        1.0
    );
    let serving = queen_metric(&queen, "rbee_queen_workers{state=\"idle\"}")
        + queen_metric(&queen, "rbee_queen_workers{state=\"busy\"}");
    assert_eq!(serving, 2.0);

    // `GET /v1/models` lists the model with where it is.
    let (status, models, _) = send(client().get(queen.url("/v1/models")));
    assert_eq!(status, 200);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], model.as_str());
    assert_eq!(models["data"][0]["workers_ready"], 2);
}

#[test]
fn bad_input_unknown_models_and_missing_tokens_get_the_contract_errors() {
    let hive = hive_with_model(DaemonSpec::new("rbee-hive").with_token(), Some(TEST_TOKEN));
    let queen = queen_spec(&[&hive]).with_token().spawn();
    let c = client();
    let auth = |r: reqwest::blocking::RequestBuilder| r.bearer_auth(TEST_TOKEN);

    // Every protected route refuses a missing or wrong token.
    let protected: [(&str, &str); 10] = [
        ("POST", "/v1/inference"),
        ("DELETE", "/v1/inference/j1"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("GET", "/v1/models"),
        ("POST", "/v2/hives/register"),
        ("GET", "/v2/hives/list"),
        ("POST", "/v2/hives/remove"),
        ("GET", "/v2/workers/list"),
        ("POST", "/v1/admin/shutdown"),
    ];
    for (method, path) in protected {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let (status, body, headers) = send(c.request(m.clone(), queen.url(path)));
        assert_eq!(status, 401, "{method} {path}");
        assert_eq!(body["error"]["code"], "MISSING_API_KEY");
        assert_eq!(headers["www-authenticate"], "Bearer");
        let (status, body, _) = send(
            c.request(m, queen.url(path))
                .bearer_auth("wrong-token-0123456789"),
        );
        assert_eq!(status, 401, "{method} {path}");
        assert_eq!(body["error"]["code"], "INVALID_API_KEY");
    }
    for path in ["/health", "/health/live", "/metrics"] {
        assert_eq!(
            c.get(queen.url(path)).send().expect("public").status(),
            200,
            "{path}"
        );
    }
    // The queen reaches the authenticated hive with its token.
    wait_for(Duration::from_secs(10), "the hive to be reachable", || {
        send(c.get(queen.url("/health/ready"))).0 == 200
    });

    let (status, body, _) = send(auth(c.post(queen.url("/v1/inference"))).json(&json!({
        "model": "hf:nobody/nothing", "prompt": "hi"
    })));
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "MODEL_NOT_FOUND");

    let (status, body, _) = send(auth(c.post(queen.url("/v1/inference"))).json(&json!({
        "prompt": " ", "max_tokens": 0, "temperature": 5, "job_id": "../x"
    })));
    assert_eq!(status, 400);
    let fields = field_names(&body);
    for f in ["prompt", "max_tokens", "temperature", "job_id"] {
        assert!(fields.contains(&f), "{f} missing from {body}");
    }
    let (status, body, _) = send(
        auth(c.post(queen.url("/v1/inference")))
            .header("content-type", "application/json")
            .body("{\"prompt\": "),
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("INVALID_JSON"))
    );
    let (status, body, _) = send(
        auth(c.post(queen.url("/v1/inference")))
            .header("x-timeout-ms", "soon")
            .json(&json!({"prompt": "hi"})),
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("INVALID_DEADLINE"))
    );

    let (status, body, _) = send(auth(c.post(queen.url("/v1/chat/completions"))).json(
        &json!({"messages": [], "stream": "yes", "model": 3, "temperature": -1, "max_tokens": 0}),
    ));
    assert_eq!(status, 400);
    assert_eq!(
        field_names(&body),
        ["messages", "model", "stream", "max_tokens", "temperature"],
        "every bad field, types and ranges together: {body}"
    );
    let (status, _, _) =
        send(auth(c.post(queen.url("/v1/completions"))).json(&json!({"max_tokens": 3})));
    assert_eq!(status, 400);
    let (status, _, _) = send(auth(c.post(queen.url("/v1/completions"))).json(&json!([1, 2])));
    assert_eq!(status, 400);
    // What the server does not do is refused, not answered as free text:
    // by the queen's own checks, and by the worker, whose model's template
    // shows no tools.
    let (status, body, _) = send(
        auth(c.post(queen.url("/v1/chat/completions"))).json(&json!({
            "messages": [{"role": "user", "content": "hi"}],
            "functions": [{"name": "f"}],
            "modalities": ["audio"],
        })),
    );
    assert_eq!(status, 400);
    assert_eq!(field_names(&body), ["functions", "modalities"], "{body}");
    let (status, body, _) = send(
        auth(c.post(queen.url("/v1/chat/completions"))).json(&json!({
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
        })),
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(field_names(&body), ["tools"], "{body}");

    // Bodies within the limit that outgrow it as the queen forwards them
    // are refused by the queen before queueing, in the envelope.
    let model = default_ref();
    let near_limit = |room: usize| {
        let skeleton = json!({"model": model, "prompt": ""}).to_string();
        json!({"model": model, "prompt": "x".repeat(1024 * 1024 - skeleton.len() - room)})
            .to_string()
    };
    // Both grow when the queen encodes them again: the native body gains
    // the job id, the OpenAI body every setting written out explicitly.
    for (path, body) in [
        ("/v1/inference", near_limit(8)),
        ("/v1/completions", near_limit(8)),
    ] {
        assert!(
            body.len() <= 1024 * 1024,
            "{path}: within the limit as sent"
        );
        let (status, answer, _) = send(
            auth(c.post(queen.url(path)))
                .header("content-type", "application/json")
                .body(body),
        );
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (413, Some("PAYLOAD_TOO_LARGE")),
            "{path}"
        );
        assert!(
            answer["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("as forwarded to a worker")),
            "{answer}"
        );
    }

    let (status, body, _) = send(
        auth(c.post(queen.url("/v2/hives/register")))
            .json(&json!({"node_name": "bad name", "url": "ftp://x/y"})),
    );
    assert_eq!(status, 400);
    assert_eq!(
        body["error"]["details"]["fields"].as_array().map(Vec::len),
        Some(2),
        "{body}"
    );
    let (status, body, _) = send(
        auth(c.post(queen.url("/v2/hives/register")))
            .json(&json!({"node_name": "a", "url": "http://h:1", "extra": 1})),
    );
    assert_eq!(status, 400, "{body}");
    let (status, body, _) =
        send(auth(c.post(queen.url("/v2/hives/remove"))).json(&json!({"node_name": "ghost"})));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("NOT_FOUND"))
    );
    let (status, _, _) = send(auth(c.delete(queen.url("/v1/inference/%2E%2E%2Fx%20y"))));
    assert_eq!(status, 400);
    let (status, body, _) = send(auth(c.delete(queen.url("/v1/inference/never-seen"))));
    assert_eq!((status, body), (204, Value::Null));
    let (status, _, _) = send(auth(c.get(queen.url("/v2/nothing"))));
    assert_eq!(status, 404);
}

#[test]
fn queue_limits_deadlines_cancellation_and_disconnects() {
    let hive = hive_with_model(DaemonSpec::new("rbee-hive"), None);
    // One worker with one slot, so that one stream fills it.
    let (status, body, _) = send(
        client()
            .post(hive.url("/v1/workers/spawn"))
            .json(&json!({"model_ref": default_ref(), "slots": 1})),
    );
    assert_eq!(status, 202, "{body}");
    let queen = ready_queen(&queen_spec(&[&hive]).args(["--max-queue", "1"]), None);
    wait_ready_workers(&queen, 1, None);
    let (status, body, _) = infer(
        &queen,
        &json!({"prompt": "Hi", "max_tokens": 2, "stream": false}),
    );
    assert_eq!(status, 200, "{body}");
    let worker = wait_ready_workers(&queen, 1, None)[0]["url"]
        .as_str()
        .expect("worker url")
        .to_owned();

    // Already expired at the queen: 504, and the worker never hears of it.
    let before = worker_total(&worker);
    let past = (std::time::SystemTime::now() - Duration::from_secs(5))
        .duration_since(std::time::UNIX_EPOCH)
        .expect("epoch")
        .as_millis();
    let (status, body, _) = send(
        client()
            .post(queen.url("/v1/inference"))
            .header("x-deadline", past.to_string())
            .json(&json!({"prompt": "Hi", "max_tokens": 2})),
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (504, Some("DEADLINE_EXCEEDED"))
    );
    assert_eq!(worker_total(&worker), before);
    assert_eq!(
        queen_metric(
            &queen,
            "rbee_queen_deadline_exceeded_total{stage=\"admission\"}"
        ),
        1.0
    );

    // A worker that is busy with work the queen did not send answers 503;
    // the queen puts its request back in the queue instead of failing it.
    let busy_before =
        metric_at(&worker, "rbee_worker_requests_total{outcome=\"busy\"}").unwrap_or(0.0);
    let mut direct = EventStream::open(
        client()
            .post(format!("{worker}/v1/inference"))
            .json(&long_request(30, true)),
    );
    assert_eq!(direct.status, 200);
    direct.until_token();
    let (status, body, _) = infer(
        &queen,
        &json!({"prompt": "Hi", "max_tokens": 2, "stream": false}),
    );
    assert_eq!(status, 200, "{body}");
    assert!(direct.rest().iter().any(|e| e["type"] == "end"));
    assert!(
        metric_at(&worker, "rbee_worker_requests_total{outcome=\"busy\"}").unwrap_or(0.0)
            > busy_before,
        "the worker turned the queen away at least once"
    );

    // One stream holds the only slot.
    let mut holder = stream(
        &queen,
        &json!({"job_id": "holder", "prompt": "Tell a story", "max_tokens": 400, "ignore_eos": true}),
    );
    holder.until_token();

    // A queued request whose deadline passes: 504 near its deadline.
    let started = Instant::now();
    let (status, body, _) = send(
        client()
            .post(queen.url("/v1/inference"))
            .header("x-timeout-ms", "700")
            .json(&json!({"prompt": "Hi", "max_tokens": 2, "stream": false})),
    );
    let waited = started.elapsed();
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (504, Some("DEADLINE_EXCEEDED"))
    );
    assert!(
        waited >= Duration::from_millis(650) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert_eq!(
        queen_metric(
            &queen,
            "rbee_queen_deadline_exceeded_total{stage=\"queued\"}"
        ),
        1.0
    );

    // A queued request whose client gives up leaves the queue.
    let model = default_ref();
    let quitter = client()
        .post(queen.url("/v1/inference"))
        .timeout(Duration::from_millis(500))
        .json(&json!({"prompt": "Hi", "max_tokens": 2, "stream": false}))
        .send();
    assert!(quitter.is_err_and(|e| e.is_timeout()));
    wait_for(
        Duration::from_secs(5),
        "the abandoned request to leave the queue",
        || {
            queen_metric(
                &queen,
                &format!("rbee_queen_queue_size{{model=\"{model}\"}}"),
            ) == 0.0
        },
    );

    // One waits (the queue holds one), the next is refused with 429.
    std::thread::scope(|s| {
        let queen_ref = &queen;
        let waiting = s.spawn(move || {
            infer(
                queen_ref,
                &json!({"job_id": "waiter", "prompt": "Hi", "max_tokens": 2, "stream": false}),
            )
        });
        let model = &model;
        wait_for(Duration::from_secs(10), "one queued request", || {
            queen_metric(
                queen_ref,
                &format!("rbee_queen_queue_size{{model=\"{model}\"}}"),
            ) == 1.0
        });
        let (status, body, headers) = infer(queen_ref, &json!({"prompt": "Hi", "max_tokens": 2}));
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (429, Some("QUEUE_FULL"))
        );
        assert!(headers.contains_key("retry-after"));
        // DELETE takes the queued one out of the queue.
        let (status, _, _) = send(client().delete(queen.url("/v1/inference/waiter")));
        assert_eq!(status, 204);
        let (status, body, _) = waiting.join().expect("thread");
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (409, Some("CANCELLED"))
        );
    });

    // DELETE ends the running stream with CANCELLED and frees the slot.
    let (status, _, _) = send(client().delete(queen.url("/v1/inference/holder")));
    assert_eq!(status, 204);
    let rest = holder.rest();
    let error = rest
        .iter()
        .find(|e| e["type"] == "error")
        .expect("error event");
    assert_eq!(error_code(error), "CANCELLED");
    wait_for(
        Duration::from_secs(5),
        "the worker to free its slot",
        || running(&worker) == 0.0,
    );
    assert_eq!(
        send(client().delete(queen.url("/v1/inference/holder"))).0,
        204
    );

    // A deadline during generation ends the stream with an error event.
    let mut late = EventStream::open(
        client()
            .post(queen.url("/v1/inference"))
            .header("x-timeout-ms", "1500")
            .json(&long_request(400, true)),
    );
    let events = late.rest();
    let tokens = events.iter().filter(|e| e["type"] == "token").count();
    let last_error = events
        .iter()
        .rev()
        .find(|e| e["type"] == "error")
        .expect("error event");
    assert_eq!(error_code(last_error), "DEADLINE_EXCEEDED", "{events:?}");
    assert!(tokens > 0 && tokens < 400, "{tokens}");
    assert_eq!(events.last(), Some(&json!("[DONE]")));
    wait_for(
        Duration::from_secs(5),
        "the worker to free its slot",
        || running(&worker) == 0.0,
    );

    // A client that goes away stops the worker's generation.
    let before = worker_total(&worker);
    let mut gone = stream(&queen, &long_request(400, true));
    gone.until_token();
    assert_eq!(running(&worker), 1.0);
    drop(gone);
    wait_for(
        Duration::from_secs(5),
        "the worker to stop generating",
        || running(&worker) == 0.0,
    );
    wait_for(Duration::from_secs(5), "the worker to count it", || {
        worker_total(&worker) == before + 1.0
    });
    assert!(
        metric_at(&worker, "rbee_worker_requests_total{outcome=\"cancelled\"}").unwrap_or(0.0)
            >= 2.0,
        "the DELETE and the disconnect both count as cancelled on the worker"
    );
}

#[test]
fn the_registry_survives_a_restart_and_hives_register_themselves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let audit = dir.path().join("audit");
    let database = dir.path().join("queen.sqlite3");
    let database_arg = database.display().to_string();
    let spec = DaemonSpec::new("queen-rbee")
        .args([
            "--database",
            database_arg.as_str(),
            "--hive-poll-interval-ms",
            "200",
        ])
        .env("LLORCH_AUDIT_MODE", "local")
        .env("LLORCH_AUDIT_DIR", &audit.display().to_string());
    let mut queen = spec.spawn();

    // A hive started with --queen-url registers itself.
    let hive = DaemonSpec::new("rbee-hive")
        .args([
            "--queen-url".to_owned(),
            queen.url(""),
            "--node-name".to_owned(),
            "self-registered".to_owned(),
        ])
        .spawn();
    wait_for(Duration::from_secs(15), "the hive to register", || {
        let (_, body, _) = send(client().get(queen.url("/v2/hives/list")));
        body["hives"].as_array().is_some_and(|h| {
            h.iter()
                .any(|h| h["node_name"] == "self-registered" && h["state"] == "reachable")
        })
    });
    let (status, body, _) = send(
        client()
            .post(queen.url("/v2/hives/register"))
            .json(&json!({"node_name": "manual", "url": "http://127.0.0.1:9/"})),
    );
    assert_eq!(
        (status, body["url"].as_str()),
        (201, Some("http://127.0.0.1:9"))
    );
    let (status, body, _) = send(
        client()
            .post(queen.url("/v2/hives/register"))
            .json(&json!({"node_name": "manual", "url": "http://127.0.0.1:9"})),
    );
    assert_eq!((status, body["created"].as_bool()), (200, Some(false)));

    queen.signal(Signal::SIGTERM);
    assert!(queen
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    let mut queen = spec.spawn();
    let (_, body, _) = send(client().get(queen.url("/v2/hives/list")));
    let names: Vec<&str> = body["hives"]
        .as_array()
        .expect("hives")
        .iter()
        .filter_map(|h| h["node_name"].as_str())
        .collect();
    assert_eq!(names, ["manual", "self-registered"], "{body}");
    // The stored hive is polled again without re-registering.
    wait_for(
        Duration::from_secs(10),
        "the stored hive to be reachable",
        || send(client().get(queen.url("/health/ready"))).0 == 200,
    );
    let (status, _, _) = send(
        client()
            .post(queen.url("/v2/hives/remove"))
            .json(&json!({"node_name": "manual"})),
    );
    assert_eq!(status, 200);
    let (status, _, _) = send(
        client()
            .post(queen.url("/v2/hives/remove"))
            .json(&json!({"node_name": "manual"})),
    );
    assert_eq!(status, 404);
    queen.signal(Signal::SIGTERM);
    assert!(queen
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    drop(hive);

    let queen = spec.spawn();
    let (_, body, _) = send(client().get(queen.url("/v2/hives/list")));
    assert_eq!(body["hives"].as_array().map(Vec::len), Some(1), "{body}");
    drop(queen);

    // The audit trail holds the registry changes and verifies.
    let trail = rbee_system_tests::read_trail(&audit.join("queen-rbee"));
    assert_eq!(
        trail.matches("\"hive_registered\"").count(),
        2,
        "registrations, not refreshes"
    );
    assert_eq!(trail.matches("\"hive_removed\"").count(), 1);
    rbee_system_tests::verify_trail(&audit.join("queen-rbee"));
}

#[test]
fn sigterm_lets_streams_finish_and_cascade_stops_the_hives() {
    let mut hive = hive_with_model(DaemonSpec::new("rbee-hive"), None);
    let mut queen = ready_queen(&queen_spec(&[&hive]).args(["--cascade-shutdown"]), None);
    let (status, _, _) = infer(
        &queen,
        &json!({"prompt": "Hi", "max_tokens": 2, "stream": false}),
    );
    assert_eq!(status, 200);
    let mut s = stream(&queen, &long_request(30, true));
    s.until_token();
    queen.signal(Signal::SIGTERM);
    let rest = s.rest();
    assert_eq!(rest[rest.len() - 2]["type"], "end", "{rest:?}");
    assert_eq!(rest.iter().filter(|e| e["type"] == "token").count(), 29);
    both_exit_zero(&mut queen, &mut hive);
}

/// A queen told to stop exits 0, and with `--cascade-shutdown` its hive
/// follows and exits 0 too.
fn both_exit_zero(queen: &mut RunningDaemon, hive: &mut RunningDaemon) {
    let status = queen
        .wait_exit(Duration::from_secs(15))
        .expect("queen exits");
    assert!(status.success(), "{status:?}");
    let status = hive
        .wait_exit(Duration::from_secs(30))
        .expect("hive exits (cascade)");
    assert!(status.success(), "{status:?}");
}

/// Each process's allowed CPUs, from /proc.
fn cpus_allowed(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("process status")
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list")
        .trim()
        .to_owned()
}

/// A stack allowed one CPU (a container's limit, `taskset`): each daemon
/// then runs its async work on one thread, and everything else behaves as
/// on many: a cold start, a stream and an answer, a graceful stop.
#[test]
fn a_stack_allowed_one_cpu_streams_answers_and_stops() {
    let mut hive = hive_with_model(DaemonSpec::new("rbee-hive").on_one_cpu(0), None);
    let mut queen = ready_queen(
        &queen_spec(&[&hive])
            .on_one_cpu(0)
            .args(["--cascade-shutdown"]),
        None,
    );
    assert_eq!(cpus_allowed(queen.pid()), "0");
    assert_eq!(cpus_allowed(hive.pid()), "0");
    let mut s = stream(&queen, &long_request(8, true));
    let events = s.rest();
    assert_eq!(
        events.iter().filter(|e| e["type"] == "token").count(),
        8,
        "{events:?}"
    );
    assert_eq!(events[events.len() - 2]["type"], "end", "{events:?}");
    let workers = wait_ready_workers(&queen, 1, None);
    let worker_pid = workers[0]["pid"].as_u64().expect("the worker's pid");
    assert_eq!(
        cpus_allowed(u32::try_from(worker_pid).expect("a pid")),
        "0",
        "the worker the hive started inherits the limit"
    );
    let (status, body, _) = infer(
        &queen,
        &json!({"prompt": "Hi", "max_tokens": 3, "temperature": 0, "stream": false}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["tokens_out"], 3, "{body}");
    queen.signal(Signal::SIGTERM);
    both_exit_zero(&mut queen, &mut hive);
}
