//! The audit trail as operators meet it: real daemons writing it, the real
//! `rbee-audit` verifying it.

use std::path::Path;
use std::time::Duration;

use rbee_system_tests::{binary, token_fingerprint, DaemonSpec, DAEMONS, TEST_TOKEN};
use reqwest::blocking::Client;
use serde_json::Value;

fn records(dir: &Path) -> Vec<Value> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("audit dir exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .expect("read audit file")
                .lines()
                .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
                .collect::<Vec<Value>>()
        })
        .collect()
}

fn verify(dir: &Path) -> (bool, String) {
    let out = std::process::Command::new(binary("rbee-audit"))
        .arg("verify")
        .arg(dir)
        .output()
        .expect("run rbee-audit");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn audited(name: &str, root: &Path) -> DaemonSpec {
    DaemonSpec::new(name)
        .with_token()
        .env("LLORCH_AUDIT_MODE", "local")
        .env("LLORCH_AUDIT_DIR", root.to_str().expect("UTF-8 temp path"))
}

fn service_id(name: &str) -> String {
    if name == "llm-worker-rbee" {
        "llm-worker-rbee-standalone".to_owned()
    } else {
        name.to_owned()
    }
}

#[test]
fn every_daemon_audits_config_and_auth_decisions_in_a_verifiable_chain() {
    let http = Client::new();
    let root = tempfile::tempdir().unwrap();
    for name in DAEMONS {
        let mut daemon = audited(name, root.path()).spawn();
        http.get(daemon.url("/v1/x")).send().unwrap();
        http.get(daemon.url("/v1/x"))
            .header("authorization", "Bearer not-the-token-0000000")
            .send()
            .unwrap();
        http.get(daemon.url("/v1/x"))
            .header("authorization", format!("Bearer {TEST_TOKEN}"))
            .header("x-request-id", "audited-req-1")
            .send()
            .unwrap();
        // Probes are public and not audited.
        http.get(daemon.url("/health")).send().unwrap();
        http.post(daemon.url("/v1/admin/shutdown"))
            .json(&serde_json::json!({}))
            .header("authorization", format!("Bearer {TEST_TOKEN}"))
            .send()
            .unwrap();
        assert_eq!(
            daemon.wait_exit(Duration::from_secs(10)).unwrap().code(),
            Some(0)
        );

        let dir = root.path().join(service_id(name));
        let (ok, said) = verify(&dir);
        assert!(ok, "{name}: {said}");
        assert!(
            said.contains("OK") && said.contains("5 records"),
            "{name}: {said}"
        );

        let tail = std::process::Command::new(binary("rbee-audit"))
            .args(["tail", "-n", "2"])
            .arg(&dir)
            .output()
            .expect("run rbee-audit tail");
        assert!(tail.status.success());
        let shown = String::from_utf8_lossy(&tail.stdout);
        assert_eq!(shown.matches("\"audit_id\"").count(), 2, "{shown}");
        assert!(
            shown.contains("\"audit_id\": 5"),
            "pretty-printed, newest last: {shown}"
        );

        let trail = records(&dir);
        let kinds: Vec<&str> = trail
            .iter()
            .map(|r| r["event"]["event_type"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            [
                "config_loaded",
                "auth_failure",
                "auth_failure",
                "auth_success",
                "auth_success"
            ],
            "{name}"
        );
        let fp = token_fingerprint(TEST_TOKEN);
        let loaded = &trail[0]["event"]["settings"];
        assert!(
            loaded
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["name"] == "api_token" && s["value"] == fp.as_str()),
            "{loaded}"
        );
        assert_eq!(trail[1]["event"]["reason"], "missing");
        assert_eq!(trail[2]["event"]["reason"], "invalid");
        assert_eq!(
            trail[2]["event"]["token_fp"],
            token_fingerprint("not-the-token-0000000")
        );
        assert_eq!(trail[3]["event"]["token_fp"], fp.as_str());
        assert_eq!(trail[3]["request_id"], "audited-req-1");
        assert_eq!(trail[3]["event"]["peer_ip"], "127.0.0.1");
        assert_eq!(trail[3]["event"]["path"], "/v1/x");
        assert_eq!(trail[4]["event"]["path"], "/v1/admin/shutdown");
        assert!(trail
            .iter()
            .all(|r| r["service_id"] == service_id(name).as_str()));

        for entry in std::fs::read_dir(&dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            assert!(!text.contains(TEST_TOKEN), "{name} wrote the raw token");
            assert!(
                !text.contains("not-the-token"),
                "{name} wrote a presented token"
            );
        }
    }
    // The root holds one directory per service, and verifies as a whole.
    let (ok, said) = verify(root.path());
    assert!(ok, "{said}");
    assert_eq!(
        said.lines().filter(|l| l.starts_with("OK")).count(),
        3,
        "{said}"
    );
}

#[test]
fn the_chain_continues_when_a_daemon_restarts() {
    let http = Client::new();
    let root = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let mut hive = audited("rbee-hive", root.path()).spawn();
        http.get(hive.url("/v1/x")).send().unwrap();
        hive.signal(nix::sys::signal::Signal::SIGTERM);
        assert_eq!(
            hive.wait_exit(Duration::from_secs(10)).unwrap().code(),
            Some(0)
        );
    }
    let dir = root.path().join("rbee-hive");
    let (ok, said) = verify(&dir);
    assert!(ok, "{said}");
    let ids: Vec<u64> = records(&dir)
        .iter()
        .map(|r| r["audit_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2, 3, 4]);
}

#[test]
fn a_second_writer_for_the_same_service_refuses_to_start() {
    let root = tempfile::tempdir().unwrap();
    let _first = audited("rbee-hive", root.path()).spawn();
    let out = audited("rbee-hive", root.path()).run_to_exit(Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("locked by another writer"), "{lines:?}");
}

#[test]
fn an_invalid_configuration_is_audited_before_the_daemon_exits() {
    let root = tempfile::tempdir().unwrap();
    let out = audited("queen-rbee", root.path())
        .env("LLORCH_API_TOKEN", "too-short")
        .run_to_exit(Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(1));
    let dir = root.path().join("queen-rbee");
    let trail = records(&dir);
    assert_eq!(trail.len(), 1);
    assert_eq!(trail[0]["event"]["event_type"], "config_invalid");
    assert!(trail[0]["event"]["errors"][0]
        .as_str()
        .unwrap()
        .contains("at least 16"));
    assert!(!std::fs::read_to_string(
        std::fs::read_dir(&dir)
            .unwrap()
            .find_map(|e| {
                let p = e.unwrap().path();
                p.extension().is_some_and(|x| x == "jsonl").then_some(p)
            })
            .unwrap()
    )
    .unwrap()
    .contains("too-short"));
    assert!(verify(&dir).0);
}

#[test]
fn bad_audit_settings_refuse_to_start_with_one_line() {
    for (key, value, needle) in [
        ("LLORCH_AUDIT_MODE", "remote", "LLORCH_AUDIT_MODE"),
        ("LLORCH_AUDIT_FLUSH", "sometimes", "LLORCH_AUDIT_FLUSH"),
    ] {
        let out = DaemonSpec::new("rbee-hive")
            .env(key, value)
            .run_to_exit(Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(1), "{key}={value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr.lines().filter(|l| !l.trim().is_empty()).count(),
            1,
            "{stderr}"
        );
        assert!(stderr.contains(needle), "{stderr}");
    }
}

#[test]
fn audit_dropped_counter_is_exported() {
    let root = tempfile::tempdir().unwrap();
    let daemon = audited("llm-worker-rbee", root.path()).spawn();
    let text = Client::new()
        .get(daemon.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(text.contains("rbee_audit_events_dropped_total 0"), "{text}");
}
