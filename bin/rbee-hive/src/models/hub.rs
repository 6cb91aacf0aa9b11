//! Hugging Face: resolve a reference to the exact files of one commit, then
//! fetch each with the `hf-hub` crate into a Hugging Face cache layout
//! (`models--ORG--REPO/{blobs,snapshots,refs}`) and verify it.
//!
//! Resolution pins the commit the Hub reports, so every file of one model
//! comes from the same commit even if the branch moves during the download.
//! `hf-hub` writes each file to `blobs/<etag>.sync.part`, records how much is
//! committed (in 10 MB chunks) so a later attempt resumes there, and renames
//! the finished file into place. We then check its size and, for LFS files,
//! the SHA-256 the Hub reported; a mismatch deletes it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hf_hub::api::tokio::{Api, ApiBuilder, ApiError as HfError};
use hf_hub::{Cache, Repo, RepoType};
use prometheus_client::metrics::counter::Counter;
use rbee_api::HfRef;
use serde::Deserialize;

mod error;

pub use error::HubError;

/// How long resolving a reference (the repository listing) may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(30);

/// Files a safetensors model may need besides its weights (the last two:
/// sentence-transformers' normalization and window, for embedding models).
const SAFETENSORS_COMPANIONS: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "model.safetensors.index.json",
    "modules.json",
    "sentence_bert_config.json",
];

/// The model format, as the catalog records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One GGUF file.
    Gguf,
    /// A directory of safetensors weights plus config and tokenizer.
    Safetensors,
}

impl Format {
    /// `gguf` or `safetensors`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gguf => "gguf",
            Self::Safetensors => "safetensors",
        }
    }
}

/// One file to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoFile {
    /// Path inside the repository.
    pub name: String,
    /// Size the Hub reports.
    pub size: u64,
    /// SHA-256 the Hub reports (LFS files only).
    pub sha256: Option<String>,
}

/// What provisioning an `hf:` reference will download.
#[derive(Debug, Clone)]
pub struct Plan {
    /// `ORG/REPO`.
    pub repo: String,
    /// The commit every file is fetched from.
    pub commit: String,
    /// GGUF or safetensors.
    pub format: Format,
    /// The files, the GGUF first for GGUF models.
    pub files: Vec<RepoFile>,
}

impl Plan {
    /// Bytes of every file.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// The Hub client (endpoint, token, cache directory).
#[derive(Debug, Clone)]
pub struct Hub {
    api: Api,
    endpoint: String,
    token: Option<secrecy::SecretString>,
    cache_dir: PathBuf,
    has_token: bool,
}

/// A client for `endpoint` with `token`, writing under `cache_dir`.
fn build_api(endpoint: &str, token: Option<String>, cache_dir: PathBuf) -> Result<Api, HfError> {
    ApiBuilder::from_cache(Cache::new(cache_dir))
        .with_endpoint(endpoint.trim_end_matches('/').to_owned())
        .with_token(token)
        .with_progress(false)
        .with_user_agent("rbee-hive", env!("CARGO_PKG_VERSION"))
        .build()
}

impl Hub {
    /// A client for `endpoint` writing under `cache_dir`.
    pub fn new(endpoint: &str, token: Option<String>, cache_dir: PathBuf) -> Result<Self, HfError> {
        let has_token = token.is_some();
        let api = build_api(endpoint, token.clone(), cache_dir.clone())?;
        Ok(Self {
            api,
            endpoint: endpoint.to_owned(),
            token: token.map(secrecy::SecretString::from),
            cache_dir,
            has_token,
        })
    }

    /// The cache root (`<models-dir>/hf`).
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// The cache folder of `repo` (`models--ORG--REPO`).
    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.cache_dir
            .join(Repo::new(repo.to_owned(), RepoType::Model).folder_name())
    }

    /// Where a fetched file of `plan` lies.
    pub fn snapshot_path(&self, plan: &Plan, name: &str) -> PathBuf {
        self.repo_dir(&plan.repo)
            .join("snapshots")
            .join(&plan.commit)
            .join(name)
    }

