//! The registry of workers: one record per worker id, behind a mutex that
//! is only ever held for a map operation (never across an await).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Mutex, MutexGuard};
use rbee_api::worker::{Backend, ReadyCallback, WorkerInfo, WorkerState};
use tokio::sync::Notify;

use super::error::WorkerError;

/// One worker.
#[derive(Debug, Clone)]
pub struct WorkerRecord {
    /// Its id.
    pub id: String,
    /// Current process.
    pub pid: Option<u32>,
    /// Base URL from the ready callback.
    pub url: Option<String>,
    /// Model reference.
    pub model_ref: String,
    /// Backend.
    pub backend: Backend,
    /// Device ordinal.
    pub device: u32,
    /// Slots.
    pub slots: u16,
    /// Its state in the registry.
    pub state: WorkerState,
    /// Restarts counted by the policy.
    pub restart_count: u32,
    /// Last restart.
    pub last_restart: Option<SystemTime>,
    /// Last heartbeat (wall clock, for display).
    pub last_heartbeat: Option<SystemTime>,
    /// Last sign of life (ready, heartbeat), for the monitor.
    pub last_seen: Instant,
    /// Consecutive failed health checks.
    pub failed_health_checks: u32,
    /// Current process start (wall clock).
    pub started_at: SystemTime,
    /// Current process start, for the load timeout.
    pub started: Instant,
    /// Memory reserved while loading (released when ready).
    pub reserved_bytes: u64,
    /// GPU memory the worker reported.
    pub vram_bytes: u64,
    /// Why the hive gave up on it, once `failed`.
    pub failure: Option<String>,
}

impl WorkerRecord {
    /// The API view.
    pub fn info(&self) -> WorkerInfo {
        let port = self
            .url
            .as_deref()
            .and_then(|u| u.rsplit(':').next())
            .and_then(|p| p.trim_end_matches('/').parse().ok());
        WorkerInfo {
            worker_id: self.id.clone(),
            pid: self.pid,
            port,
            url: self.url.clone(),
            model_ref: self.model_ref.clone(),
            backend: self.backend,
            device: self.device,
            state: self.state,
            restart_count: self.restart_count,
            last_restart: self.last_restart.map(rfc3339),
            last_heartbeat: self.last_heartbeat.map(rfc3339),
            failed_health_checks: self.failed_health_checks,
            started_at: rfc3339(self.started_at),
            slots_total: u32::from(self.slots),
            vram_bytes: self.vram_bytes,
            failure: self.failure.clone(),
        }
    }

    /// True while a process is meant to be running.
    pub fn is_live(&self) -> bool {
        self.state != WorkerState::Failed
    }
}

/// RFC 3339 UTC, seconds precision.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The registry; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct WorkerRegistry {
    inner: Arc<Mutex<HashMap<String, WorkerRecord>>>,
    /// Woken after every change, for [`wait_while_loading`](Self::wait_while_loading).
    changed: Arc<Notify>,
}

