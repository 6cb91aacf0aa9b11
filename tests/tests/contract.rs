//! Corners of the contract (`CONTRACT.md`) as a new user meets them: error
//! codes for a backend this build does not know and for malformed worker
//! ids, the hive's `/v1/status` devices, and labelled counters exported at
//! 0 before their first event.

use std::time::Duration;

use rbee_system_tests::http::{client, default_ref, send, wait_for};
use rbee_system_tests::queen::{hive_with_model, metric_at, queen_spec, ready_queen};
use rbee_system_tests::worker::worker;
use rbee_system_tests::DaemonSpec;
use serde_json::json;

#[test]
fn the_hive_names_unknown_backends_and_malformed_ids_and_lists_its_devices() {
    let hive = DaemonSpec::new("rbee-hive").spawn();
    let (status, body, _) = send(
        client()
            .post(hive.url("/v1/workers/spawn"))
            .json(&json!({"model_ref": "hf:acme/tiny", "backend": "rocm"})),
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "BACKEND_UNAVAILABLE");
    assert_eq!(body["error"]["details"]["available"], json!(["cpu"]));

    for (path, body) in [
        ("/v1/workers/shutdown", json!({"worker_id": "../../etc"})),
        (
            "/v1/workers/heartbeat",
            json!({"worker_id": "a b", "timestamp": "2026-12-07T00:00:00Z", "state": "idle"}),
        ),
        ("/v1/workers/shutdown", json!({"worker_id": "x".repeat(65)})),
    ] {
        let (status, answer, _) = send(client().post(hive.url(path)).json(&body));
        assert_eq!(status, 400, "{path} {body}: {answer}");
        assert_eq!(answer["error"]["code"], "INVALID_REQUEST", "{answer}");
        assert_eq!(
            answer["error"]["details"]["fields"][0]["field"],
            "worker_id"
        );
    }
    // A well-formed id that is not there is a different answer.
    let (status, _, _) = send(
        client()
            .post(hive.url("/v1/workers/shutdown"))
            .json(&json!({"worker_id": "w-absent"})),
    );
    assert_eq!(status, 404);

    let (status, body, _) = send(client().get(hive.url("/v1/status")));
    assert_eq!(status, 200);
    let devices = body["devices"].as_array().expect("devices");
    assert_eq!(devices[0]["kind"], "cpu", "{body}");
    assert!(devices[0]["ram_total_bytes"].as_u64() > Some(0), "{body}");
    assert!(devices[0]["cpu_count"].as_u64() >= Some(1), "{body}");

    let base = hive.url("");
    for reason in ["max_attempts", "circuit_open", "spawn_failed"] {
        assert_eq!(
            metric_at(
                &base,
                &format!("rbee_hive_worker_restart_failures_total{{reason=\"{reason}\"}}")
            ),
            Some(0.0),
            "{reason}"
        );
    }
}

#[test]
fn labelled_counters_are_exported_at_zero_before_their_first_event() {
    let w = worker(&[]);
    let base = w.url("");
    for outcome in [
        "ok",
        "busy",
        "client_error",
        "deadline_exceeded",
        "cancelled",
        "error",
    ] {
        assert_eq!(
            metric_at(
                &base,
                &format!("rbee_worker_requests_total{{outcome=\"{outcome}\"}}")
            ),
            Some(0.0),
            "{outcome}"
        );
    }
    drop(w);

    let hive = hive_with_model(DaemonSpec::new("rbee-hive"), None);
    let queen = ready_queen(&queen_spec(&[&hive]), None);
    let model = default_ref();
    let ok = format!("rbee_queen_requests_total{{model=\"{model}\",outcome=\"ok\"}}");
    wait_for(Duration::from_secs(10), "the model's series", || {
        metric_at(&queen.url(""), &ok) == Some(0.0)
    });
    for outcome in [
        "no_capacity",
        "queue_full",
        "worker_failed",
        "deadline_exceeded",
    ] {
        assert_eq!(
            metric_at(
                &queen.url(""),
                &format!("rbee_queen_requests_total{{model=\"{model}\",outcome=\"{outcome}\"}}")
            ),
            Some(0.0),
            "{outcome}"
        );
    }
}
