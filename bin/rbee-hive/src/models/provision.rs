//! The two ways a model is provisioned: fetching an `hf:` reference's files
//! (disk claim, resumable transfers, verification, catalog row) and
//! validating and hashing a `file:` reference in place.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rbee_api::models::{DownloadEvent, ModelEntry};
use rbee_api::{ApiError, HfRef};
use tokio_util::sync::CancellationToken;

use super::catalog::{CatalogRecord, StoredFile};
use super::downloads::{Download, Phase};
use super::error::{DiskShortfall, ModelError};
use super::hub::{FileProgress, Format, Plan, RepoFile};
use super::{
    available_bytes, internal, local, now_rfc3339, remove_with_blob, Failure, Inner,
    PROGRESS_INTERVAL,
};

/// One provisioning run over the model service's state: the transfers,
/// checks and catalog rows of one reference. A type of its own so that
/// `Models` keeps one `impl`, in `models.rs`.
pub(super) struct Provision<'a> {
    pub(super) inner: &'a Inner,
}

impl Provision<'_> {
    pub(super) async fn run_hf(
        &self,
        download: &Arc<Download>,
        r: &HfRef,
    ) -> Result<ModelEntry, Failure> {
        let display = download.model_ref.clone();
        let plan = self
            .inner
            .hub
            .resolve(r, &display)
            .await
            .map_err(|e| Failure::Rejected(e.into()))?;
        let present: Vec<bool> = plan
            .files
            .iter()
            .map(|f| {
                std::fs::metadata(self.inner.hub.snapshot_path(&plan, &f.name))
                    .is_ok_and(|m| m.is_file() && m.len() == f.size)
            })
            .collect();
        let to_fetch: u64 = plan
            .files
            .iter()
            .zip(&present)
            .filter(|(_, p)| !**p)
            .map(|(f, _)| f.size)
            .sum();
        self.claim_disk(download, to_fetch, plan.total_bytes())
            .map_err(Failure::Rejected)?;
        self.inner
            .catalog
            .add_pending(&display, download.started_at.clone())
            .await
            .map_err(|e| Failure::Rejected(internal(e)))?;
        self.inner.metrics.active.inc();
        let ticker = self.publish_progress(download);
        let result = self.fetch_plan(download, &plan, &present).await;
        ticker.cancel();
        self.inner.metrics.active.dec();
        let record = match result {
            Ok(record) => record,
            Err(e) => {
                let _ = self.inner.catalog.remove_pending(&display).await;
                return Err(Failure::Failed(e));
            }
        };
        let entry = record.entry.clone();
        self.inner
            .catalog
            .insert(record)
            .await
            .map_err(|e| Failure::Failed(internal(e)))?;
        Ok(entry)
    }

    async fn fetch_plan(
        &self,
        download: &Download,
        plan: &Plan,
        present: &[bool],
    ) -> Result<CatalogRecord, ApiError> {
        let display = &download.model_ref;
        let mut stored = Vec::new();
        let mut digests = Vec::new();
        for (file, &is_present) in plan.files.iter().zip(present) {
            let target = self.inner.hub.snapshot_path(plan, &file.name);
            let mut sha = None;
            if is_present {
                // A file kept from an earlier, interrupted provision: check it.
                sha = self.verify(&target, file, display).await.ok();
            }
            if sha.is_none() {
                let path = self
                    .fetch_with_retries(plan, file, display, download)
                    .await?;
                sha = Some(self.verify(&path, file, display).await?);
            }
            download.counters.finish_file(file.size);
            digests.push((file.name.clone(), sha.unwrap_or_default()));
            stored.push(StoredFile {
                path: target,
                size: file.size,
            });
        }
        let (local_path, sha256) = match plan.format {
            Format::Gguf => (stored[0].path.clone(), digests[0].1.clone()),
            Format::Safetensors => (
                self.inner
                    .hub
                    .repo_dir(&plan.repo)
                    .join("snapshots")
                    .join(&plan.commit),
                local::manifest_digest(&digests),
            ),
        };
        Ok(CatalogRecord {
            entry: ModelEntry {
                model_ref: display.clone(),
                provider: "hf".to_owned(),
                local_path: local_path.display().to_string(),
                format: plan.format.as_str().to_owned(),
                size_bytes: plan.total_bytes(),
                sha256,
                revision: Some(plan.commit.clone()),
                downloaded_at: now_rfc3339(),
                last_used: None,
            },
            files: stored,
        })
    }

    async fn fetch_with_retries(
        &self,
        plan: &Plan,
        file: &RepoFile,
        display: &str,
        download: &Download,
    ) -> Result<PathBuf, ApiError> {
        let attempts = self.inner.settings.download_attempts.max(1);
        let mut attempt = 1;
        loop {
            let progress = FileProgress::new(
                Arc::clone(&download.counters),
                self.inner.metrics.bytes.clone(),
            );
            match self.inner.hub.fetch(plan, file, display, progress).await {
                Ok(path) => return Ok(path),
                Err(e) if e.retry() && attempt < attempts => {
                    let delay = Duration::from_secs(1 << (attempt - 1).min(5));
                    tracing::warn!(model_ref = %download.model_ref, file = %file.name, attempt, error = %rbee_api::error::chain(&e), retry_in_s = delay.as_secs(), "download attempt failed; resuming after a pause");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Check size and SHA-256 of a fetched file; delete it on a mismatch.
    /// Returns its SHA-256.
    async fn verify(
        &self,
        path: &Path,
        file: &RepoFile,
        display: &str,
    ) -> Result<String, ApiError> {
        let path = path.to_path_buf();
        let expected = file.clone();
        let shutdown = self.inner.shutdown.clone();
        let display = display.to_owned();
        let cache = self.inner.hub.cache_dir().to_path_buf();
        rbee_http::task::spawn_blocking(move || {
            let name = expected.name.clone();
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let mismatch = if size != expected.size {
                ModelError::SizeMismatch {
                    display,
                    name,
                    have: size,
                    want: expected.size,
                }
            } else {
                let sink = AtomicU64::new(0);
                match local::hash_file(&path, &sink, &|| shutdown.is_cancelled()) {
                    Ok(Some(sha)) => match expected.sha256 {
                        Some(want) if want != sha => ModelError::ShaMismatch {
                            display,
                            name,
                            want,
                            have: sha,
                        },
                        _ => return Ok(sha),
                    },
                    Ok(None) => return Err(ModelError::ShuttingDown.into()),
                    Err(source) => ModelError::Unverifiable {
                        display,
                        name,
                        source,
                    },
                }
            };
            remove_with_blob(&path, &cache);
            Err(mismatch.into())
        })
        .await
        .map_err(|e| internal(e.to_string()))?
    }

    pub(super) async fn run_file(
        &self,
        download: &Arc<Download>,
        named: &Path,
    ) -> Result<ModelEntry, Failure> {
        let display = download.model_ref.clone();
        let named = named.to_path_buf();
        let inspect_display = display.clone();
        let local =
            rbee_http::task::spawn_blocking(move || local::inspect(&named, &inspect_display))
                .await
                .map_err(|e| Failure::Rejected(internal(e.to_string())))?
                .map_err(|e| Failure::Rejected(e.into()))?;
        let total: u64 = local.files.iter().map(|(_, s)| s).sum();
        download.total.store(total, Ordering::Relaxed);
        download.set(Phase::Event(DownloadEvent::Downloading {
            bytes_downloaded: 0,
            bytes_total: total,
        }));
        let ticker = self.publish_progress(download);
        let counters = Arc::clone(&download.counters);
        let shutdown = self.inner.shutdown.clone();
        let files = local.files.clone();
        let hashed = rbee_http::task::spawn_blocking(move || {
            let mut digests = Vec::new();
            for (path, size) in &files {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                match local::hash_file(path, &counters.current, &|| shutdown.is_cancelled()) {
                    Ok(Some(sha)) => digests.push((name, sha)),
                    Ok(None) => return Err(ModelError::ShuttingDown),
                    Err(source) => {
                        return Err(ModelError::Unreadable {
                            path: path.clone(),
                            source,
                        })
                    }
                }
                counters.finish_file(*size);
            }
            Ok(digests)
        })
        .await;
        ticker.cancel();
        let digests = hashed
            .map_err(|e| Failure::Failed(internal(e.to_string())))?
            .map_err(|e| Failure::Failed(e.into()))?;
        let sha256 = match local.format {
            Format::Gguf => digests[0].1.clone(),
            Format::Safetensors => local::manifest_digest(&digests),
        };
        let record = CatalogRecord {
            entry: ModelEntry {
                model_ref: display,
                provider: "file".to_owned(),
                local_path: local.path.display().to_string(),
                format: local.format.as_str().to_owned(),
                size_bytes: total,
                sha256,
                revision: None,
                downloaded_at: now_rfc3339(),
                last_used: None,
            },
            files: local
                .files
                .into_iter()
                .map(|(path, size)| StoredFile { path, size })
                .collect(),
        };
        let entry = record.entry.clone();
        self.inner
            .catalog
            .insert(record)
            .await
            .map_err(|e| Failure::Failed(internal(e)))?;
        Ok(entry)
    }

    /// Refuse a download that would leave less than the reserve free,
    /// counting what running downloads still have to write; on success the
    /// download's total is set, which claims its bytes.
    fn claim_disk(&self, download: &Download, to_fetch: u64, total: u64) -> Result<(), ApiError> {
        let _gate = self.inner.disk_gate.lock();
        let available = available_bytes(&self.inner.settings.models_dir).map_err(internal)?;
        let reserved = self.inner.downloads.reserved_bytes();
        let reserve = self.inner.settings.disk_reserve_bytes;
        let needed = to_fetch.saturating_add(reserved).saturating_add(reserve);
        if available < needed {
            return Err(ModelError::InsufficientDisk {
                model_ref: download.model_ref.clone(),
                disk: DiskShortfall {
                    required_bytes: to_fetch,
                    available_bytes: available,
                    reserved_bytes: reserved,
                    reserve_bytes: reserve,
                },
            }
            .into());
        }
        download.total.store(total, Ordering::Relaxed);
        download.set(Phase::Event(DownloadEvent::Downloading {
            bytes_downloaded: download.counters.downloaded(),
            bytes_total: total,
        }));
        Ok(())
    }

    /// Publish the byte counters every [`PROGRESS_INTERVAL`] while they
    /// change, until the returned token is cancelled.
    fn publish_progress(&self, download: &Arc<Download>) -> CancellationToken {
        let stop = CancellationToken::new();
        let download = Arc::clone(download);
        let token = stop.clone();
        rbee_http::task::spawn(async move {
            let mut interval = tokio::time::interval(PROGRESS_INTERVAL);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last = u64::MAX;
            loop {
                tokio::select! {
                    () = token.cancelled() => break,
                    _ = interval.tick() => {}
                }
                let now = download.counters.downloaded();
                if now != last {
                    download.progress(now, download.total.load(Ordering::Relaxed));
                    last = now;
                }
            }
        });
        stop
    }
}
