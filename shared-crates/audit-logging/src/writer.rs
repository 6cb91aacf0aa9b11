//! The file side of the trail: lock, resume, append, rotate, sync.
//!
//! Runs on the logger's own thread; nothing here is on a request's path.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use serde_json::{json, Value};

use crate::canonical::{canonical_json, chain_hash, CanonicalError, GENESIS_HASH};
use crate::config::{AuditConfig, FlushPolicy};
use crate::event::AuditEvent;
use crate::verify::trail_files;

/// Why the trail could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Bad settings.
    #[error("audit configuration: {0}")]
    Config(String),
    /// Another process holds the directory's lock.
    #[error("audit directory {0} is locked by another writer; one process per service id")]
    Locked(PathBuf),
    /// A file system operation failed.
    #[error("audit {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The last complete record of the trail cannot be read, so the chain
    /// cannot be continued.
    #[error("audit trail {file}:{line} is unreadable ({reason}); run `rbee-audit verify` on the directory")]
    Corrupt {
        /// File.
        file: PathBuf,
        /// 1-based line.
        line: u64,
        /// Why.
        reason: TailError,
    },
    /// An event could not be serialized canonically.
    #[error("audit record: {0}")]
    Canonical(#[from] CanonicalError),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> AuditError {
    let path = path.to_owned();
    move |source| AuditError::Io { what, path, source }
}

/// One event waiting to be written.
#[derive(Debug)]
pub(crate) struct Pending {
    pub at: SystemTime,
    pub request_id: Option<String>,
    pub event: AuditEvent,
}

struct OpenFile {
    file: File,
    name: String,
    bytes: u64,
    lines: u64,
    date: String,
}

pub(crate) struct TrailWriter {
    dir: PathBuf,
    service_id: String,
    policy: FlushPolicy,
    max_file_bytes: u64,
    min_free_bytes: u64,
    dropped: Counter,
    _lock: File,
    current: Option<OpenFile>,
    next_id: u64,
    prev_hash: String,
    unsynced: u32,
    last_sync: Instant,
    last_disk_check: Option<Instant>,
    disk_refusing: bool,
    pending_recovery: Option<AuditEvent>,
}

impl std::fmt::Debug for TrailWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrailWriter")
            .field("dir", &self.dir)
            .field("next_id", &self.next_id)
            .finish_non_exhaustive()
    }
}

const LOCK_FILE: &str = ".lock";
const DISK_CHECK_EVERY: Duration = Duration::from_secs(1);

impl TrailWriter {
    /// Create the directory (0700), take its lock, and find where the chain
    /// ends. A torn last line is left as it is; the chain continues in a new
    /// file whose first record says so.
    pub(crate) fn open(config: &AuditConfig, dropped: Counter) -> Result<Self, AuditError> {
        let dir = config
            .service_dir()
            .ok_or_else(|| AuditError::Config("local audit needs a directory".to_owned()))?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io("create directory", &dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("set permissions of", &dir))?;
        let lock = take_lock(&dir)?;

        let mut writer = Self {
            dir,
            service_id: config.service_id.clone(),
            policy: config.flush,
            max_file_bytes: config.max_file_bytes,
            min_free_bytes: config.min_free_bytes,
            dropped,
            _lock: lock,
            current: None,
            next_id: 1,
            prev_hash: GENESIS_HASH.to_owned(),
            unsynced: 0,
            last_sync: Instant::now(),
            last_disk_check: None,
            disk_refusing: false,
            pending_recovery: None,
        };
        writer.pending_recovery = writer.resume()?;
        if let Some(event) = &writer.pending_recovery {
            tracing::warn!(
                ?event,
                "audit trail ended in a torn line; continuing the chain in a new file"
            );
            if !writer.disk_is_short() {
                writer.write_recovery()?;
                writer.sync()?;
            }
        }
        Ok(writer)
    }

