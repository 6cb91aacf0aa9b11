//! `X-Request-Id`: accepted or minted, echoed, and carried by the request's span.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use http::{HeaderName, HeaderValue};
use tracing::Instrument;

/// The request id header.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Longest request id accepted from a client; longer ones are replaced.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// The id of the request being served, in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(Arc<str>);

impl RequestId {
    /// Mint a fresh id (UUID v4).
    pub fn mint() -> Self {
        Self(Arc::from(uuid::Uuid::new_v4().to_string()))
    }

    /// Accept a client's id if it is 1..=128 characters of `[A-Za-z0-9._:-]`.
    pub fn accept(value: &HeaderValue) -> Option<Self> {
        let text = value.to_str().ok()?;
        rbee_api::inference::is_valid_id(text, MAX_REQUEST_ID_BYTES).then(|| Self(Arc::from(text)))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Middleware: take or mint the id, run the rest of the stack inside a span
/// that carries it, echo it on the response, and log one access line.
pub async fn middleware(mut request: Request, next: Next) -> Response {
    let supplied = request.headers().get(&X_REQUEST_ID);
    let id = supplied
        .and_then(RequestId::accept)
        .unwrap_or_else(RequestId::mint);
    if supplied.is_some_and(|v| v.as_bytes() != id.as_str().as_bytes()) {
        tracing::debug!(request_id = %id, "client X-Request-Id was not acceptable; minted a new one");
    }
    let header =
        HeaderValue::from_str(id.as_str()).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    request.headers_mut().insert(X_REQUEST_ID, header.clone());
    request.extensions_mut().insert(id.clone());

    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let span = tracing::info_span!("request", request_id = %id, %method, %path);
    let started = Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    response.headers_mut().insert(X_REQUEST_ID, header);

    let _entered = span.enter();
    let status = response.status().as_u16();
    let latency_ms = started.elapsed().as_secs_f64() * 1e3;
    if auth_min::PUBLIC_PATHS.contains(&path.as_str()) {
        tracing::debug!(status, latency_ms, "request finished");
    } else {
        tracing::info!(status, latency_ms, "request finished");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_safe_ids_and_rejects_the_rest() {
        assert!(RequestId::accept(&HeaderValue::from_static("abc-123_x.y:z")).is_some());
        assert!(RequestId::accept(&HeaderValue::from_static("has space")).is_none());
        assert!(RequestId::accept(&HeaderValue::from_static("")).is_none());
        let long = "a".repeat(MAX_REQUEST_ID_BYTES + 1);
        assert!(RequestId::accept(&HeaderValue::from_str(&long).unwrap()).is_none());
    }

    #[test]
    fn minted_ids_are_unique() {
        assert_ne!(RequestId::mint(), RequestId::mint());
    }
}
