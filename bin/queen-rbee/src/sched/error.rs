//! Why the scheduler refuses or fails a request, and why a spawn it ordered
//! failed. Both carry only what a client needs, so one refusal can be
//! handed to every waiter of a model; the envelope is made at the edge from
//! [`Coded`].

use rbee_api::{Coded, ErrorCode};
use serde::Serialize;

/// Why a request got no worker.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AdmitError {
    /// A request without `model` while the fleet knows no model.
    #[error("no hive serves or has provisioned any model yet")]
    NoModels,
    /// A request without `model` while the fleet knows several.
    #[error("`model` is required: several models are available")]
    ModelRequired { models: Vec<String> },
    /// No hive knows the model.
    #[error("no hive serves or has provisioned the model `{model}`")]
    UnknownModel { model: String },
    /// Hives know the model, but none that can serve it is reachable.
    #[error("no reachable hive can serve the model `{model}` now")]
    Unreachable { model: String },
    /// The model's queue is at its limit.
    #[error("{max_queue} requests already wait for the model `{model}`")]
    QueueFull { model: String, max_queue: usize },
    /// The spawn the request waited for failed.
    #[error("no worker could be started for `{model}`: {why}")]
    SpawnFailed {
        model: String,
        why: String,
        cause: ErrorCode,
    },
    /// The scheduler let go of a waiting request without an answer.
    #[error("the scheduler dropped a waiting request")]
    Dropped,
}

#[derive(Serialize)]
struct Models<'a> {
    models: &'a [String],
}

#[derive(Serialize)]
struct Model<'a> {
    model: &'a str,
}

#[derive(Serialize)]
struct MaxQueue {
    max_queue: usize,
}

#[derive(Serialize)]
struct Cause {
    cause: ErrorCode,
}

impl Coded for AdmitError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::NoModels | Self::Unreachable { .. } | Self::SpawnFailed { .. } => {
                ErrorCode::NoCapacity
            }
            Self::ModelRequired { .. } => ErrorCode::InvalidRequest,
            Self::UnknownModel { .. } => ErrorCode::ModelNotFound,
            Self::QueueFull { .. } => ErrorCode::QueueFull,
            Self::Dropped => ErrorCode::Internal,
        }
    }

    fn details(&self) -> Option<serde_json::Value> {
        match self {
            Self::ModelRequired { models } => serde_json::to_value(Models { models }).ok(),
            Self::UnknownModel { model } => serde_json::to_value(Model { model }).ok(),
            Self::QueueFull { max_queue, .. } => serde_json::to_value(MaxQueue {
                max_queue: *max_queue,
            })
            .ok(),
            Self::SpawnFailed { cause, .. } => serde_json::to_value(Cause { cause: *cause }).ok(),
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::NoModels | Self::QueueFull { .. } => Some(1),
            Self::Unreachable { .. } | Self::SpawnFailed { .. } => Some(5),
            _ => None,
        }
    }
}

/// Why a spawn the scheduler ordered did not give a ready worker.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The order could not be queued: too many spawns are pending.
    #[error("too many models are starting at once")]
    Backlog,
    /// The order could not be queued: the queen is stopping.
    #[error("the queen is shutting down")]
    Closed,
    /// The spawn request got no answer.
    #[error("the hive did not answer")]
    HiveSilent(#[source] reqwest::Error),
    /// The hive refused, with its own error.
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
    /// The hive refused without an error body.
    #[error("the hive answered HTTP {0}")]
    HiveStatus(u16),
    /// The hive accepted with a body that is not the contract's.
    #[error("bad spawn answer")]
    BadAnswer(#[source] reqwest::Error),
    /// The worker was still loading when the spawn's time ran out.
    #[error("worker {worker_id} did not become ready in time")]
    NotReady { worker_id: String },
    /// The worker vanished from its hive while loading.
    #[error("worker {worker_id} is gone from its hive")]
    Gone { worker_id: String },
    /// The worker failed while loading.
    #[error("worker {worker_id} failed to start")]
    FailedToStart { worker_id: String },
}

impl Coded for SpawnError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Backlog
            | Self::Closed
            | Self::HiveSilent(_)
            | Self::HiveStatus(_)
            | Self::NotReady { .. } => ErrorCode::NoCapacity,
            Self::Refused { code, .. } => *code,
            Self::BadAnswer(_) => ErrorCode::Internal,
            Self::Gone { .. } | Self::FailedToStart { .. } => ErrorCode::WorkerFailed,
        }
    }
}
