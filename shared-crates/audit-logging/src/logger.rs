//! The emitting side: a cheap handle in front of a bounded channel, and the
//! thread that owns the files.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use crate::config::{AuditConfig, AuditMode};
use crate::event::AuditEvent;
use crate::writer::{AuditError, Pending, TrailWriter};

/// Longest wait for the writer in [`AuditSink::flush`] and at shutdown.
const WRITER_WAIT: Duration = Duration::from_secs(10);
/// At most one "buffer full" warning per this many milliseconds.
const DROP_WARNING_EVERY_MS: u64 = 10_000;

enum Command {
    Record(Pending),
    Flush(SyncSender<()>),
    Shutdown(SyncSender<()>),
}

/// Emits audit events. Cheap to clone; never blocks.
///
/// In disabled mode every call returns at once without touching its
/// arguments' contents or the clock.
#[derive(Clone)]
pub struct AuditSink {
    dropped: Counter,
    shared: Option<Arc<Shared>>,
}

struct Shared {
    tx: SyncSender<Command>,
    last_drop_warning_ms: AtomicU64,
}

impl std::fmt::Debug for AuditSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSink")
            .field("enabled", &self.is_enabled())
            .field("dropped", &self.dropped.get())
            .finish()
    }
}

impl AuditSink {
    /// A sink that records nothing.
    pub fn disabled() -> Self {
        Self {
            dropped: Counter::default(),
            shared: None,
        }
    }

    /// True when events are written.
    pub fn is_enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// Record `event` for the request `request_id`, if any.
    pub fn emit(&self, request_id: Option<&str>, event: AuditEvent) {
        if let Some(shared) = &self.shared {
            self.send(shared, request_id, event);
        }
    }

    /// Like [`emit`](Self::emit), but builds the event only when audit is on,
    /// so a disabled trail costs one branch.
    pub fn emit_with(&self, request_id: Option<&str>, make: impl FnOnce() -> AuditEvent) {
        if let Some(shared) = &self.shared {
            self.send(shared, request_id, make());
        }
    }

    fn send(&self, shared: &Shared, request_id: Option<&str>, event: AuditEvent) {
        let pending = Pending {
            at: SystemTime::now(),
            request_id: request_id.map(str::to_owned),
            event,
        };
        match shared.tx.try_send(Command::Record(pending)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.count_drop(shared, "the audit buffer is full"),
            Err(TrySendError::Disconnected(_)) => {
                self.count_drop(shared, "the audit writer has stopped");
            }
        }
    }

    fn count_drop(&self, shared: &Shared, why: &str) {
        self.dropped.inc();
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let last = shared.last_drop_warning_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) >= DROP_WARNING_EVERY_MS
            && shared
                .last_drop_warning_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                dropped_total = self.dropped.get(),
                "audit event dropped: {why} (counted in rbee_audit_events_dropped_total)"
            );
        }
    }

    /// Block until every event emitted before this call is written and
    /// synced. False when the writer did not answer in time (or audit is off).
    pub fn flush(&self) -> bool {
        let Some(shared) = &self.shared else {
            return false;
        };
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        shared.tx.send(Command::Flush(ack_tx)).is_ok() && ack_rx.recv_timeout(WRITER_WAIT).is_ok()
    }

    /// Events dropped so far (buffer full, writer stopped, disk reserve).
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// Register `rbee_audit_events_dropped_total` in the daemon's registry.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "rbee_audit_events_dropped",
            "Audit events not written: buffer full, writer stopped, or disk under its reserve",
            self.dropped.clone(),
        );
    }
}

/// Owns the writer thread. Dropping it (or [`shutdown`](Self::shutdown))
/// drains every queued event and syncs before returning.
pub struct AuditLogger {
    sink: AuditSink,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for AuditLogger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLogger")
            .field("sink", &self.sink)
            .finish()
    }
}

impl AuditLogger {
    /// Start logging per `config`. Disabled mode starts no thread and does no I/O.
    pub fn open(config: &AuditConfig) -> Result<Self, AuditError> {
        if config.mode == AuditMode::Disabled {
            return Ok(Self {
                sink: AuditSink::disabled(),
                writer: None,
            });
        }
        let dropped = Counter::default();
        let writer = TrailWriter::open(config, dropped.clone())?;
        let (tx, rx) = mpsc::sync_channel(config.capacity.max(1));
        let thread = std::thread::Builder::new()
            .name("audit-writer".to_owned())
            .spawn(move || run_writer(writer, rx))
            .map_err(|source| AuditError::Io {
                what: "start writer thread for",
                path: config.service_dir().unwrap_or_default(),
                source,
            })?;
        Ok(Self {
            sink: AuditSink {
                dropped,
                shared: Some(Arc::new(Shared {
                    tx,
                    last_drop_warning_ms: AtomicU64::new(0),
                })),
            },
            writer: Some(thread),
        })
    }

    /// A handle for emitting.
    pub fn sink(&self) -> AuditSink {
        self.sink.clone()
    }

    /// Write and sync everything queued, then stop the writer.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(thread) = self.writer.take() else {
            return;
        };
        if let Some(shared) = &self.sink.shared {
            let (ack_tx, ack_rx) = mpsc::sync_channel(1);
            if shared.tx.send(Command::Shutdown(ack_tx)).is_ok()
                && ack_rx.recv_timeout(WRITER_WAIT).is_err()
            {
                tracing::error!("audit writer did not finish draining in time");
                return;
            }
        }
        let _ = thread.join();
    }
}

impl Drop for AuditLogger {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run_writer(mut writer: TrailWriter, rx: Receiver<Command>) {
    let write = |writer: &mut TrailWriter, pending| {
        if let Err(e) = writer.append(pending) {
            tracing::error!(error = %e, "audit record not written");
        }
    };
    let sync = |writer: &mut TrailWriter| {
        if let Err(e) = writer.sync() {
            tracing::error!(error = %e, "audit sync failed");
        }
    };
    loop {
        let wait = writer.sync_due_in().unwrap_or(Duration::from_secs(3600));
        match rx.recv_timeout(wait) {
            Ok(Command::Record(pending)) => write(&mut writer, pending),
            Ok(Command::Flush(ack)) => {
                sync(&mut writer);
                let _ = ack.send(());
            }
            Ok(Command::Shutdown(ack)) => {
                while let Ok(command) = rx.try_recv() {
                    match command {
                        Command::Record(pending) => write(&mut writer, pending),
                        Command::Flush(other) | Command::Shutdown(other) => {
                            let _ = other.send(());
                        }
                    }
                }
                sync(&mut writer);
                let _ = ack.send(());
                return;
            }
            Err(RecvTimeoutError::Timeout) => sync(&mut writer),
            Err(RecvTimeoutError::Disconnected) => {
                sync(&mut writer);
                return;
            }
        }
    }
}
