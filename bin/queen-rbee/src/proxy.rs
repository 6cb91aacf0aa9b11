//! One inference request through the queen: admission, the wait for a
//! worker, the call to it, and the relay of its answer.
//!
//! Streams are relayed event by event as the worker writes them; nothing
//! waits for the whole answer. The worker's `started` event is held back
//! until the first token so that a worker failing before its first token
//! can be replaced once, invisibly; after a token has reached the client a
//! failure ends the stream with an `error` event (`WORKER_FAILED`), never a
//! retry and never a hang. A client that goes away, or a
//! `DELETE /v1/inference/{job_id}`, drops the call to the worker, which
//! stops generating at its next step.

mod error;
mod events;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use audit_logging::AuditEvent;
use auth_min::send_authenticated;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use parking_lot::Mutex;
use rbee_api::sse::{self, Dialect, Endpoint};
use rbee_api::{ApiError, Coded, Outcome};
use rbee_http::RequestContext;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics::Stage;
use crate::sched::{Lease, Ticket};
use crate::upstream::{Exchange, Head, Outgoing};
use crate::AppState;
use error::{RelayError, WorkerFault};
use events::{usage_of, SseState};

/// The response header naming the queen's job id (for `DELETE`).
pub const X_JOB_ID: &str = "x-job-id";

/// Time past the deadline the queen gives a worker to report the deadline
/// itself before the queen ends the call.
const DEADLINE_GRACE: Duration = Duration::from_millis(500);

/// The longest non-streaming answer taken from a worker: far above the
/// text of a whole context window, and a bound on what a faulty worker
/// can make the queen hold.
pub const MAX_ANSWER_BYTES: usize = 16 << 20;

/// The longest refusal (a 4xx answer) taken from a worker.
const MAX_REFUSAL_BYTES: usize = 1 << 20;

/// The longest single SSE event taken from a worker: an event is held
/// until its end arrives, so this bounds what one can make the queen hold.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// A checked request, ready to route.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The worker route: the one the client called.
    pub endpoint: Endpoint,
    /// The model ref.
    pub model: String,
    /// The queen's job id.
    pub job_id: String,
    /// SSE or one JSON answer.
    pub stream: bool,
    /// The body to forward, serialized once.
    pub body: Bytes,
    /// For the audit trail.
    pub max_tokens: u32,
    /// The conversation the request continues (a key made from the start
    /// of its prompt), for routing it to the worker that holds its earlier
    /// turns in its KV cache.
    pub affinity: Option<u64>,
    /// An OpenAI stream: the client asked for the chunk that carries
    /// `usage` (`stream_options.include_usage`). The queen always asks the
    /// worker for it, for its token counts, and drops it when the client
    /// did not ask.
    pub usage_chunk: bool,
}

/// Running and queued jobs by id, for `DELETE /v1/inference/{job_id}`.
#[derive(Debug, Clone, Default)]
pub struct Jobs {
    map: Arc<Mutex<HashMap<String, CancellationToken, ahash::RandomState>>>,
}

/// Removes its job from [`Jobs`] when the request ends.
#[derive(Debug)]
pub struct JobGuard {
    jobs: Jobs,
    job_id: String,
    /// Cancelled by `DELETE`.
    pub cancel: CancellationToken,
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        self.jobs.lock().remove(&self.job_id);
    }
}

impl Jobs {
    fn lock(
        &self,
    ) -> parking_lot::MutexGuard<'_, HashMap<String, CancellationToken, ahash::RandomState>> {
        self.map.lock()
    }

    /// Register `job_id`; `CONFLICT` when it is already running.
    pub fn insert(&self, job_id: &str) -> Result<JobGuard, RelayError> {
        let mut map = self.lock();
        if map.contains_key(job_id) {
            return Err(RelayError::JobRunning {
                job_id: job_id.to_owned(),
            });
        }
        let cancel = CancellationToken::new();
        map.insert(job_id.to_owned(), cancel.clone());
        Ok(JobGuard {
            jobs: self.clone(),
            job_id: job_id.to_owned(),
            cancel,
        })
    }

    /// Cancel `job_id` wherever it is; unknown ids are ignored.
    pub fn cancel(&self, job_id: &str) -> bool {
        match self.lock().get(job_id) {
            Some(token) => {
                token.cancel();
                true
            }
            None => false,
        }
    }
}

/// Accounting for one admitted request, done once.
struct Finish {
    state: AppState,
    model: String,
    job_id: String,
    request_id: String,
    arrived: Instant,
    done: bool,
}

