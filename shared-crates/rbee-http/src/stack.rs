//! The layer stack every daemon's router gets.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use auth_min::{AuthLayer, AuthMetrics, Authenticator};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::response::{IntoResponse, Response};
use axum::Router;
use deadline_propagation::DeadlineLayer;
use futures_util::future::{ready, Either, Ready};
use http::header;
use prometheus_client::registry::Registry;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::metrics::HttpMetrics;
use crate::request_id::X_REQUEST_ID;

/// Default request body limit: 1 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;

/// The shared layers, configured once per daemon.
#[derive(Debug, Clone)]
pub struct HttpStack {
    auth: AuthLayer,
    http_metrics: HttpMetrics,
    body_limit: usize,
    deadline: DeadlineLayer,
}

impl HttpStack {
    /// Register the stack's metrics (`<metric_prefix>_requests_total`,
    /// `<metric_prefix>_request_duration_seconds`, `rbee_auth_failures_total`)
    /// and guard routes with `authenticator`.
    pub fn new(registry: &mut Registry, metric_prefix: &str, authenticator: Authenticator) -> Self {
        Self {
            auth: AuthLayer::new(authenticator, AuthMetrics::register(registry)),
            http_metrics: HttpMetrics::register(registry, metric_prefix),
            body_limit: DEFAULT_BODY_LIMIT,
            deadline: DeadlineLayer::new(),
        }
    }

    /// Report every authentication decision to `observer` (the audit trail).
    pub fn with_auth_observer(
        mut self,
        observer: std::sync::Arc<dyn auth_min::AuthObserver>,
    ) -> Self {
        self.auth = self.auth.with_observer(observer);
        self
    }

    /// Change the body limit (default [`DEFAULT_BODY_LIMIT`]).
    pub fn with_body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// Give requests without deadline headers this deadline (the queen's
    /// default); the caller keeps a clone to change it while serving.
    pub fn with_default_deadline(mut self, default: deadline_propagation::DefaultDeadline) -> Self {
        self.deadline = DeadlineLayer::with_shared_default(default);
        self
    }

    /// Shorten deadlines further away than `max` to it (the queen's
    /// `--max-deadline-ms`); the caller keeps a clone to change it while
    /// serving. Set after [`with_default_deadline`](Self::with_default_deadline).
    pub fn with_max_deadline(mut self, max: deadline_propagation::MaxDeadline) -> Self {
        self.deadline = self.deadline.max(max);
        self
    }

    /// Call `f` for each request refused because its deadline had passed
    /// on arrival. Set after [`with_default_deadline`](Self::with_default_deadline).
    pub fn on_deadline_expired(mut self, f: deadline_propagation::OnExpired) -> Self {
        self.deadline = self.deadline.on_expired(f);
        self
    }

    /// The HTTP metrics, for tests and for daemons that read them.
    pub fn http_metrics(&self) -> &HttpMetrics {
        &self.http_metrics
    }

    /// Wrap `router` (state already applied) in the whole stack, with the
    /// JSON 404 fallback.
    ///
    /// The layers are composed into one before they reach the router:
    /// `Router::layer` boxes each layer it is given around every route, so
    /// seven layers added one by one cost seven boxed services and futures
    /// per request, where one composed stack costs one.
    pub fn apply(&self, router: Router) -> Router {
        let stack = tower::ServiceBuilder::new()
            .layer(EdgeLayer {
                metrics: self.http_metrics.clone(),
            })
            .layer(self.auth.clone())
            .layer(self.deadline.clone())
            .layer(BodyLimitLayer(self.body_limit))
            .layer(DefaultBodyLimit::max(self.body_limit));
        router.fallback(crate::errors::not_found).layer(stack)
    }
}

/// The outermost layer, in one service: the request id (taken or minted,
/// echoed, carried by the request's span, one access line), the HTTP
/// metrics, and the JSON envelope for any error answered in another shape.
#[derive(Debug, Clone)]
struct EdgeLayer {
    metrics: HttpMetrics,
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Debug, Clone)]
struct Edge<S> {
    inner: S,
    metrics: HttpMetrics,
}

impl<S> Service<Request> for Edge<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let started = Instant::now();
        let (id, echo) = crate::request_id::assign(&mut request);
        let route = request.extensions().get::<MatchedPath>().cloned();
        let method = request.method().clone();
        let uri = request.uri().clone();
        let span = tracing::info_span!("request", request_id = %id, %method, path = %uri.path());
        let inner = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let response = match inner.instrument(span.clone()).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            let path = uri.path();
            let mut response = crate::errors::to_envelope(&method, path, response).await;
            let status = response.status().as_u16();
            let elapsed = started.elapsed();
            metrics.observe(
                route.as_ref().map_or("unmatched", MatchedPath::as_str),
                status,
                elapsed.as_secs_f64(),
            );
            response.headers_mut().insert(X_REQUEST_ID, echo);
            let _entered = span.enter();
            let latency_ms = elapsed.as_secs_f64() * 1e3;
            if auth_min::PUBLIC_PATHS.contains(&path) {
                tracing::debug!(status, latency_ms, "request finished");
            } else {
                tracing::info!(status, latency_ms, "request finished");
            }
            Ok(response)
        })
    }
}

/// Refuses a request that declares a body longer than the limit before a
/// byte of it is read. Bodies without a length are bounded while they are
/// read (`DefaultBodyLimit`, inside).
#[derive(Debug, Clone, Copy)]
struct BodyLimitLayer(usize);

impl<S> Layer<S> for BodyLimitLayer {
    type Service = BodyLimit<S>;

    fn layer(&self, inner: S) -> BodyLimit<S> {
        BodyLimit {
            inner,
            limit: self.0,
        }
    }
}

#[derive(Debug, Clone)]
struct BodyLimit<S> {
    inner: S,
    limit: usize,
}

impl<S> Service<Request> for BodyLimit<S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.limit as u64) {
            return Either::Left(ready(
                Ok(crate::errors::payload_too_large().into_response()),
            ));
        }
        Either::Right(self.inner.call(request))
    }
}
