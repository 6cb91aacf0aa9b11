//! The `/v1/workers/*` routes, `/v1/status` and the hive's probes.

use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRef, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use rbee_api::health::HealthResponse;
use rbee_api::health::{Ack, HiveReady, ReadyStatus};
use rbee_api::hive::{CpuStatus, Device, GpuStatus, HiveStatus, WorkerStopped, WorkersHealth};
use rbee_api::worker::{
    Backend, Heartbeat, ReadyCallback, ScrapeTargetGroup, ShutdownWorkerRequest, SpawnRequest,
    WorkerInfo, WorkerList,
};
use rbee_api::{ApiError, ErrorCode, FieldError};
use rbee_http::{ApiJson, CoreState, RequestContext, Routes};
use serde::Deserialize;

use super::error::WorkerError;
use super::Workers;
use crate::host;
use crate::models::Models;

/// Whether `/health/ready` also needs a ready worker
/// (`--ready-requires-worker`); shared, so a reload can change it.
#[derive(Debug, Clone, Default)]
pub struct ReadyRequiresWorker(pub std::sync::Arc<std::sync::atomic::AtomicBool>);

impl ReadyRequiresWorker {
    /// Starting at `value`.
    pub fn new(value: bool) -> Self {
        Self(std::sync::Arc::new(value.into()))
    }

    /// The setting now.
    pub fn get(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Change it (reload).
    pub fn set(&self, value: bool) {
        self.0.store(value, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The worker, status and probe routes.
pub fn router<S>() -> Routes<S>
where
    S: Clone + Send + Sync + 'static,
    Workers: FromRef<S>,
    Models: FromRef<S>,
    CoreState: FromRef<S>,
    ReadyRequiresWorker: FromRef<S>,
{
    Routes::new()
        .post("/v1/workers/spawn", spawn)
        .get("/v1/workers/list", list)
        .get("/v1/workers/{worker_id}", one)
        .get("/v1/workers/health", health)
        .get("/v1/workers/metrics-targets", metrics_targets)
        .post("/v1/workers/ready", ready)
        .post("/v1/workers/heartbeat", heartbeat)
        .post("/v1/workers/shutdown", shutdown)
        .get("/v1/status", status)
        .get("/health/ready", readiness)
        .get("/v1/health", simple_health)
}

async fn spawn(
    State(workers): State<Workers>,
    ctx: RequestContext,
    ApiJson(body): ApiJson<SpawnRequest>,
) -> Result<Response, ApiError> {
    let accepted = workers.spawn(body, Some(ctx.request_id.as_str())).await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)).into_response())
}

async fn list(State(workers): State<Workers>) -> Json<WorkerList> {
    Json(WorkerList {
        workers: workers.registry().list(),
    })
}

/// Longest `wait_ms` taken by `GET /v1/workers/{worker_id}`.
pub(crate) const MAX_WAIT_MS: u64 = 60_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    /// Wait up to this long while the worker is loading.
    wait_ms: Option<u64>,
}

