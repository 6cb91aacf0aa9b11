//! systemd as operators run the daemons: readiness over `NOTIFY_SOCKET`
//! from the real binaries, and the units in `deploy/systemd/` through
//! `systemd-analyze`.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use rbee_system_tests::http::{client, default_ref, send, wait_for};
use rbee_system_tests::ops::{deploy, run_tool};
use rbee_system_tests::queen::hive_with_model;
use rbee_system_tests::{binary, DaemonSpec};
use serde_json::json;

/// A notification socket as systemd binds it for a `Type=notify` unit.
struct NotifySocket {
    _dir: tempfile::TempDir,
    path: PathBuf,
    socket: UnixDatagram,
}

impl NotifySocket {
    fn bind() -> Self {
        let dir = tempfile::tempdir().expect("socket dir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        Self {
            _dir: dir,
            path,
            socket,
        }
    }

    /// The next datagram, within `timeout`.
    fn recv(&self, timeout: Duration) -> Option<String> {
        self.socket
            .set_read_timeout(Some(timeout))
            .expect("read timeout");
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

#[test]
fn every_daemon_tells_systemd_it_is_ready_and_when_it_drains() {
    for name in ["queen-rbee", "rbee-hive", "llm-worker-rbee"] {
        let notify = NotifySocket::bind();
        let spec = DaemonSpec::new(name).env(
            "NOTIFY_SOCKET",
            notify.path.to_str().expect("utf-8 socket path"),
        );
        let mut daemon = if name == "rbee-hive" {
            hive_with_model(spec, None)
        } else {
            spec.spawn()
        };
        let ready = notify.recv(Duration::from_secs(10));
        assert_eq!(ready.as_deref(), Some("READY=1\n"), "{name}");

        if name == "rbee-hive" {
            // A worker the hive spawns must not speak for the hive's unit.
            let (status, body, _) = send(
                client()
                    .post(daemon.url("/v1/workers/spawn"))
                    .json(&json!({ "model_ref": default_ref(), "worker_id": "w-notify" })),
            );
            assert_eq!(status, 202, "{body}");
            wait_for(Duration::from_secs(60), "the worker to be idle", || {
                let (_, list, _) = send(client().get(daemon.url("/v1/workers/list")));
                list["workers"]
                    .as_array()
                    .is_some_and(|w| w.iter().any(|w| w["state"] == "idle"))
            });
            let extra = notify.recv(Duration::from_millis(500));
            assert_eq!(extra, None, "the worker notified the hive's socket");
        }

        // SIGHUP (`systemctl reload`) reloads: systemd is told the unit
        // is reloading, then ready again; the daemon neither stops nor
        // drains.
        daemon.signal(Signal::SIGHUP);
        assert_eq!(
            notify.recv(Duration::from_secs(10)).as_deref(),
            Some("RELOADING=1\n"),
            "{name}"
        );
        assert_eq!(
            notify.recv(Duration::from_secs(10)).as_deref(),
            Some("READY=1\n"),
            "{name}"
        );
        assert!(
            daemon.wait_for_log("configuration reloaded", Duration::from_secs(5)),
            "{name}"
        );
        assert_eq!(notify.recv(Duration::from_millis(300)), None, "{name}");
        assert_eq!(
            client()
                .get(daemon.url("/health/live"))
                .send()
                .map(|r| r.status().as_u16())
                .ok(),
            Some(200),
            "{name} after SIGHUP"
        );

        daemon.signal(Signal::SIGTERM);
        let stopping = notify.recv(Duration::from_secs(10));
        assert_eq!(stopping.as_deref(), Some("STOPPING=1\n"), "{name}");
        let status = daemon.wait_exit(Duration::from_secs(30)).expect("exit");
        assert!(status.success(), "{name} exited {status}");
    }
}

/// Copy the units into `dir` with `ExecStart` pointing at the built
/// binaries (verify checks that the program exists and is executable).
fn units_for_verify(dir: &Path) -> Vec<String> {
    let bin_dir = binary("queen-rbee")
        .parent()
        .expect("binary dir")
        .display()
        .to_string();
    let mut units = Vec::new();
    for (file, unit) in [
        ("queen-rbee.service", "queen-rbee.service"),
        ("rbee-hive.service", "rbee-hive.service"),
        (
            "llm-worker-rbee@.service",
            "llm-worker-rbee@smollm2.service",
        ),
    ] {
        let text = std::fs::read_to_string(deploy("systemd").join(file)).expect("read unit");
        assert!(text.contains("/usr/local/bin/"), "{file}: ExecStart path");
        std::fs::write(
            dir.join(unit),
            text.replace("/usr/local/bin/", &format!("{bin_dir}/")),
        )
        .expect("write unit");
        units.push(unit.to_owned());
    }
    units
}

fn systemd_analyze(dir: &Path, args: &[&str]) -> (bool, String) {
    run_tool(Command::new("systemd-analyze").args(args).current_dir(dir))
}

#[test]
fn systemd_units_verify_cleanly_and_are_hardened() {
    let dir = tempfile::tempdir().expect("unit dir");
    let units = units_for_verify(dir.path());

    let mut args = vec!["verify", "--man=no"];
    args.extend(units.iter().map(String::as_str));
    let (ok, text) = systemd_analyze(dir.path(), &args);
    // verify exits 0 on unknown keys and bad values and only prints them:
    // any output is a defect.
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );

    // The check can fail: a misspelled key is reported.
    let broken = dir.path().join("broken.service");
    let queen = std::fs::read_to_string(dir.path().join("queen-rbee.service")).expect("unit");
    std::fs::write(&broken, queen.replace("ProtectHome=", "ProtectHme=")).expect("write");
    let (_, text) = systemd_analyze(dir.path(), &["verify", "--man=no", "broken.service"]);
    assert!(text.contains("ProtectHme"), "{text}");

    for unit in &units {
        let text = std::fs::read_to_string(dir.path().join(unit)).expect("unit");
        for required in [
            "Type=notify",
            "Restart=on-failure",
            "User=rbee",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "LoadCredential=api-token:",
            "CacheDirectory=",
            "ExecReload=/bin/kill -HUP $MAINPID",
        ] {
            assert!(text.contains(required), "{unit} lacks {required}");
        }
        // systemd's own exposure score (0 safest, 10 unprotected).
        let (_, report) = systemd_analyze(dir.path(), &["security", "--offline=true", unit]);
        let score: f64 = report
            .lines()
            .find_map(|l| {
                let rest = l.split("Overall exposure level for ").nth(1)?;
                rest.split(": ")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no exposure level for {unit}:\n{report}"));
        assert!(score <= 2.5, "{unit}: exposure {score}");
    }
    for unit in ["queen-rbee.service", "rbee-hive.service"] {
        let text = std::fs::read_to_string(dir.path().join(unit)).expect("unit");
        for required in ["StateDirectory=", "LogsDirectory="] {
            assert!(text.contains(required), "{unit} lacks {required}");
        }
    }
}
