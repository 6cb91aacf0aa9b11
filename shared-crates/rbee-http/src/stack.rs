//! The layer stack every daemon's router gets.

use auth_min::{AuthLayer, AuthMetrics, Authenticator};
use axum::extract::DefaultBodyLimit;
use axum::Router;
use deadline_propagation::DeadlineLayer;
use prometheus_client::registry::Registry;
use tower_http::limit::RequestBodyLimitLayer;

use crate::metrics::HttpMetrics;

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
    pub fn apply(&self, router: Router) -> Router {
        // `Router::layer` wraps each route and the fallback; the last layer
        // added is the outermost.
        router
            .fallback(crate::errors::not_found)
            .layer(DefaultBodyLimit::max(self.body_limit))
            .layer(RequestBodyLimitLayer::new(self.body_limit))
            .layer(self.deadline.clone())
            .layer(self.auth.clone())
            .layer(axum::middleware::from_fn(crate::errors::json_errors))
            .layer(axum::middleware::from_fn_with_state(
                self.http_metrics.clone(),
                crate::metrics::middleware,
            ))
            .layer(axum::middleware::from_fn(crate::request_id::middleware))
    }
}
