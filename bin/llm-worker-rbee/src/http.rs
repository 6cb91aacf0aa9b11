//! The worker's routes: inference (SSE and JSON), cancellation, readiness,
//! models, and the OpenAI-compatible routes ([`openai`]).

mod embeddings;
mod error;
pub(crate) mod openai;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::{Stream, StreamExt};
use parking_lot::Mutex;
use rbee_api::health::{ReadyStatus, WorkerReady};
use rbee_api::inference::{
    InferenceRequest, InferenceResponse, StreamEvent, TokenLogprob, ValidInferenceRequest,
};
use rbee_api::openai::answer::{Model, ModelList};
use rbee_api::worker::{WorkerReadiness, WorkerState};
use rbee_api::{ApiError, ErrorCode, FieldError, Outcome};
use rbee_http::{ApiJson, RequestContext, Routes};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::engine::sampler::SamplingParams;
use crate::engine::{Job, JobEvent};
use crate::AppState;
use error::{AdmitError, PromptBytes, PromptTokens};

/// The worker's own routes.
pub fn routes() -> Routes<AppState> {
    Routes::new()
        .post("/v1/inference", inference)
        .delete("/v1/inference/{job_id}", cancel)
        .get("/v1/ready", ready)
        .get("/health/ready", health_ready)
        .get("/v1/models", models)
        .post("/v1/chat/completions", openai::chat_completions)
        .post("/v1/completions", openai::completions)
        .post("/v1/embeddings", embeddings::embeddings)
}

/// Running jobs by id, for `DELETE`.
#[derive(Debug, Clone, Default)]
pub struct Jobs(Arc<Mutex<HashMap<String, CancellationToken>>>);

impl Jobs {
    fn lock(&self) -> parking_lot::MutexGuard<'_, HashMap<String, CancellationToken>> {
        self.0.lock()
    }

    /// Register `job_id`; false when it is already running.
    fn insert(&self, job_id: &str, cancel: CancellationToken) -> bool {
        let mut jobs = self.lock();
        if jobs.contains_key(job_id) {
            return false;
        }
        jobs.insert(job_id.to_owned(), cancel);
        true
    }

    fn cancel(&self, job_id: &str) {
        if let Some(token) = self.lock().get(job_id) {
            token.cancel();
        }
    }
}

/// Removes a job from [`Jobs`] and cancels it (if still running) when the
/// response that streams it is dropped: finished, or the client went away.
pub(crate) struct JobGuard {
    jobs: Jobs,
    job_id: String,
    _cancel: DropGuard,
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        self.jobs.lock().remove(&self.job_id);
    }
}

fn worker_state(state: &AppState) -> WorkerState {
    if state.core.is_draining() {
        WorkerState::Draining
    } else {
        match (state.model.get(), state.embedder.get()) {
            (Some(m), _) if m.engine.active() > 0 => WorkerState::Busy,
            (_, Some(e)) if e.active() > 0 => WorkerState::Busy,
            (Some(_), _) | (_, Some(_)) => WorkerState::Idle,
            (None, None) => WorkerState::Loading,
        }
    }
}

async fn ready(State(state): State<AppState>) -> Json<WorkerReadiness> {
    let s = worker_state(&state);
    Json(WorkerReadiness {
        ready: matches!(s, WorkerState::Idle | WorkerState::Busy) && stall(&state).is_none(),
        state: s,
        model_loaded: state.loaded(),
    })
}

/// `Some(how long)` while the stall watchdog ([`crate::watch_for_stalls`])
/// finds the engine with work and no token for the stall timeout.
fn stall(state: &AppState) -> Option<Duration> {
    if !state.stalled.load(std::sync::atomic::Ordering::Acquire) {
        return None;
    }
    state.model.get()?.engine.stalled_for()
}

