//! The circuit breaker's half-open probe, on every path where a probe spawn
//! ends without becoming ready: the real hive with the worker's
//! `fault-injection` build (slow loading) and a corrupt model file.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use rbee_system_tests::hive::{metric, provision_to_end, spawn_worker, worker_record};
use rbee_system_tests::http::{client, send, wait_for};
use rbee_system_tests::{binary, DaemonSpec, RunningDaemon, FAULT_INJECTION_WORKER};
use serde_json::{json, Value};

fn spawn(hive: &RunningDaemon, id: &str, model_ref: &str) -> (u16, Value) {
    let (status, body, _) = spawn_worker(hive, &json!({ "model_ref": model_ref, "worker_id": id }));
    (status, body)
}

fn state(hive: &RunningDaemon, id: &str) -> Value {
    worker_record(hive, id).map_or(Value::Null, |w| w["state"].clone())
}

/// Wait out the breaker's 1 s cooldown: it is half-open again.
fn after_cooldown() {
    std::thread::sleep(Duration::from_millis(1300));
}

#[test]
fn a_probe_spawn_that_ends_before_ready_reopens_the_breaker_instead_of_wedging_it() {
    let dir = tempfile::tempdir().expect("dir");
    let corrupt = dir.path().join("corrupt.gguf");
    std::fs::write(&corrupt, b"GGUF\x03\0\0\0 this is not a model").expect("write");
    // A copy of the worker that can be made unstartable mid-test.
    let worker_binary = dir.path().join("llm-worker-rbee");
    std::fs::copy(binary(FAULT_INJECTION_WORKER), &worker_binary).expect("copy the worker");
    let settings = dir.path().join("hive.toml");
    std::fs::write(
        &settings,
        "restart_max_attempts = 0\nbreaker_threshold = 1\nbreaker_cooldown_s = 1\n",
    )
    .expect("settings");
    let hive = DaemonSpec::new("rbee-hive")
        .args(["--config", settings.to_str().expect("UTF-8")])
        .args(["--worker-binary", worker_binary.to_str().expect("UTF-8")])
        // Every worker loads for 2 s before it reads its model: a probe can
        // be stopped while it loads.
        .env("RBEE_FAULT_LOAD_DELAY_MS", "2000")
        .spawn();
    let model_ref = format!("file:{}", corrupt.canonicalize().expect("path").display());
    provision_to_end(&hive, &model_ref);

    // One crash opens the breaker.
    assert_eq!(spawn(&hive, "w-bad", &model_ref).0, 202);
    wait_for(Duration::from_secs(30), "w-bad to fail", || {
        state(&hive, "w-bad") == "failed"
    });
    let activations =
        format!("rbee_hive_circuit_breaker_activations_total{{model=\"{model_ref}\"}}");
    assert_eq!(metric(&hive, &activations), 1.0);

    // A spawn refused before it asks the breaker (its id is taken) takes
    // no probe.
    after_cooldown();
    let (status, body) = spawn(&hive, "w-bad", &model_ref);
    assert_eq!(status, 409, "{body}");
    assert_eq!(metric(&hive, &activations), 1.0);

    // The probe is stopped while it loads: given up as a failure.
    after_cooldown();
    let (status, body) = spawn(&hive, "w-stopped", &model_ref);
    assert_eq!(status, 202, "a new probe after the cooldown: {body}");
    let (status, body, _) = send(
        client()
            .post(hive.url("/v1/workers/shutdown"))
            .json(&json!({ "worker_id": "w-stopped" })),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(metric(&hive, &activations), 2.0);

    // The probe's process cannot be started.
    after_cooldown();
    let executable = std::fs::metadata(&worker_binary)
        .expect("meta")
        .permissions();
    std::fs::set_permissions(&worker_binary, std::fs::Permissions::from_mode(0o600))
        .expect("chmod");
    let (status, body) = spawn(&hive, "w-unstartable", &model_ref);
    assert_eq!(status, 202, "{body}");
    wait_for(Duration::from_secs(10), "w-unstartable to fail", || {
        state(&hive, "w-unstartable") == "failed"
    });
    std::fs::set_permissions(&worker_binary, executable).expect("chmod back");
    assert_eq!(metric(&hive, &activations), 3.0);

    // Each time the breaker half-opened again: a probe is let through.
    after_cooldown();
    let (status, body) = spawn(&hive, "w-probe", &model_ref);
    assert_eq!(status, 202, "{body}");
    assert_eq!(state(&hive, "w-probe"), "loading");
    // While it is out, other spawns of the pair wait for its outcome.
    let (status, body) = spawn(&hive, "w-other", &model_ref);
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "CIRCUIT_OPEN");

    // The probe exits before it is ready (the model is corrupt): a failure,
    // open again, and after the cooldown another probe.
    wait_for(Duration::from_secs(30), "w-probe to fail", || {
        state(&hive, "w-probe") == "failed"
    });
    assert_eq!(metric(&hive, &activations), 4.0);
    after_cooldown();
    let (status, body) = spawn(&hive, "w-last", &model_ref);
    assert_eq!(status, 202, "{body}");
}

#[test]
fn supervision_durations_out_of_range_are_refused_at_startup_not_met_as_a_panic_later() {
    let dir = tempfile::tempdir().expect("dir");
    for (flag, value) in [
        ("--breaker-cooldown-s", "18446744073709551615"),
        ("--breaker-window-s", "0"),
        ("--restart-backoff-cap-ms", "18446744073709551615"),
        ("--restart-backoff-base-ms", "0"),
        ("--restart-stable-uptime-s", "18446744073709551615"),
        ("--download-retention-s", "18446744073709551615"),
    ] {
        let out = DaemonSpec::new("rbee-hive")
            .args([flag, value])
            .run_to_exit(Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag), "{flag}: {stderr}");
    }
    // The same bounds hold in the settings file.
    let settings = dir.path().join("hive.toml");
    std::fs::write(&settings, "breaker_cooldown_s = 18446744073709551615\n").expect("write");
    let out = DaemonSpec::new("rbee-hive")
        .args(["--config", settings.to_str().expect("UTF-8")])
        .run_to_exit(Duration::from_secs(10));
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("breaker_cooldown_s"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
