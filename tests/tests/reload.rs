//! Reloading settings on SIGHUP, as an operator does it: edit the settings
//! or token file, send SIGHUP (`systemctl reload`), and nothing in flight
//! fails. Real binaries, the real default model, real signals.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use parking_lot::Mutex;
use rbee_system_tests::queen::{
    client, hive_with_model, metric_at, queen_spec, ready_queen, send, wait_for, wait_ready_workers,
};
use rbee_system_tests::{read_trail, token_fingerprint, verify_trail, DaemonSpec, RunningDaemon};
use serde_json::{json, Value};

const OLD: &str = "rotation-old-token-5d1e7a";
const NEW: &str = "rotation-new-token-c94b02";

/// Replace `path` whole with `text`, mode 0600, as a secret mount or
/// `install -m 600` leaves it.
fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let staging = path.with_extension("staging");
    std::fs::write(&staging, text).expect("write file");
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::rename(&staging, path).expect("replace file");
}

/// How many log lines of `daemon` contain `needle`.
fn log_count(daemon: &RunningDaemon, needle: &str) -> usize {
    daemon.logs().iter().filter(|l| l.contains(needle)).count()
}

/// Send SIGHUP and wait for the reload's outcome line; true when applied.
fn reload(daemon: &RunningDaemon) -> bool {
    let applied = log_count(daemon, "configuration reloaded");
    let rejected = log_count(daemon, "configuration rejected");
    daemon.signal(Signal::SIGHUP);
    let mut outcome = None;
    wait_for(
        Duration::from_secs(10),
        "the reload's outcome in the log",
        || {
            if log_count(daemon, "configuration reloaded") > applied {
                outcome = Some(true);
            } else if log_count(daemon, "configuration rejected") > rejected {
                outcome = Some(false);
            }
            outcome.is_some()
        },
    );
    outcome.unwrap_or(false)
}

/// The audit records of `event_type` in a service's trail.
fn events(dir: &Path, event_type: &str) -> Vec<Value> {
    read_trail(dir)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["event"]["event_type"] == event_type)
        .map(|r| r["event"].clone())
        .collect()
}

fn changed(event: &Value, name: &str) -> Option<String> {
    event["changed"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)
        .and_then(|s| s["value"].as_str().map(str::to_owned))
}

fn short_request(stream: bool) -> Value {
    json!({
        "prompt": "Say hello.",
        "max_tokens": 2,
        "temperature": 0,
        "stream": stream,
    })
}

/// One request through the queen with `token`: its status, and for a
/// stream whether it ended with `[DONE]` and no error event.
fn one_request(queen: &RunningDaemon, token: &str, stream: bool) -> (u16, String) {
    let response = client()
        .post(queen.url("/v1/inference"))
        .bearer_auth(token)
        .json(&short_request(stream))
        .send();
    match response {
        Ok(r) => {
            let status = r.status().as_u16();
            let text = r.text().unwrap_or_default();
            let complete = !stream || (text.contains("[DONE]") && !text.contains("event: error"));
            let status = if complete { status } else { 599 };
            (status, text)
        }
        Err(e) => (0, e.to_string()),
    }
}