    /// Ask the Hub which files `r` means. Errors are what the provision
    /// request answers.
    pub async fn resolve(&self, r: &HfRef, display: &str) -> Result<Plan, HubError> {
        let repo = Repo::with_revision(
            r.repo.clone(),
            RepoType::Model,
            r.revision_or_main().to_owned(),
        );
        let request = self
            .api
            .repo(repo)
            .info_request()
            .query(&[("blobs", "true")])
            .send();
        let display = display.to_owned();
        let response = match tokio::time::timeout(RESOLVE_TIMEOUT, request).await {
            Err(_) => return Err(HubError::Timeout { display }),
            Ok(Err(source)) => return Err(HubError::Unreachable { display, source }),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if !status.is_success() {
            let hub_code = response
                .headers()
                .get("x-error-code")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            return Err(self.status_error(status.as_u16(), hub_code.as_deref(), display, r));
        }
        let body = match rbee_http::client::read_limited(response, MAX_LISTING_BYTES).await {
            Ok(body) => body,
            Err(source) => return Err(HubError::ListingUnread { display, source }),
        };
        let info: RepoInfo = match serde_json::from_slice(&body) {
            Ok(info) => info,
            Err(source) => return Err(HubError::ListingInvalid { display, source }),
        };
        select_files(r, &display, info)
    }

    fn status_error(
        &self,
        status: u16,
        hub_code: Option<&str>,
        display: String,
        r: &HfRef,
    ) -> HubError {
        let repo = r.repo.clone();
        match (status, hub_code) {
            (_, Some("RepoNotFound")) | (404, None) => HubError::RepoNotFound { display, repo },
            (_, Some("RevisionNotFound")) => HubError::RevisionNotFound {
                display,
                revision: r.revision_or_main().to_owned(),
                repo,
            },
            (_, Some("EntryNotFound")) => HubError::EntryNotFound { display, repo },
            (401 | 403, _) if self.has_token => HubError::TokenDenied { display, repo },
            (401 | 403, _) => HubError::NeedsToken { display, repo },
            (404, Some(_)) => HubError::NotFound { display },
            (status, _) => HubError::Status { display, status },
        }
    }

    /// Fetch one file of `plan`, resuming a partial one; returns its path
    /// in the snapshot.
    ///
    /// `hf-hub` spawns one task per 10 MB range and commits only a
    /// contiguous prefix; on a multi-threaded runtime those tasks start in
    /// no fixed order (the last range often first), so an interruption
    /// could find nothing committed. Each fetch therefore runs on its own
    /// thread with a current-thread runtime, where the ranges start in
    /// file order and every finished range extends the committed prefix.
    /// The thread is detached: a hive that exits does not wait for it.
    pub async fn fetch(
        &self,
        plan: &Plan,
        file: &RepoFile,
        display: &str,
        progress: FileProgress,
    ) -> Result<PathBuf, HubError> {
        let repo = Repo::with_revision(plan.repo.clone(), RepoType::Model, plan.commit.clone());
        let endpoint = self.endpoint.clone();
        let token = self
            .token
            .as_ref()
            .map(|t| secrecy::ExposeSecret::expose_secret(t).to_owned());
        let cache_dir = self.cache_dir.clone();
        let name = file.name.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("hf-download".to_owned())
            .spawn(move || {
                let result = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(HfError::IoError)
                    .and_then(|runtime| {
                        let api = build_api(&endpoint, token, cache_dir)?;
                        runtime.block_on(api.repo(repo).download_with_progress(&name, progress))
                    });
                let _ = tx.send(result);
            });
        let result = match spawned {
            Ok(_) => rx.await.map_err(|_| {
                HfError::IoError(std::io::Error::other("the download thread stopped"))
            }),
            Err(e) => Err(HfError::IoError(e)),
        };
        let path = result
            .and_then(|r| r)
            .map_err(|e| self.fetch_error(e, display, &file.name))?;
        self.confined(&path, display)
    }

    /// `path`, once it is known to lie under the cache root after every
    /// symlink is followed.
    fn confined(&self, path: &Path, display: &str) -> Result<PathBuf, HubError> {
        let unchecked = |source| HubError::Unchecked {
            display: display.to_owned(),
            path: path.to_path_buf(),
            source,
        };
        let root = std::fs::canonicalize(&self.cache_dir).map_err(unchecked)?;
        let real = std::fs::canonicalize(path).map_err(unchecked)?;
        if real.starts_with(&root) {
            Ok(path.to_path_buf())
        } else {
            Err(HubError::Outside {
                display: display.to_owned(),
                path: path.to_path_buf(),
                root,
            })
        }
    }

    fn fetch_error(&self, e: HfError, display: &str, name: &str) -> HubError {
        let display = display.to_owned();
        let name = name.to_owned();
        let status = match &e {
            HfError::RequestError(inner) => inner.status().map(|s| s.as_u16()),
            _ => None,
        };
        match status {
            Some(404) => HubError::FileNotFound { display, name },
            Some(401 | 403) => HubError::FileDenied { display, name },
            Some(status) => HubError::FileStatus {
                display,
                name,
                status,
            },
            None => HubError::Download {
                display,
                name,
                source: e,
            },
        }
    }
}

#[derive(Debug, Deserialize)]
struct RepoInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Debug, Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    lfs: Option<LfsInfo>,
}

