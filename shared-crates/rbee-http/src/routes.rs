//! Routes every daemon answers the same way: `/health`, `/health/live`,
//! `/metrics`, `POST /v1/admin/shutdown`.

use std::sync::Arc;

use axum::extract::{FromRef, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{header, StatusCode};
use prometheus_client::registry::Registry;
use rbee_api::health::{Draining, HealthResponse, LiveResponse, ReadyStatus};
use rbee_api::{ApiError, ErrorCode};
use tokio_util::sync::CancellationToken;

/// What the shared routes need from a daemon's state.
#[derive(Debug, Clone)]
pub struct CoreState {
    registry: Arc<Registry>,
    shutdown: CancellationToken,
    version: &'static str,
}

impl CoreState {
    /// `registry` is frozen here: register every metric before.
    pub fn new(registry: Registry, shutdown: CancellationToken, version: &'static str) -> Self {
        Self {
            registry: Arc::new(registry),
            shutdown,
            version,
        }
    }

    /// Cancelled when the daemon starts draining (signal or admin route).
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// True once draining has begun.
    pub fn is_draining(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// The metrics in Prometheus/OpenMetrics text.
    pub fn encode_metrics(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// The shared routes, for a daemon state `S` that contains a [`CoreState`].
pub fn core_routes<S>() -> crate::Routes<S>
where
    S: Clone + Send + Sync + 'static,
    CoreState: FromRef<S>,
{
    crate::Routes::new()
        .get("/health", health)
        .get("/health/live", live)
        .get("/metrics", metrics)
        .post("/v1/admin/shutdown", admin_shutdown)
}

async fn health(State(core): State<CoreState>) -> Json<HealthResponse> {
    Json(HealthResponse::ok(core.version))
}

/// Answers whenever the process can; touches no lock and no other task.
async fn live() -> Json<LiveResponse> {
    Json(LiveResponse::default())
}

async fn metrics(State(core): State<CoreState>) -> Response {
    match core.encode_metrics() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => ApiError::new(ErrorCode::Internal, "failed to encode metrics").into_response(),
    }
}

/// `POST /v1/admin/shutdown`. It must say `Content-Type: application/json`
/// (a body is optional): a web page can make a browser POST to loopback
/// without a custom header or a JSON content type (a form, a `no-cors`
/// fetch), but not with one unless the daemon answers a CORS preflight,
/// which no rbee daemon does. On a daemon serving without a token on
/// loopback this is what stops any page the operator visits from stopping it.
async fn admin_shutdown(State(core): State<CoreState>, headers: http::HeaderMap) -> Response {
    let json = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "POST /v1/admin/shutdown needs Content-Type: application/json (a body is optional), so that a web page cannot send it",
        )
        .into_response();
    }
    tracing::info!("shutdown requested over HTTP; draining");
    core.shutdown.cancel();
    (
        StatusCode::ACCEPTED,
        Json(Draining {
            status: ReadyStatus::Draining,
        }),
    )
        .into_response()
}
