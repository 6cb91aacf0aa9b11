//! Downloads in flight and recently finished: one per model reference at a
//! time (later requests for the same reference join it), each with a
//! `watch` channel that progress streams subscribe to. Finished downloads
//! stay queryable for the retention period.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Mutex, MutexGuard};
use rand::Rng;
use rbee_api::models::{DownloadEvent, DownloadInfo};
use rbee_api::ApiError;
use tokio::sync::watch;

use super::hub::Counters;

/// Where a download stands.
#[derive(Debug, Clone)]
pub enum Phase {
    /// Asking the Hub (or the disk) what the reference means.
    Resolving,
    /// Resolution failed: the provision request answers this error.
    Rejected(ApiError),
    /// Resolved; downloading, complete or failed.
    Event(DownloadEvent),
}

impl Phase {
    /// The event a progress stream shows for this phase.
    pub fn event(&self) -> DownloadEvent {
        match self {
            Self::Resolving => DownloadEvent::Downloading {
                bytes_downloaded: 0,
                bytes_total: 0,
            },
            Self::Rejected(e) => DownloadEvent::Error {
                code: e.code(),
                message: e.body().error.message.clone(),
            },
            Self::Event(e) => e.clone(),
        }
    }

    /// True once nothing more will happen.
    pub fn is_terminal(&self) -> bool {
        match self {
            Self::Resolving => false,
            Self::Rejected(_) => true,
            Self::Event(e) => e.is_terminal(),
        }
    }
}

/// One download.
#[derive(Debug)]
pub struct Download {
    /// Its id (`dl-` and 16 hex digits).
    pub id: String,
    /// The canonical reference.
    pub model_ref: String,
    /// Started, as RFC 3339.
    pub started_at: String,
    /// Bytes so far, updated by the fetch tasks.
    pub counters: Arc<Counters>,
    /// Bytes in all, once resolved.
    pub total: std::sync::atomic::AtomicU64,
    phase: watch::Sender<Phase>,
}

impl Download {
    /// Subscribe to its phase; the receiver sees the current phase first.
    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// The phase now.
    pub fn phase(&self) -> Phase {
        self.phase.borrow().clone()
    }

    /// Publish byte counts, unless the download has already moved past
    /// `downloading` (a late tick must not hide the final event).
    pub fn progress(&self, bytes_downloaded: u64, bytes_total: u64) {
        self.phase.send_if_modified(|phase| {
            if matches!(phase, Phase::Event(DownloadEvent::Downloading { .. })) {
                *phase = Phase::Event(DownloadEvent::Downloading {
                    bytes_downloaded,
                    bytes_total,
                });
                true
            } else {
                false
            }
        });
    }

    /// Publish a new phase (progress streams wake up).
    pub fn set(&self, phase: Phase) {
        self.phase.send_replace(phase);
    }
}

struct Entry {
    download: Arc<Download>,
    finished_at: Option<Instant>,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<String, Entry>,
    active: HashMap<String, String>,
}

/// The registry of downloads.
pub struct Downloads {
    inner: Mutex<Inner>,
    retention: Duration,
}

