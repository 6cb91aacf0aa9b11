//! Why the queen answers a relayed request with an error of its own (a
//! worker's own refusals are passed on as the worker wrote them).

use rbee_api::{Coded, ErrorCode};

use crate::sched::AdmitError;
use crate::upstream::UpstreamError;

/// The queen's own failures while relaying one request.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RelayError {
    /// The scheduler refused or failed the request.
    #[error(transparent)]
    Admit(#[from] AdmitError),
    /// A job with the same id is running.
    #[error("job `{job_id}` is already running")]
    JobRunning { job_id: String },
    /// The queen is draining.
    #[error("the queen is shutting down")]
    ShuttingDown,
    /// The deadline passed in the queue.
    #[error("the deadline passed while the request waited for a worker")]
    QueuedPastDeadline,
    /// The client went away or a `DELETE` came while queued.
    #[error("the request was cancelled while queued")]
    QueuedCancelled,
    /// The deadline passed while a worker had the request.
    #[error("the deadline passed while the worker generated")]
    PastDeadline,
    /// The client went away or a `DELETE` came while a worker had it.
    #[error("the request was cancelled")]
    Cancelled,
    /// The worker failed before answering, and no retry was left.
    #[error("the worker failed")]
    WorkerFailed(#[source] WorkerFault),
    /// The worker's answer broke off, and no retry was left.
    #[error("the worker failed mid-answer")]
    MidAnswer(#[source] UpstreamError),
    /// The one retry failed too.
    #[error("the worker failed, and so did the retry")]
    RetryFailed,
    /// A streamed answer broke off after events were relayed (the fault is
    /// logged; the client's stream ends with this).
    #[error("the worker failed while generating")]
    StreamFailed,
    /// A worker's refusal whose body could not be read.
    #[error("the worker's refusal could not be read")]
    RefusalUnread(#[source] UpstreamError),
}

/// Why a worker did not answer a request it was sent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WorkerFault {
    /// It refused the queen's token, the previous one included.
    #[error("the worker refused the queen's API token")]
    RefusedToken,
    /// It answered with a status that is neither success nor a refusal.
    #[error("HTTP {0}")]
    Status(u16),
    /// The call failed.
    #[error(transparent)]
    Call(#[from] UpstreamError),
    /// The relay's deadline fired while reading the stream.
    #[error("the deadline passed")]
    Deadline,
    /// One event is longer than the relay holds.
    #[error("an event from the worker is longer than {0} bytes")]
    EventTooLong(usize),
    /// The stream ended before its terminal event.
    #[error("the worker ended the stream early")]
    EndedEarly,
}

impl Coded for RelayError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Admit(e) => e.code(),
            Self::JobRunning { .. } => ErrorCode::Conflict,
            Self::ShuttingDown => ErrorCode::ShuttingDown,
            Self::QueuedPastDeadline | Self::PastDeadline => ErrorCode::DeadlineExceeded,
            Self::QueuedCancelled | Self::Cancelled => ErrorCode::Cancelled,
            Self::WorkerFailed(_)
            | Self::MidAnswer(_)
            | Self::RetryFailed
            | Self::StreamFailed
            | Self::RefusalUnread(_) => ErrorCode::WorkerFailed,
        }
    }

    fn details(&self) -> Option<serde_json::Value> {
        match self {
            Self::Admit(e) => e.details(),
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Admit(e) => e.retry_after(),
            Self::ShuttingDown => Some(1),
            _ => None,
        }
    }
}