    /// Find the last complete record; reopen its file for appending unless
    /// the trail ends in a torn line. Returns the recovery event to write.
    fn resume(&mut self) -> Result<Option<AuditEvent>, AuditError> {
        let files = trail_files(&self.dir).map_err(io("list", &self.dir))?;
        let mut torn: Option<AuditEvent> = None;
        for (index, path) in files.iter().enumerate().rev() {
            let content = std::fs::read(path).map_err(io("read", path))?;
            let name = file_name(path);
            let complete_end = content
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i + 1);
            let complete = &content[..complete_end];
            let lines = complete.iter().filter(|b| **b == b'\n').count() as u64;
            let newest = index + 1 == files.len();
            if newest && complete_end < content.len() {
                torn = Some(AuditEvent::TrailRecovered {
                    file: name.clone(),
                    line: lines + 1,
                    torn_bytes: (content.len() - complete_end) as u64,
                });
            }
            let Some(last) = complete[..complete_end.saturating_sub(1)]
                .split(|b| *b == b'\n')
                .next_back()
                .filter(|l| !l.is_empty())
            else {
                continue;
            };
            let (id, hash) = parse_tail(last).map_err(|reason| AuditError::Corrupt {
                file: path.clone(),
                line: lines,
                reason,
            })?;
            self.next_id = id + 1;
            self.prev_hash = hash;
            if newest && torn.is_none() {
                let file = OpenOptions::new()
                    .append(true)
                    .open(path)
                    .map_err(io("open", path))?;
                self.current = Some(OpenFile {
                    file,
                    date: file_date(&name).unwrap_or_default(),
                    name,
                    bytes: content.len() as u64,
                    lines,
                });
            }
            break;
        }
        Ok(torn)
    }

    /// Chain and write one record, then sync if the policy says so. A
    /// record that could not be written is counted as dropped.
    pub(crate) fn append(&mut self, pending: Pending) -> Result<(), AuditError> {
        if self.disk_is_short() {
            self.dropped.inc();
            return Ok(());
        }
        let result = self
            .write_recovery()
            .and_then(|()| self.write_record(pending));
        if result.is_err() {
            self.dropped.inc();
        }
        result
    }

    /// Write the record acknowledging a torn line, if one is owed.
    fn write_recovery(&mut self) -> Result<(), AuditError> {
        match self.pending_recovery.take() {
            Some(event) => self.write_record(Pending {
                at: SystemTime::now(),
                request_id: None,
                event,
            }),
            None => Ok(()),
        }
    }

    fn write_record(&mut self, pending: Pending) -> Result<(), AuditError> {
        let timestamp = humantime::format_rfc3339_millis(pending.at).to_string();
        let mut record = json!({
            "audit_id": self.next_id,
            "timestamp": timestamp,
            "service_id": self.service_id,
            "event": serde_json::to_value(&pending.event)
                .map_err(|e| AuditError::Config(format!("unserializable event: {e}")))?,
            "prev_hash": self.prev_hash,
        });
        if let (Some(id), Value::Object(map)) = (pending.request_id, &mut record) {
            map.insert("request_id".to_owned(), Value::String(id));
        }
        let hash = chain_hash(&self.prev_hash, &canonical_json(&record)?);
        if let Value::Object(map) = &mut record {
            map.insert("hash".to_owned(), Value::String(hash.clone()));
        }
        let mut line = canonical_json(&record)?;
        line.push('\n');

        let date: String = timestamp
            .chars()
            .take(10)
            .filter(char::is_ascii_digit)
            .collect();
        let file = self.file_for(&date, line.len() as u64)?;
        if let Err(source) = file.file.write_all(line.as_bytes()) {
            // Whatever part reached the file is a torn line; continue in a
            // new file so the chain after it stays valid.
            let torn_bytes = file
                .file
                .metadata()
                .map_or(0, |m| m.len().saturating_sub(file.bytes));
            let name = file.name.clone();
            let line_no = file.lines + 1;
            let path = self.dir.join(&name);
            let event = AuditEvent::TrailRecovered {
                file: name,
                line: line_no,
                torn_bytes,
            };
            self.current = None;
            tracing::error!(error = %source, ?event, "audit write failed; the next record starts a new file");
            if torn_bytes > 0 {
                self.pending_recovery = Some(event);
            }
            return Err(AuditError::Io {
                what: "write",
                path,
                source,
            });
        }
        file.bytes += line.len() as u64;
        file.lines += 1;
        self.prev_hash = hash;
        self.next_id += 1;
        self.unsynced += 1;
        match self.policy {
            FlushPolicy::Immediate => self.sync()?,
            FlushPolicy::Batched { records, .. } if self.unsynced >= records => self.sync()?,
            FlushPolicy::Batched { .. } => {}
        }
        Ok(())
    }

    /// `fsync` what was written since the last sync.
    pub(crate) fn sync(&mut self) -> Result<(), AuditError> {
        if let Some(current) = &self.current {
            if self.unsynced > 0 {
                current
                    .file
                    .sync_data()
                    .map_err(io("sync", &self.dir.join(&current.name)))?;
            }
        }
        self.unsynced = 0;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Time until a batched sync is due, when records wait for one.
    pub(crate) fn sync_due_in(&self) -> Option<Duration> {
        match self.policy {
            FlushPolicy::Batched { interval, .. } if self.unsynced > 0 => {
                Some(interval.saturating_sub(self.last_sync.elapsed()))
            }
            _ => None,
        }
    }

    /// The open file, rotating first when the day changed or the record
    /// would pass the size limit.
    fn file_for(&mut self, date: &str, len: u64) -> Result<&mut OpenFile, AuditError> {
        let rotate = match &self.current {
            None => true,
            Some(f) => f.date != date || (f.bytes > 0 && f.bytes + len > self.max_file_bytes),
        };
        if rotate {
            self.sync()?;
            let (file, name) = self.create_file(date)?;
            // Make the new directory entry itself durable.
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io("sync directory", &self.dir))?;
            self.current = Some(OpenFile {
                file,
                name,
                bytes: 0,
                lines: 0,
                date: date.to_owned(),
            });
        }
        self.current
            .as_mut()
            .ok_or_else(|| AuditError::Config("no audit file open".to_owned()))
    }

    /// The file the next record starts, `audit-<next id>-<date>.jsonl`. A
    /// file of that name is there when an earlier attempt created it and
    /// then wrote nothing (a crash right after creating it, a write that
    /// failed before its first byte): it is empty and is written into. One
    /// holding bytes (a torn first line) is left as it is and the chain
    /// continues in `audit-<next id>-<date>_<n>.jsonl`, which sorts after it.
    fn create_file(&self, date: &str) -> Result<(File, String), AuditError> {
        for attempt in 0..1000u32 {
            let name = if attempt == 0 {
                format!("audit-{:020}-{date}.jsonl", self.next_id)
            } else {
                format!("audit-{:020}-{date}_{attempt}.jsonl", self.next_id)
            };
            let path = self.dir.join(&name);
            match OpenOptions::new()
                .create_new(true)
                .append(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(file) => return Ok((file, name)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let empty = std::fs::symlink_metadata(&path)
                        .is_ok_and(|m| m.file_type().is_file() && m.len() == 0);
                    if empty {
                        let file = OpenOptions::new()
                            .append(true)
                            .open(&path)
                            .map_err(io("open", &path))?;
                        tracing::warn!(file = %name, "resuming the audit trail in an empty file an earlier attempt left");
                        return Ok((file, name));
                    }
                }
                Err(source) => {
                    return Err(AuditError::Io {
                        what: "create",
                        path,
                        source,
                    })
                }
            }
        }
        Err(AuditError::Config(format!(
            "no free audit file name for record {} on {date}",
            self.next_id
        )))
    }

    /// True while free space is under the reserve; checked at most once a second.
    fn disk_is_short(&mut self) -> bool {
        let due = self
            .last_disk_check
            .is_none_or(|t| t.elapsed() >= DISK_CHECK_EVERY);
        if !due {
            return self.disk_refusing;
        }
        self.last_disk_check = Some(Instant::now());
        let free = match nix::sys::statvfs::statvfs(&self.dir) {
            Ok(s) => s.blocks_available().saturating_mul(s.fragment_size()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read free disk space for the audit directory");
                return self.disk_refusing;
            }
        };
        let short = free < self.min_free_bytes;
        if short && !self.disk_refusing {
            tracing::error!(
                free_bytes = free,
                reserve_bytes = self.min_free_bytes,
                dir = %self.dir.display(),
                "audit trail NOT WRITTEN: free disk space is under the reserve; events are dropped and counted in rbee_audit_events_dropped_total until space is freed"
            );
        } else if !short && self.disk_refusing {
            tracing::warn!(
                free_bytes = free,
                "audit trail resumed: free disk space is above the reserve again"
            );
        }
        self.disk_refusing = short;
        short
    }
}

