//! The hive registry: which hives the queen routes to, persisted in the
//! [`Store`], each polled by its own task for its workers and models, and
//! the spawns the scheduler orders.
//!
//! What the polls say goes to the scheduler, which owns the fleet view
//! (`Scheduler::hives`): a hive is `unknown` until its first answer,
//! `reachable` while it answers, and `unreachable` only after
//! `--hive-misses` polls in a row failed. The registry itself keeps only
//! which poller runs for which hive.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use audit_logging::{AuditEvent, AuditSink};
use auth_min::{send_authenticated, Authenticator};
use parking_lot::{Mutex, MutexGuard};
use rbee_api::fleet::{HiveState, HiveSummary};
use rbee_api::models::ModelList;
use rbee_api::worker::{SpawnAccepted, SpawnRequest, WorkerInfo, WorkerList, WorkerState};
use rbee_api::{ApiError, ErrorCode, FieldError};
use rbee_http::client::error_chain;
use reqwest::StatusCode;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::sched::{Scheduler, SpawnError, SpawnOrder};
use crate::store::{Store, StoredHive};

/// Longest single wait on a hive for a spawned worker to leave `loading`
/// (the hive's `wait_ms`); a longer spawn asks again.
const READY_WAIT: Duration = Duration::from_secs(10);

/// Pause before asking a hive about a spawn again after it did not answer.
const RETRY_WAIT: Duration = Duration::from_millis(250);

/// How hives are polled.
#[derive(Debug, Clone, Copy)]
pub struct PollSettings {
    /// Time between polls of one hive.
    pub interval: Duration,
    /// Bound of one poll.
    pub timeout: Duration,
    /// Failed polls in a row that make a hive unreachable.
    pub misses: u32,
    /// How long a spawned worker may take to become ready.
    pub spawn_timeout: Duration,
}

/// The poll task of one hive, and the URL it polls.
#[derive(Debug)]
struct Poller {
    url: String,
    stop: CancellationToken,
}

struct Inner {
    pollers: Mutex<HashMap<String, Poller>>,
    store: Store,
    sched: Scheduler,
    client: reqwest::Client,
    auth: Authenticator,
    poll: Mutex<PollSettings>,
    audit: AuditSink,
    shutdown: CancellationToken,
}

/// The registry; cheap to clone.
#[derive(Clone)]
pub struct Hives {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Hives {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hives").finish_non_exhaustive()
    }
}

/// Check a node name: 1 to 128 characters of letters, digits, `.`, `_`,
/// `-` and `:`.
pub fn check_node_name(name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'));
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            "node_name",
            "format",
            "node_name must be 1 to 128 characters of letters, digits, '.', '_', '-' or ':'",
        ))
    }
}

