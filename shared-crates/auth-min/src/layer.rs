//! The tower layer that guards every route but the public probes.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::ConnectInfo;

use axum::response::{IntoResponse, Response};
use futures_util::future::{Either, Ready};
use http::{header, HeaderValue, Request};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rbee_api::ApiError;
use tower::{Layer, Service};

use crate::authenticator::{AuthFailure, Authenticator};
use crate::fingerprint::Fingerprint;

/// Paths that never require a token: probes and metrics.
pub const PUBLIC_PATHS: [&str; 5] = [
    "/health",
    "/v1/health",
    "/health/live",
    "/health/ready",
    "/metrics",
];

/// Put into the request's extensions once it passed the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// Fingerprint of the accepted token; `None` in open mode or on a public path.
    pub fingerprint: Option<Fingerprint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// `rbee_auth_failures_total{reason}`.
#[derive(Debug, Clone, Default)]
pub struct AuthMetrics {
    failures: Family<ReasonLabel, Counter>,
}

impl AuthMetrics {
    /// Register the counter in `registry` (the daemon's, never a global).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "rbee_auth_failures",
            "Requests refused for a missing or invalid API token",
            metrics.failures.clone(),
        );
        // Both series exist from the start, so rate() works before the first failure.
        for reason in ["missing", "invalid"] {
            let _ = metrics.failures.get_or_create(&ReasonLabel { reason });
        }
        metrics
    }

    /// Current count for `reason` (`missing` or `invalid`).
    pub fn failures(&self, reason: &'static str) -> u64 {
        self.failures.get_or_create(&ReasonLabel { reason }).get()
    }
}

/// What the layer decided about one request on a protected path.
#[derive(Debug)]
pub struct AuthDecision<'a> {
    /// Fingerprint of the accepted token, or of the rejected one when it could be read.
    pub fingerprint: Option<&'a Fingerprint>,
    /// `None` when accepted, else why it was refused.
    pub failure: Option<crate::AuthFailureKind>,
    /// Request method.
    pub method: &'a http::Method,
    /// Request path (never the query string).
    pub path: &'a str,
    /// The peer's address, when the server records it.
    pub peer_ip: Option<IpAddr>,
    /// The request's `X-Request-Id`, when it has one.
    pub request_id: Option<&'a str>,
}

/// Told about every authentication decision on a protected path (the
/// audit trail). Not called for public paths or in open mode. Must not block.
pub trait AuthObserver: Send + Sync + std::fmt::Debug + 'static {
    /// One decision.
    fn observe(&self, decision: &AuthDecision<'_>);
}

/// Requires a valid bearer token on every path except [`PUBLIC_PATHS`].
#[derive(Debug, Clone)]
pub struct AuthLayer {
    authenticator: Authenticator,
    metrics: AuthMetrics,
    observer: Option<Arc<dyn AuthObserver>>,
}

impl AuthLayer {
    /// A layer checking against `authenticator`, counting failures in `metrics`.
    pub fn new(authenticator: Authenticator, metrics: AuthMetrics) -> Self {
        Self {
            authenticator,
            metrics,
            observer: None,
        }
    }

    /// Report every decision on a protected path to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn AuthObserver>) -> Self {
        self.observer = Some(observer);
        self
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            authenticator: self.authenticator.clone(),
            metrics: self.metrics.clone(),
            observer: self.observer.clone(),
        }
    }
}

/// The service made by [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    authenticator: Authenticator,
    metrics: AuthMetrics,
    observer: Option<Arc<dyn AuthObserver>>,
}

impl<S> AuthService<S> {
    fn tell<B>(
        &self,
        request: &Request<B>,
        fingerprint: Option<&Fingerprint>,
        failure: Option<crate::AuthFailureKind>,
    ) {
        if let Some(observer) = &self.observer {
            observer.observe(&AuthDecision {
                fingerprint,
                failure,
                method: request.method(),
                path: request.uri().path(),
                peer_ip: request
                    .extensions()
                    .get::<ConnectInfo<SocketAddr>>()
                    .map(|info| info.0.ip()),
                request_id: request
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok()),
            });
        }
    }
}

