//! Outgoing calls carry the request's id, trace context and deadline.

use std::time::Duration;

use axum::extract::FromRequestParts;
use deadline_propagation::{Deadline, X_DEADLINE};
use http::request::Parts;
use http::{HeaderName, HeaderValue};
use rbee_api::ApiError;

use crate::request_id::{RequestId, X_REQUEST_ID};

/// How long a pooled connection to another daemon may stay idle: under
/// the peers' header read timeout (10 s by default), which also closes idle
/// keep-alive connections, so a pooled connection is not reused just as the
/// peer closes it.
pub const POOL_IDLE: Duration = Duration::from_secs(5);

/// A client builder for calls to other daemons: pooled connections idle at
/// most [`POOL_IDLE`], TCP keepalive, no Nagle delay, and `https://` peers
/// verified against the process's CA bundle ([`crate::tls::client_config`]).
pub fn http_client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .pool_idle_timeout(POOL_IDLE)
        .tcp_keepalive(Duration::from_secs(60))
        .tcp_nodelay(true)
        .use_preconfigured_tls((*crate::tls::client_config()).clone())
}

/// [`http_client_builder`], built; falls back to reqwest's defaults if the
/// client cannot be built.
pub fn http_client() -> reqwest::Client {
    http_client_builder().build().unwrap_or_default()
}

/// An error and its causes on one line, `: `-separated: reqwest's own
/// message ("error sending request") hides the useful part (a refused
/// connection, a certificate from an unknown issuer).
pub use rbee_api::error::chain as error_chain;

/// Why [`read_limited`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The body is longer than the caller accepts.
    #[error("the body is longer than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// Reading it failed.
    #[error("reading the body failed: {0}")]
    Read(#[from] reqwest::Error),
}

/// The whole body of `response`, refusing one longer than `limit` bytes
/// (by `Content-Length` before reading, or as the bytes arrive).
pub async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<bytes::Bytes, BodyError> {
    if response
        .content_length()
        .is_some_and(|n| n > u64::try_from(limit).unwrap_or(u64::MAX))
    {
        return Err(BodyError::TooLarge { limit });
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// W3C trace context header, forwarded as is.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// What a handler forwards downstream: request id, `traceparent`, deadline.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// This request's id.
    pub request_id: RequestId,
    /// The client's `traceparent`, if any.
    pub traceparent: Option<HeaderValue>,
    /// The request's deadline, if any.
    pub deadline: Option<Deadline>,
}

impl RequestContext {
    /// Add `X-Request-Id`, `traceparent` and `X-Deadline` to `headers`, for
    /// a client that builds its own requests (bound the call by
    /// [`Deadline::remaining`] yourself).
    pub fn forward_headers(&self, headers: &mut http::HeaderMap) {
        if let Ok(v) = HeaderValue::from_str(self.request_id.as_str()) {
            headers.insert(X_REQUEST_ID, v);
        }
        if let Some(tp) = &self.traceparent {
            headers.insert(TRACEPARENT, tp.clone());
        }
        if let Some(deadline) = &self.deadline {
            headers.insert(X_DEADLINE, deadline.header_value());
        }
    }

    /// A context for work the daemon starts itself (no client request).
    pub fn background(deadline: Option<Deadline>) -> Self {
        Self {
            request_id: RequestId::mint(),
            traceparent: None,
            deadline,
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RequestContext {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let request_id = parts
            .extensions
            .get::<RequestId>()
            .cloned()
            .unwrap_or_else(RequestId::mint);
        let deadline =
            <Deadline as axum::extract::OptionalFromRequestParts<S>>::from_request_parts(
                parts, state,
            )
            .await?;
        Ok(Self {
            request_id,
            traceparent: parts.headers.get(&TRACEPARENT).cloned(),
            deadline,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers every connection with `response` as is.
    async fn answering(response: &'static [u8]) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(response).await;
            }
        });
        format!("http://{addr}/")
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused_by_its_length_or_as_it_arrives() {
        let client = http_client();
        let declared =
            answering(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\nconnection: close\r\n\r\n").await;
        let response = client.get(&declared).send().await.expect("response");
        assert!(matches!(
            read_limited(response, 50).await,
            Err(BodyError::TooLarge { limit: 50 })
        ));
        let chunked = answering(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n20\r\naaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n20\r\nbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\r\n0\r\n\r\n",
        )
        .await;
        let response = client.get(&chunked).send().await.expect("response");
        assert!(matches!(
            read_limited(response, 50).await,
            Err(BodyError::TooLarge { limit: 50 })
        ));
        let response = client.get(&chunked).send().await.expect("response");
        let body = read_limited(response, 64).await.expect("within the limit");
        assert_eq!(body.len(), 64);
    }
}