impl WorkerRegistry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, WorkerRecord>> {
        self.inner.lock()
    }

    /// Add a worker; 409 `CONFLICT` when the id is taken.
    pub fn insert(&self, record: WorkerRecord) -> Result<(), WorkerError> {
        let mut map = self.lock();
        if map.contains_key(&record.id) {
            return Err(WorkerError::Exists {
                worker_id: record.id,
            });
        }
        map.insert(record.id.clone(), record);
        drop(map);
        self.changed.notify_waiters();
        Ok(())
    }

    /// A copy of one record.
    pub fn get(&self, id: &str) -> Option<WorkerRecord> {
        self.lock().get(id).cloned()
    }

    /// Every worker with a running process: (id, pid).
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.lock()
            .values()
            .filter_map(|r| Some((r.id.clone(), r.pid?)))
            .collect()
    }

    /// Change one record; `None` when the id is unknown.
    pub fn update<T>(&self, id: &str, f: impl FnOnce(&mut WorkerRecord) -> T) -> Option<T> {
        let result = self.lock().get_mut(id).map(f);
        self.changed.notify_waiters();
        result
    }

    /// Forget a worker.
    pub fn remove(&self, id: &str) -> Option<WorkerRecord> {
        let removed = self.lock().remove(id);
        self.changed.notify_waiters();
        removed
    }

    /// The worker `id` once it is no longer loading, or as it is when `wait`
    /// has passed; `None` when there is no such worker (or it is removed
    /// meanwhile).
    pub async fn wait_while_loading(&self, id: &str, wait: Duration) -> Option<WorkerInfo> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before the look, so a change between the look and
            // the wait is not missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let info = self.lock().get(id).map(WorkerRecord::info)?;
            if info.state != WorkerState::Loading {
                return Some(info);
            }
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(deadline) => return Some(info),
            }
        }
    }

    /// Every worker, by id.
    pub fn list(&self) -> Vec<WorkerInfo> {
        let mut out: Vec<WorkerInfo> = self.lock().values().map(WorkerRecord::info).collect();
        out.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        out
    }

    /// Ids of every worker.
    pub fn ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Workers per state, failed health checks and restarts of live workers.
    pub fn stats(&self) -> Stats {
        let map = self.lock();
        let mut stats = Stats::default();
        for r in map.values() {
            let slot = match r.state {
                WorkerState::Loading => &mut stats.loading,
                WorkerState::Idle => &mut stats.idle,
                WorkerState::Busy => &mut stats.busy,
                WorkerState::Draining => &mut stats.draining,
                WorkerState::Failed => &mut stats.failed,
            };
            *slot += 1;
            if r.is_live() {
                stats.failed_health_checks += u64::from(r.failed_health_checks);
                stats.restart_count += u64::from(r.restart_count);
            }
        }
        stats
    }

    /// Memory still reserved by loading workers: host RAM (`device` None)
    /// or VRAM of one GPU.
    pub fn reserved(&self, backend: Backend, device: u32) -> u64 {
        self.lock()
            .values()
            .filter(|r| r.backend == backend && (backend == Backend::Cpu || r.device == device))
            .map(|r| r.reserved_bytes)
            .sum()
    }

    /// VRAM reported by ready workers on `device`.
    pub fn vram_used(&self, device: u32) -> u64 {
        self.lock()
            .values()
            .filter(|r| r.backend == Backend::Cuda && r.device == device && r.is_live())
            .map(|r| r.vram_bytes)
            .sum()
    }

    /// Apply a ready callback: the worker is idle at `url`; its reservation
    /// is released (its real use now shows in free memory).
    pub fn on_ready(&self, cb: &ReadyCallback, now: Instant) -> Result<(), WorkerError> {
        self.update(&cb.worker_id, |r| {
            if r.model_ref != cb.model_ref {
                return Err(WorkerError::WrongModel {
                    worker_id: r.id.clone(),
                    spawned: r.model_ref.clone(),
                    reported: cb.model_ref.clone(),
                });
            }
            r.url = Some(cb.url.trim_end_matches('/').to_owned());
            r.state = WorkerState::Idle;
            r.last_seen = now;
            r.last_heartbeat = Some(SystemTime::now());
            r.failed_health_checks = 0;
            r.reserved_bytes = 0;
            r.vram_bytes = cb.vram_bytes;
            Ok(())
        })
        .unwrap_or_else(|| Err(unknown(&cb.worker_id)))
    }

    /// Apply a heartbeat: the worker's reported state (never `failed`,
    /// which only the hive decides) and the time.
    pub fn on_heartbeat(
        &self,
        id: &str,
        state: WorkerState,
        now: Instant,
    ) -> Result<(), WorkerError> {
        self.update(id, |r| {
            r.last_seen = now;
            r.last_heartbeat = Some(SystemTime::now());
            if r.state != WorkerState::Failed && state != WorkerState::Failed {
                r.state = state;
            }
        })
        .ok_or_else(|| unknown(id))
    }
}

/// Counts for the scrape-time gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Workers loading.
    pub loading: u64,
    /// Workers idle.
    pub idle: u64,
    /// Workers busy.
    pub busy: u64,
    /// Workers draining.
    pub draining: u64,
    /// Workers given up on.
    pub failed: u64,
    /// Sum of consecutive failed health checks of live workers.
    pub failed_health_checks: u64,
    /// Sum of restart counts of live workers.
    pub restart_count: u64,
}

impl Stats {
    /// Workers that can take inference (idle or busy).
    pub fn ready(&self) -> u64 {
        self.idle + self.busy
    }

    /// Every worker.
    pub fn total(&self) -> u64 {
        self.loading + self.idle + self.busy + self.draining + self.failed
    }
}

