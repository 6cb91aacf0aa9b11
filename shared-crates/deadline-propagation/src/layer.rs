//! The layer that reads a request's deadline before any handler runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use futures_util::future::{Either, Ready};
use http::Request;
use tower::{Layer, Service};

use crate::deadline::{Deadline, DeadlineExceeded, X_DEADLINE, X_TIMEOUT_MS};

/// Parses `X-Deadline` / `X-Timeout-Ms` on every request.
///
/// - invalid value: 400 `INVALID_DEADLINE`, handler not called;
/// - already expired: 504 `DEADLINE_EXCEEDED`, handler not called;
/// - otherwise the [`Deadline`] (or the configured default, if any),
///   shortened to the configured maximum (if any), goes into the request's
///   extensions, and the request's headers are normalised to a single
///   absolute `X-Deadline`, ready to forward.
#[derive(Clone, Default)]
pub struct DeadlineLayer {
    default: Option<DefaultDeadline>,
    max: Option<MaxDeadline>,
    on_expired: Option<OnExpired>,
}

/// A duration a daemon can change while it serves (a reload): clones
/// share the value.
#[derive(Debug, Clone)]
pub struct SharedDuration(std::sync::Arc<AtomicU64>);

impl SharedDuration {
    /// Starting at `value` (whole milliseconds).
    pub fn new(value: Duration) -> Self {
        Self(std::sync::Arc::new(AtomicU64::new(millis(value))))
    }

    /// The value now.
    pub fn get(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::Relaxed))
    }

    /// Change it for the requests that arrive from now on.
    pub fn set(&self, value: Duration) {
        self.0.store(millis(value), Ordering::Relaxed);
    }
}

/// The deadline given to requests without deadline headers.
pub type DefaultDeadline = SharedDuration;

/// The longest deadline a request may have: a later one is shortened to it.
pub type MaxDeadline = SharedDuration;

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Called for each request refused because its deadline had already passed.
pub type OnExpired = std::sync::Arc<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for DeadlineLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadlineLayer")
            .field("default", &self.default)
            .field("max", &self.max)
            .field("on_expired", &self.on_expired.is_some())
            .finish()
    }
}

impl DeadlineLayer {
    /// Requests without deadline headers get none.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests without deadline headers get `default` from their arrival
    /// (the queen's `--default-deadline-ms`).
    pub fn with_default(default: Duration) -> Self {
        Self::with_shared_default(DefaultDeadline::new(default))
    }

    /// [`with_default`](Self::with_default) with a value the caller can
    /// change later.
    pub fn with_shared_default(default: DefaultDeadline) -> Self {
        Self {
            default: Some(default),
            max: None,
            on_expired: None,
        }
    }

    /// Shorten deadlines further away than `max` to `max` from arrival
    /// (the queen's `--max-deadline-ms`).
    pub fn max(mut self, max: MaxDeadline) -> Self {
        self.max = Some(max);
        self
    }

    /// Call `f` for each request refused as already expired (a daemon
    /// counts them in its metrics).
    pub fn on_expired(mut self, f: OnExpired) -> Self {
        self.on_expired = Some(f);
        self
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DeadlineService {
            inner,
            default: self.default.clone(),
            max: self.max.clone(),
            on_expired: self.on_expired.clone(),
        }
    }
}

