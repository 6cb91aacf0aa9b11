//! The queen when things break: a worker killed mid-stream, a hive that
//! stops answering, a worker failing before and after its first token. Real
//! `queen-rbee`, `rbee-hive` and `llm-worker-rbee` (its fault-injection
//! build where named) on loopback, with real signals.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rbee_system_tests::queen::{
    assert_worker_failed_after, client, default_ref, error_code, hive_with_a_worker,
    hive_with_model, infer, long_request, queen_metric, queen_spec, ready_queen, send, stream,
    wait_for, wait_ready_workers,
};
use rbee_system_tests::{DaemonSpec, RunningDaemon};
use serde_json::{json, Value};

#[test]
fn a_worker_killed_mid_stream_ends_the_stream_with_worker_failed() {
    let hive = hive_with_model(
        DaemonSpec::new("rbee-hive").args(["--restart-backoff-base-ms", "200"]),
        None,
    );
    let queen = ready_queen(&queen_spec(&[&hive]), None);
    let (status, _, _) = infer(
        &queen,
        &json!({"prompt": "Hi", "max_tokens": 2, "stream": false}),
    );
    assert_eq!(status, 200);
    let pid = wait_ready_workers(&queen, 1, None)[0]["pid"]
        .as_i64()
        .expect("worker pid");

    let mut s = stream(&queen, &long_request(400, true));
    s.until_token();
    let killed = Instant::now();
    kill(
        Pid::from_raw(i32::try_from(pid).expect("pid")),
        Signal::SIGKILL,
    )
    .expect("kill worker");
    let rest = s.rest();
    let elapsed = killed.elapsed();
    let error = rest
        .iter()
        .find(|e| e["type"] == "error")
        .expect("an error event");
    assert_eq!(error_code(error), "WORKER_FAILED", "{rest:?}");
    assert_eq!(rest.last(), Some(&json!("[DONE]")));
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    let model = default_ref();
    assert_eq!(
        queen_metric(
            &queen,
            &format!("rbee_queen_requests_total{{model=\"{model}\",outcome=\"worker_failed\"}}")
        ),
        1.0
    );

    // The hive restarts the worker and the queen routes to it again.
    wait_for(
        Duration::from_secs(30),
        "the restarted worker to serve",
        || {
            infer(
                &queen,
                &json!({"prompt": "Hi", "max_tokens": 2, "stream": false}),
            )
            .0 == 200
        },
    );
}

#[test]
fn a_hive_that_stops_answering_leaves_routing_and_comes_back() {
    let hive = hive_with_model(DaemonSpec::new("rbee-hive"), None);
    let queen = ready_queen(
        &queen_spec(&[&hive]).args(["--hive-poll-timeout-ms", "300"]),
        None,
    );
    let (status, _, _) = infer(
        &queen,
        &json!({"prompt": "Hi", "max_tokens": 2, "stream": false}),
    );
    assert_eq!(status, 200);

    hive.signal(Signal::SIGSTOP);
    wait_for(
        Duration::from_secs(10),
        "the hive to be marked unreachable",
        || send(client().get(queen.url("/health/ready"))).0 == 503,
    );
    let (_, ready, _) = send(client().get(queen.url("/health/ready")));
    assert_eq!(ready["status"], "no_reachable_hive");
    assert_eq!(
        queen_metric(&queen, "rbee_queen_hives{state=\"unreachable\"}"),
        1.0
    );
    let (status, body, _) = infer(&queen, &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("NO_CAPACITY")),
        "{body}"
    );
    let (_, hives, _) = send(client().get(queen.url("/v2/hives/list")));
    assert_eq!(hives["hives"][0]["state"], "unreachable");
    assert!(hives["hives"][0]["consecutive_misses"].as_u64() >= Some(3));

    hive.signal(Signal::SIGCONT);
    wait_for(
        Duration::from_secs(10),
        "the hive to be reachable again",
        || send(client().get(queen.url("/health/ready"))).0 == 200,
    );
    let (status, body, _) = infer(
        &queen,
        &json!({"prompt": "Hi", "max_tokens": 2, "stream": false}),
    );
    assert_eq!(status, 200, "{body}");
}

