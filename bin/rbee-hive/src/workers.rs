//! Workers: spawn, supervise, restart, stop.
//!
//! [`Workers`] validates and preflights a spawn, records the worker in the
//! [`registry::WorkerRegistry`] and hands it to its own supervisor task. The task
//! starts the process (through [`process::Launcher`], the only code that
//! creates processes), then watches it: process exit (reaped at once), the
//! load timeout, missed heartbeats, and failed readiness checks. A worker
//! the hive did not ask to stop is killed if needed and put through the
//! restart policy and the circuit breaker of its (model, device) pair.

mod breaker;
pub(crate) mod error;
mod metrics;
pub(crate) mod preflight;
pub(crate) mod process;
pub(crate) mod registry;
pub(crate) mod routes;
mod supervisor;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use audit_logging::{AuditEvent, AuditSink, CrashCause, ExitInfo};
use auth_min::{ApiToken, Authenticator};
use nix::sys::signal::Signal;
use parking_lot::{Mutex, RwLock};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry as MetricsRegistry;
use rbee_api::worker::{Backend, ReadyCallback, SpawnAccepted, SpawnRequest, WorkerState};
use rbee_api::{ApiError, ErrorCode, FieldError, ModelRef};
use restart_policy::{
    BreakerConfig, BreakerTransition, CircuitBreaker, RestartConfig, RestartPolicy,
};
use tokio_util::sync::CancellationToken;

use crate::host::{self, GpuInfo};
use crate::models::Models;
use breaker::Breakers;
use error::{MemoryShortfall, SetupError, WorkerError};
use process::Launcher;
use registry::{WorkerRecord, WorkerRegistry};
use supervisor::{Spec, Supervisor};

/// Supervision settings.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// The `llm-worker-rbee` binary.
    pub worker_binary: PathBuf,
    /// Per-worker working directories and logs.
    pub run_dir: PathBuf,
    /// Host workers listen on (the hive's bind host).
    pub bind_host: IpAddr,
    /// The host part of `--advertise-url`: how other hosts reach this one.
    /// A worker bound to every interface (`0.0.0.0`) is listed under it.
    pub advertise_host: Option<String>,
    /// The hive's TLS flags with absolute paths (`--tls-cert`, `--tls-key`,
    /// `--tls-ca`), passed on to every worker: a worker serves HTTPS with
    /// the hive's certificate (it listens on the hive's host) and verifies
    /// the hive with the hive's CA bundle.
    pub tls_args: Vec<String>,
    /// Heartbeat interval given to workers.
    pub heartbeat_interval: Duration,
    /// A ready worker silent for this long is declared dead.
    pub heartbeat_timeout: Duration,
    /// Interval of readiness checks against ready workers.
    pub health_interval: Duration,
    /// Consecutive failed checks that declare a worker dead.
    pub health_failures: u32,
    /// A worker still loading after this long is killed.
    pub load_timeout: Duration,
    /// Grace for each stop step (HTTP shutdown, then SIGTERM).
    pub stop_grace: Duration,
    /// Restart policy.
    pub restart: RestartConfig,
    /// Circuit breaker per (model, device).
    pub breaker: BreakerConfig,
}

#[derive(Debug, Clone, Default)]
struct Metrics {
    restarts: Family<Vec<(String, String)>, Counter>,
    restart_failures: Family<Vec<(String, String)>, Counter>,
    activations: Family<Vec<(String, String)>, Counter>,
}

/// The supervision settings in effect with the policy and breaker template
/// built from them; a reload swaps the whole of it.
#[derive(Debug)]
pub struct Tuning {
    settings: WorkerSettings,
    policy: RestartPolicy,
    breaker_template: CircuitBreaker,
}

impl WorkerSettings {
    /// A worker's working directory (its log, its token file).
    fn worker_dir(&self, id: &str) -> PathBuf {
        self.run_dir.join(id)
    }

    /// The token file a worker reads (`--api-token-file`).
    fn token_file(&self, id: &str) -> PathBuf {
        self.worker_dir(id).join("api-token")
    }
}