#[derive(Debug, Deserialize)]
struct LfsInfo {
    sha256: String,
    size: u64,
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn select_files(r: &HfRef, display: &str, info: RepoInfo) -> Result<Plan, HubError> {
    let display = || display.to_owned();
    if !is_commit(&info.sha) {
        return Err(HubError::NoCommit { display: display() });
    }
    let to_file = |s: &Sibling| -> Result<RepoFile, HubError> {
        // The listing is the Hub's (or whatever answers at HF_ENDPOINT): a
        // name that would leave the snapshot folder is refused like a
        // user-given one.
        if let Err(source) = rbee_api::model_ref::check_repo_file_name(&s.rfilename) {
            return Err(HubError::UnsafeName {
                display: display(),
                source,
            });
        }
        let size = s
            .lfs
            .as_ref()
            .map(|l| l.size)
            .or(s.size)
            .ok_or_else(|| HubError::NoSize {
                display: display(),
                name: s.rfilename.clone(),
            })?;
        let sha256 = s.lfs.as_ref().map(|l| l.sha256.to_ascii_lowercase());
        if sha256
            .as_deref()
            .is_some_and(|h| h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(HubError::BadSha256 {
                display: display(),
                name: s.rfilename.clone(),
            });
        }
        Ok(RepoFile {
            name: s.rfilename.clone(),
            size,
            sha256,
        })
    };
    let is_gguf = |name: &str| name.to_ascii_lowercase().ends_with(".gguf");
    let plan = |format, files| Plan {
        repo: r.repo.clone(),
        commit: info.sha.to_ascii_lowercase(),
        format,
        files,
    };
    if let Some(wanted) = &r.file {
        let Some(sibling) = info.siblings.iter().find(|s| &s.rfilename == wanted) else {
            return Err(HubError::NoSuchFile {
                display: display(),
                repo: r.repo.clone(),
                file: wanted.clone(),
            });
        };
        if !is_gguf(wanted) {
            return Err(HubError::NotGguf { display: display() });
        }
        return Ok(plan(Format::Gguf, vec![to_file(sibling)?]));
    }
    let ggufs: Vec<&Sibling> = info
        .siblings
        .iter()
        .filter(|s| is_gguf(&s.rfilename))
        .collect();
    match ggufs.as_slice() {
        [one] => return Ok(plan(Format::Gguf, vec![to_file(one)?])),
        [] => {}
        many => {
            return Err(HubError::ManyGguf {
                display: display(),
                repo: r.repo.clone(),
                files: many.iter().map(|s| s.rfilename.clone()).collect(),
            });
        }
    }
    let top_level = |s: &&Sibling| !s.rfilename.contains('/');
    let weights: Vec<&Sibling> = info
        .siblings
        .iter()
        .filter(top_level)
        .filter(|s| s.rfilename.ends_with(".safetensors"))
        .collect();
    let has = |name: &str| info.siblings.iter().any(|s| s.rfilename == name);
    if weights.is_empty() || !has("config.json") || !has("tokenizer.json") {
        return Err(HubError::NoModel {
            display: display(),
            repo: r.repo.clone(),
        });
    }
    let mut files = Vec::new();
    for sibling in info.siblings.iter().filter(top_level) {
        if SAFETENSORS_COMPANIONS.contains(&sibling.rfilename.as_str())
            || sibling.rfilename.ends_with(".safetensors")
        {
            files.push(to_file(sibling)?);
        }
    }
    Ok(plan(Format::Safetensors, files))
}

/// The largest repository listing the hive reads (a listing of thousands of
/// files is a few MB).
const MAX_LISTING_BYTES: usize = 32 << 20;

/// Progress of one download, shared with `hf-hub`'s chunk tasks.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes of files already complete.
    pub finished: AtomicU64,
    /// Bytes of the file being fetched (resumed bytes included).
    pub current: AtomicU64,
}