fn unknown(id: &str) -> WorkerError {
    WorkerError::Unknown {
        worker_id: id.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use rbee_api::{Coded, ErrorCode};

    use super::*;

    fn record(id: &str, backend: Backend, device: u32, reserved: u64) -> WorkerRecord {
        WorkerRecord {
            id: id.to_owned(),
            pid: Some(42),
            url: None,
            model_ref: "hf:o/r".to_owned(),
            backend,
            device,
            slots: 1,
            state: WorkerState::Loading,
            restart_count: 0,
            last_restart: None,
            last_heartbeat: None,
            last_seen: Instant::now(),
            failed_health_checks: 0,
            started_at: SystemTime::now(),
            started: Instant::now(),
            reserved_bytes: reserved,
            vram_bytes: 0,
            failure: None,
        }
    }

    fn ready(id: &str, vram: u64) -> ReadyCallback {
        ReadyCallback {
            worker_id: id.to_owned(),
            url: "http://127.0.0.1:4100/".to_owned(),
            model_ref: "hf:o/r".to_owned(),
            backend: Backend::Cuda,
            device: 1,
            slots_total: 1,
            vram_bytes: vram,
        }
    }

    #[test]
    fn ready_moves_loading_to_idle_and_releases_the_reservation() {
        let reg = WorkerRegistry::default();
        reg.insert(record("a", Backend::Cuda, 1, 500)).unwrap();
        reg.insert(record("b", Backend::Cuda, 0, 300)).unwrap();
        assert_eq!(reg.reserved(Backend::Cuda, 1), 500);
        assert_eq!(reg.reserved(Backend::Cuda, 0), 300);
        reg.on_ready(&ready("a", 700), Instant::now()).unwrap();
        let a = reg.get("a").unwrap();
        assert_eq!(a.state, WorkerState::Idle);
        assert_eq!(a.url.as_deref(), Some("http://127.0.0.1:4100"));
        assert_eq!(a.info().port, Some(4100));
        assert_eq!(reg.reserved(Backend::Cuda, 1), 0);
        assert_eq!(reg.vram_used(1), 700);
        assert_eq!(reg.stats().ready(), 1);
        assert_eq!(reg.stats().loading, 1);
    }

    #[test]
    fn heartbeats_move_state_but_never_out_of_failed() {
        let reg = WorkerRegistry::default();
        reg.insert(record("a", Backend::Cpu, 0, 0)).unwrap();
        reg.on_heartbeat("a", WorkerState::Busy, Instant::now())
            .unwrap();
        assert_eq!(reg.get("a").unwrap().state, WorkerState::Busy);
        assert!(reg.get("a").unwrap().info().last_heartbeat.is_some());
        reg.update("a", |r| r.state = WorkerState::Failed);
        reg.on_heartbeat("a", WorkerState::Idle, Instant::now())
            .unwrap();
        assert_eq!(reg.get("a").unwrap().state, WorkerState::Failed);
        assert_eq!(
            reg.on_heartbeat("zz", WorkerState::Idle, Instant::now())
                .unwrap_err()
                .code(),
            ErrorCode::NotFound
        );
    }

    #[test]
    fn ids_are_unique_and_a_ready_callback_must_match_the_model() {
        let reg = WorkerRegistry::default();
        reg.insert(record("a", Backend::Cpu, 0, 0)).unwrap();
        assert_eq!(
            reg.insert(record("a", Backend::Cpu, 0, 0))
                .unwrap_err()
                .code(),
            ErrorCode::Conflict
        );
        let mut cb = ready("a", 0);
        cb.model_ref = "hf:other/model".into();
        assert_eq!(
            reg.on_ready(&cb, Instant::now()).unwrap_err().code(),
            ErrorCode::Conflict
        );
        // The refused callback leaves the record as it was.
        let record = reg.get("a").expect("still registered");
        assert_eq!(record.model_ref, "hf:o/r");
        assert_eq!(reg.stats().ready(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_when_the_worker_leaves_loading_or_when_it_is_up() {
        let reg = WorkerRegistry::default();
        reg.insert(record("a", Backend::Cpu, 0, 0)).unwrap();
        let started = tokio::time::Instant::now();
        let callback = {
            let reg = reg.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(250)).await;
                reg.on_ready(&ready("a", 0), Instant::now()).unwrap();
            })
        };
        let info = reg
            .wait_while_loading("a", Duration::from_secs(30))
            .await
            .expect("known");
        assert_eq!(info.state, WorkerState::Idle);
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(250),
            "at the callback, not later"
        );
        callback.await.unwrap();

        reg.insert(record("b", Backend::Cpu, 0, 0)).unwrap();
        let started = tokio::time::Instant::now();
        let info = reg
            .wait_while_loading("b", Duration::from_secs(2))
            .await
            .expect("known");
        assert_eq!(info.state, WorkerState::Loading);
        assert_eq!(started.elapsed(), Duration::from_secs(2));

        assert!(reg
            .wait_while_loading("nobody", Duration::from_secs(1))
            .await
            .is_none());
        let remover = {
            let reg = reg.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                reg.remove("b");
            })
        };
        assert!(reg
            .wait_while_loading("b", Duration::from_secs(5))
            .await
            .is_none());
        remover.await.unwrap();
    }
}