impl Tuning {
    /// Check `settings` (restart policy, circuit breaker).
    pub fn try_new(settings: WorkerSettings) -> Result<Self, SetupError> {
        let policy = RestartPolicy::try_new(settings.restart).map_err(SetupError::Policy)?;
        let breaker_template =
            CircuitBreaker::try_new(settings.breaker).map_err(SetupError::Breaker)?;
        Ok(Self {
            settings,
            policy,
            breaker_template,
        })
    }
}

struct Inner {
    tuning: RwLock<Arc<Tuning>>,
    registry: WorkerRegistry,
    launcher: Launcher,
    models: Models,
    audit: AuditSink,
    auth: Authenticator,
    hive_url: OnceLock<String>,
    breakers: Arc<Breakers>,
    preflight: Mutex<()>,
    stops: Mutex<HashMap<String, CancellationToken>>,
    /// The supervisors; a finished one leaves nothing behind.
    tasks: tokio_util::task::TaskTracker,
    backends: Vec<Backend>,
    gpus: Mutex<Vec<GpuInfo>>,
    draining: CancellationToken,
    metrics: Metrics,
    http: reqwest::Client,
}

impl Inner {
    /// The supervision settings in effect now.
    fn tuning(&self) -> Arc<Tuning> {
        Arc::clone(&self.tuning.read())
    }
}

/// Whether `id` can be a worker's id: 1 to 64 of `A-Z a-z 0-9 . _ - :`,
/// without `..` (it names the worker's directory).
pub(crate) fn is_worker_id(id: &str) -> bool {
    rbee_api::inference::is_valid_id(id, 64) && !id.contains("..")
}

/// The field error for an id [`is_worker_id`] refuses.
pub(crate) fn worker_id_error() -> FieldError {
    FieldError::new(
        "worker_id",
        "format",
        "worker_id must be 1 to 64 of A-Z a-z 0-9 . _ - : and not contain ..",
    )
}

/// The worker service; cheap to clone.
#[derive(Clone)]
pub struct Workers {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers").finish_non_exhaustive()
    }
}

/// How a watched process ended.
#[derive(Debug)]
enum Ended {
    /// The hive asked it to stop.
    Stopped,
    /// It exited with code 0 without being asked (someone stopped it
    /// directly): not restarted.
    CleanExit,
    /// Declared dead.
    Crashed(CrashCause, ExitInfo),
}

impl Workers {
    /// Apply reloaded supervision settings: restart policy, breaker
    /// thresholds (existing breakers keep their state and count under the
    /// new ones), health, heartbeat, load and stop limits. Where workers
    /// come from and go to (binary, run directory, hosts) stays as started.
    pub fn retune(&self, tuning: Tuning) {
        let mut tuning = tuning;
        let mut slot = self.inner.tuning.write();
        let fixed = &slot.settings;
        tuning.settings.worker_binary = fixed.worker_binary.clone();
        tuning.settings.run_dir = fixed.run_dir.clone();
        tuning.settings.bind_host = fixed.bind_host;
        tuning.settings.advertise_host = fixed.advertise_host.clone();
        tuning.settings.tls_args = fixed.tls_args.clone();
        let breaker = tuning.settings.breaker;
        *slot = Arc::new(tuning);
        drop(slot);
        self.inner.breakers.reconfigure(breaker);
    }

    /// Hand a rotated API token to every running worker: replace its token
    /// file, then send it SIGHUP so it reads the file again. The hive has
    /// already rotated its own token, and keeps accepting the old one for
    /// the grace window, so calls between the two never fail.
    pub fn forward_token(&self, token: &ApiToken) {
        let tuning = self.inner.tuning();
        for (id, pid) in self.inner.registry.pids() {
            let path = tuning.settings.token_file(&id);
            if let Err(e) = token.write_private_file(&path) {
                tracing::error!(worker_id = %id, path = %path.display(), error = %e, "cannot hand the rotated token to the worker");
                continue;
            }
            if process::signal_pid(pid, Signal::SIGHUP) {
                tracing::info!(worker_id = %id, pid, "rotated token handed to the worker (SIGHUP)");
            } else {
                tracing::warn!(worker_id = %id, pid, "cannot signal the worker; it reads the new token when it restarts");
            }
        }
    }

