//! The closed set of audited events.
//!
//! Fields are typed so that a secret cannot be represented: tokens appear
//! only as [`Fingerprint`], which can be made from a token or parsed from its
//! own `token:<6 hex>` form and nothing else, and `auth-min` never hands a raw
//! token out. Inference events carry sizes and outcomes, never prompt or
//! output text. Durations are integer milliseconds: records hold no floats.

use std::net::IpAddr;

use auth_min::Fingerprint;
use rbee_api::worker::Backend;
use rbee_api::{ErrorCode, Outcome};
use serde::{Deserialize, Serialize};

/// Why authentication failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthFailureReason {
    /// No credential.
    Missing,
    /// Malformed or not accepted.
    Invalid,
}

/// Why a worker stopped when the hive asked it to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopCause {
    /// An operator's shutdown request.
    Requested,
    /// The hive itself is shutting down.
    HiveShutdown,
    /// Its model was evicted.
    Evicted,
    /// Drained for another reason.
    Drained,
}

/// Why the hive gave up on a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerFailureReason {
    /// Restart attempts used up.
    MaxAttempts,
    /// The circuit breaker of its model and device is open.
    CircuitOpen,
    /// The process could not be started.
    SpawnFailed,
    /// It did not become ready in time.
    LoadTimeout,
}

/// What made the hive declare a worker dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CrashCause {
    /// The process exited on its own.
    Exited,
    /// No heartbeat within the timeout.
    MissedHeartbeats,
    /// Its readiness probe failed too many times in a row.
    FailedHealthChecks,
    /// It stayed loading past the load timeout.
    LoadTimeout,
}

impl CrashCause {
    /// The log and label string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exited => "exited",
            Self::MissedHeartbeats => "missed_heartbeats",
            Self::FailedHealthChecks => "failed_health_checks",
            Self::LoadTimeout => "load_timeout",
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal number, when it was killed.
    pub signal: Option<i32>,
}

/// One configuration setting as recorded: its name and a rendered value.
/// Secrets are rendered as their fingerprint (see [`ConfigSetting::secret`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSetting {
    /// Flag or setting name, e.g. `addr`.
    pub name: String,
    /// Rendered value.
    pub value: String,
}

impl ConfigSetting {
    /// A plain setting.
    pub fn new(name: impl Into<String>, value: impl std::fmt::Display) -> Self {
        Self {
            name: name.into(),
            value: value.to_string(),
        }
    }

    /// A secret setting: recorded as its fingerprint, or `none`.
    pub fn secret(name: impl Into<String>, fingerprint: Option<&Fingerprint>) -> Self {
        Self {
            name: name.into(),
            value: fingerprint.map_or_else(|| "none".to_owned(), ToString::to_string),
        }
    }
}

/// An audited event, serialized with its kind in `event_type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event_type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum AuditEvent {
    /// A protected route accepted a token.
    AuthSuccess {
        /// The token's fingerprint.
        token_fp: Fingerprint,
        /// Request method.
        method: String,
        /// Request path, without the query string.
        path: String,
        /// Peer address.
        peer_ip: Option<IpAddr>,
    },
    /// A protected route refused a request.
    AuthFailure {
        /// Fingerprint of the presented token, when one could be read.
        token_fp: Option<Fingerprint>,
        /// Request method.
        method: String,
        /// Request path, without the query string.
        path: String,
        /// Peer address.
        peer_ip: Option<IpAddr>,
        /// Missing or invalid.
        reason: AuthFailureReason,
    },
    /// The hive started a worker process.
    WorkerSpawned {
        /// Worker id.
        worker_id: String,
        /// Model served.
        model_ref: String,
        /// Backend.
        backend: Backend,
        /// Device ordinal.
        device: u32,
        /// Process id.
        pid: u32,
    },
    /// A worker reported ready.
    WorkerReady {
        /// Worker id.
        worker_id: String,
        /// Model served.
        model_ref: String,
        /// Backend.
        backend: Backend,
        /// Device ordinal.
        device: u32,
    },
    /// A worker stopped because the hive asked it to.
    WorkerStopped {
        /// Worker id.
        worker_id: String,
        /// Model served.
        model_ref: String,
        /// Why.
        cause: StopCause,
    },
    /// A worker exited or was declared dead without being asked to.
    WorkerCrashed {
        /// Worker id.
        worker_id: String,
        /// Model served.
        model_ref: String,
        /// Process id.
        pid: u32,
        /// How it ended.
        exit: ExitInfo,
        /// What the hive noticed.
        cause: CrashCause,
    },
    /// A worker is being restarted.
    WorkerRestarted {
        /// Worker id.
        worker_id: String,
        /// Model served.
        model_ref: String,
        /// 1 for the first restart.
        attempt: u32,
        /// Backoff before the restart.
        delay_ms: u64,
    },
    /// The hive gave up on a worker.
    WorkerFailed {
        /// Worker id.
        worker_id: String,
        /// Model served.
        model_ref: String,
        /// Why.
        reason: WorkerFailureReason,
    },
    /// The circuit breaker of a (model, device) pair opened.
    CircuitBreakerOpened {
        /// Model.
        model_ref: String,
        /// Device ordinal.
        device: u32,
    },
    /// The circuit breaker of a (model, device) pair closed again.
    CircuitBreakerClosed {
        /// Model.
        model_ref: String,
        /// Device ordinal.
        device: u32,
    },
    /// A model finished provisioning.
    ModelProvisioned {
        /// Model reference.
        model_ref: String,
        /// Where it lies.
        local_path: String,
        /// Its size.
        bytes: u64,
    },
    /// A model was evicted.
    ModelEvicted {
        /// Model reference.
        model_ref: String,
    },
    /// Provisioning failed.
    ModelProvisionFailed {
        /// Model reference.
        model_ref: String,
        /// The error code answered.
        code: ErrorCode,
    },
    /// The daemon started with this configuration.
    ConfigLoaded {
        /// The settings, secrets as fingerprints.
        settings: Vec<ConfigSetting>,
    },
    /// The daemon refused its configuration.
    ConfigInvalid {
        /// What was wrong (messages never contain secret values).
        errors: Vec<String>,
    },
    /// Configuration reloaded at runtime.
    ConfigReloaded {
        /// The settings that changed.
        changed: Vec<ConfigSetting>,
        /// Settings that differ in the configuration read again but take
        /// effect only at the next start.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        restart_required: Vec<String>,
    },
    /// A hive joined the queen's registry.
    HiveRegistered {
        /// Node name.
        node_name: String,
        /// Base URL.
        url: String,
    },
    /// A hive left the queen's registry.
    HiveRemoved {
        /// Node name.
        node_name: String,
    },
    /// An inference request was admitted.
    InferenceAdmitted {
        /// Job id.
        job_id: String,
        /// Model.
        model: String,
        /// Requested token limit.
        max_tokens: u32,
    },
    /// An inference request was refused.
    InferenceRejected {
        /// Job id, when one was given.
        job_id: Option<String>,
        /// Model, when one was named.
        model: Option<String>,
        /// Why.
        code: ErrorCode,
    },
    /// An inference request ended.
    InferenceFinished {
        /// Job id.
        job_id: String,
        /// Model.
        model: String,
        /// Prompt tokens.
        tokens_in: u32,
        /// Generated tokens.
        tokens_out: u32,
        /// How it ended.
        outcome: Outcome,
        /// Wall time.
        duration_ms: u64,
    },
    /// The writer found a torn last line (a crash mid-write) and continued
    /// the chain from the last complete record in a new file.
    TrailRecovered {
        /// The file with the torn line.
        file: String,
        /// Its 1-based line number.
        line: u64,
        /// Bytes of the torn line.
        torn_bytes: u64,
    },
}