fn take_lock(dir: &Path) -> Result<File, AuditError> {
    let path = dir.join(LOCK_FILE);
    let mut lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io("open lock", &path))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(AuditError::Locked(dir.to_owned())),
        Err(std::fs::TryLockError::Error(source)) => {
            return Err(AuditError::Io {
                what: "lock",
                path,
                source,
            })
        }
    }
    // For an operator wondering who holds it.
    let _ = lock
        .set_len(0)
        .and_then(|()| writeln!(lock, "{}", std::process::id()));
    Ok(lock)
}

/// Why the last record of a trail cannot continue the chain.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// The line is not JSON.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// No numeric `audit_id`.
    #[error("no audit_id")]
    NoId,
    /// No 64-character `hash`.
    #[error("no hash")]
    NoHash,
}

fn parse_tail(line: &[u8]) -> Result<(u64, String), TailError> {
    let value: Value = serde_json::from_slice(line)?;
    let id = value
        .get("audit_id")
        .and_then(Value::as_u64)
        .ok_or(TailError::NoId)?;
    let hash = value
        .get("hash")
        .and_then(Value::as_str)
        .filter(|h| h.len() == 64)
        .ok_or(TailError::NoHash)?;
    Ok((id, hash.to_owned()))
}

pub(crate) fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `audit-<id>-<yyyymmdd>[_<n>].jsonl` → `yyyymmdd`.
fn file_date(name: &str) -> Option<String> {
    name.strip_suffix(".jsonl")?
        .rsplit('-')
        .next()
        .map(|d| d.split('_').next().unwrap_or(d))
        .filter(|d| d.len() == 8)
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuditConfig;

    fn pending(i: u64) -> Pending {
        Pending {
            at: SystemTime::now(),
            request_id: None,
            event: AuditEvent::ModelEvicted {
                model_ref: format!("file:/models/m{i}.gguf"),
            },
        }
    }

    fn today() -> String {
        humantime::format_rfc3339(SystemTime::now())
            .to_string()
            .chars()
            .take(10)
            .filter(char::is_ascii_digit)
            .collect()
    }

    #[test]
    fn a_write_that_fails_before_its_first_byte_is_counted_and_the_next_record_takes_its_file() {
        let root = tempfile::tempdir().expect("dir");
        let config = AuditConfig {
            min_free_bytes: 0,
            flush: FlushPolicy::Immediate,
            ..AuditConfig::local(root.path(), "svc")
        };
        let dropped = Counter::default();
        let mut writer = TrailWriter::open(&config, dropped.clone()).expect("open");
        writer.append(pending(0)).expect("first record");
        // Rotate into a new file, then make its first write fail as a full
        // disk would: nothing reaches the file.
        writer.max_file_bytes = 1;
        let date = today();
        let name = writer.file_for(&date, 100).expect("rotate").name.clone();
        assert_eq!(name, format!("audit-{:020}-{date}.jsonl", 2));
        let path = writer.dir.join(&name);
        if let Some(current) = writer.current.as_mut() {
            current.file = File::open(&path).expect("a read-only handle");
        }
        assert!(writer.append(pending(1)).is_err());
        assert_eq!(dropped.get(), 1, "the unwritten record is counted");
        // The empty file is written into; no EEXIST from here on.
        writer.max_file_bytes = 1 << 20;
        writer.append(pending(2)).expect("the next record");
        writer.append(pending(3)).expect("and the one after");
        drop(writer);
        let report = crate::verify_dir(&root.path().join("svc")).expect("verifies");
        assert_eq!((report.records, report.files), (3, 2));
        assert_eq!(dropped.get(), 1);
    }

    #[test]
    fn a_file_name_holding_a_torn_line_is_continued_under_a_name_that_sorts_after_it() {
        assert_eq!(
            file_date("audit-00000000000000000004-20261207_1.jsonl").as_deref(),
            Some("20261207")
        );
        assert_eq!(
            file_date("audit-00000000000000000004-20261207.jsonl").as_deref(),
            Some("20261207")
        );
        let mut names = [
            "audit-00000000000000000004-20261207_1.jsonl",
            "audit-00000000000000000005-20261207.jsonl",
            "audit-00000000000000000004-20261207.jsonl",
        ];
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "audit-00000000000000000004-20261207.jsonl",
                "audit-00000000000000000004-20261207_1.jsonl",
                "audit-00000000000000000005-20261207.jsonl",
            ]
        );
    }
}
