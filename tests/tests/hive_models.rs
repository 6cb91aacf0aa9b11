//! Model provisioning as an operator meets it: the real `rbee-hive` binary
//! downloading from a fake Hugging Face server (a test double with the
//! Hub's layout and API) and from local files, over real HTTP on loopback,
//! with its SQLite catalog on disk.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rbee_system_tests::fake_hub::{sha256_hex, FakeHub, HubFile};
use rbee_system_tests::hive::{
    client, follow, follow_until, list, metric, provision, provision_to_end, send,
};
use rbee_system_tests::{read_trail, verify_trail, DaemonSpec, RunningDaemon};
use serde_json::{json, Value};

/// `hf-hub` commits downloads in chunks of this many bytes.
const HF_HUB_CHUNK: u64 = 10_000_000;

/// A GGUF-looking file: the magic, then deterministic pseudo-random bytes.
fn gguf(len: usize, seed: u64) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    let mut x = seed | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A hive downloading from `hub`. The disk reserve is 0 so that the tests
/// do not depend on the free space of the machine running them; the 507
/// test raises it with the flag, which wins over the variable.
fn hive(hub: &FakeHub) -> DaemonSpec {
    DaemonSpec::new("rbee-hive")
        .env("HF_ENDPOINT", &hub.url())
        .env("RBEE_DISK_RESERVE_MIB", "0")
}

fn hive_in(hub: &FakeHub, models_dir: &Path) -> DaemonSpec {
    hive(hub).args(["--models-dir", models_dir.to_str().expect("UTF-8 path")])
}

fn content_requests<'a>(hub: &'a FakeHub, file: &'a str) -> Vec<String> {
    hub.requests()
        .into_iter()
        .filter(|r| r.target.ends_with(&format!("/{file}")))
        .filter_map(|r| r.range)
        .filter(|r| r != "bytes=0-0")
        .collect()
}

#[test]
fn a_gguf_repo_is_provisioned_with_throttled_progress_then_listed() {
    let hub = FakeHub::start();
    let content = gguf(3_000_000, 1);
    let commit = hub.add_repo(
        "acme/tiny-GGUF",
        vec![
            HubFile::git("README.md", b"# tiny"),
            HubFile::lfs("tiny.Q4_0.gguf", content.clone()),
        ],
    );
    hub.throttle(Some(3_000_000));
    let hive = hive(&hub).spawn();

    let started = Instant::now();
    let (status, body) = provision(&hive, "hf:acme/tiny-GGUF");
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["stage"], "downloading");
    assert_eq!(body["model_ref"], "hf:acme/tiny-GGUF");
    let id = body["download_id"]
        .as_str()
        .expect("download_id")
        .to_owned();

    let first = follow_until(&hive, &id, |e| e["bytes_downloaded"].as_u64() > Some(0));
    assert_eq!(metric(&hive, "rbee_hive_download_active"), 1.0);
    let (status, catalog) = send(client().get(hive.url("/v1/models/catalog")));
    assert_eq!(status, 200);
    assert_eq!(catalog["models"], json!([]));
    assert_eq!(catalog["downloads"][0]["download_id"], id.as_str());
    assert_eq!(catalog["downloads"][0]["model_ref"], "hf:acme/tiny-GGUF");
    assert_eq!(catalog["downloads"][0]["bytes_total"], 3_000_000);
    let mut events = first;
    events.extend(follow(&hive, &id));
    let elapsed = started.elapsed();

    let downloading: Vec<&Value> = events
        .iter()
        .map(|(_, e)| e)
        .filter(|e| e["stage"] == "downloading")
        .collect();
    assert!(downloading.len() >= 2, "{events:?}");
    for e in &downloading {
        assert_eq!(e["bytes_total"], 3_000_000);
    }
    let bytes: Vec<u64> = downloading
        .iter()
        .map(|e| e["bytes_downloaded"].as_u64().expect("bytes"))
        .collect();
    assert!(bytes.windows(2).all(|w| w[0] <= w[1]), "{bytes:?}");
    // At most one event per 250 ms (plus the first and the resumed view).
    let bound = (elapsed.as_millis() / 250) as usize + 3;
    assert!(
        downloading.len() <= bound,
        "{} events in {elapsed:?}",
        downloading.len()
    );

    let complete = &events[events.len() - 2].1;
    assert_eq!(complete["stage"], "complete", "{events:?}");
    let local_path = complete["local_path"].as_str().expect("local_path");
    assert!(
        local_path.ends_with(&format!("snapshots/{commit}/tiny.Q4_0.gguf")),
        "{local_path}"
    );
    assert_eq!(std::fs::read(local_path).expect("model file"), content);

    // A late subscriber sees where it stands: complete, then [DONE].
    let late = follow(&hive, &id);
    assert_eq!(late.len(), 2);
    assert_eq!(late[0].1, *complete);

    let models = list(&hive);
    assert_eq!(models.len(), 1);
    let m = &models[0];
    assert_eq!(m["model_ref"], "hf:acme/tiny-GGUF");
    assert_eq!(m["provider"], "hf");
    assert_eq!(m["format"], "gguf");
    assert_eq!(m["size_bytes"], 3_000_000);
    assert_eq!(m["sha256"], sha256_hex(&content));
    assert_eq!(m["revision"], commit);
    assert!(m["downloaded_at"].as_str().expect("time").ends_with('Z'));

    assert_eq!(metric(&hive, "rbee_hive_models_downloaded_total"), 1.0);
    assert_eq!(metric(&hive, "rbee_hive_download_active"), 0.0);
    assert!(metric(&hive, "rbee_hive_download_bytes_total") >= 3_000_000.0);
    assert_eq!(
        hub.bytes_served("README.md"),
        0,
        "only the model is fetched"
    );

    // Provisioning it again is immediate and downloads nothing.
    let served = hub.bytes_served("tiny.Q4_0.gguf");
    let (status, again) = provision(&hive, "hf:acme/tiny-GGUF");
    assert_eq!(status, 202);
    assert_eq!(again["stage"], "complete");
    assert_eq!(again["local_path"], local_path);
    assert_eq!(hub.bytes_served("tiny.Q4_0.gguf"), served);
}