impl std::fmt::Debug for Downloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Downloads")
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl Downloads {
    /// Keep finished downloads queryable for `retention`.
    pub fn new(retention: Duration) -> Self {
        Self {
            inner: Mutex::default(),
            retention,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    /// The running download of `model_ref`, or a new one in `Resolving`;
    /// the flag is true when the caller created it and must run it.
    pub fn join_or_start(&self, model_ref: &str) -> (Arc<Download>, bool) {
        let mut inner = self.lock();
        self.prune(&mut inner);
        if let Some(id) = inner.active.get(model_ref) {
            if let Some(entry) = inner.by_id.get(id) {
                return (Arc::clone(&entry.download), false);
            }
        }
        let id = format!("dl-{:016x}", rand::rng().random::<u64>());
        let (phase, _) = watch::channel(Phase::Resolving);
        let download = Arc::new(Download {
            id: id.clone(),
            model_ref: model_ref.to_owned(),
            started_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            counters: Arc::default(),
            total: std::sync::atomic::AtomicU64::new(0),
            phase,
        });
        inner.active.insert(model_ref.to_owned(), id.clone());
        inner.by_id.insert(
            id,
            Entry {
                download: Arc::clone(&download),
                finished_at: None,
            },
        );
        (download, true)
    }

    /// Publish the final phase and release the reference, so the next
    /// request for it starts afresh.
    pub fn finish(&self, download: &Download, phase: Phase) {
        let mut inner = self.lock();
        download.set(phase);
        if inner.active.get(&download.model_ref) == Some(&download.id) {
            inner.active.remove(&download.model_ref);
        }
        if let Some(entry) = inner.by_id.get_mut(&download.id) {
            entry.finished_at = Some(Instant::now());
        }
    }

    /// A download by id, running or finished within the retention period.
    pub fn get(&self, id: &str) -> Option<Arc<Download>> {
        let mut inner = self.lock();
        self.prune(&mut inner);
        inner.by_id.get(id).map(|e| Arc::clone(&e.download))
    }

    /// True while `model_ref` is being downloaded.
    pub fn is_active(&self, model_ref: &str) -> bool {
        self.lock().active.contains_key(model_ref)
    }

    /// Downloads in progress, for the catalog view.
    pub fn active(&self) -> Vec<DownloadInfo> {
        let inner = self.lock();
        let mut out: Vec<DownloadInfo> = inner
            .active
            .values()
            .filter_map(|id| inner.by_id.get(id))
            .map(|e| {
                let d = &e.download;
                DownloadInfo {
                    download_id: d.id.clone(),
                    model_ref: d.model_ref.clone(),
                    bytes_downloaded: d.counters.downloaded(),
                    bytes_total: d.total.load(std::sync::atomic::Ordering::Relaxed),
                    started_at: d.started_at.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| {
            a.started_at
                .cmp(&b.started_at)
                .then(a.model_ref.cmp(&b.model_ref))
        });
        out
    }

    /// Bytes that running downloads still have to write: the disk space
    /// they have claimed.
    pub fn reserved_bytes(&self) -> u64 {
        let inner = self.lock();
        inner
            .active
            .values()
            .filter_map(|id| inner.by_id.get(id))
            .map(|e| {
                let d = &e.download;
                d.total
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .saturating_sub(d.counters.downloaded())
            })
            .sum()
    }

    fn prune(&self, inner: &mut Inner) {
        let retention = self.retention;
        inner
            .by_id
            .retain(|_, e| e.finished_at.is_none_or(|t| t.elapsed() < retention));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_request_joins_the_running_download_and_a_finished_one_starts_afresh() {
        let downloads = Downloads::new(Duration::from_secs(60));
        let (first, created) = downloads.join_or_start("hf:o/r");
        assert!(created);
        let (joined, created) = downloads.join_or_start("hf:o/r");
        assert!(!created);
        assert_eq!(joined.id, first.id);
        assert!(downloads.is_active("hf:o/r"));

        downloads.finish(
            &first,
            Phase::Event(DownloadEvent::Complete {
                local_path: "/m".into(),
            }),
        );
        assert!(!downloads.is_active("hf:o/r"));
        assert!(downloads.get(&first.id).unwrap().phase().is_terminal());
        let (again, created) = downloads.join_or_start("hf:o/r");
        assert!(created);
        assert_ne!(again.id, first.id);
    }

    #[test]
    fn finished_downloads_are_forgotten_after_the_retention_period() {
        let downloads = Downloads::new(Duration::from_millis(20));
        let (d, _) = downloads.join_or_start("hf:o/r");
        downloads.finish(
            &d,
            Phase::Rejected(ApiError::new(rbee_api::ErrorCode::ModelNotFound, "no")),
        );
        assert!(downloads.get(&d.id).is_some());
        std::thread::sleep(Duration::from_millis(40));
        assert!(downloads.get(&d.id).is_none());
    }

    #[test]
    fn running_downloads_reserve_what_they_have_left_to_write() {
        let downloads = Downloads::new(Duration::from_secs(60));
        let (d, _) = downloads.join_or_start("hf:o/r");
        d.total.store(100, std::sync::atomic::Ordering::Relaxed);
        d.counters.finish_file(30);
        assert_eq!(downloads.reserved_bytes(), 70);
        assert_eq!(downloads.active()[0].bytes_downloaded, 30);
    }
}
