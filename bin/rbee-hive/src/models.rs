//! Model provisioning: references in, verified files and a catalog row out.
//!
//! [`Models`] is the service behind the `/v1/models/*` routes. A provision
//! request joins the running download of the same reference or starts one
//! on its own task; the request waits only for resolution (which files,
//! how big, allowed, room on disk), so every synchronous error is answered
//! on the request, and the transfer itself is followed on the progress
//! stream. The catalog (SQLite) records finished models and pending
//! downloads; at startup it is reconciled with the disk and pending
//! downloads resume.

pub(crate) mod catalog;
pub(crate) mod downloads;
pub(crate) mod error;
pub(crate) mod hub;
pub(crate) mod leases;
pub(crate) mod local;
mod provision;
pub mod routes;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use audit_logging::{AuditEvent, AuditSink};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rbee_api::models::{
    Catalog as CatalogView, DownloadEvent, Evicted, ModelEntry, ModelList, ProvisionAccepted,
};
use rbee_api::{ApiError, ErrorCode, ModelRef};
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;

use catalog::{Catalog, CatalogError, StoredFile};
use downloads::{Download, Downloads, Phase};
use error::ModelError;
use hub::Hub;
use leases::Leases;
use provision::Provision;

/// How often progress is published (the contract's "at most every 250 ms").
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// Settings of the model service.
#[derive(Debug, Clone)]
pub struct ModelSettings {
    /// Root of the catalog and the Hugging Face cache.
    pub models_dir: PathBuf,
    /// Hugging Face endpoint (`HF_ENDPOINT`).
    pub hf_endpoint: String,
    /// Hugging Face token (`HF_TOKEN` or a token file).
    pub hf_token: Option<SecretString>,
    /// Free space a download must leave on the models filesystem.
    pub disk_reserve_bytes: u64,
    /// Attempts per file when the network fails (each resumes).
    pub download_attempts: u32,
    /// How long a finished download id stays queryable.
    pub retention: Duration,
}

/// The model metrics of the contract.
#[derive(Debug, Clone, Default)]
struct ModelMetrics {
    downloaded: Counter,
    active: Gauge,
    bytes: Counter,
}

impl ModelMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "rbee_hive_models_downloaded",
            "Models provisioned into the catalog",
            m.downloaded.clone(),
        );
        registry.register(
            "rbee_hive_download_active",
            "Downloads in progress",
            m.active.clone(),
        );
        registry.register(
            "rbee_hive_download_bytes",
            "Bytes received from the model hub",
            m.bytes.clone(),
        );
        m
    }
}

struct Inner {
    catalog: Catalog,
    hub: Hub,
    downloads: Downloads,
    leases: Leases,
    metrics: ModelMetrics,
    audit: AuditSink,
    settings: ModelSettings,
    disk_gate: parking_lot::Mutex<()>,
    shutdown: CancellationToken,
}

/// The model service; cheap to clone.
#[derive(Clone)]
pub struct Models {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Models {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Models")
            .field("models_dir", &self.inner.settings.models_dir)
            .finish_non_exhaustive()
    }
}

/// Why the model service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    /// The models directory is unusable.
    #[error("models directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The catalog could not be opened or read.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The Hub client could not be built.
    #[error("cannot build the Hugging Face client")]
    Hub(#[source] hf_hub::api::tokio::ApiError),
}

