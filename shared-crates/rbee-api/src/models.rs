//! Bodies of the hive's model routes: provision, download progress, list,
//! catalog and evict.

use serde::{Deserialize, Serialize};

/// `POST /v1/models/provision` (alias `/v1/models/download`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionRequest {
    /// `hf:ORG/REPO[@REVISION][:FILE]` or `file:/abs/path`.
    pub model_ref: String,
}

/// The 202 answer to a provision: follow `download_id` on
/// `GET /v1/models/download/progress?id=`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionAccepted {
    /// Id of the download (shared by every request for the same ref while
    /// it runs).
    pub download_id: String,
    /// The reference, in canonical form.
    pub model_ref: String,
    /// `downloading` or, when the model was already provisioned, `complete`.
    pub stage: String,
    /// Where the model lies, when `stage` is `complete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_path: Option<String>,
}

/// One event of the progress stream (SSE `data:`), tagged by `stage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum DownloadEvent {
    /// Bytes are arriving (sent at most every 250 ms).
    Downloading {
        /// Bytes on disk so far, resumed bytes included.
        bytes_downloaded: u64,
        /// Bytes of every file to download.
        bytes_total: u64,
    },
    /// The model is provisioned.
    Complete {
        /// The GGUF file or safetensors directory.
        local_path: String,
    },
    /// Provisioning failed; nothing was added to the catalog.
    Error {
        /// The contract's error code.
        code: crate::ErrorCode,
        /// A sentence for humans.
        message: String,
    },
}

impl DownloadEvent {
    /// True for `complete` and `error`, after which the stream ends.
    pub fn is_terminal(&self) -> bool {
        !matches!(self, Self::Downloading { .. })
    }
}

/// One provisioned model, as `GET /v1/models/list` and the catalog show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelEntry {
    /// The reference it was provisioned under.
    pub model_ref: String,
    /// `hf` or `file`.
    pub provider: String,
    /// The GGUF file or safetensors directory a worker loads.
    pub local_path: String,
    /// `gguf` or `safetensors`.
    pub format: String,
    /// Bytes on disk.
    pub size_bytes: u64,
    /// SHA-256 of the GGUF file, or of the manifest of a directory's files.
    pub sha256: String,
    /// The resolved commit, for Hugging Face models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// When it was provisioned (RFC 3339).
    pub downloaded_at: String,
    /// When a worker last used it (RFC 3339).
    #[serde(default)]
    pub last_used: Option<String>,
}

/// `GET /v1/models/list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelList {
    /// Provisioned models, by reference.
    pub models: Vec<ModelEntry>,
}

/// A download in progress, as the catalog shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadInfo {
    /// Its id.
    pub download_id: String,
    /// What is being provisioned.
    pub model_ref: String,
    /// Bytes so far.
    pub bytes_downloaded: u64,
    /// Bytes in all.
    pub bytes_total: u64,
    /// When it started (RFC 3339).
    pub started_at: String,
}

/// `GET /v1/models/catalog`: provisioned models plus downloads in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    /// Provisioned models.
    pub models: Vec<ModelEntry>,
    /// Downloads in progress.
    pub downloads: Vec<DownloadInfo>,
}

/// `DELETE /v1/models/evict`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvictRequest {
    /// The reference to remove.
    pub model_ref: String,
}

/// The answer to an eviction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evicted {
    /// The reference removed from the catalog.
    pub model_ref: String,
    /// Bytes deleted from disk (0 for `file:` models, whose files are the
    /// operator's and are never deleted).
    pub bytes_freed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_events_have_the_contract_shape() {
        let e = DownloadEvent::Downloading {
            bytes_downloaded: 5,
            bytes_total: 10,
        };
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"stage":"downloading","bytes_downloaded":5,"bytes_total":10})
        );
        let e = DownloadEvent::Error {
            code: crate::ErrorCode::ModelNotFound,
            message: "no".into(),
        };
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"stage":"error","code":"MODEL_NOT_FOUND","message":"no"})
        );
        assert!(e.is_terminal());
    }
}