/// `GET /v1/workers/{worker_id}[?wait_ms=N]`: one worker as the list shows
/// it. With `wait_ms`, a worker still loading is answered when it leaves
/// `loading` (ready, failed or stopping) or when `wait_ms` has passed,
/// whichever comes first: how a spawner learns of readiness at once
/// without polling.
async fn one(
    State(workers): State<Workers>,
    Path(worker_id): Path<String>,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Json<WorkerInfo>, ApiError> {
    check_worker_id(&worker_id)?;
    let wait_ms = match query {
        Ok(Query(WaitQuery { wait_ms })) => wait_ms.unwrap_or(0),
        Err(e) => {
            return Err(ApiError::invalid_fields(
                ErrorCode::InvalidRequest,
                vec![FieldError::new(
                    "wait_ms",
                    "type",
                    format!("the query must be at most `wait_ms`, a number of milliseconds: {e}"),
                )],
            ))
        }
    };
    if wait_ms > MAX_WAIT_MS {
        return Err(ApiError::invalid_fields(
            ErrorCode::InvalidRequest,
            vec![FieldError::new(
                "wait_ms",
                "maximum",
                format!("wait_ms is at most {MAX_WAIT_MS}"),
            )],
        ));
    }
    workers
        .registry()
        .wait_while_loading(&worker_id, Duration::from_millis(wait_ms))
        .await
        .map(Json)
        .ok_or_else(|| WorkerError::Unknown { worker_id }.into())
}

/// The workers' `/metrics` endpoints in Prometheus's HTTP service-discovery
/// format (`http_sd_configs`): one target group per worker that has an
/// address, labelled with its id, model, backend and device.
async fn metrics_targets(State(workers): State<Workers>) -> Json<Vec<ScrapeTargetGroup>> {
    Json(
        workers
            .registry()
            .list()
            .iter()
            .filter_map(WorkerInfo::scrape_target)
            .collect(),
    )
}

async fn health(State(workers): State<Workers>) -> Response {
    let stats = workers.registry().stats();
    Json(WorkersHealth {
        workers_total: stats.total(),
        workers_ready: stats.ready(),
        workers_loading: stats.loading,
        workers_failed: stats.failed,
        workers: workers.registry().list(),
    })
    .into_response()
}

async fn ready(
    State(workers): State<Workers>,
    ctx: RequestContext,
    ApiJson(body): ApiJson<ReadyCallback>,
) -> Result<Response, ApiError> {
    check_worker_id(&body.worker_id)?;
    workers.on_ready(&body, Some(ctx.request_id.as_str()))?;
    Ok(Json(Ack::default()).into_response())
}

async fn heartbeat(
    State(workers): State<Workers>,
    ApiJson(body): ApiJson<Heartbeat>,
) -> Result<Response, ApiError> {
    check_worker_id(&body.worker_id)?;
    workers
        .registry()
        .on_heartbeat(&body.worker_id, body.state, Instant::now())?;
    Ok(Json(Ack::default()).into_response())
}

async fn shutdown(
    State(workers): State<Workers>,
    ApiJson(body): ApiJson<ShutdownWorkerRequest>,
) -> Result<Response, ApiError> {
    check_worker_id(&body.worker_id)?;
    workers.shutdown(&body.worker_id).await?;
    Ok(Json(WorkerStopped::new(body.worker_id)).into_response())
}

/// 400 `INVALID_REQUEST` naming `worker_id` when `id` could not be a
/// worker's id (the rule [`is_worker_id`](super::is_worker_id) gives
/// spawns), so a malformed id is told apart from one that is not there.
fn check_worker_id(id: &str) -> Result<(), ApiError> {
    if super::is_worker_id(id) {
        Ok(())
    } else {
        Err(ApiError::invalid_fields(
            ErrorCode::InvalidRequest,
            vec![super::worker_id_error()],
        ))
    }
}

async fn status(
    State(workers): State<Workers>,
    State(models): State<Models>,
) -> Result<Response, ApiError> {
    let memory = host::memory();
    let gpus: Vec<GpuStatus> = workers
        .refresh_gpus()
        .await
        .into_iter()
        .map(|g| GpuStatus {
            vram_reserved_bytes: workers.registry().reserved(Backend::Cuda, g.index),
            vram_used_by_workers_bytes: workers.registry().vram_used(g.index),
            index: g.index,
            name: g.name,
            vram_total_bytes: g.vram_total_bytes,
            vram_free_bytes: g.vram_free_bytes,
        })
        .collect();
    let catalog = models.catalog().await?;
    let cpu = CpuStatus {
        index: 0,
        cpu_count: host::cpu_count(),
        ram_total_bytes: memory.map(|m| m.total_bytes),
        ram_available_bytes: memory.map(|m| m.available_bytes),
        ram_reserved_bytes: workers.registry().reserved(Backend::Cpu, 0),
    };
    // One entry per device a worker can be placed on: the host (CPU and
    // RAM), then each GPU.
    let devices = std::iter::once(Device::Cpu(cpu.clone()))
        .chain(gpus.iter().cloned().map(Device::Cuda))
        .collect();
    Ok(Json(HiveStatus {
        devices,
        hostname: host::hostname(),
        cpu_count: cpu.cpu_count,
        ram_total_bytes: cpu.ram_total_bytes,
        ram_available_bytes: cpu.ram_available_bytes,
        ram_reserved_bytes: cpu.ram_reserved_bytes,
        backends: workers.backends().to_vec(),
        gpus,
        workers: workers.registry().list(),
        models: catalog.models,
        downloads: catalog.downloads,
    })
    .into_response())
}

async fn readiness(
    State(workers): State<Workers>,
    State(core): State<CoreState>,
    State(requires): State<ReadyRequiresWorker>,
) -> Response {
    let stats = workers.registry().stats();
    let status = if core.is_draining() {
        ReadyStatus::Draining
    } else if requires.get() && stats.ready() == 0 {
        ReadyStatus::NoReadyWorker
    } else {
        ReadyStatus::Ready
    };
    let ok = status == ReadyStatus::Ready;
    let body = Json(HiveReady {
        status,
        workers_total: stats.total(),
        workers_ready: stats.ready(),
    });
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body).into_response()
}

async fn simple_health() -> Json<HealthResponse> {
    Json(HealthResponse::ok(env!("CARGO_PKG_VERSION")))
}