impl Models {
    /// Open the catalog under `settings.models_dir`, reconcile it with the
    /// disk, remove partial files nobody will resume, and resume the
    /// downloads that were running when the hive stopped.
    pub async fn open(
        settings: ModelSettings,
        audit: AuditSink,
        registry: &mut Registry,
        shutdown: CancellationToken,
    ) -> Result<Self, ModelsError> {
        let dir = &settings.models_dir;
        std::fs::create_dir_all(dir.join("hf")).map_err(|source| ModelsError::Dir {
            path: dir.clone(),
            source,
        })?;
        let dir = dir.canonicalize().map_err(|source| ModelsError::Dir {
            path: dir.clone(),
            source,
        })?;
        let catalog = Catalog::open(&dir).await?;
        let hub = Hub::new(
            &settings.hf_endpoint,
            settings
                .hf_token
                .as_ref()
                .map(|t| t.expose_secret().to_owned()),
            dir.join("hf"),
        )
        .map_err(ModelsError::Hub)?;
        let dropped = catalog.reconcile().await?;
        for model_ref in &dropped {
            tracing::warn!(%model_ref, "model removed from the catalog: its files are missing or changed on disk");
        }
        let pending = catalog.pending().await?;
        tracing::info!(
            models_dir = %dir.display(),
            dropped = dropped.len(),
            pending = pending.len(),
            "model catalog open"
        );
        let mut settings = settings;
        settings.models_dir = dir;
        let models = Self {
            inner: Arc::new(Inner {
                catalog,
                hub,
                downloads: Downloads::new(settings.retention),
                leases: Leases::default(),
                metrics: ModelMetrics::register(registry),
                audit,
                settings,
                disk_gate: parking_lot::Mutex::new(()),
                shutdown,
            }),
        };
        models.remove_stray_partials(&pending);
        for model_ref in pending {
            match ModelRef::parse(&model_ref) {
                Ok(parsed) => {
                    tracing::info!(%model_ref, "resuming a download interrupted by the last stop");
                    let _ = models.start(parsed, None);
                }
                Err(_) => {
                    let _ = models.inner.catalog.remove_pending(&model_ref).await;
                }
            }
        }
        Ok(models)
    }

    /// Leases that keep models in use from being evicted.
    pub fn leases(&self) -> &Leases {
        &self.inner.leases
    }

    /// Look up a provisioned model.
    pub async fn get(&self, model_ref: &str) -> Result<Option<ModelEntry>, ApiError> {
        Ok(self
            .inner
            .catalog
            .get(model_ref)
            .await
            .map_err(internal)?
            .map(|r| r.entry))
    }

    /// Record that a worker started with `model_ref`.
    pub async fn mark_used(&self, model_ref: &str) -> Result<bool, ApiError> {
        self.inner
            .catalog
            .mark_used(model_ref, now_rfc3339())
            .await
            .map_err(internal)
    }

    /// Start (or join) provisioning of `raw` and wait until it is resolved.
    pub async fn provision(
        &self,
        raw: &str,
        request_id: Option<&str>,
    ) -> Result<ProvisionAccepted, ApiError> {
        let parsed = ModelRef::parse(raw).map_err(ModelError::from)?;
        let download = self.start(parsed, request_id.map(str::to_owned));
        let mut phase = download.subscribe();
        let resolved = phase
            .wait_for(|p| !matches!(p, Phase::Resolving))
            .await
            .map(|p| p.clone())
            .map_err(|_| ApiError::new(ErrorCode::Internal, "the download task stopped"))?;
        let (stage, local_path) = match resolved {
            Phase::Rejected(e) => return Err(e),
            Phase::Resolving => ("downloading", None),
            Phase::Event(DownloadEvent::Downloading { .. }) => ("downloading", None),
            Phase::Event(DownloadEvent::Complete { local_path }) => ("complete", Some(local_path)),
            Phase::Event(DownloadEvent::Error { .. }) => ("error", None),
        };
        Ok(ProvisionAccepted {
            download_id: download.id.clone(),
            model_ref: download.model_ref.clone(),
            stage: stage.to_owned(),
            local_path,
        })
    }

    /// The download `id`, for its progress stream.
    pub fn download(&self, id: &str) -> Option<Arc<Download>> {
        self.inner.downloads.get(id)
    }

    /// Provisioned models.
    pub async fn list(&self) -> Result<ModelList, ApiError> {
        let records = self.inner.catalog.list().await.map_err(internal)?;
        Ok(ModelList {
            models: records.into_iter().map(|r| r.entry).collect(),
        })
    }

    /// Provisioned models plus downloads in progress.
    pub async fn catalog(&self) -> Result<CatalogView, ApiError> {
        let models = self.list().await?.models;
        Ok(CatalogView {
            models,
            downloads: self.inner.downloads.active(),
        })
    }

