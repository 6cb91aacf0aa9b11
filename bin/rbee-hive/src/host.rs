//! The host as the hive reports it: name, CPUs, RAM, GPUs.
//!
//! RAM comes from `/proc/meminfo` (`MemAvailable`, what the kernel says can
//! be allocated without swapping). GPUs come from NVML (`libnvidia-ml`,
//! loaded at run time) when the driver provides it, else from `nvidia-smi`
//! (run through the launcher, the hive's only way to start a process);
//! without either the list is empty and `cuda` is not offered. Both also
//! report the GPU memory of each process, which is how a worker's
//! `vram_bytes` is measured.

use std::collections::HashMap;
use std::sync::OnceLock;

use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::Nvml;
use serde::{Deserialize, Serialize};

use crate::workers::process::Launcher;

/// One GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// Device ordinal (CUDA index).
    pub index: u32,
    /// Product name.
    pub name: String,
    /// Total memory.
    pub vram_total_bytes: u64,
    /// Free memory now.
    pub vram_free_bytes: u64,
}

/// Host memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    /// `MemTotal`.
    pub total_bytes: u64,
    /// `MemAvailable`.
    pub available_bytes: u64,
}

/// Read `/proc/meminfo`.
pub fn memory() -> Option<Memory> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo(&text)
}

fn parse_meminfo(text: &str) -> Option<Memory> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..]
            .trim()
            .trim_start_matches(':')
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kib * 1024)
    };
    Some(Memory {
        total_bytes: field("MemTotal")?,
        available_bytes: field("MemAvailable")?,
    })
}

/// CPUs this process may use.
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// The host name.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// GPUs now, and the GPU memory used by each process id.
#[derive(Debug, Clone, Default)]
pub struct GpuReport {
    /// Every GPU.
    pub gpus: Vec<GpuInfo>,
    /// Bytes of GPU memory per process id, summed over GPUs.
    pub process_vram: HashMap<u32, u64>,
    /// `nvml`, `nvidia-smi` or `none`.
    pub source: &'static str,
}

/// Ask NVML, then `nvidia-smi`; an empty report when neither answers.
pub async fn gpus(launcher: &Launcher) -> GpuReport {
    if let Ok(Some(report)) = rbee_http::task::spawn_blocking(nvml_report).await {
        return report;
    }
    let Some(listing) = launcher
        .probe(
            "nvidia-smi",
            &[
                "--query-gpu=index,name,memory.total,memory.free",
                "--format=csv,noheader,nounits",
            ],
        )
        .await
    else {
        return GpuReport {
            source: "none",
            ..GpuReport::default()
        };
    };
    let apps = launcher
        .probe(
            "nvidia-smi",
            &[
                "--query-compute-apps=pid,used_memory",
                "--format=csv,noheader,nounits",
            ],
        )
        .await
        .unwrap_or_default();
    GpuReport {
        gpus: parse_nvidia_smi(&listing),
        process_vram: parse_compute_apps(&apps),
        source: "nvidia-smi",
    }
}

fn nvml() -> Option<&'static Nvml> {
    static NVML: OnceLock<Option<Nvml>> = OnceLock::new();
    NVML.get_or_init(|| Nvml::init().ok()).as_ref()
}

fn nvml_report() -> Option<GpuReport> {
    let nvml = nvml()?;
    let mut report = GpuReport {
        source: "nvml",
        ..GpuReport::default()
    };
    for index in 0..nvml.device_count().ok()? {
        let device = nvml.device_by_index(index).ok()?;
        let memory = device.memory_info().ok()?;
        report.gpus.push(GpuInfo {
            index,
            name: device.name().unwrap_or_default(),
            vram_total_bytes: memory.total,
            vram_free_bytes: memory.free,
        });
        for p in device.running_compute_processes().unwrap_or_default() {
            if let UsedGpuMemory::Used(bytes) = p.used_gpu_memory {
                *report.process_vram.entry(p.pid).or_default() += bytes;
            }
        }
    }
    Some(report)
}

fn parse_compute_apps(text: &str) -> HashMap<u32, u64> {
    const MIB: u64 = 1024 * 1024;
    let mut out = HashMap::new();
    for line in text.lines() {
        let mut parts = line.split(',').map(str::trim);
        if let (Some(Ok(pid)), Some(Ok(mib))) = (
            parts.next().map(str::parse::<u32>),
            parts.next().map(str::parse::<u64>),
        ) {
            *out.entry(pid).or_default() += mib * MIB;
        }
    }
    out
}

fn parse_nvidia_smi(text: &str) -> Vec<GpuInfo> {
    const MIB: u64 = 1024 * 1024;
    text.lines()
        .filter_map(|line| {
            let parts: Vec<&str> = line.split(',').map(str::trim).collect();
            let [index, name, total, free] = parts.as_slice() else {
                return None;
            };
            Some(GpuInfo {
                index: index.parse().ok()?,
                name: (*name).to_owned(),
                vram_total_bytes: total.parse::<u64>().ok()? * MIB,
                vram_free_bytes: free.parse::<u64>().ok()? * MIB,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields_are_read_in_bytes() {
        let text = "MemTotal:       16318652 kB\nMemFree:          512000 kB\nMemAvailable:    8159326 kB\n";
        let m = parse_meminfo(text).unwrap();
        assert_eq!(m.total_bytes, 16_318_652 * 1024);
        assert_eq!(m.available_bytes, 8_159_326 * 1024);
        assert!(parse_meminfo("MemTotal: 1 kB\n").is_none());
        assert!(memory().is_some_and(|m| m.total_bytes >= m.available_bytes));
    }

    #[test]
    fn nvidia_smi_csv_is_parsed_and_junk_skipped() {
        let text = "0, NVIDIA H100 80GB HBM3, 81559, 80000\n1, NVIDIA H100 80GB HBM3, 81559, 1024\nNo devices were found\n";
        let gpus = parse_nvidia_smi(text);
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[1].index, 1);
        assert_eq!(gpus[1].vram_free_bytes, 1024 * 1024 * 1024);
        assert_eq!(gpus[0].name, "NVIDIA H100 80GB HBM3");
        let apps = parse_compute_apps("4242, 1500\n4242, 500\n77, [N/A]\n");
        assert_eq!(apps.get(&4242), Some(&(2000 * 1024 * 1024)));
        assert!(!apps.contains_key(&77));
    }
}