impl Counters {
    /// Bytes on disk so far.
    pub fn downloaded(&self) -> u64 {
        self.finished.load(Ordering::Relaxed) + self.current.load(Ordering::Relaxed)
    }

    /// A file of `size` bytes is complete.
    pub fn finish_file(&self, size: u64) {
        self.current.store(0, Ordering::Relaxed);
        self.finished.fetch_add(size, Ordering::Relaxed);
    }
}

/// `hf-hub`'s progress callback for one attempt at one file.
///
/// `hf-hub` 0.4 calls `init`, then `update(offset)` once with the bytes it
/// resumes from, then `update(n)` for every piece received. Only the
/// latter are network bytes (`rbee_hive_download_bytes_total`). Clones
/// (one per chunk task) share the counters.
#[derive(Debug, Clone)]
pub struct FileProgress {
    counters: Arc<Counters>,
    network: Counter,
    expect_resume_offset: bool,
}

impl FileProgress {
    /// Progress into `counters`, network bytes into `network`.
    pub fn new(counters: Arc<Counters>, network: Counter) -> Self {
        Self {
            counters,
            network,
            expect_resume_offset: false,
        }
    }
}

impl hf_hub::api::tokio::Progress for FileProgress {
    async fn init(&mut self, _size: usize, _filename: &str) {
        self.counters.current.store(0, Ordering::Relaxed);
        self.expect_resume_offset = true;
    }

    async fn update(&mut self, size: usize) {
        let size = size as u64;
        if std::mem::take(&mut self.expect_resume_offset) {
            self.counters.current.store(size, Ordering::Relaxed);
            if size > 0 {
                tracing::info!(resumed_bytes = size, "resuming a partial download");
            }
        } else {
            self.counters.current.fetch_add(size, Ordering::Relaxed);
            self.network.inc_by(size);
        }
    }

    async fn finish(&mut self) {}
}

#[cfg(test)]
mod tests {
    use rbee_api::{ApiError, Coded, ErrorCode};

    use super::*;

    fn info(files: &[(&str, u64, bool)]) -> RepoInfo {
        RepoInfo {
            sha: "a".repeat(40),
            siblings: files
                .iter()
                .map(|(name, size, lfs)| Sibling {
                    rfilename: (*name).to_owned(),
                    size: Some(*size),
                    lfs: lfs.then(|| LfsInfo {
                        sha256: "b".repeat(64),
                        size: *size,
                    }),
                })
                .collect(),
        }
    }