async fn health_ready(State(state): State<AppState>) -> Response {
    let s = worker_state(&state);
    if let Some(stalled) = stall(&state) {
        return ApiError::from(AdmitError::Stalled {
            seconds: stalled.as_secs(),
        })
        .into_response();
    }
    match s {
        WorkerState::Idle | WorkerState::Busy => {
            let body = WorkerReady {
                status: ReadyStatus::Ready,
                state: s,
                capacity: state
                    .model
                    .get()
                    .map(|m| m.engine.capacity())
                    .or_else(|| state.embedder.get().map(|e| e.capacity())),
            };
            (StatusCode::OK, Json(body)).into_response()
        }
        WorkerState::Loading | WorkerState::Draining | WorkerState::Failed => {
            let status = if s == WorkerState::Loading {
                ReadyStatus::Loading
            } else {
                ReadyStatus::Draining
            };
            let body = WorkerReady {
                status,
                state: s,
                capacity: None,
            };
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

async fn models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList::new(vec![Model {
        ready: Some(state.loaded()),
        ..Model::new(state.model_ref.clone())
    }]))
}

async fn cancel(State(state): State<AppState>, Path(job_id): Path<String>) -> StatusCode {
    state.jobs.cancel(&job_id);
    StatusCode::NO_CONTENT
}

/// 503 `ALL_SLOTS_BUSY`.
/// The text-generating model, or why there is none: still loading, or
/// this worker's model makes embeddings.
pub(crate) fn generation_model(state: &AppState) -> Result<Arc<crate::Model>, AdmitError> {
    match (state.model.get(), state.embedder.get()) {
        (Some(model), _) => Ok(Arc::clone(model)),
        (None, Some(_)) => Err(AdmitError::NotGenerative),
        (None, None) => Err(AdmitError::Loading),
    }
}

pub(crate) fn all_slots_busy(model: &crate::Model) -> AdmitError {
    AdmitError::AllSlotsBusy {
        slots: model.engine.slots(),
    }
}

/// A validated, tokenized, admitted job and the receiving end of its events.
pub(crate) struct Admitted {
    pub(crate) job_id: String,
    pub(crate) events: UnboundedReceiver<JobEvent>,
    pub(crate) guard: JobGuard,
}

/// Validate, tokenize and hand a request to the engine. Refusals are
/// counted in `rbee_worker_requests_total` (`client_error`, `busy`, `error`)
/// once a model is loaded.
pub(crate) async fn admit(
    state: &AppState,
    ctx: &RequestContext,
    request: InferenceRequest,
) -> Result<(Admitted, ValidInferenceRequest), ApiError> {
    let result = admit_checked(state, ctx, request).await;
    if let (Err(e), Some(model)) = (&result, state.model.get()) {
        // Refusals for the worker's state, not the request's, are not counted.
        let outcome = match e.code() {
            ErrorCode::ShuttingDown | ErrorCode::ModelLoading => None,
            code => Some(Outcome::from(code)),
        };
        if let Some(outcome) = outcome {
            model.metrics.request_finished(outcome, 0.0);
        }
    }
    result
}

async fn admit_checked(
    state: &AppState,
    ctx: &RequestContext,
    request: InferenceRequest,
) -> Result<(Admitted, ValidInferenceRequest), ApiError> {
    if state.core.is_draining() {
        return Err(AdmitError::ShuttingDown.into());
    }
    let model = generation_model(state)?;
    // From here on the request is the validated one, read-only, down to
    // the job it becomes.
    let request = request.validate().map_err(AdmitError::Invalid)?;
    let job_id = request
        .job_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());

    // Everything that can refuse the request comes before the tokenizer:
    // a full worker, a job id in use, a prompt too long in bytes to fit.
    let Some(permit) = model.engine.try_reserve() else {
        return Err(all_slots_busy(&model).into());
    };
    let cancel = CancellationToken::new();
    if !state.jobs.insert(&job_id, cancel.clone()) {
        return Err(AdmitError::JobRunning { job_id }.into());
    }
    let guard = JobGuard {
        jobs: state.jobs.clone(),
        job_id: job_id.clone(),
        _cancel: cancel.clone().drop_guard(),
    };
    if request.prompt.len() > model.max_prompt_bytes {
        return Err(AdmitError::PromptBytes(PromptBytes {
            prompt_bytes: request.prompt.len(),
            max_prompt_bytes: model.max_prompt_bytes,
            context_length: model.context_length,
        })
        .into());
    }
    let prompt = request.prompt.clone();
    let constraint = request.constraint.clone();
    let tokenizer = Arc::clone(&model);
    let tokenizing = Instant::now();
    // The prompt's ids and the constraint's grammar, both CPU work, off
    // the runtime's threads.
    let (ids, grammar) = rbee_http::task::spawn_blocking(move || {
        let ids = tokenizer
            .tokenizer
            .encode(prompt.as_str(), false)
            .map(|e| e.get_ids().to_vec());
        let grammar = constraint.map(|c| match tokenizer.grammars() {
            Ok(grammars) => grammars.compile(&c).map_err(|e| e.to_string()),
            Err(why) => Err(why.to_owned()),
        });
        (ids, grammar.transpose())
    })
    .await
    .map_err(|_| AdmitError::TokenizerLost)?;
    let ids = ids.map_err(|e| AdmitError::Tokenize(e.to_string()))?;
    let grammar = grammar.map_err(|e| {
        AdmitError::Invalid(vec![FieldError::new(
            "response_format",
            "unsupported",
            format!("the output cannot be constrained as asked: {e}"),
        )])
    })?;
    tracing::debug!(
        bytes = request.prompt.len(),
        tokens = ids.len(),
        ms = tokenizing.elapsed().as_secs_f64() * 1e3,
        "prompt tokenized"
    );
    if ids.is_empty() || ids.len() >= model.context_length {
        return Err(AdmitError::PromptTokens(PromptTokens {
            prompt_tokens: ids.len(),
            context_length: model.context_length,
        })
        .into());
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let tokens_in = ids.len();
    let job = Job {
        job_id: job_id.clone(),
        prompt: ids,
        max_tokens: request.max_tokens,
        sampling: SamplingParams {
            temperature: request.temperature,
            top_k: request.top_k,
            top_p: request.top_p,
            min_p: request.min_p,
            repetition_penalty: request.repetition_penalty,
            seed: request.seed,
        },
        stop: request.stop.clone(),
        ignore_eos: request.ignore_eos,
        logprobs: request.logprobs,
        grammar,
        request_id: ctx.request_id.to_string(),
        deadline: ctx.deadline.map(|d| Instant::now() + d.remaining()),
        cancel,
        events: tx,
    };
    model
        .engine
        .submit(job, permit)
        .map_err(AdmitError::EngineDown)?;
    tracing::info!(%job_id, tokens_in, max_tokens = request.max_tokens, stream = request.stream, "inference admitted");
    Ok((
        Admitted {
            job_id,
            events: rx,
            guard,
        },
        request,
    ))
}

async fn inference(
    State(state): State<AppState>,
    ctx: RequestContext,
    ApiJson(request): ApiJson<InferenceRequest>,
) -> Result<Response, ApiError> {
    let (admitted, request) = admit(&state, &ctx, request).await?;
    if request.stream {
        let started = StreamEvent::Started {
            job_id: admitted.job_id.clone(),
            request_id: ctx.request_id.to_string(),
            model: state.model_ref.clone(),
            started_at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        };
        Ok(Sse::new(keep_alive(&state, sse_stream(started, admitted))).into_response())
    } else {
        collect(admitted).await.map(IntoResponse::into_response)
    }
}

/// `events`, with a comment whenever they have been quiet for the
/// keep-alive interval while the engine still finishes steps (a long
/// prompt's prefill, a request waiting for cache blocks): a client or proxy
/// that times out quiet streams sees a live one. A wedged engine finishes
/// no steps, so its streams go quiet and their callers' timeouts fire
/// (axum's own keep-alive would write comments for it forever).
pub(crate) fn keep_alive(
    state: &AppState,
    events: impl Stream<Item = Result<Event, Infallible>> + Send + 'static,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let every = state.keep_alive;
    let model = state.model.get().cloned();
    futures_util::stream::unfold(
        (Box::pin(events), model),
        move |(mut events, model)| async move {
            loop {
                match tokio::time::timeout(every, events.next()).await {
                    Ok(Some(event)) => return Some((event, (events, model))),
                    Ok(None) => return None,
                    Err(_) => {
                        let progressing = model
                            .as_ref()
                            .is_some_and(|m| m.engine.stalled_for().is_none_or(|d| d < every));
                        if progressing {
                            let comment = Event::default().comment("keep-alive");
                            return Some((Ok(comment), (events, model)));
                        }
                    }
                }
            }
        },
    )
}

fn sse_stream(
    started: StreamEvent,
    admitted: Admitted,
) -> impl Stream<Item = Result<Event, Infallible>> {
    enum Phase {
        Started(StreamEvent),
        Events,
        Done,
        Finished,
    }
    let state = (Phase::Started(started), admitted);
    futures_util::stream::unfold(state, |(phase, mut admitted)| async move {
        match phase {
            Phase::Started(event) => Some((Ok(json_event(&event)), (Phase::Events, admitted))),
            Phase::Events => {
                let event = admitted.events.recv().await.unwrap_or_else(engine_stopped);
                let next = if matches!(event, StreamEvent::Token { .. }) {
                    Phase::Events
                } else {
                    Phase::Done
                };
                Some((Ok(json_event(&event)), (next, admitted)))
            }
            Phase::Done => Some((
                Ok(Event::default().data(rbee_api::sse::DONE)),
                (Phase::Finished, admitted),
            )),
            Phase::Finished => {
                drop(admitted.guard);
                None
            }
        }
    })
}

fn json_event(event: &StreamEvent) -> Event {
    Event::default().data(serde_json::to_string(event).unwrap_or_else(|_| "{}".to_owned()))
}

/// How a job ended, for the non-streaming answers.
pub(crate) struct Collected {
    pub(crate) text: String,
    /// Per generated token, when asked for: its log-probability and where
    /// its text starts in `text` (bytes).
    pub(crate) logprobs: Vec<(TokenLogprob, usize)>,
    pub(crate) tokens_in: u32,
    pub(crate) tokens_out: u32,
    pub(crate) tokens_cached: u32,
    pub(crate) decode_time_ms: u64,
    pub(crate) stop_reason: rbee_api::inference::StopReason,
}

/// Wait for the job to end, gathering its text.
pub(crate) async fn collect_text(admitted: &mut Admitted) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    loop {
        match admitted.events.recv().await.unwrap_or_else(engine_stopped) {
            StreamEvent::Token { t, lp, .. } => {
                if let Some(lp) = lp {
                    logprobs.push((lp, text.len()));
                }
                text.push_str(&t);
            }
            StreamEvent::End {
                tokens_in,
                tokens_out,
                tokens_cached,
                decode_time_ms,
                stop_reason,
            } => {
                return Ok(Collected {
                    text,
                    logprobs,
                    tokens_in,
                    tokens_out,
                    tokens_cached,
                    decode_time_ms,
                    stop_reason,
                });
            }
            StreamEvent::Error { code, message } => return Err(ApiError::new(code, message)),
            StreamEvent::Started { .. } => {}
        }
    }
}

/// The event standing in for a job whose engine went away.
pub(crate) fn engine_stopped() -> StreamEvent {
    tracing::error!("the engine dropped a job");
    StreamEvent::Error {
        code: ErrorCode::Internal,
        message: "the engine stopped".to_owned(),
    }
}

async fn collect(mut admitted: Admitted) -> Result<Json<InferenceResponse>, ApiError> {
    let done = collect_text(&mut admitted).await?;
    Ok(Json(InferenceResponse {
        job_id: admitted.job_id,
        text: done.text,
        tokens_in: done.tokens_in,
        tokens_out: done.tokens_out,
        tokens_cached: done.tokens_cached,
        stop_reason: done.stop_reason,
        decode_time_ms: done.decode_time_ms,
        logprobs: done.logprobs.into_iter().map(|(lp, _)| lp).collect(),
    }))
}