/// Check and normalise a hive URL: `http` or `https`, a host, no user,
/// query or fragment, no path; the trailing slash is dropped.
pub fn normalize_url(url: &str) -> Result<String, FieldError> {
    let bad = |why: &str| FieldError::new("url", "format", why);
    let parsed = reqwest::Url::parse(url.trim()).map_err(|e| bad(&format!("not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad("the URL must be http or https"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("the URL needs a host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(bad("the URL must not carry credentials"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() || parsed.path() != "/" {
        return Err(bad(
            "the URL must be the hive's base URL, without path, query or fragment",
        ));
    }
    Ok(parsed.as_str().trim_end_matches('/').to_owned())
}

/// The node name of a hive given by `--hive URL`: its `host:port`.
pub fn node_name_of(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => format!(
            "{}:{}",
            u.host_str().unwrap_or("hive"),
            u.port_or_known_default().unwrap_or(0)
        ),
        Err(_) => url.to_owned(),
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// What one poll of a hive brought back.
struct Snapshot {
    workers: WorkerList,
    models: ModelList,
}

impl Hives {
    /// The registry over `store`; no hive is loaded yet ([`Self::load`]).
    pub fn new(
        store: Store,
        sched: Scheduler,
        auth: Authenticator,
        poll: PollSettings,
        audit: AuditSink,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                pollers: Mutex::new(HashMap::new()),
                store,
                sched,
                client: rbee_http::client::http_client(),
                auth,
                poll: Mutex::new(poll),
                audit,
                shutdown,
            }),
        }
    }

    /// The polling settings in effect.
    fn poll(&self) -> PollSettings {
        *self.inner.poll.lock()
    }

    /// Change the polling settings (a reload); pollers and spawn waits
    /// use them from their next poll or check.
    pub fn set_poll(&self, poll: PollSettings) {
        *self.inner.poll.lock() = poll;
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Poller>> {
        self.inner.pollers.lock()
    }

    /// Start polling every stored hive, then add the `--hive` URLs (already
    /// normalised) as `config` hives.
    pub async fn load(&self, flag_urls: &[String]) -> Result<(), ApiError> {
        let stored = self.inner.store.list().await.map_err(internal)?;
        for hive in stored {
            let _ = self.track(hive, false);
        }
        for url in flag_urls {
            self.add_configured(url).await?;
        }
        Ok(())
    }

    /// Add a `--hive` URL (already normalised) as a `config` hive.
    pub async fn add_configured(&self, url: &str) -> Result<bool, ApiError> {
        self.register(&node_name_of(url), url, "config").await
    }

    /// Add or update a hive; true when it is new. Registering again with
    /// the same URL only refreshes it (hives re-register periodically).
    pub async fn register(
        &self,
        node_name: &str,
        url: &str,
        source: &str,
    ) -> Result<bool, ApiError> {
        let unchanged = self.lock().get(node_name).is_some_and(|p| p.url == url);
        if unchanged {
            return Ok(false);
        }
        let stored = StoredHive {
            node_name: node_name.to_owned(),
            url: url.to_owned(),
            source: source.to_owned(),
            registered_at: now_rfc3339(),
        };
        self.inner
            .store
            .upsert(stored.clone())
            .await
            .map_err(internal)?;
        let registered = source == "registered";
        let (created, stop) = self.track(stored, registered);
        if registered {
            // Learn its workers and models before answering: a request sent
            // right after the registration is answered would otherwise find
            // no hive that has its model (404) until the first poll.
            let result = self.poll_once(url).await;
            self.apply(node_name, url, &stop, result);
        }
        self.inner.audit.emit(
            None,
            AuditEvent::HiveRegistered {
                node_name: node_name.to_owned(),
                url: url.to_owned(),
            },
        );
        tracing::info!(%node_name, %url, source, created, "hive registered");
        Ok(created)
    }

    /// Remove a hive; false when it was not registered.
    pub async fn remove(&self, node_name: &str) -> Result<bool, ApiError> {
        let removed = self.inner.store.remove(node_name).await.map_err(internal)?;
        let entry = self.lock().remove(node_name);
        if let Some(entry) = &entry {
            entry.stop.cancel();
        }
        self.inner.sched.hive_removed(node_name);
        let existed = removed || entry.is_some();
        if existed {
            self.inner.audit.emit(
                None,
                AuditEvent::HiveRemoved {
                    node_name: node_name.to_owned(),
                },
            );
            tracing::info!(%node_name, "hive removed");
        }
        Ok(existed)
    }

    /// Put `hive` in the view and (re)start its poller (which waits one
    /// interval first when `polled_now`: the caller polls it at once);
    /// true when new, and the poller's stop token.
    fn track(&self, hive: StoredHive, polled_now: bool) -> (bool, CancellationToken) {
        let stop = self.inner.shutdown.child_token();
        let summary = HiveSummary {
            node_name: hive.node_name.clone(),
            url: hive.url.clone(),
            source: hive.source,
            state: HiveState::Unknown,
            registered_at: hive.registered_at,
            last_seen: None,
            consecutive_misses: 0,
            workers: 0,
            models: Vec::new(),
        };
        let previous = self.lock().insert(
            hive.node_name.clone(),
            Poller {
                url: hive.url.clone(),
                stop: stop.clone(),
            },
        );
        if let Some(old) = &previous {
            old.stop.cancel();
        }
        self.inner.sched.hive_added(summary);
        let this = self.clone();
        let poller = stop.clone();
        rbee_http::task::spawn(async move {
            if polled_now {
                tokio::select! {
                    () = poller.cancelled() => return,
                    () = tokio::time::sleep(this.poll().interval) => {}
                }
            }
            this.poll_loop(hive.node_name, hive.url, poller).await;
        });
        (previous.is_none(), stop)
    }

    async fn poll_loop(self, node_name: String, url: String, stop: CancellationToken) {
        loop {
            let result = tokio::select! {
                () = stop.cancelled() => return,
                r = self.poll_once(&url) => r,
            };
            self.apply(&node_name, &url, &stop, result);
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(self.poll().interval) => {}
            }
        }
    }

    async fn poll_once(&self, url: &str) -> Result<Snapshot, HiveCallError> {
        let timeout = self.poll().timeout;
        let get = |path: &str| {
            send_authenticated(
                self.inner
                    .client
                    .get(format!("{url}{path}"))
                    .timeout(timeout),
                &self.inner.auth,
            )
        };
        let (workers, models) = tokio::join!(get("/v1/workers/list"), get("/v1/models/list"));
        let workers = decode::<WorkerList>(workers).await?;
        let models = decode::<ModelList>(models).await?;
        Ok(Snapshot { workers, models })
    }

    /// Hand a poll's result to the scheduler, unless its poller was
    /// stopped (the scheduler also ignores a hive removed or moved since).
    fn apply(
        &self,
        node_name: &str,
        url: &str,
        stop: &CancellationToken,
        result: Result<Snapshot, HiveCallError>,
    ) {
        if stop.is_cancelled() {
            return;
        }
        match result {
            Ok(snap) => {
                let models = snap
                    .models
                    .models
                    .into_iter()
                    .map(|m| m.model_ref)
                    .collect();
                self.inner
                    .sched
                    .hive_seen(node_name, url, snap.workers.workers, models);
            }
            Err(why) => {
                let misses = self.poll().misses;
                self.inner
                    .sched
                    .hive_missed(node_name, url, misses, &error_chain(&why));
            }
        }
    }

    /// Start every spawn the scheduler decides on, until shutdown.
    pub fn run_spawns(&self, mut orders: mpsc::Receiver<SpawnOrder>) {
        let this = self.clone();
        let stop = self.inner.shutdown.clone();
        rbee_http::task::spawn(
            async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        order = orders.recv() => match order {
                            Some(order) => this.spawn(order),
                            None => return,
                        },
                    }
                }
            }
            .instrument(tracing::info_span!("spawns")),
        );
    }

    /// Ask `order.hive` to spawn a worker for `order.model` and follow it
    /// until it is ready; the scheduler hears how it ended.
    fn spawn(&self, order: SpawnOrder) {
        let this = self.clone();
        rbee_http::task::spawn(async move {
            let result = this.spawn_and_wait(&order).await;
            match &result {
                Ok(()) => {
                    tracing::info!(model = %order.model, hive = %order.hive, "spawned worker is ready")
                }
                Err(e) => {
                    tracing::warn!(model = %order.model, hive = %order.hive, error = %rbee_api::error::chain(e), "spawn failed")
                }
            }
            this.inner.sched.spawn_finished(&order.model, result);
        });
    }

    async fn spawn_and_wait(&self, order: &SpawnOrder) -> Result<(), SpawnError> {
        tracing::info!(model = %order.model, hive = %order.hive, "no worker for the model; asking the hive to spawn one");
        let body = SpawnRequest {
            model_ref: order.model.clone(),
            backend: None,
            device: None,
            worker_id: None,
            slots: None,
            kv_tokens: None,
        };
        let mut request = self
            .inner
            .client
            .post(format!("{}/v1/workers/spawn", order.hive_url));
        if let Some(id) = &order.request_id {
            request = request.header(rbee_http::X_REQUEST_ID, id.as_ref());
        }
        let response = send_authenticated(
            request.timeout(Duration::from_secs(30)).json(&body),
            &self.inner.auth,
        )
        .await
        .map_err(SpawnError::HiveSilent)?;
        if !response.status().is_success() {
            return Err(hive_error(response).await);
        }
        let accepted: SpawnAccepted = response.json().await.map_err(SpawnError::BadAnswer)?;
        let worker_id = || accepted.worker_id.clone();
        let deadline = Instant::now() + self.poll().spawn_timeout;
        let stop = self.inner.shutdown.clone();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SpawnError::NotReady {
                    worker_id: worker_id(),
                });
            }
            // The hive answers as soon as the worker leaves `loading`.
            let wait = left.min(READY_WAIT);
            let seen = tokio::select! {
                () = stop.cancelled() => return Err(SpawnError::Closed),
                seen = self.wait_for_worker(&order.hive_url, &accepted.worker_id, wait) => seen,
            };
            let state = match seen {
                Ok(Some(info)) => info.state,
                Ok(None) => {
                    return Err(SpawnError::Gone {
                        worker_id: worker_id(),
                    })
                }
                Err(why) => {
                    // The hive did not answer this time; ask again shortly,
                    // within the spawn's time.
                    tracing::debug!(hive = %order.hive, error = %error_chain(&why), "waiting for a spawned worker");
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = tokio::time::sleep(RETRY_WAIT.min(left)) => {}
                    }
                    continue;
                }
            };
            match state {
                WorkerState::Idle | WorkerState::Busy => {
                    // Bring the routing view up to date now rather than at
                    // the next poll.
                    let snap = self.poll_once(&order.hive_url).await;
                    let live = self
                        .lock()
                        .get(&order.hive)
                        .map(|p| (p.stop.clone(), p.url.clone()));
                    if let (Ok(snap), Some((entry_stop, url))) = (snap, live) {
                        self.apply(&order.hive, &url, &entry_stop, Ok(snap));
                    }
                    return Ok(());
                }
                WorkerState::Loading => {}
                WorkerState::Failed | WorkerState::Draining => {
                    return Err(SpawnError::FailedToStart {
                        worker_id: worker_id(),
                    })
                }
            }
        }
    }

    /// The worker `worker_id` at `hive_url` once it leaves `loading`, or as
    /// it is after `wait`; `None` when the hive does not know it.
    async fn wait_for_worker(
        &self,
        hive_url: &str,
        worker_id: &str,
        wait: Duration,
    ) -> Result<Option<WorkerInfo>, HiveCallError> {
        let request = self
            .inner
            .client
            .get(format!("{hive_url}/v1/workers/{worker_id}"))
            .query(&[("wait_ms", wait.as_millis().to_string())])
            .timeout(wait + Duration::from_secs(5));
        let response = send_authenticated(request, &self.inner.auth)
            .await
            .map_err(HiveCallError::Send)?;
        match response.status() {
            StatusCode::NOT_FOUND => Ok(None),
            _ => decode::<WorkerInfo>(Ok(response)).await.map(Some),
        }
    }
}

