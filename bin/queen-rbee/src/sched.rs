//! Admission, the per-model queues and worker selection.
//!
//! One lock guards the queen's whole routing view: every hive's workers
//! and provisioned models (replaced by each poll), the queen-side count of
//! outstanding requests per worker, and a FIFO queue of waiting requests
//! per model. Whenever capacity may have appeared (a request finished, a
//! poll brought a new worker, a spawn finished), [`Scheduler`] hands the
//! oldest waiter of that model a [`Lease`] on the ready worker with the
//! fewest outstanding requests, ties broken round-robin.
//!
//! When a model has waiters, no worker that is or may become ready, and a
//! reachable hive has it provisioned, the scheduler orders a spawn on that
//! hive, over a bounded channel to the task that starts spawns
//! ([`crate::hives::Hives::run_spawns`]); one spawn per model at a time,
//! however many requests wait. The routing decision itself is [`pick`], a
//! function of the view alone.

use std::collections::{HashMap, HashSet, VecDeque};

use parking_lot::{Mutex, MutexGuard};

/// The scheduler's maps are looked up several times per request with model
/// refs and worker keys as keys: a keyed hash faster than SipHash on them.
type Map<K, V> = HashMap<K, V, ahash::RandomState>;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rbee_api::fleet::{FleetWorker, HiveState, HiveSummary};
use rbee_api::worker::{WorkerInfo, WorkerState};
use rbee_api::Coded;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use self::affinity::Affinity;
use crate::metrics::QueenMetrics;

/// How long a worker that answered 503 is passed over.
const BUSY_AVOID: Duration = Duration::from_millis(200);
/// How long a worker that failed a request is passed over.
const FAILED_AVOID: Duration = Duration::from_secs(2);

/// What a waiting request receives.
pub type Grant = Result<Lease, AdmitError>;

/// What routing asks of a hive in the fleet view.
trait Routable {
    /// Answering polls: its workers may be routed to.
    fn reachable(&self) -> bool;
    /// Has `model` provisioned.
    fn has(&self, model: &str) -> bool;
}

impl Routable for HiveSummary {
    fn reachable(&self) -> bool {
        self.state == HiveState::Reachable
    }

    fn has(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == model)
    }
}

/// One worker as the scheduler sees it.
#[derive(Debug, Clone)]
struct Slot {
    hive: String,
    info: WorkerInfo,
    outstanding: u32,
    avoid_until: Option<Instant>,
}

impl Slot {
    fn might_serve(&self) -> bool {
        matches!(
            self.info.state,
            WorkerState::Loading | WorkerState::Idle | WorkerState::Busy
        )
    }

    fn ready(&self) -> bool {
        matches!(self.info.state, WorkerState::Idle | WorkerState::Busy) && self.info.url.is_some()
    }
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    tx: oneshot::Sender<Grant>,
    /// The request's id, given to a spawn this request starts.
    request_id: Arc<str>,
    /// The conversation the request continues, if known (see [`Affinity`]).
    affinity: Option<u64>,
}

#[derive(Debug, Default)]
struct ModelQueue {
    waiting: VecDeque<Waiter>,
    spawning: bool,
    rr: usize,
}

#[derive(Debug, Default)]
struct State {
    /// The fleet view: every registered hive as `/v2/hives/list` shows it.
    /// The registry (`hives.rs`) persists hives and polls them; what the
    /// polls say is kept here only.
    hives: Map<String, HiveSummary>,
    /// Keyed by `hive/worker_id`.
    slots: Map<String, Slot>,
    queues: Map<String, ModelQueue>,
    next_id: u64,
    affinity: Affinity,
}

/// A spawn the scheduler decided on; started outside the lock.
#[derive(Debug, Clone)]
pub struct SpawnOrder {
    /// The model.
    pub model: String,
    /// The hive's name.
    pub hive: String,
    /// The hive's URL.
    pub hive_url: String,
    /// The request whose wait started the spawn (sent to the hive as
    /// `X-Request-Id`, so a cold start can be followed across the logs).
    pub request_id: Option<Arc<str>>,
}