    /// Remove `raw` from the catalog and delete the files only it uses
    /// (never the files of a `file:` model, which are the operator's).
    pub async fn evict(&self, raw: &str, request_id: Option<&str>) -> Result<Evicted, ApiError> {
        let parsed = ModelRef::parse(raw).map_err(ModelError::from)?;
        let model_ref = parsed.to_string();
        if self.inner.downloads.is_active(&model_ref) {
            return Err(ModelError::Downloading { model_ref }.into());
        }
        let _evicting = self.inner.leases.begin_evict(&model_ref)?;
        let all = self.inner.catalog.list().await.map_err(internal)?;
        let Some(record) = all.iter().find(|r| r.entry.model_ref == model_ref).cloned() else {
            return Err(ModelError::NotInCatalog { model_ref }.into());
        };
        let bytes_freed = if record.entry.provider == "hf" {
            let others: Vec<PathBuf> = all
                .iter()
                .filter(|r| r.entry.model_ref != model_ref)
                .flat_map(|r| r.files.iter().map(|f| f.path.clone()))
                .collect();
            let cache = self.inner.hub.cache_dir().to_path_buf();
            let files = record.files.clone();
            rbee_http::task::spawn_blocking(move || delete_unshared(&files, &others, &cache))
                .await
                .map_err(|e| internal(e.to_string()))?
        } else {
            0
        };
        self.inner
            .catalog
            .remove(&model_ref)
            .await
            .map_err(internal)?;
        tracing::info!(%model_ref, bytes_freed, "model evicted");
        self.inner.audit.emit(
            request_id,
            AuditEvent::ModelEvicted {
                model_ref: model_ref.clone(),
            },
        );
        Ok(Evicted {
            model_ref,
            bytes_freed,
        })
    }

    /// Join the running download of `parsed` or start one on its own task.
    fn start(&self, parsed: ModelRef, request_id: Option<String>) -> Arc<Download> {
        let model_ref = parsed.to_string();
        let (download, created) = self.inner.downloads.join_or_start(&model_ref);
        if created {
            let models = self.clone();
            let task_download = Arc::clone(&download);
            rbee_http::task::spawn(async move {
                models.run(task_download, parsed, request_id).await;
            });
        }
        download
    }

    async fn run(&self, download: Arc<Download>, parsed: ModelRef, request_id: Option<String>) {
        let model_ref = download.model_ref.clone();
        let provisioned = match self.cached(&model_ref).await {
            Ok(Some(local_path)) => {
                let phase = Phase::Event(DownloadEvent::Complete { local_path });
                self.inner.downloads.finish(&download, phase);
                return;
            }
            Ok(None) => match &parsed {
                ModelRef::HuggingFace(r) => {
                    Provision { inner: &self.inner }.run_hf(&download, r).await
                }
                ModelRef::File(path) => {
                    Provision { inner: &self.inner }
                        .run_file(&download, path)
                        .await
                }
            },
            Err(e) => Err(Failure::Rejected(e)),
        };
        let entry = match provisioned {
            Ok(entry) => entry,
            Err(failure) => {
                self.fail(&download, request_id.as_deref(), failure);
                return;
            }
        };
        self.inner.metrics.downloaded.inc();
        tracing::info!(%model_ref, local_path = %entry.local_path, bytes = entry.size_bytes, "model provisioned");
        self.inner.audit.emit(
            request_id.as_deref(),
            AuditEvent::ModelProvisioned {
                model_ref: model_ref.clone(),
                local_path: entry.local_path.clone(),
                bytes: entry.size_bytes,
            },
        );
        let phase = Phase::Event(DownloadEvent::Complete {
            local_path: entry.local_path,
        });
        self.inner.downloads.finish(&download, phase);
    }

