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