/// Spawn orders that may wait to be started. One spawn per model is in
/// flight at a time, so this bounds the models cold-starting at once.
pub const SPAWN_QUEUE: usize = 64;

struct Inner {
    state: Mutex<State>,
    max_queue: std::sync::atomic::AtomicUsize,
    metrics: QueenMetrics,
    /// Where the spawns decided on go; whoever holds the receiver starts
    /// them ([`crate::hives::Hives::run_spawns`]).
    spawns: mpsc::Sender<SpawnOrder>,
    /// A worker was passed over until a stored time: the recheck task
    /// ([`Scheduler::run_rechecks`]) looks at its deadlines again.
    recheck: Notify,
}

/// The routing view and queues; cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("max_queue", &self.max_queue())
            .finish_non_exhaustive()
    }
}

/// Counts for the gauges and probes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Reachable hives.
    pub hives_reachable: usize,
    /// Unreachable (or not yet reached) hives.
    pub hives_unreachable: usize,
}

impl Scheduler {
    /// At most `max_queue` waiting requests per model; the receiver gets
    /// the spawns the scheduler decides on.
    pub fn new(max_queue: usize, metrics: QueenMetrics) -> (Self, mpsc::Receiver<SpawnOrder>) {
        let (spawns, orders) = mpsc::channel(SPAWN_QUEUE);
        let sched = Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                max_queue: max_queue.into(),
                metrics,
                spawns,
                recheck: Notify::new(),
            }),
        };
        (sched, orders)
    }

    /// Until `stop`, hand out the places of workers whose pass-over time
    /// has come: one task and one timer, set to the earliest stored
    /// deadline, instead of a timer per passed-over worker.
    pub fn run_rechecks(&self, stop: CancellationToken) {
        let this = self.clone();
        rbee_http::task::spawn(
            async move {
                loop {
                    let next = this.next_recheck();
                    let due = async {
                        match next {
                            Some(t) => tokio::time::sleep_until(t.into()).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        () = stop.cancelled() => return,
                        // A new deadline: look again.
                        () = this.inner.recheck.notified() => {}
                        () = due => {
                            let spawns = {
                                let mut st = this.lock();
                                this.pump_all(&mut st)
                            };
                            this.start(spawns);
                        }
                    }
                }
            }
            .instrument(tracing::info_span!("rechecks")),
        );
    }

    /// The earliest pass-over time still to come.
    fn next_recheck(&self) -> Option<Instant> {
        let now = Instant::now();
        self.lock()
            .slots
            .values()
            .filter_map(|s| s.avoid_until)
            .filter(|t| *t > now)
            .min()
    }

    /// Waiting requests allowed per model.
    pub fn max_queue(&self) -> usize {
        self.inner
            .max_queue
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Change the bound (a reload). Requests already waiting keep their
    /// place; a smaller bound refuses new ones until the queue is below it.
    pub fn set_max_queue(&self, max_queue: usize) {
        self.inner
            .max_queue
            .store(max_queue, std::sync::atomic::Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock()
    }

    /// Hand `spawns` (decided under the lock) to whoever starts them; one
    /// that cannot be queued ends at once, failing its model's waiters.
    fn start(&self, spawns: Vec<SpawnOrder>) {
        for order in spawns {
            if let Err(e) = self.inner.spawns.try_send(order) {
                let (order, why) = match e {
                    mpsc::error::TrySendError::Full(o) => (o, SpawnError::Backlog),
                    mpsc::error::TrySendError::Closed(o) => (o, SpawnError::Closed),
                };
                tracing::warn!(model = %order.model, hive = %order.hive, %why, "spawn not started");
                self.spawn_finished(&order.model, Err(why));
            }
        }
    }

    /// `hive` answered a poll at `url`: its workers and models replace the
    /// old ones and it is reachable. A poll of a hive that was removed or
    /// moved to another URL meanwhile is ignored.
    pub fn hive_seen(&self, hive: &str, url: &str, workers: Vec<WorkerInfo>, models: Vec<String>) {
        let spawns = {
            let mut st = self.lock();
            let Some(view) = st.hives.get_mut(hive).filter(|h| h.url == url) else {
                return;
            };
            for model in models.iter().chain(workers.iter().map(|w| &w.model_ref)) {
                self.inner.metrics.model_known(model);
            }
            if view.state != HiveState::Reachable {
                tracing::info!(hive, url, "hive reachable");
            }
            view.state = HiveState::Reachable;
            view.consecutive_misses = 0;
            view.last_seen =
                Some(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string());
            view.workers = workers.len();
            view.models = models;
            let mut fresh: HashMap<String, Slot> = HashMap::new();
            for info in workers {
                let key = format!("{hive}/{}", info.worker_id);
                let (outstanding, avoid_until) = st
                    .slots
                    .get(&key)
                    .map_or((0, None), |s| (s.outstanding, s.avoid_until));
                fresh.insert(
                    key,
                    Slot {
                        hive: hive.to_owned(),
                        info,
                        outstanding,
                        avoid_until,
                    },
                );
            }
            st.slots.retain(|_, s| s.hive != hive);
            st.slots.extend(fresh);
            self.refresh_gauges(&st);
            self.pump_all(&mut st)
        };
        self.start(spawns);
    }

    /// A poll of `hive` at `url` failed (`why`). After `misses` failures in
    /// a row the hive is unreachable and its workers leave the routing set
    /// until it answers again; one slow answer never takes it out.
    pub fn hive_missed(&self, hive: &str, url: &str, misses: u32, why: &str) {
        let spawns = {
            let mut st = self.lock();
            let Some(view) = st.hives.get_mut(hive).filter(|h| h.url == url) else {
                return;
            };
            view.consecutive_misses = view.consecutive_misses.saturating_add(1);
            tracing::debug!(
                hive,
                url,
                error = why,
                misses = view.consecutive_misses,
                "hive poll failed"
            );
            if view.consecutive_misses < misses || view.state == HiveState::Unreachable {
                return;
            }
            view.state = HiveState::Unreachable;
            tracing::warn!(
                hive,
                url,
                error = why,
                "hive unreachable; its workers leave the routing set"
            );
            self.refresh_gauges(&st);
            self.pump_all(&mut st)
        };
        self.start(spawns);
    }

    /// A hive joined the registry: `unknown` until its first answer. One
    /// already in the view under that name is replaced, workers and all.
    pub fn hive_added(&self, summary: HiveSummary) {
        let spawns = {
            let mut st = self.lock();
            let name = summary.node_name.clone();
            st.slots.retain(|_, s| s.hive != name);
            st.hives.insert(name, summary);
            self.refresh_gauges(&st);
            self.pump_all(&mut st)
        };
        self.start(spawns);
    }

    /// Every hive, by name.
    pub fn hives(&self) -> Vec<HiveSummary> {
        let st = self.lock();
        let mut list: Vec<_> = st.hives.values().cloned().collect();
        list.sort_by(|a, b| a.node_name.cmp(&b.node_name));
        list
    }

    /// Base URLs of the hives answering now.
    pub fn reachable_urls(&self) -> Vec<String> {
        self.lock()
            .hives
            .values()
            .filter(|h| h.reachable())
            .map(|h| h.url.clone())
            .collect()
    }

    /// A hive left the registry.
    pub fn hive_removed(&self, hive: &str) {
        let spawns = {
            let mut st = self.lock();
            st.hives.remove(hive);
            st.slots.retain(|_, s| s.hive != hive);
            self.refresh_gauges(&st);
            self.pump_all(&mut st)
        };
        self.start(spawns);
    }

    /// Reachable and unreachable hive counts.
    pub fn counts(&self) -> Counts {
        let st = self.lock();
        let reachable = st.hives.values().filter(|h| h.reachable()).count();
        Counts {
            hives_reachable: reachable,
            hives_unreachable: st.hives.len() - reachable,
        }
    }

    /// Every model served or provisioned somewhere, with the hives that
    /// have it and the number of ready workers.
    pub fn models(&self) -> Vec<(String, Vec<String>, usize)> {
        let st = self.lock();
        let mut out: HashMap<String, (HashSet<String>, usize)> = HashMap::new();
        for (name, hive) in &st.hives {
            for m in &hive.models {
                out.entry(m.clone()).or_default().0.insert(name.clone());
            }
        }
        for slot in st.slots.values() {
            let entry = out.entry(slot.info.model_ref.clone()).or_default();
            entry.0.insert(slot.hive.clone());
            if slot.ready() {
                entry.1 += 1;
            }
        }
        let mut list: Vec<_> = out
            .into_iter()
            .map(|(m, (hives, ready))| {
                let mut hives: Vec<_> = hives.into_iter().collect();
                hives.sort();
                (m, hives, ready)
            })
            .collect();
        list.sort();
        list
    }

    /// Every worker of every hive, with the queen's outstanding count.
    pub fn workers(&self) -> Vec<FleetWorker> {
        let st = self.lock();
        let mut list: Vec<_> = st
            .slots
            .values()
            .map(|s| FleetWorker {
                info: s.info.clone(),
                hive: s.hive.clone(),
                hive_reachable: st.hives.get(&s.hive).is_some_and(|h| h.reachable()),
                outstanding: s.outstanding,
            })
            .collect();
        list.sort_by(|a, b| (&a.hive, &a.info.worker_id).cmp(&(&b.hive, &b.info.worker_id)));
        list
    }

    /// Whether a hive has `model` provisioned or a worker serves it.
    pub fn knows(&self, model: &str) -> bool {
        let st = self.lock();
        st.hives.values().any(|h| h.has(model))
            || st.slots.values().any(|s| s.info.model_ref == model)
    }

    /// The one model the queen knows of, for requests that name none.
    pub fn sole_model(&self) -> Result<String, AdmitError> {
        let models = self.models();
        match models.as_slice() {
            [(only, _, _)] => Ok(only.clone()),
            [] => Err(AdmitError::NoModels),
            many => Err(AdmitError::ModelRequired {
                models: many.iter().map(|m| m.0.clone()).collect(),
            }),
        }
    }

    /// Admit a request for `model`: 404 for a model no hive knows, 503 when
    /// no reachable hive can serve it, 429 when its queue is full; else a
    /// place in the queue (often granted at once). A request that continues
    /// the conversation keyed `affinity` prefers, among the workers with a
    /// free place, the one that served that conversation last.
    pub fn admit_for(
        &self,
        model: &str,
        request_id: &str,
        affinity: Option<u64>,
    ) -> Result<Ticket, AdmitError> {
        self.enqueue(model, request_id, affinity, false)
    }

    /// Put a request that a worker turned away back at the head of the
    /// queue; the queue limit does not apply to it.
    pub fn requeue(
        &self,
        model: &str,
        request_id: &str,
        affinity: Option<u64>,
    ) -> Result<Ticket, AdmitError> {
        self.enqueue(model, request_id, affinity, true)
    }

    fn enqueue(
        &self,
        model: &str,
        request_id: &str,
        affinity: Option<u64>,
        front: bool,
    ) -> Result<Ticket, AdmitError> {
        let (ticket, spawns) = {
            let mut st = self.lock();
            let known = st.hives.values().any(|h| h.has(model))
                || st.slots.values().any(|s| s.info.model_ref == model);
            if !known {
                return Err(AdmitError::UnknownModel {
                    model: model.to_owned(),
                });
            }
            if !can_serve(&st, model) {
                return Err(AdmitError::Unreachable {
                    model: model.to_owned(),
                });
            }
            let max_queue = self.max_queue();
            let id = st.next_id;
            st.next_id += 1;
            let q = st.queues.entry(model.to_owned()).or_default();
            q.waiting.retain(|w| !w.tx.is_closed());
            if !front && q.waiting.len() >= max_queue {
                return Err(AdmitError::QueueFull {
                    model: model.to_owned(),
                    max_queue,
                });
            }
            let (tx, rx) = oneshot::channel();
            let waiter = Waiter {
                id,
                tx,
                request_id: Arc::from(request_id),
                affinity,
            };
            if front {
                q.waiting.push_front(waiter);
            } else {
                q.waiting.push_back(waiter);
            }
            let spawns = self.pump(&mut st, model);
            (
                Ticket {
                    sched: self.clone(),
                    model: model.to_owned(),
                    id,
                    rx,
                    queued_at: Instant::now(),
                },
                spawns,
            )
        };
        self.start(spawns);
        Ok(ticket)
    }

    /// A lease on a ready worker of `model` other than `exclude`, if one
    /// has room now (the single retry after a worker failed).
    pub fn try_other(&self, model: &str, exclude: &str) -> Option<Lease> {
        let mut st = self.lock();
        let key = choose(&mut st, model, Some(exclude), None)?;
        Some(self.lease(&mut st, key, model))
    }

    fn lease(&self, st: &mut State, key: String, model: &str) -> Lease {
        let url = match st.slots.get_mut(&key) {
            Some(slot) => {
                slot.outstanding += 1;
                slot.info.url.clone().unwrap_or_default()
            }
            None => String::new(),
        };
        Lease {
            sched: self.clone(),
            key,
            url,
            model: model.to_owned(),
            armed: true,
        }
    }

    fn pump_all(&self, st: &mut State) -> Vec<SpawnOrder> {
        let models: Vec<String> = st.queues.keys().cloned().collect();
        models.iter().flat_map(|m| self.pump(st, m)).collect()
    }

    fn pump(&self, st: &mut State, model: &str) -> Vec<SpawnOrder> {
        let mut spawns = Vec::new();
        loop {
            let Some(q) = st.queues.get_mut(model) else {
                return spawns;
            };
            while q.waiting.front().is_some_and(|w| w.tx.is_closed()) {
                q.waiting.pop_front();
            }
            let Some(affinity) = q.waiting.front().map(|w| w.affinity) else {
                break;
            };
            let Some(key) = choose(st, model, None, affinity) else {
                if let Some(order) = self.maybe_spawn(st, model) {
                    spawns.push(order);
                }
                break;
            };
            if let Some(conversation) = affinity {
                st.affinity.set(conversation, &key);
            }
            let lease = self.lease(st, key, model);
            let Some(q) = st.queues.get_mut(model) else {
                break;
            };
            let Some(waiter) = q.waiting.pop_front() else {
                break;
            };
            if let Err(Ok(mut lease)) = waiter.tx.send(Ok(lease)) {
                // The waiter left between the check and the send.
                lease.armed = false;
                if let Some(slot) = st.slots.get_mut(&lease.key) {
                    slot.outstanding = slot.outstanding.saturating_sub(1);
                }
            }
        }
        if let Some(q) = st.queues.get(model) {
            self.inner.metrics.set_queue_size(model, q.waiting.len());
        }
        spawns
    }

    fn maybe_spawn(&self, st: &mut State, model: &str) -> Option<SpawnOrder> {
        let pending = st.slots.values().any(|s| {
            s.info.model_ref == model
                && s.might_serve()
                && st.hives.get(&s.hive).is_some_and(|h| h.reachable())
        });
        let spawning = st.queues.get(model).is_some_and(|q| q.spawning);
        if pending || spawning {
            return None;
        }
        let target = st
            .hives
            .iter()
            .filter(|(_, h)| h.reachable() && h.has(model))
            .min_by_key(|(name, _)| {
                (
                    st.slots.values().filter(|s| &&s.hive == name).count(),
                    (*name).clone(),
                )
            })
            .map(|(name, h)| (name.clone(), h.url.clone()));
        match target {
            Some((hive, hive_url)) => {
                if let Some(q) = st.queues.get_mut(model) {
                    q.spawning = true;
                }
                let request_id = st
                    .queues
                    .get(model)
                    .and_then(|q| q.waiting.front())
                    .map(|w| Arc::clone(&w.request_id));
                Some(SpawnOrder {
                    model: model.to_owned(),
                    hive,
                    hive_url,
                    request_id,
                })
            }
            None => {
                fail_all(
                    st,
                    model,
                    &AdmitError::Unreachable {
                        model: model.to_owned(),
                    },
                );
                None
            }
        }
    }

    /// A spawn ended: its worker is in the view (`Ok`), or the hive refused
    /// or the worker never became ready (`Err`), which fails the model's
    /// waiters with `NO_CAPACITY` carrying the hive's reason.
    pub fn spawn_finished(&self, model: &str, result: Result<(), SpawnError>) {
        let spawns = {
            let mut st = self.lock();
            if let Some(q) = st.queues.get_mut(model) {
                q.spawning = false;
            }
            if let Err(e) = result {
                let err = AdmitError::SpawnFailed {
                    model: model.to_owned(),
                    why: rbee_api::error::chain(&e),
                    cause: e.code(),
                };
                fail_all(&mut st, model, &err);
                Vec::new()
            } else {
                self.pump(&mut st, model)
            }
        };
        self.start(spawns);
    }

    fn refresh_gauges(&self, st: &State) {
        let reachable = st.hives.values().filter(|h| h.reachable()).count();
        self.inner
            .metrics
            .set_hives(reachable, st.hives.len() - reachable);
        let mut by_state: HashMap<WorkerState, usize> = HashMap::new();
        for slot in st.slots.values() {
            if st.hives.get(&slot.hive).is_some_and(|h| h.reachable()) {
                *by_state.entry(slot.info.state).or_default() += 1;
            }
        }
        self.inner.metrics.set_workers(&by_state);
    }
}

fn can_serve(st: &State, model: &str) -> bool {
    st.hives.values().any(|h| h.reachable() && h.has(model))
        || st.slots.values().any(|s| {
            s.info.model_ref == model
                && s.might_serve()
                && st.hives.get(&s.hive).is_some_and(|h| h.reachable())
        })
}

/// [`pick`] now, moving `model`'s round-robin on when it was used.
fn choose(
    st: &mut State,
    model: &str,
    exclude: Option<&str>,
    affinity: Option<u64>,
) -> Option<String> {
    let (key, round_robin) = pick(st, model, exclude, affinity, Instant::now())?;
    if round_robin {
        if let Some(q) = st.queues.get_mut(model) {
            q.rr = q.rr.wrapping_add(1);
        }
    }
    Some(key)
}

/// The routing decision, a function of the view alone: the ready worker
/// of `model` on a reachable hive with a free place and not passed over at
/// `now`, other than `exclude`: the one that served the conversation
/// `affinity` last if it is one of them, else the one with the fewest
/// outstanding requests, ties taken in turn by the model's round-robin
/// count (true when that count decided).
fn pick(
    st: &State,
    model: &str,
    exclude: Option<&str>,
    affinity: Option<u64>,
    now: Instant,
) -> Option<(String, bool)> {
    let mut best: Vec<(&String, u32)> = st
        .slots
        .iter()
        .filter(|(key, s)| {
            s.info.model_ref == model
                && s.ready()
                && Some(key.as_str()) != exclude
                && s.outstanding < s.info.slots_total.max(1)
                && s.avoid_until.is_none_or(|t| t <= now)
                && st.hives.get(&s.hive).is_some_and(|h| h.reachable())
        })
        .map(|(key, s)| (key, s.outstanding))
        .collect();
    if let Some(previous) = affinity.and_then(|a| st.affinity.get(a)) {
        if best.iter().any(|(key, _)| *key == previous) {
            return Some((previous.clone(), false));
        }
    }
    let least = best.iter().map(|(_, n)| *n).min()?;
    best.retain(|(_, n)| *n == least);
    best.sort();
    let rr = st.queues.get(model).map_or(0, |q| q.rr);
    Some((best[rr % best.len()].0.clone(), true))
}

fn fail_all(st: &mut State, model: &str, err: &AdmitError) {
    if let Some(q) = st.queues.get_mut(model) {
        for waiter in q.waiting.drain(..) {
            let _ = waiter.tx.send(Err(err.clone()));
        }
    }
}

mod affinity;
mod error;
mod lease;

pub use error::{AdmitError, SpawnError};
pub use lease::{Lease, Ticket};
#[cfg(test)]
mod tests;