    fn fail(&self, download: &Download, request_id: Option<&str>, failure: Failure) {
        let (phase, error) = match failure {
            Failure::Rejected(e) => (Phase::Rejected(e.clone()), e),
            Failure::Failed(e) => (
                Phase::Event(DownloadEvent::Error {
                    code: e.code(),
                    message: e.body().error.message.clone(),
                }),
                e,
            ),
        };
        tracing::warn!(model_ref = %download.model_ref, code = %error.code(), error = %error.body().error.message, "provisioning failed");
        self.inner.audit.emit(
            request_id,
            AuditEvent::ModelProvisionFailed {
                model_ref: download.model_ref.clone(),
                code: error.code(),
            },
        );
        self.inner.downloads.finish(download, phase);
    }

    /// The local path of an already provisioned, intact model.
    async fn cached(&self, model_ref: &str) -> Result<Option<String>, ApiError> {
        let Some(record) = self.inner.catalog.get(model_ref).await.map_err(internal)? else {
            return Ok(None);
        };
        let intact = record
            .files
            .iter()
            .all(|f| std::fs::metadata(&f.path).is_ok_and(|m| m.is_file() && m.len() == f.size));
        if intact {
            return Ok(Some(record.entry.local_path));
        }
        tracing::warn!(%model_ref, "catalogued files are missing or changed; provisioning again");
        self.inner
            .catalog
            .remove(model_ref)
            .await
            .map_err(internal)?;
        Ok(None)
    }

    /// Remove partial files of repositories no pending download will
    /// resume (`models--*/blobs/*.sync.part`).
    fn remove_stray_partials(&self, pending: &[String]) {
        let keep: Vec<PathBuf> = pending
            .iter()
            .filter_map(|r| match ModelRef::parse(r) {
                Ok(ModelRef::HuggingFace(hf)) => Some(self.inner.hub.repo_dir(&hf.repo)),
                _ => None,
            })
            .collect();
        let Ok(repos) = std::fs::read_dir(self.inner.hub.cache_dir()) else {
            return;
        };
        for repo in repos.flatten() {
            if keep.contains(&repo.path()) {
                continue;
            }
            let Ok(blobs) = std::fs::read_dir(repo.path().join("blobs")) else {
                continue;
            };
            for blob in blobs.flatten() {
                let path = blob.path();
                if path.to_string_lossy().ends_with(".sync.part") {
                    match std::fs::remove_file(&path) {
                        Ok(()) => {
                            tracing::info!(path = %path.display(), "removed a partial download no pending provision will resume")
                        }
                        Err(e) => {
                            tracing::warn!(path = %path.display(), error = %e, "cannot remove a partial download")
                        }
                    }
                }
            }
        }
    }
}

/// How provisioning ended badly.
enum Failure {
    /// Before any transfer: the request answers it.
    Rejected(ApiError),
    /// During the transfer: the progress stream reports it.
    Failed(ApiError),
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "model service failure");
    ApiError::new(
        ErrorCode::Internal,
        "internal error in the model service; see the hive's log",
    )
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Free bytes for unprivileged writers on the filesystem holding `path`.
pub fn available_bytes(path: &Path) -> std::io::Result<u64> {
    let stat = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(stat.blocks_available().saturating_mul(stat.fragment_size()))
}

/// Delete a snapshot file and the blob it links to (when inside `cache`).
fn remove_with_blob(path: &Path, cache: &Path) {
    if let Ok(blob) = path.canonicalize() {
        if blob.starts_with(cache) && blob != path {
            let _ = std::fs::remove_file(&blob);
        }
    }
    let _ = std::fs::remove_file(path);
}

/// Delete `files` (snapshot links and their blobs) that no path in
/// `others` shares; returns the bytes freed.
fn delete_unshared(files: &[StoredFile], others: &[PathBuf], cache: &Path) -> u64 {
    let other_blobs: Vec<PathBuf> = others
        .iter()
        .filter_map(|p| p.canonicalize().ok())
        .collect();
    let mut freed = 0;
    for file in files {
        if others.contains(&file.path) {
            continue;
        }
        let blob = file.path.canonicalize().ok();
        let _ = std::fs::remove_file(&file.path);
        if let Some(blob) = blob {
            if blob.starts_with(cache)
                && !other_blobs.contains(&blob)
                && std::fs::remove_file(&blob).is_ok()
            {
                freed += file.size;
            }
        }
    }
    freed
}
