//! Worker lifecycle bodies exchanged between `llm-worker-rbee` and `rbee-hive`.

use serde::{Deserialize, Serialize};

/// Compute backend a worker runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Host CPU, always available.
    Cpu,
    /// NVIDIA GPU through CUDA.
    Cuda,
    /// Apple GPU through Metal.
    Metal,
}

impl Backend {
    /// The wire and metric-label string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::Metal => "metal",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            "metal" => Ok(Self::Metal),
            other => Err(format!(
                "unknown backend `{other}`: expected cpu, cuda or metal"
            )),
        }
    }
}

/// A worker's state as the worker reports it and the hive's registry keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    /// Process started, model not yet loaded.
    Loading,
    /// Model loaded, no request running.
    Idle,
    /// At least one request running.
    Busy,
    /// Finishing in-flight work before exit; accepts no new work.
    Draining,
    /// Given up on by the hive's restart policy.
    Failed,
}

impl WorkerState {
    /// The wire and metric-label string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loading => "loading",
            Self::Idle => "idle",
            Self::Busy => "busy",
            Self::Draining => "draining",
            Self::Failed => "failed",
        }
    }
}

/// `POST {hive}/v1/workers/ready`: sent once the model is loaded and the
/// worker's server listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadyCallback {
    /// The id the hive gave the worker.
    pub worker_id: String,
    /// Base URL the worker is reachable at.
    pub url: String,
    /// The model reference it serves, e.g. `file:/models/x.gguf`.
    pub model_ref: String,
    /// Backend it runs on.
    pub backend: Backend,
    /// Device ordinal (0 for cpu).
    pub device: u32,
    /// Concurrent sequences it can run.
    pub slots_total: u32,
    /// GPU memory the model occupies (0 on cpu).
    pub vram_bytes: u64,
}

/// `POST {hive}/v1/workers/heartbeat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The id the hive gave the worker.
    pub worker_id: String,
    /// RFC 3339 UTC time the heartbeat was sent.
    pub timestamp: String,
    /// Current state.
    pub state: WorkerState,
}

/// `GET /v1/ready` on the worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerReadiness {
    /// True when the worker accepts inference now.
    pub ready: bool,
    /// Current state.
    pub state: WorkerState,
    /// Whether the model is in memory.
    pub model_loaded: bool,
}

/// `POST /v1/workers/spawn` on the hive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnRequest {
    /// A provisioned model reference.
    pub model_ref: String,
    /// Backend (`cpu`, `cuda`, `metal`); `cpu` when omitted. A string, so
    /// that a backend this build does not know is answered
    /// `BACKEND_UNAVAILABLE` like one this host lacks, not `INVALID_JSON`.
    #[serde(default)]
    pub backend: Option<String>,
    /// Device ordinal; for `cuda` the GPU with the most free VRAM when
    /// omitted, always 0 for `cpu`.
    #[serde(default)]
    pub device: Option<u32>,
    /// The worker's id; the hive mints one when omitted.
    #[serde(default)]
    pub worker_id: Option<String>,
    /// Concurrent sequences (1..=64; default [`default_slots`] of the KV
    /// cache pool).
    #[serde(default)]
    pub slots: Option<u16>,
    /// Positions of the worker's KV cache pool, all sequences together
    /// (128..=16,777,216; default [`default_kv_tokens`]).
    #[serde(default)]
    pub kv_tokens: Option<u32>,
}

/// A worker's default positions per sequence (`--ctx`).
pub const DEFAULT_CONTEXT: u32 = 4096;

/// Positions a typical sequence is given when the number of slots is left
/// to the size of the KV cache pool.
pub const TYPICAL_SEQUENCE: u32 = 512;

/// The default KV cache pool: four full contexts.
pub fn default_kv_tokens(context: u32) -> u32 {
    context.saturating_mul(4)
}

/// The default slots for a pool of `kv_tokens` positions: as many
/// sequences of [`TYPICAL_SEQUENCE`] positions as it holds, 1 to 64.
pub fn default_slots(kv_tokens: u32) -> u16 {
    u16::try_from((kv_tokens / TYPICAL_SEQUENCE).clamp(1, 64)).unwrap_or(64)
}

/// The 202 answer to a spawn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpawnAccepted {
    /// The worker's id.
    pub worker_id: String,
    /// Its URL: `null` until the worker reports it in its ready callback
    /// (it listens on a port the OS chooses).
    pub url: Option<String>,
    /// Always `loading`.
    pub state: WorkerState,
    /// Host memory (cpu) or GPU memory (cuda) reserved for it while it loads.
    pub reserved_bytes: u64,
}

