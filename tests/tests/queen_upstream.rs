//! The queen's calls to workers when a worker takes a request and then
//! says nothing: the first-byte and idle timeouts (from the workers' stall
//! timeout) and the `--max-deadline-ms` clamp end the call long before the
//! client's own deadline would. Real `queen-rbee`, `rbee-hive` and
//! `llm-worker-rbee` (its fault-injection build where named) on loopback,
//! with real signals.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rbee_system_tests::queen::{
    assert_worker_failed_after, client, hive_with_a_worker, infer, long_request, queen_spec,
    ready_queen, send, stream, wait_ready_workers,
};
use rbee_system_tests::DaemonSpec;
use serde_json::json;

#[test]
fn a_worker_whose_engine_wedges_mid_stream_is_given_up_after_the_stall_timeout() {
    // The worker's engine blocks for good after 3 tokens; its HTTP side
    // stays up. Stall timeout 1 s at both ends: the queen gives up on a
    // stream quiet for 2 s, where the client's deadline is 60 s.
    let hive = hive_with_a_worker(
        DaemonSpec::new("rbee-hive")
            .env("RBEE_FAULT_WEDGE_AFTER_TOKENS", "3")
            .env("RBEE_WORKER_STALL_TIMEOUT_S", "1")
            .args([
                "--worker-binary",
                rbee_system_tests::binary(rbee_system_tests::FAULT_INJECTION_WORKER)
                    .to_str()
                    .expect("UTF-8"),
            ]),
    );
    let queen = ready_queen(
        &queen_spec(&[&hive]).args(["--worker-stall-timeout-s", "1"]),
        None,
    );
    wait_ready_workers(&queen, 1, None);
    let mut s = stream(&queen, &long_request(50, true));
    let started = Instant::now();
    let events = s.rest();
    let took = started.elapsed();
    // The engine blocks on its third step; two tokens have gone out.
    assert_worker_failed_after(&events, 2);
    assert_eq!(events.last(), Some(&json!("[DONE]")));
    assert!(
        (Duration::from_secs(2)..Duration::from_secs(10)).contains(&took),
        "{took:?}"
    );
    assert!(queen.wait_for_log("sent nothing for 2 s", Duration::from_secs(5)));
}

#[test]
fn a_stopped_worker_fails_a_stream_at_the_first_byte_timeout_and_a_whole_answer_at_its_deadline() {
    let hive = hive_with_a_worker(DaemonSpec::new("rbee-hive"));
    let queen = ready_queen(
        &queen_spec(&[&hive]).args(["--worker-stall-timeout-s", "1"]),
        None,
    );
    let pid = wait_ready_workers(&queen, 1, None)[0]["pid"]
        .as_i64()
        .expect("worker pid");
    // A connection to the worker is pooled, then the worker stops: the
    // kernel still takes the request, nobody answers it.
    let (status, body, _) = infer(
        &queen,
        &json!({"prompt": "Hi", "max_tokens": 2, "stream": false}),
    );
    assert_eq!(status, 200, "{body}");
    let worker = Pid::from_raw(i32::try_from(pid).expect("pid"));
    kill(worker, Signal::SIGSTOP).expect("stop the worker");

    let started = Instant::now();
    let (status, body, _) = send(
        client()
            .post(queen.url("/v1/inference"))
            .json(&long_request(5, true)),
    );
    let took = started.elapsed();
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (502, Some("WORKER_FAILED")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no answer within 2 s")),
        "{body}"
    );
    assert!(
        (Duration::from_secs(2)..Duration::from_secs(8)).contains(&took),
        "{took:?}"
    );

    // A whole answer's head comes when its generation ends: the deadline
    // is what bounds it.
    let started = Instant::now();
    let (status, body, _) = send(
        client()
            .post(queen.url("/v1/inference"))
            .header("x-timeout-ms", "4000")
            .json(&long_request(5, false)),
    );
    let took = started.elapsed();
    kill(worker, Signal::SIGCONT).expect("continue the worker");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (504, Some("DEADLINE_EXCEEDED")),
        "{body}"
    );
    assert!(
        (Duration::from_secs(4)..Duration::from_secs(8)).contains(&took),
        "{took:?}"
    );
}

#[test]
fn a_deadline_past_the_queens_maximum_is_shortened_to_it() {
    let hive = hive_with_a_worker(DaemonSpec::new("rbee-hive"));
    let queen = ready_queen(
        &queen_spec(&[&hive]).args(["--max-deadline-ms", "2000"]),
        None,
    );
    wait_ready_workers(&queen, 1, None);
    // A year asked for; 2 s given. The generation (4,000 tokens) would take
    // far longer than that.
    let started = Instant::now();
    let (status, body, _) = send(
        client()
            .post(queen.url("/v1/inference"))
            .header("x-timeout-ms", "31536000000")
            .json(&long_request(4000, false)),
    );
    let took = started.elapsed();
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (504, Some("DEADLINE_EXCEEDED")),
        "{body}"
    );
    assert!(
        (Duration::from_millis(1900)..Duration::from_secs(6)).contains(&took),
        "{took:?}"
    );
    // Within the maximum, a request is served as before.
    let (status, body, _) = send(
        client()
            .post(queen.url("/v1/inference"))
            .header("x-timeout-ms", "31536000000")
            .json(&json!({"prompt": "Hi", "max_tokens": 2, "stream": false})),
    );
    assert_eq!(status, 200, "{body}");
}