#[test]
fn a_connection_dropped_mid_file_is_resumed_from_the_last_committed_chunk() {
    let hub = FakeHub::start();
    let content = gguf(24_000_000, 2);
    hub.add_repo("acme/big", vec![HubFile::lfs("big.gguf", content.clone())]);
    hub.drop_once("big.gguf", 15_000_000);
    let hive = hive(&hub).spawn();

    let end = provision_to_end(&hive, "hf:acme/big");
    assert_eq!(end["stage"], "complete", "{end}");
    let path = end["local_path"].as_str().expect("local_path");
    assert_eq!(
        sha256_hex(&std::fs::read(path).expect("model")),
        sha256_hex(&content)
    );

    let ranges = content_requests(&hub, "big.gguf");
    let from_zero = ranges.iter().filter(|r| r.starts_with("bytes=0-")).count();
    let second_chunk = format!("bytes={HF_HUB_CHUNK}-");
    let resumed = ranges
        .iter()
        .filter(|r| r.starts_with(&second_chunk))
        .count();
    assert_eq!(from_zero, 1, "the first chunk is fetched once: {ranges:?}");
    assert_eq!(
        resumed, 2,
        "the dropped chunk is fetched again, from its start: {ranges:?}"
    );
    assert!(hive.wait_for_log("resuming a partial download", Duration::from_secs(1)));
}

#[test]
fn unknown_repo_revision_and_file_are_model_not_found_naming_the_ref() {
    let hub = FakeHub::start();
    let commit = hub.add_repo("acme/tiny", vec![HubFile::lfs("t.gguf", gguf(1000, 3))]);
    let hive = hive(&hub).spawn();
    for model_ref in [
        "hf:acme/nope",
        "hf:acme/tiny@v9",
        "hf:acme/tiny:missing.gguf",
    ] {
        let (status, body) = provision(&hive, model_ref);
        assert_eq!(status, 404, "{model_ref}: {body}");
        assert_eq!(body["error"]["code"], "MODEL_NOT_FOUND");
        assert_eq!(body["error"]["retriable"], false);
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.contains(model_ref), "{message}");
    }
    assert!(list(&hive).is_empty());

    let pinned = format!("hf:acme/tiny@{commit}");
    assert_eq!(provision_to_end(&hive, &pinned)["stage"], "complete");
}

