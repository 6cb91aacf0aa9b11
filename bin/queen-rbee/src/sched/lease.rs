//! What a request holds while it is routed: a [`Ticket`], its place in a
//! model's queue, then a [`Lease`], its place on a worker. Dropping either
//! gives the place back to the scheduler.

use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{AdmitError, Grant, Scheduler, BUSY_AVOID, FAILED_AVOID};

/// A worker reserved for one request; dropping it gives the place back.
#[derive(Debug)]
pub struct Lease {
    pub(super) sched: Scheduler,
    pub(super) key: String,
    /// The worker's base URL.
    pub url: String,
    pub(super) model: String,
    pub(super) armed: bool,
}

impl Lease {
    /// The worker said all its slots are busy (or it cannot take work now):
    /// pass it over briefly and give the place back.
    pub fn busy(mut self) {
        self.release(Some(BUSY_AVOID));
    }

    /// The worker failed this request: pass it over for a while.
    pub fn failed(mut self) {
        self.release(Some(FAILED_AVOID));
    }

    /// Give the place back now and pass the worker over for a while,
    /// keeping the lease value (already released) in place.
    pub fn mark_failed(&mut self) {
        self.release(Some(FAILED_AVOID));
    }

    /// The worker's key (`hive/worker_id`).
    pub fn key(&self) -> &str {
        &self.key
    }

    fn release(&mut self, avoid: Option<Duration>) {
        if !std::mem::replace(&mut self.armed, false) {
            return;
        }
        let spawns = {
            let mut st = self.sched.lock();
            if let Some(slot) = st.slots.get_mut(&self.key) {
                slot.outstanding = slot.outstanding.saturating_sub(1);
                slot.avoid_until = avoid.map(|d| Instant::now() + d);
            }
            self.sched.pump(&mut st, &self.model)
        };
        if avoid.is_some() {
            // The deadline is stored on the worker; the recheck task
            // hands its place out again once it passes.
            self.sched.inner.recheck.notify_one();
        }
        self.sched.start(spawns);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.release(None);
    }
}

/// A place in a model's queue; dropping it leaves the queue.
#[derive(Debug)]
pub struct Ticket {
    pub(super) sched: Scheduler,
    pub(super) model: String,
    pub(super) id: u64,
    pub(super) rx: oneshot::Receiver<Grant>,
    /// When the request joined the queue.
    pub queued_at: Instant,
}

impl Ticket {
    /// Wait for a worker (or a refusal). Bound it by the deadline yourself.
    pub async fn wait(&mut self) -> Grant {
        match (&mut self.rx).await {
            Ok(grant) => grant,
            Err(_) => Err(AdmitError::Dropped),
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut st = self.sched.lock();
        if let Some(q) = st.queues.get_mut(&self.model) {
            q.waiting.retain(|w| w.id != self.id);
            let len = q.waiting.len();
            self.sched.inner.metrics.set_queue_size(&self.model, len);
        }
    }
}
