//! The hive's model routes without a hub: `file:` models, bad input on every
//! route, and bad settings, against the real `rbee-hive` binary.

use std::time::Duration;

use rbee_system_tests::fake_hub::{sha256_hex, FakeHub};
use rbee_system_tests::hive::{client, list, provision, provision_to_end, send};
use rbee_system_tests::{DaemonSpec, TEST_TOKEN};
use serde_json::json;

/// A GGUF-looking file: the magic, then deterministic filler.
fn gguf(len: usize) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend((0..len.saturating_sub(4)).map(|i| (i % 251) as u8));
    out
}

fn hive(hub: &FakeHub) -> DaemonSpec {
    DaemonSpec::new("rbee-hive").env("HF_ENDPOINT", &hub.url())
}

#[test]
fn file_refs_are_validated_and_provisioned_without_copying() {
    let hub = FakeHub::start();
    let hive = hive(&hub).spawn();
    let dir = tempfile::tempdir().expect("dir");
    let model = dir.path().join("local model.gguf");
    let content = gguf(300_000);
    std::fs::write(&model, &content).expect("write model");
    let canonical = model.canonicalize().expect("canonical");
    let model_ref = format!("file:{}", canonical.display());

    let end = provision_to_end(&hive, &model_ref);
    assert_eq!(end["stage"], "complete", "{end}");
    assert_eq!(end["local_path"], canonical.display().to_string());
    let models = list(&hive);
    assert_eq!(models[0]["provider"], "file");
    assert_eq!(models[0]["sha256"], sha256_hex(&content));
    assert_eq!(models[0]["size_bytes"], 300_000);

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not a model").expect("write");
    let not_model = format!("file:{}", text.canonicalize().expect("canonical").display());
    let absent = format!(
        "file:{}/absent.gguf",
        canonical.parent().expect("parent").display()
    );
    for (bad, status, code) in [
        (absent.as_str(), 404, "MODEL_NOT_FOUND"),
        (not_model.as_str(), 400, "INVALID_REQUEST"),
        ("file:relative/model.gguf", 400, "INVALID_REQUEST"),
        ("file:/tmp/../etc/passwd", 400, "INVALID_REQUEST"),
        ("file:/etc", 400, "INVALID_REQUEST"),
    ] {
        let (got, body) = provision(&hive, bad);
        assert_eq!(got, status, "{bad}: {body}");
        assert_eq!(body["error"]["code"], code, "{bad}: {body}");
        if status == 400 {
            assert_eq!(
                body["error"]["details"]["fields"][0]["field"], "model_ref",
                "{body}"
            );
        }
    }

    // Evicting a file: model forgets it and never deletes the operator's file.
    let (status, body) = send(
        client()
            .delete(hive.url("/v1/models/evict"))
            .json(&json!({ "model_ref": model_ref })),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["bytes_freed"], 0);
    assert!(model.exists());
    assert!(list(&hive).is_empty());
}

#[test]
fn bad_input_to_the_model_routes_gets_contract_errors() {
    let hub = FakeHub::start();
    let hive = hive(&hub).spawn();
    let post = |body: &str| {
        send(
            client()
                .post(hive.url("/v1/models/provision"))
                .header("content-type", "application/json")
                .body(body.to_owned()),
        )
    };
    for (body, code) in [
        ("{}", "INVALID_JSON"),
        (r#"{"model_ref": 5}"#, "INVALID_JSON"),
        (r#"{"model_ref": "hf:o/r", "extra": 1}"#, "INVALID_JSON"),
        ("not json", "INVALID_JSON"),
        (r#"{"model_ref": "gpt2"}"#, "INVALID_REQUEST"),
        (
            r#"{"model_ref": "hf:o/r:../../etc/passwd"}"#,
            "INVALID_REQUEST",
        ),
    ] {
        let (status, json) = post(body);
        assert_eq!(status, 400, "{body}: {json}");
        assert_eq!(json["error"]["code"], code, "{body}: {json}");
    }
    let (status, json) = post(r#"{"model_ref": "gpt2"}"#);
    assert_eq!(status, 400);
    assert_eq!(json["error"]["details"]["fields"][0]["field"], "model_ref");

    let (status, json) = send(client().get(hive.url("/v1/models/download/progress")));
    assert_eq!(status, 400, "{json}");
    assert_eq!(json["error"]["details"]["fields"][0]["field"], "id");
    let (status, json) = send(client().get(hive.url("/v1/models/download/progress?id=dl-0000")));
    assert_eq!(status, 404, "{json}");
    assert_eq!(json["error"]["code"], "NOT_FOUND");

    let (status, json) = send(
        client()
            .delete(hive.url("/v1/models/evict"))
            .json(&json!({ "model_ref": "hf:acme/never" })),
    );
    assert_eq!(status, 404, "{json}");
    let (status, json) = send(
        client()
            .delete(hive.url("/v1/models/evict"))
            .json(&json!({ "model_ref": "nonsense" })),
    );
    assert_eq!(status, 400, "{json}");
    let (status, json) = send(client().get(hive.url("/v1/models/provision")));
    assert_eq!(status, 405, "{json}");

    let secured = DaemonSpec::new("rbee-hive").with_token().spawn();
    let (status, json) = provision(&secured, "hf:acme/x");
    assert_eq!(status, 401, "{json}");
    let (status, json) = send(
        client()
            .get(secured.url("/v1/models/list"))
            .bearer_auth(TEST_TOKEN),
    );
    assert_eq!(status, 200, "{json}");
}

#[test]
fn bad_model_settings_are_reported_together_and_exit_1() {
    let out = DaemonSpec::new("rbee-hive")
        .args([
            "--hf-endpoint",
            "ftp://mirror.example",
            "--hf-token-file",
            "/nonexistent/hf-token",
        ])
        .run_to_exit(Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().expect("an error line");
    assert!(
        last.contains("--hf-endpoint") && last.contains("--hf-token-file"),
        "{stderr}"
    );

    let file = tempfile::NamedTempFile::new().expect("a plain file");
    let out = DaemonSpec::new("rbee-hive")
        .args(["--models-dir", file.path().to_str().expect("UTF-8")])
        .run_to_exit(Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("models directory"), "{stderr}");
}