    /// Start the launcher thread, learn which backends the worker binary and
    /// the host support, and register the worker metrics.
    pub async fn start(
        settings: WorkerSettings,
        models: Models,
        audit: AuditSink,
        auth: Authenticator,
        registry: &mut MetricsRegistry,
        draining: CancellationToken,
    ) -> Result<Self, SetupError> {
        let tuning = Tuning::try_new(settings)?;
        let settings = &tuning.settings;
        let launcher = Launcher::start().map_err(SetupError::Launcher)?;
        let version = launcher
            .probe(&settings.worker_binary, &["--version"])
            .await
            .ok_or_else(|| SetupError::WorkerBinary(settings.worker_binary.clone()))?;
        let built: Vec<Backend> = version
            .split("backends=")
            .nth(1)
            .map(|list| {
                list.trim()
                    .split(',')
                    .filter_map(|b| b.trim().parse().ok())
                    .collect()
            })
            .unwrap_or_else(|| vec![Backend::Cpu]);
        let report = host::gpus(&launcher).await;
        let gpus = report.gpus;
        let backends: Vec<Backend> = built
            .into_iter()
            .filter(|b| match b {
                Backend::Cpu => true,
                Backend::Cuda => !gpus.is_empty(),
                Backend::Metal => cfg!(target_os = "macos"),
            })
            .collect();
        tracing::info!(
            worker_binary = %settings.worker_binary.display(),
            backends = ?backends.iter().map(|b| b.as_str()).collect::<Vec<_>>(),
            gpus = gpus.len(),
            gpu_source = report.source,
            "workers can be spawned"
        );
        let metrics = Metrics::default();
        registry.register(
            "rbee_hive_worker_restarts",
            "Worker restarts, by model",
            metrics.restarts.clone(),
        );
        registry.register(
            "rbee_hive_worker_restart_failures",
            "Restarts refused or failed, by reason",
            metrics.restart_failures.clone(),
        );
        registry.register(
            "rbee_hive_circuit_breaker_activations",
            "Circuit breaker openings, by model",
            metrics.activations.clone(),
        );
        // Labels known in advance are exported at 0 from the start: every
        // failure reason now, each model when a worker of it is spawned.
        for reason in ["max_attempts", "circuit_open", "spawn_failed"] {
            let _ = metrics
                .restart_failures
                .get_or_create(&vec![("reason".to_owned(), reason.to_owned())]);
        }
        let breakers = Arc::new(Breakers::new(audit.clone(), metrics.activations.clone()));
        let workers = Self {
            inner: Arc::new(Inner {
                tuning: RwLock::new(Arc::new(tuning)),
                registry: WorkerRegistry::default(),
                launcher,
                models,
                audit,
                auth,
                hive_url: OnceLock::new(),
                breakers,
                preflight: Mutex::default(),
                stops: Mutex::default(),
                tasks: tokio_util::task::TaskTracker::new(),
                backends,
                gpus: Mutex::new(gpus),
                draining,
                metrics,
                http: rbee_http::client::http_client(),
            }),
        };
        registry.register_collector(Box::new(metrics::Collector(workers.clone())));
        if workers.inner.backends.contains(&Backend::Cuda) {
            // Keep the VRAM gauges and per-worker VRAM current.
            let refresher = workers.clone();
            rbee_http::task::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(10));
                loop {
                    tick.tick().await;
                    refresher.refresh_gpus().await;
                }
            });
        }
        Ok(workers)
    }

    /// The URL workers call back on; set once the hive's socket is bound.
    pub fn set_hive_url(&self, url: String) {
        let _ = self.inner.hive_url.set(url);
    }

    /// The registry.
    pub fn registry(&self) -> &WorkerRegistry {
        &self.inner.registry
    }

    /// Backends this hive can spawn.
    pub fn backends(&self) -> &[Backend] {
        &self.inner.backends
    }

    /// GPUs, refreshed (NVML or `nvidia-smi`); also updates each CUDA
    /// worker's `vram_bytes` from the memory its process holds.
    pub async fn refresh_gpus(&self) -> Vec<GpuInfo> {
        let report = host::gpus(&self.inner.launcher).await;
        for id in self.inner.registry.ids() {
            self.inner.registry.update(&id, |r| {
                if let Some(bytes) = r.pid.and_then(|pid| report.process_vram.get(&pid)) {
                    if r.backend == Backend::Cuda {
                        r.vram_bytes = *bytes;
                    }
                }
            });
        }
        *self.inner.gpus.lock() = report.gpus.clone();
        report.gpus
    }

    /// Validate, preflight and start a worker.
    pub async fn spawn(
        &self,
        req: SpawnRequest,
        request_id: Option<&str>,
    ) -> Result<SpawnAccepted, ApiError> {
        let inner = &self.inner;
        if inner.draining.is_cancelled() {
            return Err(WorkerError::ShuttingDown.into());
        }
        let mut fields = Vec::new();
        let model_ref = match ModelRef::parse(&req.model_ref) {
            Ok(r) => Some(r.to_string()),
            Err(e) => {
                fields.push(e.into_field_error("model_ref"));
                None
            }
        };
        let worker_id = req
            .worker_id
            .clone()
            .unwrap_or_else(|| format!("w-{:08x}", rand::random::<u32>()));
        if !is_worker_id(&worker_id) {
            fields.push(worker_id_error());
        }
        let kv_tokens = req.kv_tokens.unwrap_or_else(|| {
            rbee_api::worker::default_kv_tokens(rbee_api::worker::DEFAULT_CONTEXT)
        });
        if !(128..=16_777_216).contains(&kv_tokens) {
            fields.push(FieldError::new(
                "kv_tokens",
                "range",
                "kv_tokens must be 128..=16777216",
            ));
        }
        let slots = req
            .slots
            .unwrap_or_else(|| rbee_api::worker::default_slots(kv_tokens));
        if !(1..=64).contains(&slots) {
            fields.push(FieldError::new("slots", "range", "slots must be 1..=64"));
        }
        let backend = match req.backend.as_deref().map(str::parse::<Backend>) {
            None => Backend::Cpu,
            Some(Ok(backend)) => backend,
            Some(Err(_)) => {
                return Err(WorkerError::UnknownBackend {
                    name: req.backend.clone().unwrap_or_default(),
                    available: inner.backends.iter().map(|b| b.as_str()).collect(),
                }
                .into());
            }
        };
        if backend == Backend::Cpu && req.device.is_some_and(|d| d != 0) {
            fields.push(FieldError::new(
                "device",
                "range",
                "device must be 0 for the cpu backend",
            ));
        }
        let (Some(model_ref), true) = (model_ref, fields.is_empty()) else {
            return Err(WorkerError::Invalid(fields).into());
        };
        if !inner.backends.contains(&backend) {
            return Err(WorkerError::BackendAbsent {
                backend,
                available: inner.backends.iter().map(|b| b.as_str()).collect(),
            }
            .into());
        }
        if inner.registry.get(&worker_id).is_some() {
            return Err(WorkerError::Exists { worker_id }.into());
        }
        let Some(model) = inner.models.get(&model_ref).await? else {
            return Err(WorkerError::NotProvisioned { model_ref }.into());
        };
        let local_path = PathBuf::from(&model.local_path);
        let shape_path = local_path.clone();
        let shape = rbee_http::task::spawn_blocking(move || preflight::shape(&shape_path))
            .await
            .ok()
            .flatten();
        let gpus = if backend == Backend::Cuda {
            self.refresh_gpus().await
        } else {
            Vec::new()
        };
        let required =
            preflight::required_bytes(model.size_bytes, &model.format, backend, shape, kv_tokens);
        let lease = inner.models.leases().acquire(&model_ref)?;

        // Check and reserve under one lock: two spawns cannot both claim
        // the same free memory.
        let (device, reserved, probe) = {
            let _gate = inner.preflight.lock();
            let (device, available, reserved) = match backend {
                Backend::Cuda => {
                    let pick = |g: &GpuInfo| {
                        g.vram_free_bytes
                            .saturating_sub(inner.registry.reserved(Backend::Cuda, g.index))
                    };
                    let gpu = match req.device {
                        Some(d) => gpus.iter().find(|g| g.index == d).ok_or_else(|| {
                            WorkerError::Invalid(vec![FieldError::new(
                                "device",
                                "range",
                                format!("no GPU with index {d} on this hive"),
                            )])
                        })?,
                        None => gpus
                            .iter()
                            .max_by_key(|g| pick(g))
                            .ok_or(WorkerError::NoGpu)?,
                    };
                    let reserved = inner.registry.reserved(Backend::Cuda, gpu.index);
                    (gpu.index, gpu.vram_free_bytes, reserved)
                }
                _ => {
                    let memory = host::memory().ok_or_else(|| {
                        ApiError::new(ErrorCode::Internal, "cannot read /proc/meminfo")
                    })?;
                    (
                        0,
                        memory.available_bytes,
                        inner.registry.reserved(backend, 0),
                    )
                }
            };
            let free = available.saturating_sub(reserved);
            if required > free {
                return Err(WorkerError::Memory {
                    model_ref,
                    backend,
                    memory: MemoryShortfall {
                        required_bytes: required,
                        available_bytes: available,
                        reserved_bytes: reserved,
                        device,
                    },
                }
                .into());
            }
            let probe = inner.breakers.acquire(
                &model_ref,
                device,
                &inner.tuning().breaker_template,
                request_id,
            )?;
            let now = Instant::now();
            inner.registry.insert(WorkerRecord {
                id: worker_id.clone(),
                pid: None,
                url: None,
                model_ref: model_ref.clone(),
                backend,
                device,
                slots,
                state: WorkerState::Loading,
                restart_count: 0,
                last_restart: None,
                last_heartbeat: None,
                last_seen: now,
                failed_health_checks: 0,
                started_at: SystemTime::now(),
                started: now,
                reserved_bytes: required,
                vram_bytes: 0,
                failure: None,
            })?;
            (device, required, probe)
        };
        let _ = inner.models.mark_used(&model_ref).await;
        let model_label = vec![("model".to_owned(), model_ref.clone())];
        let _ = inner.metrics.restarts.get_or_create(&model_label);
        let _ = inner.metrics.activations.get_or_create(&model_label);
        let spec = Spec {
            id: worker_id.clone(),
            model_ref,
            local_path,
            backend,
            device,
            slots,
            kv_tokens,
            required,
        };
        let stop = CancellationToken::new();
        inner.stops.lock().insert(worker_id.clone(), stop.clone());
        let supervisor = Supervisor {
            inner: Arc::clone(&self.inner),
        };
        let request_id = request_id.map(str::to_owned);
        inner.tasks.spawn(async move {
            supervisor
                .supervise(spec, stop, lease, probe, request_id)
                .await;
        });
        Ok(SpawnAccepted {
            worker_id,
            url: None,
            state: WorkerState::Loading,
            reserved_bytes: reserved,
        })
    }

    /// A ready callback arrived.
    pub fn on_ready(&self, cb: &ReadyCallback, request_id: Option<&str>) -> Result<(), ApiError> {
        let record =
            self.inner
                .registry
                .get(&cb.worker_id)
                .ok_or_else(|| WorkerError::Unknown {
                    worker_id: cb.worker_id.clone(),
                })?;
        let url = reachable_url(
            &cb.url,
            self.inner.tuning().settings.advertise_host.as_deref(),
        );
        if url == cb.url {
            self.inner.registry.on_ready(cb, Instant::now())?;
        } else {
            let cb = ReadyCallback { url, ..cb.clone() };
            self.inner.registry.on_ready(&cb, Instant::now())?;
        }
        let transition = self.inner.breakers.with(
            &record.model_ref,
            record.device,
            &self.inner.tuning().breaker_template,
            |b| b.record_success(Instant::now()),
        );
        if transition == Some(BreakerTransition::Closed) {
            tracing::info!(model_ref = %record.model_ref, device = record.device, "circuit breaker closed: a probe spawn became ready");
            self.inner.audit.emit(
                request_id,
                AuditEvent::CircuitBreakerClosed {
                    model_ref: record.model_ref.clone(),
                    device: record.device,
                },
            );
        }
        tracing::info!(worker_id = %cb.worker_id, url = %cb.url, "worker ready");
        self.inner.audit.emit(
            request_id,
            AuditEvent::WorkerReady {
                worker_id: cb.worker_id.clone(),
                model_ref: record.model_ref,
                backend: record.backend,
                device: record.device,
            },
        );
        Ok(())
    }

    /// Stop a worker the hive was asked to stop; waits until it is gone.
    pub async fn shutdown(&self, worker_id: &str) -> Result<(), ApiError> {
        let stop = self.inner.stops.lock().get(worker_id).cloned();
        let Some(stop) = stop else {
            // A failed worker has no process: forget it.
            if let Some(r) = self.inner.registry.get(worker_id) {
                if r.state == WorkerState::Failed {
                    self.inner.registry.remove(worker_id);
                    return Ok(());
                }
            }
            return Err(WorkerError::Unknown {
                worker_id: worker_id.to_owned(),
            }
            .into());
        };
        stop.cancel();
        let deadline =
            Instant::now() + self.inner.tuning().settings.stop_grace * 3 + Duration::from_secs(5);
        while self.inner.registry.get(worker_id).is_some() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Stop every worker in parallel (hive shutdown) and wait for their
    /// supervisors, then SIGKILL any process group still alive.
    pub async fn shutdown_all(&self) {
        let stops: Vec<CancellationToken> = self.inner.stops.lock().values().cloned().collect();
        for stop in &stops {
            stop.cancel();
        }
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        self.kill_all();
    }

    /// SIGKILL every worker's process group (last resort at exit).
    pub fn kill_all(&self) {
        for id in self.inner.registry.ids() {
            if let Some(pid) = self.inner.registry.get(&id).and_then(|r| r.pid) {
                process::signal_group(pid, Signal::SIGKILL);
            }
        }
    }
}