/// A hive whose workers crash after `tokens` generated tokens (the
/// worker's fault-injection build), with its worker started.
fn crashing_hive(tokens: &str) -> RunningDaemon {
    hive_with_a_worker(
        DaemonSpec::new("rbee-hive")
            .env("RBEE_FAULT_EXIT_AFTER_TOKENS", tokens)
            .args([
                "--worker-binary",
                rbee_system_tests::binary(rbee_system_tests::FAULT_INJECTION_WORKER)
                    .to_str()
                    .expect("UTF-8"),
            ]),
    )
}

fn healthy_hive() -> RunningDaemon {
    hive_with_a_worker(DaemonSpec::new("rbee-hive"))
}

/// Six greedy tokens of a story of its own: two different prompts are
/// placed by load, not sent after each other to one worker (the queen keeps
/// a conversation on the worker that served it).
fn story(i: usize) -> Value {
    let mut body = long_request(6, true);
    body["prompt"] = json!(format!(
        "Write a long story about lighthouse keeper number {i}."
    ));
    body
}

#[test]
fn a_failure_before_the_first_token_is_retried_once_elsewhere_and_never_after() {
    // Crash before any token reached the client: the client never notices.
    let bad = crashing_hive("1");
    let good = healthy_hive();
    let queen = ready_queen(&queen_spec(&[&bad, &good]), None);
    wait_ready_workers(&queen, 2, None);
    for i in 0..2 {
        let events = stream(&queen, &story(i)).rest();
        assert_eq!(
            events.iter().filter(|e| e["type"] == "started").count(),
            1,
            "{events:?}"
        );
        assert_eq!(
            events.iter().filter(|e| e["type"] == "token").count(),
            6,
            "{events:?}"
        );
        assert_eq!(events[events.len() - 2]["type"], "end", "{events:?}");
    }
    assert!(queen.wait_for_log("retrying once on another worker", Duration::from_secs(5)));
    drop((queen, bad, good));

    // Crash after tokens reached the client: an error event, no retry.
    let bad = crashing_hive("3");
    let good = healthy_hive();
    let queen = ready_queen(&queen_spec(&[&bad, &good]), None);
    wait_ready_workers(&queen, 2, None);
    let outcomes: Vec<Vec<Value>> = (0..2).map(|i| stream(&queen, &story(i)).rest()).collect();
    let failed: Vec<&Vec<Value>> = outcomes
        .iter()
        .filter(|events| events.iter().any(|e| e["type"] == "error"))
        .collect();
    assert_eq!(failed.len(), 1, "{outcomes:?}");
    assert_worker_failed_after(failed[0], 2);
    assert!(!queen
        .logs()
        .iter()
        .any(|l| l.contains("retrying once on another worker")));
}

#[test]
fn a_request_right_after_a_hive_registers_finds_its_models() {
    let hive = hive_with_model(DaemonSpec::new("rbee-hive"), None);
    // Polls far apart: only the registration itself can tell the queen.
    let queen = DaemonSpec::new("queen-rbee")
        .args(["--hive-poll-interval-ms", "600000"])
        .spawn();
    let model = default_ref();
    for round in 0..5 {
        let (status, body, _) = send(
            client()
                .post(queen.url("/v2/hives/register"))
                .json(&json!({"node_name": "h1", "url": hive.url("")})),
        );
        assert_eq!(status, 201, "round {round}: {body}");
        let (_, models, _) = send(client().get(queen.url("/v1/models")));
        assert!(
            models["data"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["id"] == model.as_str())),
            "round {round}: {models}"
        );
        let (status, body, _) = infer(
            &queen,
            &json!({"model": model, "prompt": "Hi", "max_tokens": 2, "stream": false}),
        );
        assert_eq!(status, 200, "round {round}: {body}");
        let (status, _, _) = send(
            client()
                .post(queen.url("/v2/hives/remove"))
                .json(&json!({"node_name": "h1"})),
        );
        assert_eq!(status, 200);
    }
}