impl<S, B> Service<Request<B>> for AuthService<S>
where
    S: Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if PUBLIC_PATHS.contains(&request.uri().path()) {
            request
                .extensions_mut()
                .insert(Authenticated { fingerprint: None });
            return Either::Right(self.inner.call(request));
        }
        match self
            .authenticator
            .verify(request.headers().get(header::AUTHORIZATION))
        {
            Ok(fingerprint) => {
                if let Some(fp) = &fingerprint {
                    tracing::debug!(token_fp = %fp, "authenticated");
                    self.tell(&request, Some(fp), None);
                }
                request
                    .extensions_mut()
                    .insert(Authenticated { fingerprint });
                Either::Right(self.inner.call(request))
            }
            Err(failure) => {
                self.metrics
                    .failures
                    .get_or_create(&ReasonLabel {
                        reason: failure.metric_reason(),
                    })
                    .inc();
                self.tell(&request, failure.fingerprint(), Some(failure.kind()));
                let fp = failure.fingerprint().map(ToString::to_string);
                tracing::warn!(
                    reason = failure.metric_reason(),
                    token_fp = fp.as_deref(),
                    method = %request.method(),
                    path = request.uri().path(),
                    "authentication failed: {failure}"
                );
                Either::Left(futures_util::future::ready(Ok(unauthorized(&failure))))
            }
        }
    }
}

fn unauthorized(failure: &AuthFailure) -> Response {
    let message = match failure {
        AuthFailure::Malformed(crate::BearerError::Missing) => {
            "missing API key: send `Authorization: Bearer <token>`".to_owned()
        }
        other => other.to_string(),
    };
    ApiError::new(failure.code(), message)
        .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::ApiToken;
    use axum::body::Body;
    use http::StatusCode;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    const TOKEN: &str = "layer-test-token-0123456789";

    fn service(
        auth: Authenticator,
        metrics: AuthMetrics,
    ) -> impl Service<Request<Body>, Response = Response, Error = std::convert::Infallible> + Clone
    {
        AuthLayer::new(auth, metrics).layer(tower::service_fn(|req: Request<Body>| async move {
            let who = req.extensions().get::<Authenticated>().cloned();
            let body = format!(
                "{:?}",
                who.and_then(|a| a.fingerprint).map(|f| f.to_string())
            );
            Ok::<_, std::convert::Infallible>(body.into_response())
        }))
    }

    async fn call(
        svc: impl Service<Request<Body>, Response = Response, Error = std::convert::Infallible>,
        path: &str,
        auth: Option<&str>,
    ) -> (StatusCode, http::HeaderMap, String) {
        let mut builder = Request::get(path);
        if let Some(a) = auth {
            builder = builder.header(header::AUTHORIZATION, a);
        }
        let response = svc
            .oneshot(builder.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8(body.to_vec()).unwrap())
    }

    fn protected() -> (Authenticator, AuthMetrics) {
        let token = ApiToken::new(TOKEN.into()).unwrap();
        (
            Authenticator::new(&token),
            AuthMetrics::register(&mut Registry::default()),
        )
    }

    #[tokio::test]
    async fn public_paths_need_no_token() {
        let (auth, metrics) = protected();
        for path in PUBLIC_PATHS {
            let (status, _, _) = call(service(auth.clone(), metrics.clone()), path, None).await;
            assert_eq!(status, StatusCode::OK, "{path}");
        }
    }

    #[tokio::test]
    async fn missing_token_is_401_missing_api_key_with_challenge() {
        let (auth, metrics) = protected();
        let (status, headers, body) =
            call(service(auth, metrics.clone()), "/v1/inference", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["error"]["code"], "MISSING_API_KEY");
        assert_eq!(json["error"]["retriable"], false);
        assert_eq!(metrics.failures("missing"), 1);
        assert_eq!(metrics.failures("invalid"), 0);
    }

    #[tokio::test]
    async fn wrong_token_is_401_invalid_api_key() {
        let (auth, metrics) = protected();
        let (status, headers, body) = call(
            service(auth, metrics.clone()),
            "/v1/inference",
            Some("Bearer nope-nope-nope-nope"),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
        assert!(body.contains("INVALID_API_KEY"));
        assert_eq!(metrics.failures("invalid"), 1);
    }

    #[tokio::test]
    async fn right_token_passes_with_its_fingerprint() {
        let (auth, metrics) = protected();
        let (status, _, body) = call(
            service(auth, metrics),
            "/v1/anything",
            Some(&format!("Bearer {TOKEN}")),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains(&format!("token:{}", crate::token_fp6(TOKEN))));
    }

    #[tokio::test]
    async fn open_mode_passes_everything() {
        let metrics = AuthMetrics::register(&mut Registry::default());
        let (status, _, _) = call(
            service(Authenticator::open(), metrics),
            "/v1/inference",
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
}