/// Why a call to a hive gave nothing to use.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HiveCallError {
    /// No answer: the connection, TLS, or the call's timeout.
    #[error("no answer")]
    Send(#[source] reqwest::Error),
    /// An answer other than success.
    #[error("HTTP {0}")]
    Status(u16),
    /// A success whose body is not what the route returns.
    #[error("an unreadable answer")]
    Body(#[source] reqwest::Error),
}

async fn decode<T: serde::de::DeserializeOwned>(
    response: Result<reqwest::Response, reqwest::Error>,
) -> Result<T, HiveCallError> {
    let response = response.map_err(HiveCallError::Send)?;
    if !response.status().is_success() {
        return Err(HiveCallError::Status(response.status().as_u16()));
    }
    response.json::<T>().await.map_err(HiveCallError::Body)
}

/// The hive's error, as it reported it.
async fn hive_error(response: reqwest::Response) -> SpawnError {
    let status = response.status();
    let body: Option<rbee_api::ErrorBody> = response.json().await.ok();
    match body {
        Some(b) => SpawnError::Refused {
            code: b.error.code,
            message: b.error.message,
        },
        None => SpawnError::HiveStatus(status.as_u16()),
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "hive registry failure");
    ApiError::new(
        ErrorCode::Internal,
        "the hive registry failed; see the queen's log",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalised_and_bad_ones_named() {
        assert_eq!(
            normalize_url("http://127.0.0.1:9200/").unwrap(),
            "http://127.0.0.1:9200"
        );
        assert_eq!(
            normalize_url(" https://h.example ").unwrap(),
            "https://h.example"
        );
        for bad in [
            "",
            "ftp://h:1",
            "http://user:pw@h:1",
            "http://h:1/v1",
            "http://h:1?x=1",
            "not a url",
        ] {
            assert!(normalize_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn node_names_are_checked_and_derived_from_urls() {
        assert!(check_node_name("gpu-01.lab").is_ok());
        assert!(check_node_name("").is_err());
        assert!(check_node_name("a b").is_err());
        assert!(check_node_name(&"x".repeat(129)).is_err());
        assert_eq!(node_name_of("http://127.0.0.1:9200"), "127.0.0.1:9200");
        assert_eq!(node_name_of("https://h.example"), "h.example:443");
    }
}