#[test]
fn a_gated_repo_needs_the_token_and_gets_it_when_configured() {
    let hub = FakeHub::start();
    hub.add_repo("acme/gated", vec![HubFile::lfs("g.gguf", gguf(5000, 4))]);
    hub.gate("acme/gated", "hf_secret_token_123");

    let without = hive(&hub).spawn();
    let (status, body) = provision(&without, "hf:acme/gated");
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "MODEL_ACCESS_DENIED");
    assert!(body["error"]["message"]
        .as_str()
        .expect("message")
        .contains("HF_TOKEN"));
    drop(without);

    let with = hive(&hub).env("HF_TOKEN", "hf_secret_token_123").spawn();
    assert_eq!(
        provision_to_end(&with, "hf:acme/gated")["stage"],
        "complete"
    );
    assert!(hub
        .requests()
        .iter()
        .any(|r| r.authorization.as_deref() == Some("Bearer hf_secret_token_123")));
    assert!(
        with.logs()
            .iter()
            .all(|l| !l.contains("hf_secret_token_123")),
        "the Hugging Face token never reaches the log"
    );
}

#[test]
fn a_checksum_mismatch_fails_the_download_and_keeps_nothing() {
    let hub = FakeHub::start();
    hub.add_repo(
        "acme/corrupt",
        vec![HubFile::lfs("c.gguf", gguf(200_000, 5)).with_wrong_sha256()],
    );
    let spec = hive(&hub);
    let hive = spec.spawn();
    let end = provision_to_end(&hive, "hf:acme/corrupt");
    assert_eq!(end["stage"], "error", "{end}");
    assert_eq!(end["code"], "DOWNLOAD_FAILED");
    assert!(
        end["message"]
            .as_str()
            .expect("message")
            .contains("sha256 mismatch"),
        "{end}"
    );
    assert!(list(&hive).is_empty());
    let models_dir = models_dir_of(&hive);
    let leftovers: Vec<PathBuf> = walk(&models_dir)
        .into_iter()
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() >= 200_000))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn concurrent_provisions_of_one_ref_share_one_download() {
    let hub = FakeHub::start();
    let content = gguf(2_000_000, 6);
    hub.add_repo("acme/shared", vec![HubFile::lfs("s.gguf", content)]);
    hub.throttle(Some(4_000_000));
    let hive = hive(&hub).spawn();
    let ids: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| provision(&hive, "hf:acme/shared")))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                let (status, body) = h.join().expect("thread");
                assert_eq!(status, 202, "{body}");
                body["download_id"].as_str().expect("id").to_owned()
            })
            .collect()
    });
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    let events = follow(&hive, &ids[0]);
    assert_eq!(events[events.len() - 2].1["stage"], "complete");
    assert_eq!(content_requests(&hub, "s.gguf").len(), 1, "one transfer");
    assert_eq!(
        hub.bytes_served("s.gguf"),
        2_000_000 + 1,
        "the file once plus the 1-byte probe"
    );
}

#[test]
fn a_download_that_would_eat_the_disk_reserve_is_refused_with_507() {
    let hub = FakeHub::start();
    hub.add_repo("acme/huge", vec![HubFile::lfs("h.gguf", gguf(100_000, 7))]);
    let hive = hive(&hub)
        .args(["--disk-reserve-mib", "1000000000000"])
        .spawn();
    let (status, body) = provision(&hive, "hf:acme/huge");
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["error"]["code"], "INSUFFICIENT_DISK");
    let details = &body["error"]["details"];
    assert_eq!(details["required_bytes"], 100_000);
    assert!(details["available_bytes"].as_u64().expect("available") > 0);
    assert_eq!(details["reserve_bytes"], 1_000_000_000_000u64 * 1024 * 1024);
    assert!(
        content_requests(&hub, "h.gguf").is_empty(),
        "nothing was downloaded"
    );
    assert!(list(&hive).is_empty());
}

