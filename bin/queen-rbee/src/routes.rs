//! The queen's routes: inference (native and OpenAI), models, the hive
//! registry, workers across hives, and the ready probe.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::StatusCode;
use rbee_api::fleet::{
    FleetWorkers, HiveList, HiveRegistered, HiveRegistration, HiveRemoval, HiveRemoved,
};
use rbee_api::health::{QueenReady, ReadyStatus};
use rbee_api::inference::{is_valid_id, InferenceRequest, MAX_JOB_ID_BYTES};
use rbee_api::openai::answer::{Model, ModelList};
use rbee_api::openai::embeddings::EmbeddingsRequest;
use rbee_api::openai::{OpenAiRequest, Route};
use rbee_api::sse::Endpoint;
use rbee_api::worker::ScrapeTargetGroup;
use rbee_api::{ApiError, Coded, ErrorCode, FieldError};
use rbee_http::{ApiJson, CoreState, RequestContext, Routes, DEFAULT_BODY_LIMIT};
use serde_json::Value;

use crate::hives::{check_node_name, normalize_url};
use crate::proxy::{self, Prepared};
use crate::AppState;

/// The queen's own routes (the shared ones are added by the bootstrap).
pub fn router() -> Routes<AppState> {
    Routes::new()
        .post("/v1/inference", inference)
        .delete("/v1/inference/{job_id}", cancel)
        .post("/v1/chat/completions", chat)
        .post("/v1/completions", completions)
        .post("/v1/embeddings", embeddings)
        .get("/v1/models", models)
        .post("/v2/hives/register", register)
        .get("/v2/hives/list", list_hives)
        .post("/v2/hives/remove", remove)
        .get("/v2/workers/list", list_workers)
        .get("/v2/workers/metrics-targets", metrics_targets)
        .get("/health/ready", ready)
}

/// The model a request names, checked as a model reference before anything
/// keys a queue, a log line or a metric by it; the only model served when
/// it names none.
fn resolve_model(state: &AppState, model: Option<String>) -> Result<String, ApiError> {
    match model {
        Some(m) if !m.trim().is_empty() => {
            let m = m.trim();
            rbee_api::ModelRef::parse(m).map_err(|e| {
                ApiError::invalid_fields(
                    ErrorCode::InvalidRequest,
                    vec![e.into_field_error("model")],
                )
            })?;
            Ok(m.to_owned())
        }
        _ => Ok(state.sched.sole_model()?),
    }
}

/// The queen's refusals of its own routes' bodies.
#[derive(Debug, thiserror::Error)]
enum RouteError {
    /// The body as forwarded is over the limit every daemon shares.
    #[error("the request as forwarded to a worker (encoded again by the queen) is {bytes} bytes, over the {DEFAULT_BODY_LIMIT}-byte body limit")]
    ForwardTooLarge { bytes: usize },
    /// The forwarded body could not be encoded.
    #[error("cannot encode the request")]
    Encode(#[source] serde_json::Error),
    /// `/v2/hives/remove` for a name no hive has.
    #[error("no hive named `{node_name}` is registered")]
    NoSuchHive { node_name: String },
}

impl Coded for RouteError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::ForwardTooLarge { .. } => ErrorCode::PayloadTooLarge,
            Self::Encode(_) => ErrorCode::Internal,
            Self::NoSuchHive { .. } => ErrorCode::NotFound,
        }
    }
}

/// The body the worker gets. It is encoded again (the native body gains the
/// job id and the model; numbers may be written longer than the client
/// wrote them), so it can outgrow the body limit every daemon shares even
/// though the client's body was within it: that is refused here, before
/// queueing, rather than by the worker after a worker has been found.
fn forwarded(body: &impl serde::Serialize) -> Result<bytes::Bytes, ApiError> {
    let bytes = serde_json::to_vec(body).map_err(RouteError::Encode)?;
    if bytes.len() > DEFAULT_BODY_LIMIT {
        return Err(RouteError::ForwardTooLarge { bytes: bytes.len() }.into());
    }
    Ok(bytes::Bytes::from(bytes))
}

/// Bytes of a prompt's start that identify its conversation.
const AFFINITY_BYTES: usize = 1024;