    fn hf(file: Option<&str>) -> HfRef {
        HfRef {
            repo: "o/r".into(),
            revision: None,
            file: file.map(str::to_owned),
        }
    }

    #[test]
    fn a_listed_name_that_would_leave_the_snapshot_is_refused() {
        for name in [
            "../x.gguf",
            "a/../../x.gguf",
            "/etc/x.gguf",
            "-x.gguf",
            "a//x.gguf",
        ] {
            let err = select_files(&hf(None), "hf:o/r", info(&[(name, 10, true)])).expect_err(name);
            assert_eq!(err.code(), ErrorCode::DownloadFailed, "{name}");
        }
        let ok = select_files(&hf(None), "hf:o/r", info(&[("sub/x.gguf", 10, true)]));
        assert!(ok.is_ok(), "a plain sub-folder is a valid name");
    }

    #[test]
    fn a_single_gguf_is_chosen_and_its_lfs_hash_kept() {
        let plan = select_files(
            &hf(None),
            "hf:o/r",
            info(&[("README.md", 10, false), ("m.Q4.gguf", 100, true)]),
        )
        .unwrap();
        assert_eq!(plan.format, Format::Gguf);
        assert_eq!(plan.files.len(), 1);
        assert_eq!(plan.files[0].name, "m.Q4.gguf");
        assert_eq!(plan.files[0].sha256.as_deref(), Some(&*"b".repeat(64)));
    }

    #[test]
    fn several_ggufs_without_a_file_list_them() {
        let err: ApiError = select_files(
            &hf(None),
            "hf:o/r",
            info(&[("a.gguf", 1, true), ("b.gguf", 2, true)]),
        )
        .unwrap_err()
        .into();
        assert_eq!(err.code(), ErrorCode::InvalidRequest);
        let details = err.body().error.details.clone().unwrap();
        assert_eq!(details["files"], serde_json::json!(["a.gguf", "b.gguf"]));
        let chosen = select_files(
            &hf(Some("b.gguf")),
            "hf:o/r:b.gguf",
            info(&[("a.gguf", 1, true), ("b.gguf", 2, true)]),
        )
        .unwrap();
        assert_eq!(chosen.files[0].name, "b.gguf");
    }

    #[test]
    fn safetensors_repos_take_weights_config_and_tokenizer_only() {
        let plan = select_files(
            &hf(None),
            "hf:o/r",
            info(&[
                ("config.json", 1, false),
                ("tokenizer.json", 2, false),
                ("model-00001-of-00002.safetensors", 3, true),
                ("model-00002-of-00002.safetensors", 4, true),
                ("model.safetensors.index.json", 5, false),
                ("onnx/model.safetensors", 6, true),
                ("pytorch_model.bin", 7, true),
            ]),
        )
        .unwrap();
        assert_eq!(plan.format, Format::Safetensors);
        let names: Vec<_> = plan.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "config.json",
                "tokenizer.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json"
            ]
        );
        assert_eq!(plan.total_bytes(), 15);
    }

    #[test]
    fn a_repo_without_a_model_or_a_missing_file_is_not_found() {
        let none = select_files(&hf(None), "hf:o/r", info(&[("README.md", 1, false)]));
        assert_eq!(none.unwrap_err().code(), ErrorCode::ModelNotFound);
        let missing = select_files(
            &hf(Some("x.gguf")),
            "hf:o/r:x.gguf",
            info(&[("a.gguf", 1, true)]),
        );
        let err: ApiError = missing.unwrap_err().into();
        assert_eq!(err.code(), ErrorCode::ModelNotFound);
        assert!(err.body().error.message.contains("hf:o/r:x.gguf"));
        let not_gguf = select_files(
            &hf(Some("config.json")),
            "hf:o/r:config.json",
            info(&[("config.json", 1, false)]),
        );
        assert_eq!(not_gguf.unwrap_err().code(), ErrorCode::InvalidRequest);
    }
}
