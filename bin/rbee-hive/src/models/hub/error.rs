//! Why the Hub path fails: resolving a reference (the listing) or fetching
//! one of its files, each variant naming the reference as the user wrote it.

use std::path::PathBuf;

use hf_hub::api::tokio::ApiError as HfError;
use rbee_api::{Coded, ErrorCode, FieldError, ModelRefError};
use rbee_http::client::BodyError;

use super::RESOLVE_TIMEOUT;

/// Why resolving a reference or fetching one of its files failed. Every
/// variant names the reference as the user wrote it (`display`).
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The listing request did not finish in time.
    #[error("the Hub did not answer within {:?} for {display}", RESOLVE_TIMEOUT)]
    Timeout { display: String },
    /// The listing request failed on the network.
    #[error("cannot reach the Hub for {display}")]
    Unreachable {
        display: String,
        #[source]
        source: reqwest::Error,
    },
    /// The listing could not be read.
    #[error("cannot read the Hub's listing for {display}")]
    ListingUnread {
        display: String,
        #[source]
        source: BodyError,
    },
    /// The listing is not the JSON the Hub sends.
    #[error("the Hub's listing for {display} is not valid")]
    ListingInvalid {
        display: String,
        #[source]
        source: serde_json::Error,
    },
    /// The listing's commit id is not 40 hex digits.
    #[error("the Hub's listing for {display} has no valid commit id")]
    NoCommit { display: String },
    /// The listing names a file that would leave the snapshot folder.
    #[error("the Hub's listing for {display} names an unsafe file")]
    UnsafeName {
        display: String,
        #[source]
        source: ModelRefError,
    },
    /// The listing has no size for a file.
    #[error("the Hub did not report the size of {name} for {display}")]
    NoSize { display: String, name: String },
    /// The listing's SHA-256 for a file is not 64 hex digits.
    #[error("the Hub reported an invalid sha256 for {name} of {display}")]
    BadSha256 { display: String, name: String },
    /// No such repository.
    #[error("{display}: repository {repo} not found on the Hub")]
    RepoNotFound { display: String, repo: String },
    /// No such branch, tag or commit.
    #[error("{display}: revision {revision} not found in {repo}")]
    RevisionNotFound {
        display: String,
        revision: String,
        repo: String,
    },
    /// The Hub says the entry does not exist.
    #[error("{display}: file not found in {repo}")]
    EntryNotFound { display: String, repo: String },
    /// The Hub answered 404 with an error code we do not know.
    #[error("{display}: not found on the Hub")]
    NotFound { display: String },
    /// The configured token is not granted the repository.
    #[error("{display}: the configured Hugging Face token is not granted access to {repo}")]
    TokenDenied { display: String, repo: String },
    /// The repository is gated and no token is configured.
    #[error(
        "{display}: {repo} requires authentication; set HF_TOKEN (or --hf-token-file) on the hive"
    )]
    NeedsToken { display: String, repo: String },
    /// Any other HTTP status for the listing.
    #[error("the Hub answered HTTP {status} for {display}")]
    Status { display: String, status: u16 },
    /// `:FILE` names a file the repository does not have.
    #[error("{display}: {repo} has no file {file}")]
    NoSuchFile {
        display: String,
        repo: String,
        file: String,
    },
    /// `:FILE` names something other than a GGUF file.
    #[error("{display}: only a .gguf file can be selected with :FILE; name the repository alone for a safetensors model")]
    NotGguf { display: String },
    /// Several GGUF files and none named.
    #[error("{display} holds {} GGUF files; name one as hf:{repo}:FILE ({})", files.len(), files.join(", "))]
    ManyGguf {
        display: String,
        repo: String,
        files: Vec<String>,
    },
    /// Neither a GGUF file nor a complete safetensors model.
    #[error("{display}: {repo} holds no GGUF file and no safetensors model (config.json, tokenizer.json and *.safetensors)")]
    NoModel { display: String, repo: String },
    /// A file fetch got 404.
    #[error("{display}: file {name} not found on the Hub")]
    FileNotFound { display: String, name: String },
    /// A file fetch got 401 or 403.
    #[error("{display}: access to {name} denied by the Hub")]
    FileDenied { display: String, name: String },
    /// A file fetch got another HTTP status.
    #[error("{display}: the Hub answered HTTP {status} for {name}")]
    FileStatus {
        display: String,
        name: String,
        status: u16,
    },
    /// A file fetch failed otherwise.
    #[error("{display}: downloading {name} failed")]
    Download {
        display: String,
        name: String,
        #[source]
        source: HfError,
    },
    /// A fetched file's real path could not be found.
    #[error("{display}: the fetched file {} cannot be checked", path.display())]
    Unchecked {
        display: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A fetched file resolves (through symlinks) outside the cache.
    #[error("{display}: the fetched file {} lies outside {}", path.display(), root.display())]
    Outside {
        display: String,
        path: PathBuf,
        root: PathBuf,
    },
}

impl HubError {
    /// Whether another attempt at the same file may succeed (network
    /// trouble, 5xx, 429).
    pub fn retry(&self) -> bool {
        match self {
            Self::FileStatus { status, .. } => *status >= 500 || *status == 429,
            Self::Download { source, .. } => matches!(
                source,
                HfError::RequestError(_) | HfError::TooManyRetries(_) | HfError::Join(_)
            ),
            _ => false,
        }
    }
}

/// `details` of [`HubError::ManyGguf`]: the files to choose from.
#[derive(serde::Serialize)]
struct Files<'a> {
    files: &'a [String],
}

impl Coded for HubError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::RepoNotFound { .. }
            | Self::RevisionNotFound { .. }
            | Self::EntryNotFound { .. }
            | Self::NotFound { .. }
            | Self::NoSuchFile { .. }
            | Self::NoModel { .. }
            | Self::FileNotFound { .. } => ErrorCode::ModelNotFound,
            Self::TokenDenied { .. } | Self::NeedsToken { .. } | Self::FileDenied { .. } => {
                ErrorCode::ModelAccessDenied
            }
            Self::NotGguf { .. } | Self::ManyGguf { .. } => ErrorCode::InvalidRequest,
            Self::Timeout { .. }
            | Self::Unreachable { .. }
            | Self::ListingUnread { .. }
            | Self::ListingInvalid { .. }
            | Self::NoCommit { .. }
            | Self::UnsafeName { .. }
            | Self::NoSize { .. }
            | Self::BadSha256 { .. }
            | Self::Status { .. }
            | Self::FileStatus { .. }
            | Self::Download { .. }
            | Self::Unchecked { .. }
            | Self::Outside { .. } => ErrorCode::DownloadFailed,
        }
    }

    fn details(&self) -> Option<serde_json::Value> {
        match self {
            Self::NotGguf { .. } => Some(rbee_api::error::fields_details(&[FieldError::new(
                "model_ref",
                "format",
                self.to_string(),
            )])),
            Self::ManyGguf { files, .. } => serde_json::to_value(Files { files }).ok(),
            _ => None,
        }
    }
}