/// The service made by [`DeadlineLayer`].
#[derive(Clone)]
pub struct DeadlineService<S> {
    inner: S,
    default: Option<DefaultDeadline>,
    max: Option<MaxDeadline>,
    on_expired: Option<OnExpired>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for DeadlineService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadlineService")
            .field("inner", &self.inner)
            .field("default", &self.default)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl<S, B> Service<Request<B>> for DeadlineService<S>
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
        let deadline = match Deadline::from_headers(request.headers()) {
            Ok(found) => found.or_else(|| self.default.as_ref().map(|d| Deadline::after(d.get()))),
            Err(err) => {
                tracing::debug!(error = %err, "invalid deadline header");
                return Either::Left(futures_util::future::ready(Ok(err.into_response())));
            }
        };
        let deadline = match (deadline, &self.max) {
            (Some(d), Some(max)) => Some(d.min(Deadline::after(max.get()))),
            (None, Some(max)) => Some(Deadline::after(max.get())),
            (d, None) => d,
        };
        if let Some(deadline) = deadline {
            if deadline.is_expired() {
                tracing::info!(
                    deadline_ms = deadline.epoch_ms(),
                    "request refused: deadline already passed on arrival"
                );
                if let Some(f) = &self.on_expired {
                    f();
                }
                return Either::Left(futures_util::future::ready(Ok(
                    DeadlineExceeded.into_response()
                )));
            }
            let headers = request.headers_mut();
            headers.remove(X_TIMEOUT_MS);
            headers.insert(X_DEADLINE, deadline.header_value());
            request.extensions_mut().insert(deadline);
        }
        Either::Right(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http::StatusCode;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn echo_deadline(
    ) -> impl Service<Request<Body>, Response = Response, Error = std::convert::Infallible> {
        tower::service_fn(|req: Request<Body>| async move {
            let d = req.extensions().get::<Deadline>().copied();
            let header = req.headers().get(X_DEADLINE).cloned();
            let timeout = req.headers().get(X_TIMEOUT_MS).is_some();
            let body = format!(
                "{}|{}|{}",
                d.map_or(0, |d| d.epoch_ms()),
                header.map_or_else(String::new, |h| h.to_str().unwrap().to_owned()),
                timeout
            );
            Ok::<_, std::convert::Infallible>(body.into_response())
        })
    }

    async fn run(layer: DeadlineLayer, header: Option<(&str, String)>) -> (StatusCode, String) {
        let mut req = Request::get("/v1/inference");
        if let Some((name, value)) = header {
            req = req.header(name, value);
        }
        let response = layer
            .layer(echo_deadline())
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn expired_deadline_returns_504_without_calling_the_handler() {
        let (status, body) = run(
            DeadlineLayer::new(),
            Some(("x-deadline", "1700000000000".into())),
        )
        .await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["error"]["code"], "DEADLINE_EXCEEDED");
        assert_eq!(json["error"]["retriable"], true);
    }

    #[tokio::test]
    async fn invalid_deadline_returns_400_listing_the_header() {
        let (status, body) = run(DeadlineLayer::new(), Some(("x-timeout-ms", "ten".into()))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["error"]["code"], "INVALID_DEADLINE");
        assert_eq!(
            json["error"]["details"]["fields"][0]["field"],
            "X-Timeout-Ms"
        );
    }

    #[tokio::test]
    async fn relative_timeout_is_normalised_to_x_deadline() {
        let (status, body) =
            run(DeadlineLayer::new(), Some(("x-timeout-ms", "30000".into()))).await;
        assert_eq!(status, StatusCode::OK);
        let parts: Vec<&str> = body.split('|').collect();
        assert_eq!(parts[0], parts[1], "extension and forwarded header agree");
        assert_ne!(parts[0], "0");
        assert_eq!(parts[2], "false", "X-Timeout-Ms is not forwarded");
    }

    #[tokio::test]
    async fn default_applies_only_without_headers() {
        let (_, body) = run(DeadlineLayer::with_default(Duration::from_secs(60)), None).await;
        assert_ne!(body.split('|').next(), Some("0"));
        let (_, body) = run(DeadlineLayer::new(), None).await;
        assert_eq!(body, "0||false");
    }

    #[tokio::test]
    async fn a_shared_default_changes_for_later_requests() {
        let deadline_ms = |body: &str| -> u64 { body.split('|').next().unwrap().parse().unwrap() };
        let default = DefaultDeadline::new(Duration::from_secs(60));
        let layer = DeadlineLayer::with_shared_default(default.clone());
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let (_, long) = run(layer.clone(), None).await;
        default.set(Duration::from_secs(5));
        assert_eq!(default.get(), Duration::from_secs(5));
        let (_, short) = run(layer, None).await;
        let long = deadline_ms(&long) - before;
        let short = deadline_ms(&short) - before;
        assert!((59_000..=61_000).contains(&long), "{long}");
        assert!((4_000..=6_000).contains(&short), "{short}");
    }

    #[tokio::test]
    async fn a_deadline_past_the_maximum_is_shortened_and_forwarded_so() {
        let now_ms = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64
        };
        let max = MaxDeadline::new(Duration::from_secs(10));
        let layer = DeadlineLayer::with_default(Duration::from_secs(60)).max(max.clone());
        for header in [
            None,
            Some(("x-timeout-ms", "31536000000".to_owned())),
            Some(("x-deadline", (now_ms() + 3_600_000).to_string())),
        ] {
            let before = now_ms();
            let (status, body) = run(layer.clone(), header.clone()).await;
            assert_eq!(status, StatusCode::OK);
            let mut parts = body.split('|');
            let deadline: u64 = parts.next().unwrap().parse().unwrap();
            let forwarded: u64 = parts.next().unwrap().parse().unwrap();
            assert_eq!(deadline, forwarded, "{header:?}");
            let ahead = deadline - before;
            assert!((9_000..=11_000).contains(&ahead), "{header:?}: {ahead}");
        }
        // A nearer deadline is kept as it is.
        let (_, body) = run(layer, Some(("x-timeout-ms", "2000".to_owned()))).await;
        let ahead = body.split('|').next().unwrap().parse::<u64>().unwrap() - now_ms();
        assert!(ahead <= 2_000, "{ahead}");
        max.set(Duration::from_secs(1));
        assert_eq!(max.get(), Duration::from_secs(1));
    }
}