/// The conversation key of a request: its model and the start of what it
/// sends the model. A conversation's later turns repeat its earlier ones,
/// so they share the key: for a chat, its first two messages (the system
/// message and the first user message, or the first user message and the
/// first answer); for a prompt, its first kilobyte.
fn affinity(model: &str, start: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    model.hash(&mut h);
    start[..start.len().min(AFFINITY_BYTES)].hash(&mut h);
    h.finish()
}

/// The part of an OpenAI request that keys its conversation.
fn openai_start(route: Route, request: &OpenAiRequest) -> Vec<u8> {
    match route {
        Route::Chat => {
            let first = &request.messages[..request.messages.len().min(2)];
            serde_json::to_vec(first).unwrap_or_default()
        }
        Route::Completions => request.request.prompt.as_bytes().to_vec(),
    }
}

async fn inference(
    State(state): State<AppState>,
    ctx: RequestContext,
    ApiJson(request): ApiJson<InferenceRequest>,
) -> Response {
    let request = match request.validate() {
        Ok(r) => r,
        Err(fields) => {
            return ApiError::invalid_fields(ErrorCode::InvalidRequest, fields).into_response()
        }
    };
    let model = match resolve_model(&state, request.model.clone()) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    let (request, job_id) = request.routed(model.clone());
    let conversation = affinity(&model, request.prompt.as_bytes());
    let body = match forwarded(request.get()) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    proxy::run(
        state,
        ctx,
        Prepared {
            endpoint: Endpoint::Native,
            model,
            job_id,
            stream: request.stream,
            body,
            max_tokens: request.max_tokens,
            affinity: Some(conversation),
            usage_chunk: true,
        },
    )
    .await
}

/// Check an OpenAI body whole (the worker's checks, from the same code) and
/// route it. The worker gets the checked request encoded again from its
/// type ([`OpenAiRequest::body`], every setting explicit, the model
/// resolved), so it reads what the queen checked and nothing else.
fn openai(state: &AppState, route: Route, body: Value) -> Result<Prepared, ApiError> {
    let mut request = OpenAiRequest::parse(route, &body)
        .map_err(|fields| ApiError::invalid_fields(ErrorCode::InvalidRequest, fields))?;
    let model = resolve_model(state, request.request.model.take())?;
    request.request.model = Some(model.clone());
    let usage_chunk = request.include_usage;
    request.include_usage = true;
    let conversation = affinity(&model, &openai_start(route, &request));
    Ok(Prepared {
        endpoint: Endpoint::OpenAi(route),
        job_id: rbee_api::inference::new_job_id(),
        stream: request.request.stream,
        body: forwarded(&request.body(route))?,
        max_tokens: request.request.max_tokens,
        affinity: Some(conversation),
        usage_chunk,
        model,
    })
}

/// `POST /v1/embeddings`: checked here with the worker's code, routed by
/// model like a generation, answered whole.
async fn embeddings(
    State(state): State<AppState>,
    ctx: RequestContext,
    ApiJson(body): ApiJson<Value>,
) -> Response {
    let prepared = (|| {
        let mut request = EmbeddingsRequest::parse(&body)
            .map_err(|fields| ApiError::invalid_fields(ErrorCode::InvalidRequest, fields))?;
        let model = resolve_model(&state, request.model.take())?;
        request.model = Some(model.clone());
        Ok::<_, ApiError>(Prepared {
            endpoint: Endpoint::Embeddings,
            job_id: rbee_api::inference::new_job_id(),
            stream: false,
            body: forwarded(&request)?,
            max_tokens: 0,
            affinity: None,
            usage_chunk: false,
            model,
        })
    })();
    match prepared {
        Ok(prep) => proxy::run(state, ctx, prep).await,
        Err(e) => e.into_response(),
    }
}

async fn chat(
    State(state): State<AppState>,
    ctx: RequestContext,
    ApiJson(body): ApiJson<Value>,
) -> Response {
    match openai(&state, Route::Chat, body) {
        Ok(prep) => proxy::run(state, ctx, prep).await,
        Err(e) => e.into_response(),
    }
}

