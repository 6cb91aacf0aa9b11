//! Audit settings, from the environment or built in code.

use std::path::PathBuf;
use std::time::Duration;

use crate::writer::AuditError;

/// Whether the trail is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuditMode {
    /// Nothing is written and emitting does no work (default).
    #[default]
    Disabled,
    /// Records are written under the audit directory.
    Local,
}

/// When records reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushPolicy {
    /// `fsync` after every record (compliance setups).
    Immediate,
    /// `fsync` after `records` records or `interval`, whichever comes first.
    Batched {
        /// Records between syncs.
        records: u32,
        /// Longest time a written record waits for its sync.
        interval: Duration,
    },
}

/// Records between syncs in the default batched policy.
const DEFAULT_FLUSH_RECORDS: u32 = 100;
/// Longest wait for a sync in the default batched policy.
const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_millis(1000);

impl Default for FlushPolicy {
    fn default() -> Self {
        Self::Batched {
            records: DEFAULT_FLUSH_RECORDS,
            interval: DEFAULT_FLUSH_INTERVAL,
        }
    }
}

/// Everything the logger needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// Disabled or local.
    pub mode: AuditMode,
    /// `LLORCH_AUDIT_DIR`; records go to `<dir>/<service_id>/`.
    pub dir: Option<PathBuf>,
    /// `queen-rbee`, `rbee-hive` or `llm-worker-rbee-<worker_id>`.
    pub service_id: String,
    /// Durability.
    pub flush: FlushPolicy,
    /// Start a new file once the current one would pass this size (default 64 MiB).
    pub max_file_bytes: u64,
    /// Refuse to write while the disk has less free space than this (default 100 MiB).
    pub min_free_bytes: u64,
    /// Events buffered between emitters and the writer (default 4096).
    pub capacity: usize,
}

impl AuditConfig {
    /// A disabled configuration for `service_id`.
    pub fn disabled(service_id: impl Into<String>) -> Self {
        Self {
            mode: AuditMode::Disabled,
            dir: None,
            service_id: service_id.into(),
            flush: FlushPolicy::default(),
            max_file_bytes: 64 * 1024 * 1024,
            min_free_bytes: 100 * 1024 * 1024,
            capacity: 4096,
        }
    }

    /// A local trail under `dir` with default settings.
    pub fn local(dir: impl Into<PathBuf>, service_id: impl Into<String>) -> Self {
        Self {
            mode: AuditMode::Local,
            dir: Some(dir.into()),
            ..Self::disabled(service_id)
        }
    }

    /// Read `LLORCH_AUDIT_MODE` (`disabled` | `local`), `LLORCH_AUDIT_DIR`,
    /// `LLORCH_AUDIT_FLUSH` (`immediate` | `batched`),
    /// `LLORCH_AUDIT_FLUSH_RECORDS`, `LLORCH_AUDIT_FLUSH_MS`,
    /// `LLORCH_AUDIT_MAX_FILE_BYTES`, `LLORCH_AUDIT_MIN_FREE_BYTES`.
    /// Every bad value is reported at once.
    pub fn from_env(service_id: impl Into<String>) -> Result<Self, AuditError> {
        Self::from_lookup(service_id, |key| std::env::var(key).ok())
    }

