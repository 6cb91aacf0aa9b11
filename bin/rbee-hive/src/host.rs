//! The host as the hive reports it: name, CPUs, RAM, GPUs.
//!
//! RAM comes from `/proc/meminfo` (`MemAvailable`, what the kernel says can
//! be allocated without swapping). GPUs come from `nvidia-smi` (run through
//! the launcher, the hive's only way to start a process); without it the
//! list is empty and `cuda` is not offered.

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

/// GPUs, through `nvidia-smi`; empty when it is missing or fails.
pub async fn gpus(launcher: &Launcher) -> Vec<GpuInfo> {
    let out = launcher
        .probe(
            "nvidia-smi",
            &[
                "--query-gpu=index,name,memory.total,memory.free",
                "--format=csv,noheader,nounits",
            ],
        )
        .await;
    out.map(|o| parse_nvidia_smi(&o)).unwrap_or_default()
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
    }
}