impl AuditEvent {
    /// The `event_type` string.
    pub fn event_type(&self) -> &'static str {
        match self {
            Self::AuthSuccess { .. } => "auth_success",
            Self::AuthFailure { .. } => "auth_failure",
            Self::WorkerSpawned { .. } => "worker_spawned",
            Self::WorkerReady { .. } => "worker_ready",
            Self::WorkerStopped { .. } => "worker_stopped",
            Self::WorkerCrashed { .. } => "worker_crashed",
            Self::WorkerRestarted { .. } => "worker_restarted",
            Self::WorkerFailed { .. } => "worker_failed",
            Self::CircuitBreakerOpened { .. } => "circuit_breaker_opened",
            Self::CircuitBreakerClosed { .. } => "circuit_breaker_closed",
            Self::ModelProvisioned { .. } => "model_provisioned",
            Self::ModelEvicted { .. } => "model_evicted",
            Self::ModelProvisionFailed { .. } => "model_provision_failed",
            Self::ConfigLoaded { .. } => "config_loaded",
            Self::ConfigInvalid { .. } => "config_invalid",
            Self::ConfigReloaded { .. } => "config_reloaded",
            Self::HiveRegistered { .. } => "hive_registered",
            Self::HiveRemoved { .. } => "hive_removed",
            Self::InferenceAdmitted { .. } => "inference_admitted",
            Self::InferenceRejected { .. } => "inference_rejected",
            Self::InferenceFinished { .. } => "inference_finished",
            Self::TrailRecovered { .. } => "trail_recovered",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_tagged_with_event_type() {
        let event = AuditEvent::AuthFailure {
            token_fp: Some(Fingerprint::of("x")),
            method: "POST".into(),
            path: "/v1/inference".into(),
            peer_ip: Some("127.0.0.1".parse().unwrap()),
            reason: AuthFailureReason::Invalid,
        };
        let v = serde_json::to_value(&event).unwrap();
        assert_eq!(v["event_type"], event.event_type());
        assert_eq!(v["reason"], "invalid");
        assert!(v["token_fp"].as_str().unwrap().starts_with("token:"));
        let back: AuditEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, event);
    }

    #[test]
    fn a_fingerprint_field_cannot_hold_an_arbitrary_string() {
        let forged = serde_json::json!({
            "event_type": "auth_success", "token_fp": "my-raw-secret-token",
            "method": "GET", "path": "/", "peer_ip": null
        });
        assert!(serde_json::from_value::<AuditEvent>(forged).is_err());
    }

    #[test]
    fn secret_settings_render_as_fingerprints() {
        let fp = Fingerprint::of("secret-token-value-123");
        let s = ConfigSetting::secret("api_token", Some(&fp));
        assert!(s.value.starts_with("token:"));
        assert!(!s.value.contains("secret"));
        assert_eq!(ConfigSetting::secret("api_token", None).value, "none");
    }
}
