//! Spawn admission on the real `rbee-hive`: every validation error with its
//! code, and the memory preflight that two concurrent spawns cannot both
//! pass (the fault-injection worker holds its reservation while it loads).

use std::path::Path;

use rbee_system_tests::hive::{
    provision_listed as provision, spawn_worker, worker_record as worker,
};
use rbee_system_tests::http::{client, default_ref, send};
use rbee_system_tests::{binary, DaemonSpec, RunningDaemon, FAULT_INJECTION_WORKER};
use serde_json::{json, Value};

fn spawn(hive: &RunningDaemon, body: Value) -> (u16, Value, reqwest::header::HeaderMap) {
    spawn_worker(hive, &body)
}

/// A GGUF header (no tensors) describing a llama model with `layers`
/// blocks of 64 heads of 128 over 4096 positions: a worker's default KV
/// cache pool (16,384 positions in f16) needs `layers x 536,870,912` bytes,
/// whatever the file's size.
fn gguf_header(path: &Path, layers: u32) {
    let mut f = b"GGUF".to_vec();
    f.extend(3u32.to_le_bytes());
    f.extend(0u64.to_le_bytes());
    f.extend(5u64.to_le_bytes());
    let mut kv = |key: &str, ty: u32, value: &[u8]| {
        f.extend((key.len() as u64).to_le_bytes());
        f.extend(key.as_bytes());
        f.extend(ty.to_le_bytes());
        f.extend(value);
    };
    let mut arch = 5u64.to_le_bytes().to_vec();
    arch.extend(b"llama");
    kv("general.architecture", 8, &arch);
    kv("llama.block_count", 4, &layers.to_le_bytes());
    kv("llama.attention.head_count", 4, &64u32.to_le_bytes());
    kv("llama.embedding_length", 4, &8192u32.to_le_bytes());
    kv("llama.context_length", 4, &4096u32.to_le_bytes());
    std::fs::write(path, f).expect("write GGUF header");
}

#[test]
fn every_spawn_validation_error_has_its_code() {
    let hive = DaemonSpec::new("rbee-hive").spawn();
    let model_ref = default_ref();
    provision(&hive, &model_ref);
    let dir = tempfile::tempdir().expect("dir");
    let giant = dir.path().join("giant.gguf");
    gguf_header(&giant, 100_000);
    let giant_ref = format!("file:{}", giant.canonicalize().expect("path").display());
    provision(&hive, &giant_ref);

    for (body, status, code) in [
        (json!({ "model_ref": "gpt2" }), 400, "INVALID_REQUEST"),
        (
            json!({ "model_ref": model_ref, "worker_id": "../../etc" }),
            400,
            "INVALID_REQUEST",
        ),
        (
            json!({ "model_ref": model_ref, "worker_id": "a;rm -rf" }),
            400,
            "INVALID_REQUEST",
        ),
        (
            json!({ "model_ref": model_ref, "slots": 0 }),
            400,
            "INVALID_REQUEST",
        ),
        (
            json!({ "model_ref": model_ref, "kv_tokens": 64 }),
            400,
            "INVALID_REQUEST",
        ),
        (
            json!({ "model_ref": model_ref, "device": 3 }),
            400,
            "INVALID_REQUEST",
        ),
        (
            json!({ "model_ref": model_ref, "backend": "cuda" }),
            400,
            "BACKEND_UNAVAILABLE",
        ),
        (
            json!({ "model_ref": model_ref, "backend": "tpu" }),
            400,
            "BACKEND_UNAVAILABLE",
        ),
        (
            json!({ "model_ref": "hf:acme/not-provisioned" }),
            404,
            "MODEL_NOT_FOUND",
        ),
        (json!({ "model_ref": giant_ref }), 507, "INSUFFICIENT_RAM"),
        (json!({}), 400, "INVALID_JSON"),
    ] {
        let (got, answer, _) = spawn(&hive, body.clone());
        assert_eq!(got, status, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{body}: {answer}");
    }
    let (_, answer, _) = spawn(&hive, json!({ "model_ref": giant_ref }));
    let details = &answer["error"]["details"];
    assert!(
        details["required_bytes"].as_u64() > details["available_bytes"].as_u64(),
        "{answer}"
    );

    let (status, _, _) = spawn(
        &hive,
        json!({ "model_ref": model_ref, "worker_id": "w-dup" }),
    );
    assert_eq!(status, 202);
    let (status, answer, _) = spawn(
        &hive,
        json!({ "model_ref": model_ref, "worker_id": "w-dup" }),
    );
    assert_eq!(status, 409, "{answer}");
    assert!(
        worker(&hive, "w-giant").is_none(),
        "refused spawns leave no record"
    );
    let (_, list, _) = send(client().get(hive.url("/v1/workers/list")));
    assert_eq!(list["workers"].as_array().map(Vec::len), Some(1));
}

#[test]
fn two_spawns_cannot_claim_the_same_free_memory() {
    // The fault-injection worker stays loading, holding its reservation.
    let hive = DaemonSpec::new("rbee-hive")
        .env("RBEE_FAULT_LOAD_DELAY_MS", "60000")
        .args([
            "--worker-binary",
            binary(FAULT_INJECTION_WORKER).to_str().expect("UTF-8"),
            "--restart-max-attempts",
            "0",
        ])
        .spawn();
    let (_, status, _) = send(client().get(hive.url("/v1/status")));
    let available = status["ram_available_bytes"].as_u64().expect("ram");
    // A header whose KV cache needs about 60 % of the free memory: the
    // worker's default pool of 16,384 positions, K and V, 64 heads of 128,
    // f16 on the CPU.
    let per_layer = 2 * 16_384 * 64 * 128 * 2u64;
    let layers = (available * 6 / 10) / per_layer;
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("half.gguf");
    gguf_header(&path, u32::try_from(layers).expect("layers"));
    let model_ref = format!("file:{}", path.canonicalize().expect("path").display());
    provision(&hive, &model_ref);

    let results: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = ["w-1", "w-2"]
            .iter()
            .map(|id| {
                let hive = &hive;
                let model_ref = &model_ref;
                s.spawn(move || spawn(hive, json!({ "model_ref": model_ref, "worker_id": id })).0)
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let mut sorted = results.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, vec![202, 507], "{results:?}");
}
