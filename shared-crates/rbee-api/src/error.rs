//! The contract's single error shape and its stable codes.
//!
//! Every error any daemon answers is
//! `{"error":{"code","message","retriable","details"}}`. [`ErrorCode`] is the
//! closed set of codes; each knows its HTTP status and whether a client may
//! retry, so handlers cannot pair a code with the wrong status.

use axum::response::{IntoResponse, Response};
use http::{header, HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};

/// A stable, machine-readable error code (`UPPER_SNAKE` on the wire).
///
/// The same string is used in the JSON body and as a metric label, so the set
/// is closed and bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The request body is not valid JSON or does not match the expected shape.
    InvalidJson,
    /// One or more fields failed validation; see `details.fields`.
    InvalidRequest,
    /// The body must be `application/json`.
    UnsupportedMediaType,
    /// The body is larger than the configured limit.
    PayloadTooLarge,
    /// No route matches the path.
    NotFound,
    /// The route exists but not for this method.
    MethodNotAllowed,
    /// No `Authorization: Bearer` credential was sent.
    MissingApiKey,
    /// A credential was sent but is malformed or not accepted.
    InvalidApiKey,
    /// `X-Deadline` or `X-Timeout-Ms` could not be parsed.
    InvalidDeadline,
    /// The request's deadline passed before the answer was ready.
    DeadlineExceeded,
    /// Every inference slot of the worker is busy.
    AllSlotsBusy,
    /// The model is not known or not provisioned.
    ModelNotFound,
    /// The model exists but the credentials do not grant access.
    ModelAccessDenied,
    /// A model download failed for a reason that may pass.
    DownloadFailed,
    /// The requested backend is not built into or available on this host.
    BackendUnavailable,
    /// Not enough host memory for the requested worker.
    InsufficientRam,
    /// Not enough GPU memory for the requested worker.
    InsufficientVram,
    /// Not enough disk space for the requested download.
    InsufficientDisk,
    /// The circuit breaker for this model and device is open.
    CircuitOpen,
    /// The per-model admission queue is full.
    QueueFull,
    /// No hive can serve the model now.
    NoCapacity,
    /// A resource is in use and cannot be changed now.
    Conflict,
    /// The model is used by a worker and cannot be evicted.
    ModelInUse,
    /// The engine has work but has produced no token for too long.
    EngineStalled,
    /// The prompt does not fit the model's context.
    PromptTooLong,
    /// The request was cancelled (`DELETE /v1/inference/{job_id}`).
    Cancelled,
    /// The worker is still loading its model.
    ModelLoading,
    /// The daemon is draining and accepts no new work.
    ShuttingDown,
    /// A worker failed while serving the request.
    WorkerFailed,
    /// Every connection slot is taken by requests in flight; this
    /// connection may ask only the probes.
    TooManyConnections,
    /// An internal error; the cause is in the daemon's log, never in the body.
    Internal,
}

