//! Outgoing calls carry the request's id, trace context and deadline.

use std::time::Duration;

use axum::extract::FromRequestParts;
use deadline_propagation::{Deadline, X_DEADLINE};
use http::request::Parts;
use http::{HeaderName, HeaderValue};
use rbee_api::ApiError;

use crate::request_id::{RequestId, X_REQUEST_ID};

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

/// Adds `X-Request-Id`, `traceparent` and `X-Deadline` to an outgoing request
/// and bounds it by the time that remains.
pub trait Propagate {
    /// Forward `ctx`.
    fn propagate(self, ctx: &RequestContext) -> Self;
}

impl Propagate for reqwest::RequestBuilder {
    fn propagate(self, ctx: &RequestContext) -> Self {
        let mut builder = self.header(X_REQUEST_ID, ctx.request_id.as_str());
        if let Some(tp) = &ctx.traceparent {
            builder = builder.header(TRACEPARENT, tp.clone());
        }
        if let Some(deadline) = &ctx.deadline {
            builder = builder
                .header(X_DEADLINE, deadline.header_value())
                .timeout(deadline.remaining().max(Duration::from_millis(1)));
        }
        builder
    }
}
