//! The hive's own answers about itself and its workers: `GET /v1/status`,
//! `GET /v1/workers/health`, `POST /v1/workers/shutdown`.

use serde::{Deserialize, Serialize};

use crate::models::{DownloadInfo, ModelEntry};
use crate::worker::{Backend, WorkerInfo};

/// The host's CPUs and memory, as a device a worker can be placed on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuStatus {
    /// Always 0.
    pub index: u32,
    /// CPUs this process may run on.
    pub cpu_count: usize,
    /// `MemTotal`, when `/proc/meminfo` could be read.
    pub ram_total_bytes: Option<u64>,
    /// `MemAvailable`, likewise.
    pub ram_available_bytes: Option<u64>,
    /// Memory set aside for CPU workers still loading.
    pub ram_reserved_bytes: u64,
}

/// One GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuStatus {
    /// Device ordinal (CUDA index).
    pub index: u32,
    /// Product name.
    pub name: String,
    /// Total memory.
    pub vram_total_bytes: u64,
    /// Free memory now.
    pub vram_free_bytes: u64,
    /// Memory set aside for workers still loading on it.
    pub vram_reserved_bytes: u64,
    /// Memory its ready workers report.
    pub vram_used_by_workers_bytes: u64,
}

/// A device a worker can be placed on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Device {
    /// The host.
    Cpu(CpuStatus),
    /// An NVIDIA GPU.
    Cuda(GpuStatus),
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HiveStatus {
    /// The host, then each GPU.
    pub devices: Vec<Device>,
    /// The host's name.
    pub hostname: String,
    /// As in the host's device entry.
    pub cpu_count: usize,
    /// As in the host's device entry.
    pub ram_total_bytes: Option<u64>,
    /// As in the host's device entry.
    pub ram_available_bytes: Option<u64>,
    /// As in the host's device entry.
    pub ram_reserved_bytes: u64,
    /// Backends the worker binary was built with and this host can run.
    pub backends: Vec<Backend>,
    /// The GPUs, as in their device entries.
    pub gpus: Vec<GpuStatus>,
    /// Every worker.
    pub workers: Vec<WorkerInfo>,
    /// Provisioned models.
    pub models: Vec<ModelEntry>,
    /// Downloads in progress.
    pub downloads: Vec<DownloadInfo>,
}

/// `GET /v1/workers/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkersHealth {
    /// Workers in the registry.
    pub workers_total: u64,
    /// Ready for requests.
    pub workers_ready: u64,
    /// Loading their model.
    pub workers_loading: u64,
    /// Failed.
    pub workers_failed: u64,
    /// Every worker.
    pub workers: Vec<WorkerInfo>,
}

/// The answer to `POST /v1/workers/shutdown`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStopped {
    /// The worker.
    pub worker_id: String,
    /// Always `stopped`.
    pub state: String,
}

impl WorkerStopped {
    /// `worker_id` has stopped.
    pub fn new(worker_id: impl Into<String>) -> Self {
        Self {
            worker_id: worker_id.into(),
            state: "stopped".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_tagged_by_kind() {
        let gpu = Device::Cuda(GpuStatus {
            index: 1,
            name: "H100".into(),
            vram_total_bytes: 8,
            vram_free_bytes: 4,
            vram_reserved_bytes: 2,
            vram_used_by_workers_bytes: 1,
        });
        assert_eq!(
            serde_json::to_value(&gpu).expect("json"),
            serde_json::json!({"kind": "cuda", "index": 1, "name": "H100", "vram_total_bytes": 8,
                "vram_free_bytes": 4, "vram_reserved_bytes": 2, "vram_used_by_workers_bytes": 1})
        );
        let cpu: Device = serde_json::from_value(serde_json::json!({"kind": "cpu", "index": 0,
            "cpu_count": 2, "ram_total_bytes": null, "ram_available_bytes": null, "ram_reserved_bytes": 0}))
        .expect("reads");
        assert!(matches!(cpu, Device::Cpu(CpuStatus { cpu_count: 2, .. })));
    }
}
