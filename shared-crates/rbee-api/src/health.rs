//! Probe bodies: `/health`, `/health/live`, `/health/ready`.

use serde::{Deserialize, Serialize};

/// `GET /health` (and `/v1/health` on the hive): the simple check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthResponse {
    /// Always `"ok"` when the process answers.
    pub status: String,
    /// The daemon's version (`CARGO_PKG_VERSION`).
    pub version: String,
}

impl HealthResponse {
    /// `{status:"ok", version}`.
    pub fn ok(version: &str) -> Self {
        Self {
            status: "ok".to_owned(),
            version: version.to_owned(),
        }
    }
}

/// `GET /health/live`: `{"status":"alive"}` whenever the process can answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveResponse {
    /// Always `"alive"`.
    pub status: String,
}

impl Default for LiveResponse {
    fn default() -> Self {
        Self {
            status: "alive".to_owned(),
        }
    }
}

/// What a readiness probe says, besides its status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadyStatus {
    /// Ready: 200.
    Ready,
    /// A worker still loading its model: 503.
    Loading,
    /// Shutting down: 503.
    Draining,
    /// A queen none of whose hives answers: 503.
    NoReachableHive,
    /// A hive that must have a ready worker (`--ready-requires-worker`) and
    /// has none: 503.
    NoReadyWorker,
}

/// `GET /health/ready` on the queen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueenReady {
    /// The verdict.
    pub status: ReadyStatus,
    /// Hives answering their polls.
    pub hives_reachable: usize,
    /// Hives that stopped answering.
    pub hives_unreachable: usize,
}

/// `GET /health/ready` on a hive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HiveReady {
    /// The verdict.
    pub status: ReadyStatus,
    /// Workers in its registry.
    pub workers_total: u64,
    /// Of them, ready for requests.
    pub workers_ready: u64,
}

/// `GET /health/ready` on a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerReady {
    /// The verdict.
    pub status: ReadyStatus,
    /// The worker's state.
    pub state: crate::worker::WorkerState,
    /// Capacity in use, once the model is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Capacity>,
}

/// A worker's capacity in use: slots, and KV cache blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Sequences it can run at once.
    pub slots_total: usize,
    /// Of them, running.
    pub slots_running: usize,
    /// Admitted requests waiting for a slot.
    pub requests_waiting: i64,
    /// KV cache blocks in all.
    pub kv_blocks_total: i64,
    /// Held by running sequences.
    pub kv_blocks_used: i64,
    /// Free.
    pub kv_blocks_free: i64,
    /// Free but holding a cached prefix.
    pub kv_blocks_cached: i64,
}

/// `{"status": "ok"}`: a callback or heartbeat taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Always `ok`.
    pub status: String,
}

impl Default for Ack {
    fn default() -> Self {
        Self {
            status: "ok".to_owned(),
        }
    }
}

/// The body of `POST /v1/admin/shutdown`: empty, sent as JSON because the
/// route asks for `Content-Type: application/json` (so that a web page
/// cannot send it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminShutdown {}

/// The answer to `POST /v1/admin/shutdown`: 202, `{"status": "draining"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Draining {
    /// Always `draining`.
    pub status: ReadyStatus,
}