/// The host of a base URL (`http://gpu-01:9200/` gives `gpu-01`, IPv6 keeps
/// its brackets).
pub fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if !port.contains(']') => h,
        _ => authority,
    };
    (!host.is_empty()).then(|| host.to_owned())
}

/// A worker bound to every interface reports `http(s)://0.0.0.0:PORT`, which
/// only works from its own host; list it under the hive's advertised host.
fn reachable_url(url: &str, advertise_host: Option<&str>) -> String {
    let Some(host) = advertise_host else {
        return url.to_owned();
    };
    if let Some((scheme, rest)) = url.split_once("://") {
        for unspecified in ["0.0.0.0:", "[::]:"] {
            if let Some(port) = rest.strip_prefix(unspecified) {
                return format!("{scheme}://{host}:{port}");
            }
        }
    }
    url.to_owned()
}

#[cfg(test)]
mod url_tests {
    use super::*;

    #[test]
    fn workers_on_every_interface_are_listed_under_the_advertised_host() {
        assert_eq!(url_host("http://gpu-01:9200/").as_deref(), Some("gpu-01"));
        assert_eq!(
            url_host("http://[fd00::1]:9200").as_deref(),
            Some("[fd00::1]")
        );
        assert_eq!(url_host("http://gpu-02").as_deref(), Some("gpu-02"));
        assert_eq!(url_host("http://:9200"), None);
        assert_eq!(
            reachable_url("http://0.0.0.0:41234", Some("gpu-01")),
            "http://gpu-01:41234"
        );
        assert_eq!(
            reachable_url("http://[::]:41234", Some("[fd00::1]")),
            "http://[fd00::1]:41234"
        );
        assert_eq!(
            reachable_url("http://10.0.0.5:41234", Some("gpu-01")),
            "http://10.0.0.5:41234",
            "a worker on a specific address keeps it"
        );
        assert_eq!(
            reachable_url("http://0.0.0.0:41234", None),
            "http://0.0.0.0:41234"
        );
    }
}
