//! How a request ended: the closed set used as the `outcome` metric label and
//! in audit records.

use serde::{Deserialize, Serialize};

use crate::ErrorCode;

/// Outcome of an inference request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Answered.
    Ok,
    /// Refused for a bad request.
    ClientError,
    /// The deadline passed.
    DeadlineExceeded,
    /// The client disconnected or cancelled.
    Cancelled,
    /// Every slot was busy.
    Busy,
    /// The admission queue was full.
    QueueFull,
    /// No hive could serve the model.
    NoCapacity,
    /// The worker failed while serving.
    WorkerFailed,
    /// Any other failure.
    Error,
}

impl Outcome {
    /// Every outcome, for exporting each `outcome` series at 0 from the start.
    pub const ALL: [Self; 9] = [
        Self::Ok,
        Self::ClientError,
        Self::DeadlineExceeded,
        Self::Cancelled,
        Self::Busy,
        Self::QueueFull,
        Self::NoCapacity,
        Self::WorkerFailed,
        Self::Error,
    ];

    /// The label string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::ClientError => "client_error",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::Cancelled => "cancelled",
            Self::Busy => "busy",
            Self::QueueFull => "queue_full",
            Self::NoCapacity => "no_capacity",
            Self::WorkerFailed => "worker_failed",
            Self::Error => "error",
        }
    }
}

impl From<ErrorCode> for Outcome {
    /// The outcome of a request that ended with `code`.
    fn from(code: ErrorCode) -> Self {
        match code {
            ErrorCode::DeadlineExceeded => Self::DeadlineExceeded,
            ErrorCode::Cancelled => Self::Cancelled,
            ErrorCode::AllSlotsBusy => Self::Busy,
            ErrorCode::QueueFull => Self::QueueFull,
            ErrorCode::NoCapacity => Self::NoCapacity,
            ErrorCode::WorkerFailed => Self::WorkerFailed,
            c if c.status().is_client_error() => Self::ClientError,
            _ => Self::Error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_matches_serde() {
        for o in [
            Outcome::Ok,
            Outcome::DeadlineExceeded,
            Outcome::NoCapacity,
            Outcome::WorkerFailed,
        ] {
            assert_eq!(serde_json::to_value(o).unwrap(), o.as_str());
        }
    }
}
