//! `X-Request-Id`: accepted or minted, echoed, and carried by the request's span.

use std::sync::Arc;

use http::{HeaderName, HeaderValue};

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

/// Take the client's id or mint one; put it into the request's headers (for
/// handlers that forward them) and extensions. Returns the id and its header
/// value, to echo on the response.
pub(crate) fn assign<B>(request: &mut http::Request<B>) -> (RequestId, HeaderValue) {
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
    (id, header)
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
