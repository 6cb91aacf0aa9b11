//! The queen's routes about its fleet (`/v2/hives/*`, `/v2/workers/list`),
//! and the registration a hive sends to join it.

use serde::{Deserialize, Serialize};

use crate::worker::WorkerInfo;

/// `POST /v2/hives/register`: a hive joins, or says it is still there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HiveRegistration {
    /// Its unique name.
    pub node_name: String,
    /// Its base URL, as the queen should call it.
    pub url: String,
}

/// The answer to a [`HiveRegistration`]: 201 when the hive is new, 200
/// when it was known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HiveRegistered {
    /// Its name.
    pub node_name: String,
    /// Its URL, normalised.
    pub url: String,
    /// True when the registration added the hive.
    pub created: bool,
}

/// `POST /v2/hives/remove`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HiveRemoval {
    /// The hive to forget.
    pub node_name: String,
}

/// The answer to a [`HiveRemoval`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HiveRemoved {
    /// Its name.
    pub node_name: String,
    /// Always true (an unknown hive is 404).
    pub removed: bool,
}

/// Whether a hive answers the queen's polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiveState {
    /// Not polled yet.
    Unknown,
    /// Its last poll was answered.
    Reachable,
    /// It missed the polls the queen allows.
    Unreachable,
}

impl HiveState {
    /// The label string (`hive state` in metrics and logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Reachable => "reachable",
            Self::Unreachable => "unreachable",
        }
    }
}

/// A hive as `GET /v2/hives/list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HiveSummary {
    /// Unique name.
    pub node_name: String,
    /// Base URL.
    pub url: String,
    /// `config` (`--hive` or the settings file) or `registered`.
    pub source: String,
    /// Whether it answers.
    pub state: HiveState,
    /// When it joined (RFC 3339).
    pub registered_at: String,
    /// Its last answer (RFC 3339).
    pub last_seen: Option<String>,
    /// Failed polls in a row.
    pub consecutive_misses: u32,
    /// Workers at its last answer.
    pub workers: usize,
    /// Provisioned models at its last answer.
    pub models: Vec<String>,
}

/// `GET /v2/hives/list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HiveList {
    /// Every hive, by name.
    pub hives: Vec<HiveSummary>,
}

/// A worker as the queen sees it: the hive's report, where it runs and
/// how many of the queen's requests it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetWorker {
    /// What its hive reported.
    #[serde(flatten)]
    pub info: WorkerInfo,
    /// Its hive.
    pub hive: String,
    /// Whether that hive answers.
    pub hive_reachable: bool,
    /// The queen's requests on it now.
    pub outstanding: u32,
}

/// `GET /v2/workers/list` on the queen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetWorkers {
    /// Every worker of every hive, by hive and id.
    pub workers: Vec<FleetWorker>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hive_state_labels_match_serde() {
        for s in [
            HiveState::Unknown,
            HiveState::Reachable,
            HiveState::Unreachable,
        ] {
            assert_eq!(serde_json::to_value(s).expect("json"), s.as_str());
        }
    }

    #[test]
    fn a_registration_with_an_unknown_field_is_refused() {
        let body = r#"{"node_name": "h", "url": "http://h:9200", "port": 1}"#;
        assert!(serde_json::from_str::<HiveRegistration>(body).is_err());
    }
}