/// One request of the load: the token it carried, its status, its body.
type Sent = (&'static str, u16, String);

#[test]
fn a_token_rotation_under_load_fails_no_request() {
    let dir = tempfile::tempdir().expect("scratch dir");
    let audit = dir.path().join("audit");
    let audit_dir = audit.display().to_string();
    let queen_token = dir.path().join("queen.token");
    let hive_token = dir.path().join("hive.token");
    write_private(&queen_token, OLD);
    write_private(&hive_token, OLD);
    let with = |spec: DaemonSpec, token: &PathBuf| {
        spec.env("LLORCH_AUDIT_MODE", "local")
            .env("LLORCH_AUDIT_DIR", &audit_dir)
            .args(["--api-token-file".to_owned(), token.display().to_string()])
    };
    let hive = hive_with_model(with(DaemonSpec::new("rbee-hive"), &hive_token), Some(OLD));
    let queen = ready_queen(&with(queen_spec(&[&hive]), &queen_token), Some(OLD));
    // A cold start through the queen brings up one worker.
    let (status, _) = one_request(&queen, OLD, false);
    assert_eq!(status, 200);
    let worker = wait_ready_workers(&queen, 1, Some(OLD)).remove(0);
    let worker_url = worker["url"].as_str().expect("worker url").to_owned();
    let worker_id = worker["worker_id"].as_str().expect("worker id").to_owned();
    let (_, listed, _) = send(client().get(hive.url("/v1/workers/list")).bearer_auth(OLD));
    let worker_pid = listed["workers"][0]["pid"].as_u64().expect("worker pid");

    // Two clients keep requests going (one streaming, one not) with the
    // token the operator hands out.
    let client_token = Arc::new(Mutex::new(OLD));
    let stop = Arc::new(AtomicBool::new(false));
    let results: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let queen = Arc::new(queen);
    let load: Vec<_> = [false, true]
        .into_iter()
        .map(|stream| {
            let (queen, token, stop, results) = (
                Arc::clone(&queen),
                Arc::clone(&client_token),
                Arc::clone(&stop),
                Arc::clone(&results),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let token = *token.lock();
                    let (status, text) = one_request(&queen, token, stream);
                    results.lock().push((token, status, text));
                }
            })
        })
        .collect();
    let count = || results.lock().len();
    let wait_requests = |more: usize, what: &str| {
        let target = count() + more;
        wait_for(Duration::from_secs(60), what, || count() >= target);
    };
    wait_requests(2, "requests before the rotation");

    // The queen first: it now calls the hive and the worker with a token
    // they do not know yet, and falls back to the previous one.
    write_private(&queen_token, NEW);
    assert!(reload(&queen), "queen reload: {:?}", queen.logs());
    // Long enough for several polls of the hive (every 200 ms; three
    // misses would mark it unreachable) and relayed requests.
    std::thread::sleep(Duration::from_millis(1500));
    wait_requests(2, "requests between the two reloads");

    // Then the hive, which hands the token to its worker.
    write_private(&hive_token, NEW);
    assert!(reload(&hive), "hive reload: {:?}", hive.logs());
    assert!(hive.wait_for_log("rotated token handed to the worker", Duration::from_secs(5)));
    wait_for(
        Duration::from_secs(10),
        "the worker to accept the new token",
        || {
            client()
                .get(format!("{worker_url}/v1/models"))
                .bearer_auth(NEW)
                .send()
                .is_ok_and(|r| r.status() == 200)
        },
    );
    // Clients move to the new token; the old one still works meanwhile.
    *client_token.lock() = NEW;
    wait_requests(4, "requests after the rotation");
    stop.store(true, Ordering::Relaxed);
    for thread in load {
        thread.join().expect("load thread");
    }

    let results = results.lock();
    let failed: Vec<_> = results
        .iter()
        .filter(|(_, status, _)| *status != 200)
        .collect();
    assert!(
        failed.is_empty(),
        "failed requests during the rotation: {failed:?}"
    );
    for token in [OLD, NEW] {
        assert!(
            results.iter().any(|(t, _, _)| *t == token),
            "no request was sent with {token}"
        );
    }

    // Both tokens are accepted during the grace window, anything else is not.
    for (token, expected) in [(OLD, 200), (NEW, 200), ("rotation-wrong-token-000", 401)] {
        for url in [queen.url("/v2/hives/list"), hive.url("/v1/workers/list")] {
            let (status, body, _) = send(client().get(&url).bearer_auth(token));
            assert_eq!(status, expected, "{url} with {token}: {body}");
        }
    }
    let (status, _, _) = send(
        client()
            .get(format!("{worker_url}/v1/models"))
            .bearer_auth(OLD),
    );
    assert_eq!(
        status, 200,
        "the worker keeps the old token for the grace window"
    );

    // The worker was never restarted: the same process, no restarts.
    let (_, listed, _) = send(client().get(hive.url("/v1/workers/list")).bearer_auth(NEW));
    assert_eq!(
        listed["workers"][0]["pid"].as_u64(),
        Some(worker_pid),
        "{listed}"
    );
    assert_eq!(listed["workers"][0]["restart_count"], 0, "{listed}");

    // Every daemon audited its reload with the new token's fingerprint.
    let new_fp = token_fingerprint(NEW);
    for service in [
        "queen-rbee".to_owned(),
        "rbee-hive".to_owned(),
        format!("llm-worker-rbee-{worker_id}"),
    ] {
        let trail = audit.join(&service);
        verify_trail(&trail);
        let reloads = events(&trail, "config_reloaded");
        assert_eq!(reloads.len(), 1, "{service}: {reloads:?}");
        assert_eq!(
            changed(&reloads[0], "api_token").as_deref(),
            Some(new_fp.as_str()),
            "{service}: {reloads:?}"
        );
        assert!(
            !read_trail(&trail).contains(NEW),
            "{service}: the token itself is in the trail"
        );
    }
    for daemon in [queen.url(""), hive.url("")] {
        assert_eq!(
            metric_at(&daemon, "rbee_config_reloads_total{outcome=\"applied\"}"),
            Some(1.0),
            "{daemon}"
        );
    }
}

