//! The contract's JSON error envelope for everything the framework would
//! otherwise answer in plain text.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, Method, StatusCode};
use http_body_util::BodyExt;
use rbee_api::{ApiError, ErrorCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A JSON body extractor whose every rejection is in the contract's shape:
/// malformed or mistyped JSON is 400 `INVALID_JSON` (with serde's message,
/// which names the field), a missing or wrong `Content-Type` is 415
/// `UNSUPPORTED_MEDIA_TYPE`, and a body over the limit is 413
/// `PAYLOAD_TOO_LARGE`. As a response it serialises like [`axum::Json`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let plain_json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"application/json"));
        if !plain_json {
            // Parameters, `+json` types and wrong types: axum decides.
            return match axum::Json::<T>::from_request(request, state).await {
                Ok(axum::Json(value)) => Ok(Self(value)),
                Err(rejection) => Err(json_rejection(rejection)),
            };
        }
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|e| json_rejection(e.into()))?;
        // A body that parses is parsed once; one that does not is parsed
        // again by axum, whose message names the field at fault.
        match serde_json::from_slice::<T>(&bytes) {
            Ok(value) => Ok(Self(value)),
            Err(_) => match axum::Json::<T>::from_bytes(&bytes) {
                Ok(axum::Json(value)) => Ok(Self(value)),
                Err(rejection) => Err(json_rejection(rejection)),
            },
        }
    }
}

impl<T: Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "the request body must be JSON with `Content-Type: application/json`",
        ),
        JsonRejection::JsonDataError(e) => ApiError::new(
            ErrorCode::InvalidJson,
            format!("invalid request body: {}", e.body_text()),
        ),
        JsonRejection::JsonSyntaxError(e) => ApiError::new(
            ErrorCode::InvalidJson,
            format!("malformed JSON: {}", e.body_text()),
        ),
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            payload_too_large()
        }
        other => ApiError::new(ErrorCode::InvalidJson, other.body_text()),
    }
}

pub(crate) fn payload_too_large() -> ApiError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        "the request body is larger than this server accepts",
    )
}

/// Fallback handler: 404 `NOT_FOUND` naming the method and path.
pub async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no route for {} {}", request.method(), request.uri().path()),
    )
}

/// Rewrite an error response that is not already JSON (axum's 405, a
/// plain-text rejection) into the envelope, keeping its status and headers
/// such as `Allow`. `method` and `path` are the request's, for the message.
pub(crate) async fn to_envelope(method: &Method, path: &str, response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(&response) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let error = match status {
        StatusCode::NOT_FOUND => {
            ApiError::new(ErrorCode::NotFound, format!("no route for {method} {path}"))
        }
        StatusCode::METHOD_NOT_ALLOWED => ApiError::new(
            ErrorCode::MethodNotAllowed,
            format!("{method} is not allowed on {path}"),
        ),
        StatusCode::PAYLOAD_TOO_LARGE => payload_too_large(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "unsupported Content-Type for this route",
        ),
        s if s.is_client_error() => {
            // Framework rejections carry a short, safe sentence; keep it, bounded.
            let text: String = body
                .collect()
                .await
                .map(|b| {
                    String::from_utf8_lossy(&b.to_bytes())
                        .chars()
                        .take(300)
                        .collect()
                })
                .unwrap_or_default();
            let message = if text.is_empty() {
                s.canonical_reason().unwrap_or("bad request").to_owned()
            } else {
                text
            };
            ApiError::new(ErrorCode::InvalidRequest, message)
        }
        _ => {
            tracing::error!(
                status = status.as_u16(),
                "internal error answered in plain text"
            );
            ApiError::new(ErrorCode::Internal, "internal error; see the daemon's log")
        }
    };
    parts.headers.remove(header::CONTENT_TYPE);
    parts.headers.remove(header::CONTENT_LENGTH);
    let mut rewritten = error.into_response();
    *rewritten.status_mut() = status;
    for (name, value) in parts.headers.iter() {
        rewritten.headers_mut().append(name.clone(), value.clone());
    }
    rewritten
}

fn is_json(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}