impl ErrorCode {
    /// The HTTP status this code is always answered with.
    pub fn status(self) -> StatusCode {
        match self {
            Self::InvalidJson
            | Self::InvalidRequest
            | Self::InvalidDeadline
            | Self::PromptTooLong => StatusCode::BAD_REQUEST,
            Self::Cancelled => StatusCode::CONFLICT,
            Self::BackendUnavailable => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NotFound | Self::ModelNotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::MissingApiKey | Self::InvalidApiKey => StatusCode::UNAUTHORIZED,
            Self::ModelAccessDenied => StatusCode::FORBIDDEN,
            Self::Conflict | Self::ModelInUse => StatusCode::CONFLICT,
            Self::QueueFull => StatusCode::TOO_MANY_REQUESTS,
            Self::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Self::DownloadFailed | Self::WorkerFailed => StatusCode::BAD_GATEWAY,
            Self::AllSlotsBusy
            | Self::CircuitOpen
            | Self::NoCapacity
            | Self::EngineStalled
            | Self::ModelLoading
            | Self::ShuttingDown
            | Self::TooManyConnections => StatusCode::SERVICE_UNAVAILABLE,
            Self::InsufficientRam | Self::InsufficientVram | Self::InsufficientDisk => {
                StatusCode::INSUFFICIENT_STORAGE
            }
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether the same request may succeed if sent again later.
    pub fn retriable(self) -> bool {
        matches!(
            self,
            Self::DeadlineExceeded
                | Self::AllSlotsBusy
                | Self::DownloadFailed
                | Self::CircuitOpen
                | Self::QueueFull
                | Self::NoCapacity
                | Self::EngineStalled
                | Self::ModelLoading
                | Self::ShuttingDown
                | Self::WorkerFailed
                | Self::TooManyConnections
                | Self::InsufficientRam
                | Self::InsufficientVram
        )
    }

    /// The wire string, e.g. `"INVALID_JSON"`; also the metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "INVALID_JSON",
            Self::InvalidRequest => "INVALID_REQUEST",
            Self::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            Self::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Self::NotFound => "NOT_FOUND",
            Self::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Self::MissingApiKey => "MISSING_API_KEY",
            Self::InvalidApiKey => "INVALID_API_KEY",
            Self::InvalidDeadline => "INVALID_DEADLINE",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Self::AllSlotsBusy => "ALL_SLOTS_BUSY",
            Self::ModelNotFound => "MODEL_NOT_FOUND",
            Self::ModelAccessDenied => "MODEL_ACCESS_DENIED",
            Self::DownloadFailed => "DOWNLOAD_FAILED",
            Self::BackendUnavailable => "BACKEND_UNAVAILABLE",
            Self::InsufficientRam => "INSUFFICIENT_RAM",
            Self::InsufficientVram => "INSUFFICIENT_VRAM",
            Self::InsufficientDisk => "INSUFFICIENT_DISK",
            Self::CircuitOpen => "CIRCUIT_OPEN",
            Self::QueueFull => "QUEUE_FULL",
            Self::NoCapacity => "NO_CAPACITY",
            Self::Conflict => "CONFLICT",
            Self::ModelInUse => "MODEL_IN_USE",
            Self::EngineStalled => "ENGINE_STALLED",
            Self::PromptTooLong => "PROMPT_TOO_LONG",
            Self::Cancelled => "CANCELLED",
            Self::ModelLoading => "MODEL_LOADING",
            Self::ShuttingDown => "SHUTTING_DOWN",
            Self::WorkerFailed => "WORKER_FAILED",
            Self::TooManyConnections => "TOO_MANY_CONNECTIONS",
            Self::Internal => "INTERNAL",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One invalid field of a request, listed in `details.fields`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    /// The field's name as it appears in the request body or header.
    pub field: String,
    /// The rule it broke, e.g. `range`, `required`, `format`.
    pub constraint: String,
    /// A sentence for humans.
    pub message: String,
}

impl FieldError {
    /// A field error from its three parts.
    pub fn new(
        field: impl Into<String>,
        constraint: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            field: field.into(),
            constraint: constraint.into(),
            message: message.into(),
        }
    }
}

/// The inner object of the envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable code.
    pub code: ErrorCode,
    /// Human sentence; never a stack trace or an internal cause.
    pub message: String,
    /// Whether the client may retry the same request later.
    pub retriable: bool,
    /// Structured extras: `fields` for validation errors, byte counts for
    /// memory errors, and so on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

/// The envelope: `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// An error response ready to be returned from a handler or a layer.
///
/// Carries the envelope plus the headers some codes need (`Retry-After`,
/// `WWW-Authenticate`).
#[derive(Debug, Clone)]
pub struct ApiError {
    /// Boxed: an error is the cold path, and a `Result` that carries one
    /// stays small.
    body: Box<ErrorBody>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    /// An error with the code's status and retriable flag.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            body: Box::new(ErrorBody {
                error: ErrorDetail {
                    code,
                    message: message.into(),
                    retriable: code.retriable(),
                    details: None,
                },
            }),
            headers: Vec::new(),
        }
    }

    /// A validation error listing every bad field in `details.fields`.
    pub fn invalid_fields(code: ErrorCode, fields: Vec<FieldError>) -> Self {
        Self::new(code, fields_message(&fields)).with_details(fields_details(&fields))
    }

    /// Attach structured details.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.body.error.details = Some(details);
        self
    }

    /// Add `Retry-After: <seconds>`.
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.headers
            .push((header::RETRY_AFTER, HeaderValue::from(seconds.max(1))));
        self
    }

    /// Add an arbitrary header (e.g. `WWW-Authenticate`).
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// The error code.
    pub fn code(&self) -> ErrorCode {
        self.body.error.code
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.body.error.code.status()
    }

    /// The envelope.
    pub fn body(&self) -> &ErrorBody {
        &self.body
    }
}