impl Finish {
    fn record(&mut self, outcome: Outcome, tokens_in: u32, tokens_out: u32) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let elapsed = self.arrived.elapsed();
        self.state
            .metrics
            .finished(&self.model, outcome, elapsed.as_secs_f64());
        self.state
            .audit
            .emit_with(Some(&self.request_id), || AuditEvent::InferenceFinished {
                job_id: self.job_id.clone(),
                model: self.model.clone(),
                tokens_in,
                tokens_out,
                outcome,
                duration_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            });
        tracing::info!(job_id = %self.job_id, model = %self.model, outcome = outcome.as_str(), tokens_in, tokens_out, duration_ms = elapsed.as_millis() as u64, "inference finished");
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        // A request whose future was dropped (the client left) ends here.
        self.record(Outcome::Cancelled, 0, 0);
    }
}

/// Route `prep` and answer the client.
pub async fn run(state: AppState, ctx: RequestContext, prep: Prepared) -> Response {
    let arrived = Instant::now();
    let request_id = ctx.request_id.as_str().to_owned();
    let reject = |e: RelayError| {
        state
            .audit
            .emit_with(Some(&request_id), || AuditEvent::InferenceRejected {
                job_id: Some(prep.job_id.clone()),
                model: Some(prep.model.clone()),
                code: e.code(),
            });
        // A model no hive knows is counted under one label value: each
        // client-chosen name would otherwise add its series for good.
        let label =
            if e.code() == rbee_api::ErrorCode::ModelNotFound || !state.sched.knows(&prep.model) {
                crate::metrics::UNKNOWN_MODEL
            } else {
                prep.model.as_str()
            };
        state.metrics.finished(
            label,
            Outcome::from(e.code()),
            arrived.elapsed().as_secs_f64(),
        );
        ApiError::from(e).into_response()
    };
    if state.core.is_draining() {
        return reject(RelayError::ShuttingDown);
    }
    let guard = match state.jobs.insert(&prep.job_id) {
        Ok(g) => g,
        Err(e) => return reject(e),
    };
    let ticket = match state
        .sched
        .admit_for(&prep.model, &request_id, prep.affinity)
    {
        Ok(t) => t,
        Err(e) => return reject(e.into()),
    };
    state
        .audit
        .emit_with(Some(&request_id), || AuditEvent::InferenceAdmitted {
            job_id: prep.job_id.clone(),
            model: prep.model.clone(),
            max_tokens: prep.max_tokens,
        });
    let finish = Finish {
        state: state.clone(),
        model: prep.model.clone(),
        job_id: prep.job_id.clone(),
        request_id,
        arrived,
        done: false,
    };
    let deadline = ctx
        .deadline
        .as_ref()
        .map(|d| tokio::time::Instant::now() + d.remaining());
    let mut headers = HeaderMap::new();
    ctx.forward_headers(&mut headers);
    if let Some(bearer) = state.auth.bearer() {
        headers.insert(header::AUTHORIZATION, bearer);
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let outgoing = Outgoing {
        method: Method::POST,
        path: http::Uri::from_static(prep.endpoint.path()),
        headers,
        body: prep.body.clone(),
        streaming: prep.stream,
    };
    let call = Call {
        state,
        outgoing,
        prep,
        guard,
        finish,
        deadline,
        arrived,
    };
    call.go(ticket).await
}

struct Call {
    state: AppState,
    /// The request as the worker gets it.
    outgoing: Outgoing,
    prep: Prepared,
    guard: JobGuard,
    finish: Finish,
    deadline: Option<tokio::time::Instant>,
    arrived: Instant,
}

/// A worker's answer: its head, and its body still to read.
type Answer = (Head, Exchange);

/// How a call to a worker went, before any of its answer reached the client.
enum Sent {
    /// 2xx: relay it.
    Ok(Answer),
    /// The worker cannot take it now (503): queue again.
    Busy,
    /// The worker refused the request itself (4xx): pass it on.
    Refused(Answer),
    /// The worker failed or could not be reached.
    Failed(WorkerFault),
    /// The deadline ran out.
    Expired,
    /// The client or a `DELETE` cancelled it.
    Cancelled,
}

impl Call {
    fn expired_now(&self) -> bool {
        self.deadline
            .is_some_and(|d| tokio::time::Instant::now() >= d)
    }

    async fn wait_deadline(deadline: Option<tokio::time::Instant>) {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    }

    /// Wait in the queue for a lease.
    async fn lease(&mut self, mut ticket: Ticket) -> Result<Lease, RelayError> {
        let cancel = self.guard.cancel.clone();
        let deadline = self.deadline;
        let result = tokio::select! {
            grant = ticket.wait() => grant.map_err(RelayError::from),
            () = Self::wait_deadline(deadline) => {
                self.state.metrics.deadline_exceeded(Stage::Queued);
                Err(RelayError::QueuedPastDeadline)
            }
            () = cancel.cancelled() => Err(RelayError::QueuedCancelled),
        };
        self.state
            .metrics
            .queued(&self.prep.model, ticket.queued_at.elapsed().as_secs_f64());
        result
    }

    fn fail(&mut self, e: impl Into<RelayError>) -> Response {
        let e = e.into();
        self.finish.record(Outcome::from(e.code()), 0, 0);
        ApiError::from(e).into_response()
    }

    async fn go(mut self, ticket: Ticket) -> Response {
        let mut lease = match self.lease(ticket).await {
            Ok(l) => l,
            Err(e) => return self.fail(e),
        };
        let mut retried = false;
        loop {
            match self.send(&lease).await {
                Sent::Ok(response) => {
                    return if self.prep.stream {
                        self.stream(lease, response.1, retried).await
                    } else {
                        self.whole(lease, response, &mut retried).await
                    };
                }
                Sent::Busy => {
                    lease.busy();
                    let ticket = match self.state.sched.requeue(
                        &self.prep.model,
                        &self.finish.request_id,
                        self.prep.affinity,
                    ) {
                        Ok(t) => t,
                        Err(e) => return self.fail(e),
                    };
                    lease = match self.lease(ticket).await {
                        Ok(l) => l,
                        Err(e) => return self.fail(e),
                    };
                }
                Sent::Refused(response) => {
                    self.finish.record(Outcome::ClientError, 0, 0);
                    return passthrough(response, self.deadline).await;
                }
                Sent::Failed(why) => {
                    let key = lease.key().to_owned();
                    tracing::warn!(worker = %key, error = %rbee_api::error::chain(&why), "worker failed before answering");
                    lease.failed();
                    match self.retry(&key, &mut retried) {
                        Some(next) => lease = next,
                        None => return self.fail(RelayError::WorkerFailed(why)),
                    }
                }
                Sent::Expired => {
                    self.state.metrics.deadline_exceeded(Stage::Streaming);
                    return self.fail(RelayError::PastDeadline);
                }
                Sent::Cancelled => {
                    cancel_on_worker(&self.state, &lease, &self.prep);
                    return self.fail(RelayError::Cancelled);
                }
            }
        }
    }

    fn retry(&self, failed: &str, retried: &mut bool) -> Option<Lease> {
        if std::mem::replace(retried, true) {
            return None;
        }
        let next = self.state.sched.try_other(&self.prep.model, failed)?;
        tracing::info!(worker = %next.key(), "retrying once on another worker");
        Some(next)
    }

    async fn send(&self, lease: &Lease) -> Sent {
        let refused_token = |sent: &Sent| matches!(sent, Sent::Refused(a) if a.0.status == StatusCode::UNAUTHORIZED);
        let mut sent = self.send_as(lease, &self.outgoing).await;
        // The worker refused our token: during a rotation's grace window it
        // may not have reloaded yet, so it still knows only the previous one.
        if refused_token(&sent) {
            if let Some(previous) = self.state.auth.previous_bearer() {
                let mut again = self.outgoing.clone();
                again.headers.insert(header::AUTHORIZATION, previous);
                sent = self.send_as(lease, &again).await;
            }
        }
        // The client's token was good (the queen checked it); a worker that
        // refuses the queen's is a fault between daemons, not the client's.
        if refused_token(&sent) {
            return Sent::Failed(WorkerFault::RefusedToken);
        }
        sent
    }

    async fn send_as(&self, lease: &Lease, outgoing: &Outgoing) -> Sent {
        let call = self.state.upstream.send(&lease.url, outgoing);
        let cancel = self.guard.cancel.clone();
        let limit = async {
            match self.deadline {
                Some(d) => tokio::time::sleep_until(d + DEADLINE_GRACE).await,
                None => std::future::pending().await,
            }
        };
        let result = tokio::select! {
            r = call => r,
            () = cancel.cancelled() => return Sent::Cancelled,
            () = limit => return Sent::Expired,
        };
        match result {
            Ok(r) if r.0.status.is_success() => Sent::Ok(r),
            Ok(r) if r.0.status == StatusCode::SERVICE_UNAVAILABLE => Sent::Busy,
            Ok(r) if r.0.status == StatusCode::GATEWAY_TIMEOUT || self.expired_now() => {
                Sent::Expired
            }
            Ok(r) if r.0.status.is_client_error() => Sent::Refused(r),
            Ok(r) => Sent::Failed(WorkerFault::Status(r.0.status.as_u16())),
            Err(_) if self.expired_now() => Sent::Expired,
            Err(e) => Sent::Failed(e.into()),
        }
    }

    /// A non-streaming answer: read it whole, then pass it on.
    async fn whole(mut self, mut lease: Lease, first: Answer, retried: &mut bool) -> Response {
        let (mut head, mut exchange) = first;
        loop {
            let status = head.status;
            let cancel = self.guard.cancel.clone();
            let limit = async {
                match self.deadline {
                    Some(d) => tokio::time::sleep_until(d + DEADLINE_GRACE).await,
                    None => std::future::pending().await,
                }
            };
            let body = tokio::select! {
                b = exchange.bytes(MAX_ANSWER_BYTES) => b,
                () = limit => Err(crate::upstream::UpstreamError::DeadlinePassed),
                () = cancel.cancelled() => {
                    cancel_on_worker(&self.state, &lease, &self.prep);
                    return self.fail(RelayError::Cancelled);
                }
            };
            match body {
                Ok(bytes) => {
                    let (tin, tout) = usage_of(&bytes);
                    self.finish.record(Outcome::Ok, tin, tout);
                    return json_response(status, bytes, &self.prep.job_id);
                }
                Err(_) if self.expired_now() => {
                    self.state.metrics.deadline_exceeded(Stage::Streaming);
                    return self.fail(RelayError::PastDeadline);
                }
                Err(e) => {
                    let key = lease.key().to_owned();
                    lease.failed();
                    let Some(next) = self.retry(&key, retried) else {
                        return self.fail(RelayError::MidAnswer(e));
                    };
                    lease = next;
                    match self.send(&lease).await {
                        Sent::Ok(r) => (head, exchange) = r,
                        _ => return self.fail(RelayError::RetryFailed),
                    }
                }
            }
        }
    }

    /// Relay an SSE answer: the client's body pulls from the worker's, so
    /// each batch of events is written as soon as it arrives, and a client
    /// that goes away drops the call to the worker with the body.
    ///
    /// The response goes out with the first batch (the `started` event and
    /// the first token, or an error), so that its head and first events are
    /// one write.
    async fn stream(self, lease: Lease, upstream: Exchange, retried: bool) -> Response {
        let job_id = self.prep.job_id.clone();
        let deadline = self
            .deadline
            .map(|d| Box::pin(tokio::time::sleep_until(d + DEADLINE_GRACE)));
        let sse = SseState::new(!self.prep.usage_chunk);
        let mut relay = Relay {
            dialect: self.prep.endpoint.dialect(),
            call: self,
            lease,
            upstream,
            retried,
            sse,
            deadline,
            finished: false,
            span: tracing::Span::current(),
        };
        let span = relay.span.clone();
        let first = relay.next().instrument(span).await;
        let rest = futures_util::stream::unfold(relay, |mut relay| async move {
            let span = relay.span.clone();
            relay
                .next()
                .instrument(span)
                .await
                .map(|b| (Ok::<_, Infallible>(b), relay))
        });
        let body = futures_util::StreamExt::chain(
            futures_util::stream::iter(first.map(Ok::<_, Infallible>)),
            rest,
        );
        let mut response = Response::new(Body::from_stream(body));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        if let Ok(v) = HeaderValue::from_str(&job_id) {
            headers.insert(X_JOB_ID, v);
        }
        response
    }
}

/// One stream being relayed.
struct Relay {
    call: Call,
    lease: Lease,
    upstream: Exchange,
    retried: bool,
    sse: SseState,
    dialect: Dialect,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    finished: bool,
    span: tracing::Span,
}

impl Relay {
    /// End the stream with an `error` event and `[DONE]`.
    fn end_with(&mut self, e: RelayError) -> Option<Bytes> {
        self.finished = true;
        let code = e.code();
        self.call
            .finish
            .record(Outcome::from(code), self.sse.tokens_in, self.sse.tokens_out);
        let mut out = Vec::new();
        let message = rbee_api::error::chain(&e);
        sse::frame(&sse::error_data(self.dialect, code, &message), &mut out);
        sse::frame(sse::DONE, &mut out);
        Some(Bytes::from(out))
    }

    /// The next bytes for the client: every complete event the worker has
    /// sent since the last call, in one write; `None` once the stream is over.
    async fn next(&mut self) -> Option<Bytes> {
        if self.finished {
            return None;
        }
        loop {
            let chunk = {
                let cancel = self.call.guard.cancel.cancelled();
                let deadline = async {
                    match self.deadline.as_mut() {
                        Some(d) => d.as_mut().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = cancel => {
                        cancel_on_worker(&self.call.state, &self.lease, &self.call.prep);
                        return self.end_with(RelayError::Cancelled);
                    }
                    () = deadline => Err(WorkerFault::Deadline),
                    c = self.upstream.chunk() => c.map_err(WorkerFault::from),
                }
            };
            let failure = match chunk {
                Ok(Some(bytes))
                    if self.sse.buf.len() + bytes.len() > MAX_EVENT_BYTES
                        && self.sse.unfinished_after(&bytes) > MAX_EVENT_BYTES =>
                {
                    WorkerFault::EventTooLong(MAX_EVENT_BYTES)
                }
                Ok(Some(bytes)) => {
                    let mut out = Vec::with_capacity(bytes.len() + self.sse.held.len());
                    if self.sse.feed(&bytes, self.dialect, &mut out) {
                        self.call.state.metrics.first_token(
                            &self.call.prep.model,
                            self.call.arrived.elapsed().as_secs_f64(),
                        );
                    }
                    if self.sse.done {
                        self.finished = true;
                        if self.sse.outcome == Outcome::DeadlineExceeded {
                            self.call.state.metrics.deadline_exceeded(Stage::Streaming);
                        }
                        self.call.finish.record(
                            self.sse.outcome,
                            self.sse.tokens_in,
                            self.sse.tokens_out,
                        );
                    }
                    if !out.is_empty() {
                        return Some(Bytes::from(out));
                    }
                    if self.finished {
                        return None;
                    }
                    continue;
                }
                Ok(None) => WorkerFault::EndedEarly,
                Err(e) => e,
            };
            // The worker failed, timed out, or went away.
            if self.call.expired_now() {
                self.call.state.metrics.deadline_exceeded(Stage::Streaming);
                return self.end_with(RelayError::PastDeadline);
            }
            let key = self.lease.key().to_owned();
            tracing::warn!(worker = %key, error = %rbee_api::error::chain(&failure), tokens_relayed = self.sse.relayed_tokens, "worker failed mid-stream");
            if !self.sse.started_relay {
                if let Some(next) = self.call.retry(&key, &mut self.retried) {
                    let failed = std::mem::replace(&mut self.lease, next);
                    failed.failed();
                    if let Sent::Ok(r) = self.call.send(&self.lease).await {
                        self.upstream = r.1;
                        self.sse = SseState::new(!self.call.prep.usage_chunk);
                        continue;
                    }
                }
            }
            // Pass the failed worker over; the placeholder lease holds nothing.
            self.lease.mark_failed();
            return self.end_with(RelayError::StreamFailed);
        }
    }
}

/// Tell the worker to stop `prep`'s job (native jobs carry the queen's id;
/// OpenAI calls stop when their connection is dropped).
fn cancel_on_worker(state: &AppState, lease: &Lease, prep: &Prepared) {
    if prep.endpoint != Endpoint::Native {
        return;
    }
    let request = state
        .client
        .delete(format!("{}/v1/inference/{}", lease.url, prep.job_id))
        .timeout(Duration::from_secs(5));
    let auth = state.auth.clone();
    rbee_http::task::spawn(async move {
        let _ = send_authenticated(request, &auth).await;
    });
}

fn json_response(status: StatusCode, body: Bytes, job_id: &str) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(job_id) {
        headers.insert(X_JOB_ID, v);
    }
    response
}

/// A worker's own refusal (4xx), passed on unchanged.
async fn passthrough(
    (head, mut exchange): Answer,
    deadline: Option<tokio::time::Instant>,
) -> Response {
    let limit = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d + DEADLINE_GRACE).await,
            None => std::future::pending().await,
        }
    };
    let body = tokio::select! {
        b = exchange.bytes(MAX_REFUSAL_BYTES) => b,
        () = limit => Err(crate::upstream::UpstreamError::DeadlinePassed),
    };
    match body {
        Ok(body) => {
            let mut out = Response::new(Body::from(body));
            *out.status_mut() = head.status;
            out.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if let Some(v) = head.headers.get(header::RETRY_AFTER) {
                out.headers_mut().insert(header::RETRY_AFTER, v.clone());
            }
            out
        }
        Err(e) => ApiError::from(RelayError::RefusalUnread(e)).into_response(),
    }
}