#[test]
fn a_reload_is_checked_whole_and_applies_limits_or_changes_nothing() {
    let dir = tempfile::tempdir().expect("scratch dir");
    let audit = dir.path().join("audit");
    let audit_dir = audit.display().to_string();
    let token = dir.path().join("token");
    write_private(&token, OLD);
    let hive_config = dir.path().join("hive.toml");
    let queen_config = dir.path().join("queen.toml");
    std::fs::write(&hive_config, "ready_requires_worker = false\n").expect("hive config");
    let with = |spec: DaemonSpec, config: &PathBuf| {
        spec.env("LLORCH_AUDIT_MODE", "local")
            .env("LLORCH_AUDIT_DIR", &audit_dir)
            .args([
                "--api-token-file".to_owned(),
                token.display().to_string(),
                "--config".to_owned(),
                config.display().to_string(),
            ])
    };
    let hive = with(DaemonSpec::new("rbee-hive"), &hive_config).spawn();
    // The hives come from the file: a `--hive` flag would win over it.
    let first_hive = hive.url("");
    std::fs::write(
        &queen_config,
        format!("max_queue = 4\nhive = [\"{first_hive}\"]\n"),
    )
    .expect("queen config");
    let queen_flags = DaemonSpec::new("queen-rbee").args(["--hive-poll-interval-ms", "200"]);
    let queen = ready_queen(&with(queen_flags, &queen_config), Some(OLD));
    let ready = |hive: &RunningDaemon| send(client().get(hive.url("/health/ready"))).0;
    assert_eq!(ready(&hive), 200);

    // The hive: a valid change applies at once.
    std::fs::write(
        &hive_config,
        "ready_requires_worker = true\nrestart_max_attempts = 5\nbreaker_threshold = 3\n",
    )
    .expect("hive config");
    assert!(reload(&hive));
    let (status, body, _) = send(client().get(hive.url("/health/ready")));
    assert_eq!(
        (status, body["status"].as_str()),
        (503, Some("no_ready_worker")),
        "{body}"
    );

    // An invalid one (a breaker that can never open) is refused whole: the
    // valid readiness change in the same file is not applied either.
    std::fs::write(
        &hive_config,
        "ready_requires_worker = false\nbreaker_threshold = 0\n",
    )
    .expect("hive config");
    assert!(!reload(&hive));
    assert_eq!(ready(&hive), 503, "a rejected reload changed a setting");
    // So is a file that does not parse, or names an unknown setting.
    std::fs::write(&hive_config, "ready_requires_worker = \n").expect("hive config");
    assert!(!reload(&hive));
    std::fs::write(&hive_config, "ready_requires_workers = false\n").expect("hive config");
    assert!(!reload(&hive));
    assert_eq!(ready(&hive), 503);

    // The queen: a setting out of range, then a bad token file next to a
    // valid change, are each refused whole.
    let new_hive = "http://127.0.0.1:9";
    let hives = |queen: &RunningDaemon| {
        let (_, body, _) = send(client().get(queen.url("/v2/hives/list")).bearer_auth(OLD));
        body["hives"]
            .as_array()
            .map(|h| {
                h.iter()
                    .filter_map(|h| h["url"].as_str().map(str::to_owned))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    std::fs::write(
        &queen_config,
        format!("max_queue = 0\nhive = [\"{first_hive}\", \"{new_hive}\"]\n"),
    )
    .expect("queen config");
    assert!(!reload(&queen));
    write_private(&token, "short");
    std::fs::write(
        &queen_config,
        format!("max_queue = 8\nhive = [\"{first_hive}\", \"{new_hive}\"]\n"),
    )
    .expect("queen config");
    assert!(!reload(&queen));
    assert!(
        !hives(&queen).contains(&new_hive.to_owned()),
        "{:?}",
        hives(&queen)
    );

    // Fixed: applied, and a setting that needs a restart is named as such.
    write_private(&token, OLD);
    std::fs::write(
        &queen_config,
        format!(
            "max_queue = 8\ndefault_deadline_ms = 30000\nhive = [\"{first_hive}\", \"{new_hive}\"]\nshutdown_timeout_s = 5\n"
        ),
    )
    .expect("queen config");
    assert!(reload(&queen));
    assert!(
        hives(&queen).contains(&new_hive.to_owned()),
        "{:?}",
        hives(&queen)
    );
    assert!(queen.wait_for_log(
        "take effect only when queen-rbee restarts",
        Duration::from_secs(1)
    ));

    // The audit trails hold both outcomes; the counters agree.
    let queen_trail = audit.join("queen-rbee");
    let hive_trail = audit.join("rbee-hive");
    verify_trail(&queen_trail);
    verify_trail(&hive_trail);
    let hive_reloads = events(&hive_trail, "config_reloaded");
    assert_eq!(hive_reloads.len(), 1, "{hive_reloads:?}");
    assert_eq!(
        changed(&hive_reloads[0], "ready_requires_worker").as_deref(),
        Some("true")
    );
    assert_eq!(
        changed(&hive_reloads[0], "restart_max_attempts").as_deref(),
        Some("5")
    );
    let hive_invalid = events(&hive_trail, "config_invalid");
    assert_eq!(hive_invalid.len(), 3, "{hive_invalid:?}");
    assert!(
        hive_invalid[0]["errors"]
            .to_string()
            .contains("breaker-threshold"),
        "{hive_invalid:?}"
    );
    assert!(
        hive_invalid[2]["errors"]
            .to_string()
            .contains("ready_requires_workers"),
        "{hive_invalid:?}"
    );
    let queen_reloads = events(&queen_trail, "config_reloaded");
    assert_eq!(queen_reloads.len(), 1, "{queen_reloads:?}");
    assert_eq!(
        changed(&queen_reloads[0], "max_queue").as_deref(),
        Some("8")
    );
    assert_eq!(
        changed(&queen_reloads[0], "default_deadline_ms").as_deref(),
        Some("30000")
    );
    assert_eq!(
        changed(&queen_reloads[0], "hives"),
        Some(format!("{first_hive},{new_hive}"))
    );
    assert_eq!(
        queen_reloads[0]["restart_required"],
        json!(["shutdown_timeout_s"])
    );
    let queen_invalid = events(&queen_trail, "config_invalid");
    assert_eq!(queen_invalid.len(), 2, "{queen_invalid:?}");
    assert!(
        queen_invalid[1]["errors"].to_string().contains("16"),
        "{queen_invalid:?}"
    );
    for (daemon, applied, rejected) in [(&queen, 1.0, 2.0), (&hive, 1.0, 3.0)] {
        let base = daemon.url("");
        assert_eq!(
            metric_at(&base, "rbee_config_reloads_total{outcome=\"applied\"}"),
            Some(applied)
        );
        assert_eq!(
            metric_at(&base, "rbee_config_reloads_total{outcome=\"rejected\"}"),
            Some(rejected)
        );
    }
}
