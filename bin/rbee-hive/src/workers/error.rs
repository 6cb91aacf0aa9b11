//! Why the hive refuses to spawn, stop or update a worker. Handlers answer
//! it with `?`; the envelope is made in `rbee_api` from [`Coded`].

use rbee_api::worker::Backend;
use rbee_api::{Coded, ErrorCode, FieldError};
use serde::Serialize;

/// A refused worker request.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The hive is draining.
    #[error("the hive is shutting down and spawns no workers")]
    ShuttingDown,
    /// Fields of the spawn request are invalid.
    #[error("{}", rbee_api::error::fields_message(.0))]
    Invalid(Vec<FieldError>),
    /// `backend` is not a backend rbee knows.
    #[error("backend {name:?} is not one rbee runs on (cpu, cuda, metal); available on this hive: {}", available.join(", "))]
    UnknownBackend {
        name: String,
        available: Vec<&'static str>,
    },
    /// `backend` is known but not built into or usable on this hive.
    #[error("backend {backend} is not available on this hive (available: {})", available.join(", "))]
    BackendAbsent {
        backend: Backend,
        available: Vec<&'static str>,
    },
    /// `backend: cuda` on a hive that sees no GPU.
    #[error("no GPU is visible on this hive")]
    NoGpu,
    /// A worker with the id exists.
    #[error("a worker with id {worker_id} already exists")]
    Exists { worker_id: String },
    /// The model is not in the catalog.
    #[error("{model_ref} is not provisioned on this hive; POST /v1/models/provision first")]
    NotProvisioned { model_ref: String },
    /// Not enough free memory on the device, counting loading workers.
    #[error("{model_ref} needs {} bytes on {backend} device {}; {} are free and {} are reserved by loading workers", memory.required_bytes, memory.device, memory.available_bytes, memory.reserved_bytes)]
    Memory {
        model_ref: String,
        backend: Backend,
        memory: MemoryShortfall,
    },
    /// The circuit breaker for the model and device is open.
    #[error("the circuit breaker for {model_ref} on device {device} is open after repeated failures; retry in {retry_after_s}s")]
    CircuitOpen {
        model_ref: String,
        device: u32,
        retry_after_s: u64,
    },
    /// No worker with the id.
    #[error("no worker with id {worker_id:?}")]
    Unknown { worker_id: String },
    /// A ready callback for another model than the worker was spawned for.
    #[error("worker {worker_id} was spawned for {spawned}, not {reported}")]
    WrongModel {
        worker_id: String,
        spawned: String,
        reported: String,
    },
}

/// Why the worker service cannot start, or a reload's settings are refused.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The restart policy's settings are invalid.
    #[error("restart policy")]
    Policy(#[source] restart_policy::ConfigError),
    /// The circuit breaker's settings are invalid.
    #[error("circuit breaker")]
    Breaker(#[source] restart_policy::ConfigError),
    /// The thread that forks workers could not start.
    #[error("cannot start the launcher thread")]
    Launcher(#[source] std::io::Error),
    /// `--worker-binary --version` did not run.
    #[error("the worker binary {} cannot be run (--worker-binary / RBEE_WORKER_BINARY)", .0.display())]
    WorkerBinary(std::path::PathBuf),
}

/// The numbers behind [`WorkerError::Memory`], sent as `details`.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryShortfall {
    /// Bytes the worker is estimated to need.
    pub required_bytes: u64,
    /// Bytes free on the device.
    pub available_bytes: u64,
    /// Bytes claimed by workers still loading.
    pub reserved_bytes: u64,
    /// The device index.
    pub device: u32,
}

#[derive(Serialize)]
struct Available<'a> {
    available: &'a [&'static str],
}

impl Coded for WorkerError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::ShuttingDown => ErrorCode::ShuttingDown,
            Self::Invalid(_) => ErrorCode::InvalidRequest,
            Self::UnknownBackend { .. } | Self::BackendAbsent { .. } | Self::NoGpu => {
                ErrorCode::BackendUnavailable
            }
            Self::Exists { .. } | Self::WrongModel { .. } => ErrorCode::Conflict,
            Self::NotProvisioned { .. } => ErrorCode::ModelNotFound,
            Self::Memory {
                backend: Backend::Cuda,
                ..
            } => ErrorCode::InsufficientVram,
            Self::Memory { .. } => ErrorCode::InsufficientRam,
            Self::CircuitOpen { .. } => ErrorCode::CircuitOpen,
            Self::Unknown { .. } => ErrorCode::NotFound,
        }
    }

    fn details(&self) -> Option<serde_json::Value> {
        match self {
            Self::Invalid(fields) => Some(rbee_api::error::fields_details(fields)),
            Self::UnknownBackend { available, .. } | Self::BackendAbsent { available, .. } => {
                serde_json::to_value(Available { available }).ok()
            }
            Self::Memory { memory, .. } => serde_json::to_value(memory).ok(),
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::CircuitOpen { retry_after_s, .. } => Some(*retry_after_s),
            _ => None,
        }
    }
}
