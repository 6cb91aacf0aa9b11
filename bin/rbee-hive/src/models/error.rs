//! Why a model request fails: one enum for the model service, with the
//! Hub's and the local inspector's errors as its causes. Handlers answer it
//! with `?`; the envelope is made in `rbee_api` from [`Coded`].

use rbee_api::{Coded, ErrorCode, ModelRefError};
use serde::Serialize;

use super::hub::HubError;
use super::local::LocalError;

/// A failed provision, eviction or download lookup.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The reference does not parse.
    #[error(transparent)]
    BadRef(#[from] ModelRefError),
    /// Resolving or fetching an `hf:` reference failed.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// A `file:` reference names no loadable model.
    #[error(transparent)]
    Local(#[from] LocalError),
    /// The hive is stopping; the download was interrupted.
    #[error("the hive is shutting down")]
    ShuttingDown,
    /// A fetched file is not the size the Hub listed; it was deleted.
    #[error("{display}: {name} has {have} bytes, the Hub reported {want}; the file was deleted")]
    SizeMismatch {
        display: String,
        name: String,
        have: u64,
        want: u64,
    },
    /// A fetched file's digest is not the one the Hub listed; it was deleted.
    #[error("{display}: sha256 mismatch for {name}: the Hub reported {want}, the download has {have}; the file was deleted")]
    ShaMismatch {
        display: String,
        name: String,
        want: String,
        have: String,
    },
    /// A fetched file could not be read back to verify it; it was deleted.
    #[error("{display}: {name} could not be read back to verify it and was deleted")]
    Unverifiable {
        display: String,
        name: String,
        #[source]
        source: std::io::Error,
    },
    /// A `file:` model's file could not be read while hashing it.
    #[error("cannot read {}", path.display())]
    Unreadable {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not enough free disk for the download and the reserve.
    #[error("{model_ref} needs {} bytes; {} are free on the models filesystem, {} are claimed by running downloads and {} are kept in reserve", disk.required_bytes, disk.available_bytes, disk.reserved_bytes, disk.reserve_bytes)]
    InsufficientDisk {
        model_ref: String,
        disk: DiskShortfall,
    },
    /// Eviction of a model that is still downloading.
    #[error("{model_ref} is being downloaded; evict it when the download has ended")]
    Downloading { model_ref: String },
    /// Eviction of a model the catalog does not hold.
    #[error("{model_ref} is not in the catalog")]
    NotInCatalog { model_ref: String },
    /// A worker asked for a model that is being evicted.
    #[error("{model_ref} is being evicted")]
    Evicting { model_ref: String },
    /// A second eviction of the same model.
    #[error("{model_ref} is already being evicted")]
    AlreadyEvicting { model_ref: String },
    /// Eviction of a model workers still use.
    #[error("{model_ref} is used by {workers} worker(s); stop them before evicting it")]
    InUse { model_ref: String, workers: usize },
    /// No download with that id (finished ones are forgotten after a while).
    #[error(
        "no download with id {id:?} (finished downloads are kept for a while, then forgotten)"
    )]
    NoDownload { id: String },
}

/// The numbers behind [`ModelError::InsufficientDisk`], sent as `details`.
#[derive(Debug, Clone, Serialize)]
pub struct DiskShortfall {
    /// Bytes the download still has to write.
    pub required_bytes: u64,
    /// Bytes free on the models filesystem.
    pub available_bytes: u64,
    /// Bytes running downloads have claimed.
    pub reserved_bytes: u64,
    /// Bytes kept free (`--disk-reserve-bytes`).
    pub reserve_bytes: u64,
}

/// `details` of [`ModelError::InUse`].
#[derive(Serialize)]
struct InUse {
    workers: usize,
}

impl Coded for ModelError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::BadRef(_) => ErrorCode::InvalidRequest,
            Self::Hub(e) => e.code(),
            Self::Local(e) => e.code(),
            Self::ShuttingDown => ErrorCode::ShuttingDown,
            Self::SizeMismatch { .. } | Self::ShaMismatch { .. } | Self::Unverifiable { .. } => {
                ErrorCode::DownloadFailed
            }
            Self::Unreadable { .. } => ErrorCode::InvalidRequest,
            Self::InsufficientDisk { .. } => ErrorCode::InsufficientDisk,
            Self::Downloading { .. } | Self::AlreadyEvicting { .. } => ErrorCode::Conflict,
            Self::NotInCatalog { .. } | Self::Evicting { .. } => ErrorCode::ModelNotFound,
            Self::InUse { .. } => ErrorCode::ModelInUse,
            Self::NoDownload { .. } => ErrorCode::NotFound,
        }
    }

    fn details(&self) -> Option<serde_json::Value> {
        match self {
            Self::BadRef(e) => Some(rbee_api::error::fields_details(&[e
                .clone()
                .into_field_error("model_ref")])),
            Self::Hub(e) => e.details(),
            Self::Local(e) => e.details(),
            Self::InsufficientDisk { disk, .. } => serde_json::to_value(disk).ok(),
            Self::InUse { workers, .. } => serde_json::to_value(InUse { workers: *workers }).ok(),
            _ => None,
        }
    }
}