async fn completions(
    State(state): State<AppState>,
    ctx: RequestContext,
    ApiJson(body): ApiJson<Value>,
) -> Response {
    match openai(&state, Route::Completions, body) {
        Ok(prep) => proxy::run(state, ctx, prep).await,
        Err(e) => e.into_response(),
    }
}

/// `DELETE /v1/inference/{job_id}`: 204 whether or not the job exists
/// (idempotent); a malformed id is 400.
async fn cancel(State(state): State<AppState>, Path(job_id): Path<String>) -> Response {
    if !is_valid_id(&job_id, MAX_JOB_ID_BYTES) {
        return ApiError::invalid_fields(
            ErrorCode::InvalidRequest,
            vec![FieldError::new(
                "job_id",
                "format",
                format!("job_id must be 1 to {MAX_JOB_ID_BYTES} characters of A-Z a-z 0-9 . _ : -"),
            )],
        )
        .into_response();
    }
    if state.jobs.cancel(&job_id) {
        tracing::info!(%job_id, "job cancelled");
    }
    StatusCode::NO_CONTENT.into_response()
}

/// OpenAI's model list, with where each model is.
async fn models(State(state): State<AppState>) -> Json<ModelList> {
    let data = state
        .sched
        .models()
        .into_iter()
        .map(|(id, hives, ready)| Model {
            hives: Some(hives),
            workers_ready: Some(ready),
            ..Model::new(id)
        })
        .collect();
    Json(ModelList::new(data))
}

async fn register(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<HiveRegistration>,
) -> Result<Response, ApiError> {
    let mut bad = Vec::new();
    if let Err(e) = check_node_name(&body.node_name) {
        bad.push(e);
    }
    let url = normalize_url(&body.url).map_err(|e| bad.push(e)).ok();
    let Some(url) = url.filter(|_| bad.is_empty()) else {
        return Err(ApiError::invalid_fields(ErrorCode::InvalidRequest, bad));
    };
    let created = state
        .hives
        .register(&body.node_name, &url, "registered")
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(HiveRegistered {
            node_name: body.node_name,
            url,
            created,
        }),
    )
        .into_response())
}

async fn list_hives(State(state): State<AppState>) -> Json<HiveList> {
    Json(HiveList {
        hives: state.sched.hives(),
    })
}

async fn remove(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<HiveRemoval>,
) -> Result<Json<HiveRemoved>, ApiError> {
    check_node_name(&body.node_name)
        .map_err(|e| ApiError::invalid_fields(ErrorCode::InvalidRequest, vec![e]))?;
    if state.hives.remove(&body.node_name).await? {
        Ok(Json(HiveRemoved {
            node_name: body.node_name,
            removed: true,
        }))
    } else {
        Err(RouteError::NoSuchHive {
            node_name: body.node_name,
        }
        .into())
    }
}

async fn list_workers(State(state): State<AppState>) -> Json<FleetWorkers> {
    Json(FleetWorkers {
        workers: state.sched.workers(),
    })
}

/// Every worker on a reachable hive as a Prometheus HTTP service-discovery
/// target group, labelled with its hive too: one `http_sd_configs` entry
/// at the queen scrapes the whole fleet's workers.
async fn metrics_targets(State(state): State<AppState>) -> Json<Vec<ScrapeTargetGroup>> {
    Json(
        state
            .sched
            .workers()
            .into_iter()
            .filter(|w| w.hive_reachable)
            .filter_map(|w| {
                let mut group = w.info.scrape_target()?;
                group.labels.insert("hive".to_owned(), w.hive);
                Some(group)
            })
            .collect(),
    )
}

/// 200 when at least one hive answers and the queen is not draining.
async fn ready(State(state): State<AppState>, State(core): State<CoreState>) -> Response {
    let counts = state.sched.counts();
    let status = if core.is_draining() {
        ReadyStatus::Draining
    } else if counts.hives_reachable == 0 {
        ReadyStatus::NoReachableHive
    } else {
        ReadyStatus::Ready
    };
    let ok = status == ReadyStatus::Ready;
    let body = Json(QueenReady {
        status,
        hives_reachable: counts.hives_reachable,
        hives_unreachable: counts.hives_unreachable,
    });
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body).into_response()
}