/// One worker as the hive's registry shows it; times are RFC 3339.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Its id.
    pub worker_id: String,
    /// Process id of the current process, if running.
    pub pid: Option<u32>,
    /// Port it listens on, once ready.
    pub port: Option<u16>,
    /// Base URL, once ready.
    pub url: Option<String>,
    /// Model served.
    pub model_ref: String,
    /// Backend.
    pub backend: Backend,
    /// Device ordinal.
    pub device: u32,
    /// Registry state.
    pub state: WorkerState,
    /// Restarts since the last stable period.
    pub restart_count: u32,
    /// When it was last restarted.
    pub last_restart: Option<String>,
    /// When its last heartbeat arrived.
    pub last_heartbeat: Option<String>,
    /// Consecutive failed health checks.
    pub failed_health_checks: u32,
    /// When the current process started.
    pub started_at: String,
    /// Slots.
    pub slots_total: u32,
    /// GPU memory it reported (0 on cpu).
    pub vram_bytes: u64,
    /// Why the hive gave up on it (state `failed`): the process could not
    /// be started, or how its last process ended and why no restart
    /// followed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// One target group of Prometheus's HTTP service discovery
/// (`http_sd_configs`): addresses to scrape and the labels they get.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrapeTargetGroup {
    /// `host:port` of each `/metrics` endpoint.
    pub targets: Vec<String>,
    /// Labels added to every series scraped from them.
    pub labels: std::collections::BTreeMap<String, String>,
}

impl WorkerInfo {
    /// Its `/metrics` endpoint as a target group labelled `worker_id`,
    /// `model`, `backend` and `device`; `None` until it has an address.
    pub fn scrape_target(&self) -> Option<ScrapeTargetGroup> {
        let url = self.url.as_deref()?;
        let authority = url.split_once("://").map_or(url, |(_, rest)| rest);
        let authority = authority.split('/').next().unwrap_or(authority);
        if authority.is_empty() {
            return None;
        }
        let labels = [
            ("worker_id", self.worker_id.clone()),
            ("model", self.model_ref.clone()),
            ("backend", self.backend.as_str().to_owned()),
            ("device", self.device.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Some(ScrapeTargetGroup {
            targets: vec![authority.to_owned()],
            labels,
        })
    }
}

/// `GET /v1/workers/list` and `/v1/workers/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerList {
    /// Workers, by id.
    pub workers: Vec<WorkerInfo>,
}

/// `POST /v1/workers/shutdown`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownWorkerRequest {
    /// The worker to stop.
    pub worker_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_callback_round_trips_with_contract_field_names() {
        let body = r#"{"worker_id":"w1","url":"http://127.0.0.1:4100","model_ref":"file:/m.gguf",
            "backend":"cpu","device":0,"slots_total":1,"vram_bytes":0}"#;
        let cb: ReadyCallback = serde_json::from_str(body).unwrap();
        assert_eq!(cb.backend, Backend::Cpu);
        let back = serde_json::to_value(&cb).unwrap();
        assert_eq!(back["slots_total"], 1);
        assert_eq!(back["backend"], "cpu");
    }

    #[test]
    fn heartbeat_rejects_unknown_state() {
        let body = r#"{"worker_id":"w1","timestamp":"2026-01-01T00:00:00Z","state":"sleepy"}"#;
        assert!(serde_json::from_str::<Heartbeat>(body).is_err());
    }

    #[test]
    fn backend_parses_only_known_names() {
        assert_eq!("cuda".parse::<Backend>(), Ok(Backend::Cuda));
        assert!("CUDA".parse::<Backend>().is_err());
        assert!("rocm".parse::<Backend>().is_err());
    }

    #[test]
    fn scrape_target_is_the_url_authority_with_the_worker_labels() {
        let mut info: WorkerInfo = serde_json::from_value(serde_json::json!({
            "worker_id": "w1", "pid": 7, "port": 4100, "url": "http://10.0.0.5:4100",
            "model_ref": "hf:org/repo:q4.gguf", "backend": "cuda", "device": 1,
            "state": "idle", "restart_count": 0, "last_restart": null,
            "last_heartbeat": null, "failed_health_checks": 0,
            "started_at": "2026-01-01T00:00:00Z", "slots_total": 1, "vram_bytes": 0
        }))
        .unwrap();
        let group = info.scrape_target().unwrap();
        assert_eq!(group.targets, vec!["10.0.0.5:4100".to_owned()]);
        assert_eq!(group.labels["model"], "hf:org/repo:q4.gguf");
        assert_eq!(group.labels["backend"], "cuda");
        assert_eq!(group.labels["device"], "1");
        assert_eq!(group.labels["worker_id"], "w1");
        info.url = Some("http://[::1]:4100/".to_owned());
        assert_eq!(
            info.scrape_target().unwrap().targets,
            vec!["[::1]:4100".to_owned()]
        );
        info.url = None;
        assert_eq!(info.scrape_target(), None);
        info.url = Some("http://".to_owned());
        assert_eq!(info.scrape_target(), None);
    }
}