    /// [`from_env`](Self::from_env) over any lookup (tests).
    pub fn from_lookup(
        service_id: impl Into<String>,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, AuditError> {
        let mut config = Self::disabled(service_id);
        let mut errors = Vec::new();
        match get("LLORCH_AUDIT_MODE").as_deref().map(str::trim) {
            None | Some("" | "disabled") => {}
            Some("local") => config.mode = AuditMode::Local,
            Some(other) => errors.push(format!(
                "LLORCH_AUDIT_MODE=`{other}` is not `disabled` or `local`"
            )),
        }
        config.dir = get("LLORCH_AUDIT_DIR")
            .filter(|d| !d.trim().is_empty())
            .map(PathBuf::from);
        if config.mode == AuditMode::Local && config.dir.is_none() {
            errors.push("LLORCH_AUDIT_MODE=local needs LLORCH_AUDIT_DIR".to_owned());
        }
        let number = |key: &str, errors: &mut Vec<String>| -> Option<u64> {
            let raw = get(key)?;
            match raw.trim().parse::<u64>() {
                Ok(n) if n > 0 => Some(n),
                _ => {
                    errors.push(format!("{key}=`{raw}` is not a positive integer"));
                    None
                }
            }
        };
        let records = number("LLORCH_AUDIT_FLUSH_RECORDS", &mut errors);
        let interval_ms = number("LLORCH_AUDIT_FLUSH_MS", &mut errors);
        match get("LLORCH_AUDIT_FLUSH").as_deref().map(str::trim) {
            None | Some("" | "batched") => {
                config.flush = FlushPolicy::Batched {
                    records: records.map_or(DEFAULT_FLUSH_RECORDS, |n| {
                        u32::try_from(n).unwrap_or(u32::MAX)
                    }),
                    interval: interval_ms.map_or(DEFAULT_FLUSH_INTERVAL, Duration::from_millis),
                };
            }
            Some("immediate") => config.flush = FlushPolicy::Immediate,
            Some(other) => errors.push(format!(
                "LLORCH_AUDIT_FLUSH=`{other}` is not `immediate` or `batched`"
            )),
        }
        if let Some(n) = number("LLORCH_AUDIT_MAX_FILE_BYTES", &mut errors) {
            config.max_file_bytes = n;
        }
        if let Some(raw) = get("LLORCH_AUDIT_MIN_FREE_BYTES") {
            match raw.trim().parse::<u64>() {
                Ok(n) => config.min_free_bytes = n,
                Err(_) => errors.push(format!(
                    "LLORCH_AUDIT_MIN_FREE_BYTES=`{raw}` is not a non-negative integer"
                )),
            }
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(AuditError::Config(errors.join("; ")))
        }
    }

    /// `<dir>/<service_id>`, when local.
    pub fn service_dir(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(&self.service_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(pairs: &[(&str, &str)]) -> Result<AuditConfig, AuditError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        AuditConfig::from_lookup("svc", |k| map.get(k).cloned())
    }

    #[test]
    fn disabled_by_default() {
        let c = from(&[]).unwrap();
        assert_eq!(c.mode, AuditMode::Disabled);
        assert_eq!(c.flush, FlushPolicy::default());
    }

    #[test]
    fn local_with_all_settings() {
        let c = from(&[
            ("LLORCH_AUDIT_MODE", "local"),
            ("LLORCH_AUDIT_DIR", "/var/lib/rbee/audit"),
            ("LLORCH_AUDIT_FLUSH", "batched"),
            ("LLORCH_AUDIT_FLUSH_RECORDS", "10"),
            ("LLORCH_AUDIT_FLUSH_MS", "250"),
            ("LLORCH_AUDIT_MAX_FILE_BYTES", "1048576"),
            ("LLORCH_AUDIT_MIN_FREE_BYTES", "0"),
        ])
        .unwrap();
        assert_eq!(c.mode, AuditMode::Local);
        assert_eq!(
            c.service_dir().unwrap(),
            PathBuf::from("/var/lib/rbee/audit/svc")
        );
        assert_eq!(
            c.flush,
            FlushPolicy::Batched {
                records: 10,
                interval: Duration::from_millis(250)
            }
        );
        assert_eq!(c.max_file_bytes, 1_048_576);
        assert_eq!(c.min_free_bytes, 0);
    }

    #[test]
    fn every_bad_value_is_reported_at_once() {
        let err = from(&[
            ("LLORCH_AUDIT_MODE", "remote"),
            ("LLORCH_AUDIT_FLUSH", "sometimes"),
            ("LLORCH_AUDIT_FLUSH_MS", "-1"),
            ("LLORCH_AUDIT_MAX_FILE_BYTES", "big"),
        ])
        .unwrap_err()
        .to_string();
        for needle in [
            "LLORCH_AUDIT_MODE",
            "LLORCH_AUDIT_FLUSH=",
            "LLORCH_AUDIT_FLUSH_MS",
            "LLORCH_AUDIT_MAX_FILE_BYTES",
        ] {
            assert!(err.contains(needle), "{needle} missing from: {err}");
        }
    }

    #[test]
    fn local_without_a_directory_is_an_error() {
        let err = from(&[("LLORCH_AUDIT_MODE", "local")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("LLORCH_AUDIT_DIR"), "{err}");
    }
}