/// The message of a validation error: the one field's message, or how
/// many fields are invalid.
pub fn fields_message(fields: &[FieldError]) -> String {
    match fields {
        [one] => one.message.clone(),
        many => format!("{} fields are invalid", many.len()),
    }
}

/// The `details` of a validation error: `{"fields": [...]}`.
pub fn fields_details(fields: &[FieldError]) -> serde_json::Value {
    #[derive(Serialize)]
    struct Details<'a> {
        fields: &'a [FieldError],
    }
    serde_json::to_value(Details { fields }).unwrap_or_default()
}

/// A component's own error that a daemon answers with: its contract code,
/// any structured details, and a message made of its `Display` and every
/// `source` below it. Components return their typed errors; the edge turns
/// them into the envelope with `?` (the blanket `From` below) and nowhere
/// else.
pub trait Coded: std::error::Error {
    /// The contract code (and so the status and the retriable flag).
    fn code(&self) -> ErrorCode;

    /// Structured `details`, where a client can act on them.
    fn details(&self) -> Option<serde_json::Value> {
        None
    }

    /// Seconds for `Retry-After`, where a retry has a known earliest time.
    fn retry_after(&self) -> Option<u64> {
        None
    }
}

/// An error and its causes on one line, `: `-separated.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

impl<E: Coded> From<E> for ApiError {
    fn from(e: E) -> Self {
        let mut error = ApiError::new(e.code(), chain(&e));
        if let Some(details) = e.details() {
            error = error.with_details(details);
        }
        if let Some(seconds) = e.retry_after() {
            error = error.with_retry_after(seconds);
        }
        error
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.body.error.code, self.body.error.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (status, axum::Json(*self.body)).into_response();
        let headers = response.headers_mut();
        for (name, value) in self.headers {
            headers.append(name, value);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Sample {
        #[error("cannot read {0}")]
        Read(&'static str, #[source] std::io::Error),
    }

    impl Coded for Sample {
        fn code(&self) -> ErrorCode {
            ErrorCode::ModelNotFound
        }
        fn details(&self) -> Option<serde_json::Value> {
            Some(serde_json::json!({ "path": "/m" }))
        }
    }

    #[test]
    fn a_typed_error_becomes_the_envelope_with_its_causes_in_the_message() {
        let cause = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err: ApiError = Sample::Read("/m", cause).into();
        let json = serde_json::to_value(err.body()).unwrap();
        assert_eq!(err.status(), StatusCode::NOT_FOUND);
        assert_eq!(json["error"]["code"], "MODEL_NOT_FOUND");
        assert_eq!(json["error"]["message"], "cannot read /m: no such file");
        assert_eq!(json["error"]["details"]["path"], "/m");
    }

    #[test]
    fn envelope_serializes_in_the_contract_shape() {
        let err = ApiError::invalid_fields(
            ErrorCode::InvalidRequest,
            vec![FieldError::new(
                "max_tokens",
                "range",
                "max_tokens must be 1..=4096",
            )],
        );
        let json = serde_json::to_value(err.body()).unwrap();
        assert_eq!(json["error"]["code"], "INVALID_REQUEST");
        assert_eq!(json["error"]["retriable"], false);
        assert_eq!(json["error"]["message"], "max_tokens must be 1..=4096");
        assert_eq!(json["error"]["details"]["fields"][0]["field"], "max_tokens");
        assert_eq!(json["error"]["details"]["fields"][0]["constraint"], "range");
    }

    #[test]
    fn code_wire_string_matches_serde_and_display() {
        for code in [
            ErrorCode::InvalidJson,
            ErrorCode::MissingApiKey,
            ErrorCode::DeadlineExceeded,
            ErrorCode::InsufficientVram,
            ErrorCode::AllSlotsBusy,
            ErrorCode::Internal,
        ] {
            let serde = serde_json::to_value(code).unwrap();
            assert_eq!(serde, code.as_str());
            assert_eq!(code.to_string(), code.as_str());
        }
    }

    #[test]
    fn retry_after_is_never_zero() {
        let response = ApiError::new(ErrorCode::QueueFull, "full")
            .with_retry_after(0)
            .into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }
}