#[test]
fn the_catalog_survives_a_restart_and_forgets_files_deleted_by_hand() {
    let hub = FakeHub::start();
    hub.add_repo("acme/keep", vec![HubFile::lfs("k.gguf", gguf(10_000, 8))]);
    hub.add_repo("acme/lose", vec![HubFile::lfs("l.gguf", gguf(10_000, 9))]);
    let dir = tempfile::tempdir().expect("models dir");
    let mut first = hive_in(&hub, dir.path()).spawn();
    assert_eq!(
        provision_to_end(&first, "hf:acme/keep")["stage"],
        "complete"
    );
    let lost = provision_to_end(&first, "hf:acme/lose");
    first.signal(Signal::SIGTERM);
    assert_eq!(
        first.wait_exit(Duration::from_secs(30)).map(|s| s.code()),
        Some(Some(0))
    );

    std::fs::remove_file(lost["local_path"].as_str().expect("path")).expect("delete by hand");
    // A partial file no pending download owns (left by a crash) is removed.
    let stray = dir
        .path()
        .join("hf/models--acme--gone/blobs/0123abcd.sync.part");
    std::fs::create_dir_all(stray.parent().expect("blobs dir")).expect("mkdir");
    std::fs::write(&stray, vec![7; 1000]).expect("stray partial");
    let second = hive_in(&hub, dir.path()).spawn();
    let refs: Vec<Value> = list(&second)
        .iter()
        .map(|m| m["model_ref"].clone())
        .collect();
    assert_eq!(refs, vec![json!("hf:acme/keep")]);
    assert!(second.wait_for_log("its files are missing", Duration::from_secs(1)));
    assert!(!stray.exists(), "stray partial download removed at startup");
    // The forgotten model can be provisioned again.
    assert_eq!(
        provision_to_end(&second, "hf:acme/lose")["stage"],
        "complete"
    );
    assert_eq!(list(&second).len(), 2);
}

#[test]
fn a_download_interrupted_by_killing_the_hive_resumes_when_it_restarts() {
    let hub = FakeHub::start();
    let content = gguf(24_000_000, 10);
    hub.add_repo("acme/resume", vec![HubFile::lfs("r.gguf", content.clone())]);
    hub.throttle(Some(8_000_000));
    let dir = tempfile::tempdir().expect("models dir");
    let mut first = hive_in(&hub, dir.path()).spawn();
    let (status, body) = provision(&first, "hf:acme/resume");
    assert_eq!(status, 202, "{body}");
    let id = body["download_id"].as_str().expect("id").to_owned();
    // Ranges are fetched in file order: past 16 MB the first is committed.
    let seen = follow_until(&first, &id, |e| {
        e["bytes_downloaded"].as_u64().unwrap_or(0) > 16_000_000
    });
    assert_eq!(seen.last().expect("events").1["stage"], "downloading");
    first.signal(Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(10));

    hub.throttle(None);
    let second = hive_in(&hub, dir.path()).spawn();
    let deadline = Instant::now() + Duration::from_secs(60);
    let model = loop {
        if let Some(m) = list(&second).into_iter().next() {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "the pending download did not finish"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(model["sha256"], sha256_hex(&content));
    assert!(second.wait_for_log("resuming a download interrupted", Duration::from_secs(1)));
    let ranges = content_requests(&hub, "r.gguf");
    assert!(
        ranges
            .iter()
            .filter(|r| r.starts_with(&format!("bytes={HF_HUB_CHUNK}-")))
            .count()
            >= 2,
        "the restart resumed at the committed chunk: {ranges:?}"
    );
    assert_eq!(
        ranges.iter().filter(|r| r.starts_with("bytes=0-")).count(),
        1,
        "{ranges:?}"
    );
}

#[test]
fn several_ggufs_need_a_file_and_a_safetensors_repo_downloads_its_set() {
    let hub = FakeHub::start();
    hub.add_repo(
        "acme/multi",
        vec![
            HubFile::lfs("m.Q4_0.gguf", gguf(20_000, 12)),
            HubFile::lfs("m.Q8_0.gguf", gguf(40_000, 13)),
        ],
    );
    let header = br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let mut shard = (header.len() as u64).to_le_bytes().to_vec();
    shard.extend_from_slice(header);
    shard.extend_from_slice(&[0; 4]);
    hub.add_repo(
        "acme/dense",
        vec![
            HubFile::git("config.json", b"{}"),
            HubFile::git("tokenizer.json", b"{}"),
            HubFile::git("README.md", b"# dense"),
            HubFile::lfs("model-00001-of-00002.safetensors", shard.clone()),
            HubFile::lfs("model-00002-of-00002.safetensors", shard),
            HubFile::git("model.safetensors.index.json", b"{}"),
        ],
    );
    let hive = hive(&hub).spawn();

    let (status, body) = provision(&hive, "hf:acme/multi");
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["error"]["details"]["files"],
        json!(["m.Q4_0.gguf", "m.Q8_0.gguf"])
    );
    assert!(body["error"]["message"]
        .as_str()
        .expect("message")
        .contains("hf:acme/multi:FILE"));

    let end = provision_to_end(&hive, "hf:acme/multi:m.Q8_0.gguf");
    assert_eq!(end["stage"], "complete", "{end}");
    assert_eq!(hub.bytes_served("m.Q4_0.gguf"), 0);

    let end = provision_to_end(&hive, "hf:acme/dense");
    assert_eq!(end["stage"], "complete", "{end}");
    let dir = PathBuf::from(end["local_path"].as_str().expect("path"));
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("snapshot dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json",
        ]
    );
    let dense = list(&hive)
        .into_iter()
        .find(|m| m["model_ref"] == "hf:acme/dense")
        .expect("listed");
    assert_eq!(dense["format"], "safetensors");
}

