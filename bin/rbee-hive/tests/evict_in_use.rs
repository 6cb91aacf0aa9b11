//! Eviction while a worker holds a lease on the model: the route answers
//! 409 `MODEL_IN_USE` and keeps the model, then evicts once the lease is
//! released. Runs the model routes in-process on a real catalog file.

use std::time::Duration;

use audit_logging::AuditSink;
use axum::body::Body;
use http_body_util::BodyExt;
use prometheus_client::registry::Registry;
use rbee_hive::models::{ModelSettings, Models};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

async fn evict(models: &Models, model_ref: &str) -> (u16, serde_json::Value) {
    let app = rbee_hive::models::routes::router::<Models>()
        .into_router()
        .with_state(models.clone());
    let request = axum::http::Request::delete("/v1/models/evict")
        .header("content-type", "application/json")
        .body(Body::from(
            serde_json::json!({ "model_ref": model_ref }).to_string(),
        ))
        .expect("request");
    let response = app.oneshot(request).await.expect("response");
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, serde_json::from_slice(&bytes).expect("JSON body"))
}

#[tokio::test]
async fn a_model_in_use_is_not_evicted_until_its_lease_is_released() {
    let dir = tempfile::tempdir().expect("models dir");
    let file = dir.path().join("m.gguf");
    std::fs::write(&file, b"GGUF and some bytes").expect("model file");
    let models = Models::open(
        ModelSettings {
            models_dir: dir.path().join("models"),
            hf_endpoint: "http://127.0.0.1:9".to_owned(),
            hf_token: None,
            disk_reserve_bytes: 0,
            download_attempts: 1,
            retention: Duration::from_secs(60),
        },
        AuditSink::disabled(),
        &mut Registry::default(),
        CancellationToken::new(),
    )
    .await
    .expect("model service");
    let model_ref = format!("file:{}", file.canonicalize().expect("path").display());
    let accepted = models.provision(&model_ref, None).await.expect("provision");
    let download = models.download(&accepted.download_id).expect("download");
    let mut phase = download.subscribe();
    phase
        .wait_for(|p| p.is_terminal())
        .await
        .expect("download ends");

    let lease = models.leases().acquire(&model_ref).expect("lease");
    let (status, body) = evict(&models, &model_ref).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "MODEL_IN_USE");
    assert_eq!(body["error"]["details"]["workers"], 1);
    assert!(models.get(&model_ref).await.expect("get").is_some());

    drop(lease);
    let (status, body) = evict(&models, &model_ref).await;
    assert_eq!(status, 200, "{body}");
    assert!(models.get(&model_ref).await.expect("get").is_none());
    assert!(file.exists(), "a file: model's file is the operator's");
}
