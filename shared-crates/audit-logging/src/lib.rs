//! A tamper-evident audit trail that survives restarts.
//!
//! Each process writes JSON Lines under `LLORCH_AUDIT_DIR/<service_id>/`,
//! one record per line:
//!
//! ```text
//! {"audit_id":7,"event":{"event_type":"auth_failure",...},"hash":"...","prev_hash":"...","service_id":"rbee-hive","timestamp":"2026-11-23T12:00:00.123Z"}
//! ```
//!
//! `hash = hex(sha256(prev_hash + canonical(record without hash)))`, where
//! canonical is RFC 8785 JSON (sorted keys, no whitespace, UTF-8) over records
//! that hold no floats. The first record of a trail chains from 64 zeros; the
//! chain continues across restarts and file rotations, so editing, deleting
//! or reordering a record breaks it at a place [`verify_dir`] names.
//!
//! - [`AuditConfig`]: mode (`disabled` by default, or `local`), directory,
//!   flush policy, rotation size, disk reserve; [`AuditConfig::from_env`].
//! - [`AuditLogger`] owns the writer thread; [`AuditSink`] is the cheap,
//!   cloneable handle that emits. Emitting never blocks: a full buffer drops
//!   the event and counts it in `rbee_audit_events_dropped_total`.
//! - [`AuditEvent`]: the closed set of events. No event can hold a secret:
//!   tokens appear only as [`auth_min::Fingerprint`], and raw tokens never
//!   leave `auth-min`.
//! - [`verify_dir`] and [`tail`], also as the `rbee-audit` binary.

mod canonical;
mod config;
mod event;
mod logger;
mod verify;
mod writer;

pub use canonical::{canonical_json, chain_hash, CanonicalError, GENESIS_HASH};
pub use config::{AuditConfig, AuditMode, FlushPolicy};
pub use event::{
    AuditEvent, AuthFailureReason, ConfigSetting, CrashCause, ExitInfo, StopCause,
    WorkerFailureReason,
};
pub use logger::{AuditLogger, AuditSink};
pub use verify::{tail, trail_files, verify_dir, Problem, VerifyFailure, VerifyReport};
pub use writer::{AuditError, TailError};