#[test]
fn evicting_deletes_downloaded_files_and_every_step_is_audited() {
    let hub = FakeHub::start();
    hub.add_repo("acme/evict", vec![HubFile::lfs("e.gguf", gguf(50_000, 14))]);
    let audit = tempfile::tempdir().expect("audit dir");
    let mut hive = hive(&hub)
        .env("LLORCH_AUDIT_MODE", "local")
        .env("LLORCH_AUDIT_DIR", audit.path().to_str().expect("UTF-8"))
        .env("LLORCH_AUDIT_FLUSH", "immediate")
        .spawn();
    let end = provision_to_end(&hive, "hf:acme/evict");
    let path = PathBuf::from(end["local_path"].as_str().expect("path"));
    let blob = path.canonicalize().expect("blob");
    assert_eq!(provision(&hive, "hf:acme/absent").0, 404);

    let evict = |model_ref: &str| {
        send(
            client()
                .delete(hive.url("/v1/models/evict"))
                .json(&json!({ "model_ref": model_ref })),
        )
    };
    let (status, body) = evict("hf:acme/evict");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["bytes_freed"], 50_000);
    assert!(!path.exists() && !blob.exists());
    assert!(list(&hive).is_empty());
    let (status, body) = evict("hf:acme/evict");
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "MODEL_NOT_FOUND");

    hive.signal(Signal::SIGTERM);
    hive.wait_exit(Duration::from_secs(30));
    let service = audit.path().join("rbee-hive");
    let trail = read_trail(&service);
    for event in [
        "model_provisioned",
        "model_provision_failed",
        "model_evicted",
    ] {
        assert!(
            trail.contains(&format!("\"event_type\":\"{event}\"")),
            "{event} missing:\n{trail}"
        );
    }
    assert!(trail.contains("\"code\":\"MODEL_NOT_FOUND\""));
    verify_trail(&service);
}

#[test]
fn an_unreachable_hub_is_a_retriable_download_failed() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let hive = DaemonSpec::new("rbee-hive")
        .env("HF_ENDPOINT", &format!("http://127.0.0.1:{port}"))
        .spawn();
    let (status, body) = provision(&hive, "hf:acme/anything");
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "DOWNLOAD_FAILED");
    assert_eq!(body["error"]["retriable"], true);
}

fn models_dir_of(hive: &RunningDaemon) -> PathBuf {
    hive.logs()
        .iter()
        .find_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            let settings = v["fields"]["models_dir"].as_str()?;
            Some(PathBuf::from(settings))
        })
        .expect("the hive logs its models directory at startup")
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn a_file_name_from_the_hubs_listing_is_checked_like_a_users_and_kept_inside_the_models_dir() {
    let hub = FakeHub::start();
    let parent = tempfile::tempdir().expect("temp dir");
    let models_dir = parent.path().join("models");
    std::fs::create_dir(&models_dir).expect("models dir");
    // A listing whose only GGUF would be written above the models
    // directory if its name were joined as given.
    hub.add_repo(
        "acme/escape",
        vec![HubFile::lfs("../../../../escape.gguf", gguf(1000, 5))],
    );
    hub.add_repo("acme/dashed", vec![HubFile::lfs("-rf.gguf", gguf(1000, 6))]);
    let hive = hive_in(&hub, &models_dir).spawn();
    for model_ref in ["hf:acme/escape", "hf:acme/dashed"] {
        let (status, body) = provision(&hive, model_ref);
        assert_eq!(status, 502, "{model_ref}: {body}");
        assert_eq!(body["error"]["code"], "DOWNLOAD_FAILED");
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.contains("unsafe file"), "{message}");
    }
    assert!(
        !hub.requests().iter().any(|r| r.target.ends_with(".gguf")),
        "nothing was fetched"
    );
    assert_eq!(
        walk(parent.path())
            .iter()
            .filter(|p| p.to_string_lossy().contains(".gguf"))
            .count(),
        0,
        "no file was written anywhere"
    );
}
