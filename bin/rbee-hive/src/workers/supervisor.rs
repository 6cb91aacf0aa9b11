//! The supervisor of one worker: start its process, watch it, and apply
//! the restart policy and the circuit breaker when it dies.

use std::time::{Duration, Instant, SystemTime};

use audit_logging::{AuditEvent, CrashCause, ExitInfo, StopCause, WorkerFailureReason};
use auth_min::send_authenticated;
use nix::sys::signal::Signal;
use rand::SeedableRng;
use rbee_api::worker::WorkerState;
use restart_policy::{BreakerTransition, Decision, ExitKind, Reason, RestartState};
use tokio_util::sync::CancellationToken;

use super::process::{self, LaunchSpec};
use super::registry::WorkerRecord;
use super::{Ended, Inner};
use crate::models::leases::Lease;

/// Supervises one worker process for the worker service: holds the
/// service's state, not the service, so supervision is one type with one
/// `impl` here and the service's API another in `workers.rs`.
pub(super) struct Supervisor {
    pub(super) inner: std::sync::Arc<Inner>,
}

impl Supervisor {
    /// Run one worker until it is stopped or given up on.
    pub(super) async fn supervise(
        &self,
        spec: Spec,
        stop: CancellationToken,
        lease: Lease,
        mut probe: super::breaker::Probe,
        request_id: Option<String>,
    ) {
        let inner = &self.inner;
        let request_id = request_id.as_deref();
        let mut state = RestartState::new();
        let mut rng = rand::rngs::StdRng::from_os_rng();
        loop {
            let child = match inner.launcher.spawn(self.launch_spec(&spec)).await {
                Ok(child) => child,
                Err(e) => {
                    tracing::error!(worker_id = %spec.id, error = %e, "cannot start the worker process");
                    let binary = inner.tuning().settings.worker_binary.clone();
                    self.give_up(
                        &spec,
                        WorkerFailureReason::SpawnFailed,
                        "spawn_failed",
                        format!("cannot start the worker process {}: {e}", binary.display()),
                        request_id,
                    );
                    break;
                }
            };
            let pid = child.id().unwrap_or(0);
            let now = Instant::now();
            state.record_start(now);
            inner.registry.update(&spec.id, |r| {
                r.pid = Some(pid);
                r.url = None;
                r.state = WorkerState::Loading;
                r.started = now;
                r.last_seen = now;
                r.started_at = SystemTime::now();
                r.failed_health_checks = 0;
                r.reserved_bytes = spec.required;
            });
            tracing::info!(worker_id = %spec.id, pid, model_ref = %spec.model_ref, "worker process started");
            inner.audit.emit(
                request_id,
                AuditEvent::WorkerSpawned {
                    worker_id: spec.id.clone(),
                    model_ref: spec.model_ref.clone(),
                    backend: spec.backend,
                    device: spec.device,
                    pid,
                },
            );
            let (cause, exit) = match self.watch(&spec, child, &stop).await {
                Ended::Stopped | Ended::CleanExit => {
                    self.forget(&spec, StopCause::Requested, request_id);
                    break;
                }
                Ended::Crashed(cause, exit) => (cause, exit),
            };
            tracing::warn!(worker_id = %spec.id, pid, cause = cause.as_str(), code = ?exit.code, signal = ?exit.signal, "worker died");
            inner.audit.emit(
                request_id,
                AuditEvent::WorkerCrashed {
                    worker_id: spec.id.clone(),
                    model_ref: spec.model_ref.clone(),
                    pid,
                    exit,
                    cause,
                },
            );
            let now = Instant::now();
            let tuning = inner.tuning();
            let outcome = inner.breakers.with(
                &spec.model_ref,
                spec.device,
                &tuning.breaker_template,
                |breaker| {
                    tuning
                        .policy
                        .on_exit(&mut state, breaker, ExitKind::Failure, now, &mut rng)
                },
            );
            if outcome.breaker == Some(BreakerTransition::Opened) {
                tracing::warn!(model_ref = %spec.model_ref, device = spec.device, "circuit breaker opened");
                inner
                    .breakers
                    .opened(&spec.model_ref, spec.device, request_id);
            }
            match outcome.decision {
                Decision::Restart { delay, attempt } => {
                    tracing::info!(worker_id = %spec.id, attempt, delay_ms = delay.as_millis() as u64, reason = Reason::Backoff.as_str(), "restarting worker after backoff");
                    inner
                        .metrics
                        .restarts
                        .get_or_create(&vec![("model".to_owned(), spec.model_ref.clone())])
                        .inc();
                    inner.registry.update(&spec.id, |r| {
                        r.restart_count = attempt;
                        r.last_restart = Some(SystemTime::now());
                        r.state = WorkerState::Loading;
                        r.pid = None;
                        r.url = None;
                    });
                    inner.audit.emit(
                        request_id,
                        AuditEvent::WorkerRestarted {
                            worker_id: spec.id.clone(),
                            model_ref: spec.model_ref.clone(),
                            attempt,
                            delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        },
                    );
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = stop.cancelled() => {
                            self.forget(&spec, StopCause::Requested, request_id);
                            break;
                        }
                    }
                    let template = &inner.tuning().breaker_template;
                    match inner
                        .breakers
                        .acquire(&spec.model_ref, spec.device, template, request_id)
                    {
                        Ok(next) => probe = next,
                        Err(_) => {
                            self.give_up(
                                &spec,
                                WorkerFailureReason::CircuitOpen,
                                "circuit_open",
                                format!(
                                    "{}; the circuit breaker of its model and device is open",
                                    ended(cause, &exit)
                                ),
                                request_id,
                            );
                            break;
                        }
                    }
                }
                Decision::Stop { reason, .. } => {
                    let (why, label) = match reason {
                        Reason::CircuitOpen => (WorkerFailureReason::CircuitOpen, "circuit_open"),
                        _ if cause == CrashCause::LoadTimeout => {
                            (WorkerFailureReason::LoadTimeout, "max_attempts")
                        }
                        _ => (WorkerFailureReason::MaxAttempts, "max_attempts"),
                    };
                    let detail = match reason {
                        Reason::CircuitOpen => {
                            "the circuit breaker of its model and device is open"
                        }
                        _ => "no restart attempts are left",
                    };
                    self.give_up(
                        &spec,
                        why,
                        label,
                        format!("{}; {detail}", ended(cause, &exit)),
                        request_id,
                    );
                    break;
                }
            }
        }
        drop(lease);
        drop(probe);
        // The worker is gone for good: its copy of the API token goes too
        // (its log stays, for whoever asks why it ended).
        let token = inner.tuning().settings.token_file(&spec.id);
        match std::fs::remove_file(&token) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(worker_id = %spec.id, path = %token.display(), error = %e, "cannot delete the worker's token file");
            }
        }
    }

    /// Mark a worker `failed` (kept in the registry, no process).
    fn give_up(
        &self,
        spec: &Spec,
        why: WorkerFailureReason,
        label: &str,
        failure: String,
        request_id: Option<&str>,
    ) {
        let inner = &self.inner;
        inner
            .metrics
            .restart_failures
            .get_or_create(&vec![("reason".to_owned(), label.to_owned())])
            .inc();
        inner.registry.update(&spec.id, |r| {
            r.state = WorkerState::Failed;
            r.pid = None;
            r.url = None;
            r.reserved_bytes = 0;
            r.failure = Some(failure);
        });
        inner.stops.lock().remove(&spec.id);
        tracing::error!(worker_id = %spec.id, reason = label, "worker failed; not restarting it");
        inner.audit.emit(
            request_id,
            AuditEvent::WorkerFailed {
                worker_id: spec.id.clone(),
                model_ref: spec.model_ref.clone(),
                reason: why,
            },
        );
    }

    /// Drop a stopped worker from the registry.
    fn forget(&self, spec: &Spec, cause: StopCause, request_id: Option<&str>) {
        self.inner.registry.remove(&spec.id);
        self.inner.stops.lock().remove(&spec.id);
        tracing::info!(worker_id = %spec.id, "worker stopped");
        self.inner.audit.emit(
            request_id,
            AuditEvent::WorkerStopped {
                worker_id: spec.id.clone(),
                model_ref: spec.model_ref.clone(),
                cause,
            },
        );
    }

    fn launch_spec(&self, spec: &Spec) -> LaunchSpec {
        let tuning = self.inner.tuning();
        let s = &tuning.settings;
        let dir = s.worker_dir(&spec.id);
        let mut args = vec![
            "--addr".to_owned(),
            format!("{}", std::net::SocketAddr::new(s.bind_host, 0)),
            "--model".to_owned(),
            spec.local_path.display().to_string(),
            "--model-ref".to_owned(),
            spec.model_ref.clone(),
            "--worker-id".to_owned(),
            spec.id.clone(),
            "--backend".to_owned(),
            spec.backend.as_str().to_owned(),
            "--device".to_owned(),
            spec.device.to_string(),
            "--slots".to_owned(),
            spec.slots.to_string(),
            "--kv-tokens".to_owned(),
            spec.kv_tokens.to_string(),
            "--heartbeat-interval-s".to_owned(),
            s.heartbeat_interval.as_secs().max(1).to_string(),
            "--parent-pid".to_owned(),
            std::process::id().to_string(),
            "--log-format".to_owned(),
            "json".to_owned(),
        ];
        if let Some(url) = self.inner.hive_url.get() {
            args.push("--hive-url".to_owned());
            args.push(url.clone());
        }
        args.extend(s.tls_args.iter().cloned());
        if let Some(token) = self.inner.auth.token() {
            let path = s.token_file(&spec.id);
            if std::fs::create_dir_all(&dir).is_ok() && token.write_private_file(&path).is_ok() {
                args.push("--api-token-file".to_owned());
                args.push(path.display().to_string());
            }
        }
        LaunchSpec {
            program: s.worker_binary.clone(),
            args,
            env: Vec::new(),
            log: dir.join("worker.log"),
            dir,
        }
    }

    /// Watch a running process until it stops or is declared dead.
    async fn watch(
        &self,
        spec: &Spec,
        mut child: tokio::process::Child,
        stop: &CancellationToken,
    ) -> Ended {
        let pid = child.id().unwrap_or(0);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_check = Instant::now() + self.inner.tuning().settings.health_interval;
        loop {
            tokio::select! {
                status = child.wait() => {
                    let exit = exit_info(status.ok());
                    if exit.code == Some(0) {
                        return Ended::CleanExit;
                    }
                    return Ended::Crashed(CrashCause::Exited, exit);
                }
                () = stop.cancelled() => {
                    self.stop_process(spec, &mut child).await;
                    return Ended::Stopped;
                }
                _ = tick.tick() => {}
            }
            let Some(record) = self.inner.registry.get(&spec.id) else {
                continue;
            };
            // Read each tick: a reload changes the limits of running workers.
            let tuning = self.inner.tuning();
            let s = &tuning.settings;
            let now = Instant::now();
            let dead = match record.state {
                WorkerState::Loading => (now.duration_since(record.started) > s.load_timeout)
                    .then_some(CrashCause::LoadTimeout),
                _ if now.duration_since(record.last_seen) > s.heartbeat_timeout => {
                    Some(CrashCause::MissedHeartbeats)
                }
                // A worker draining on its own (someone asked it directly)
                // refuses readiness by design; it exits 0 when done.
                WorkerState::Draining => None,
                _ if now >= next_check => {
                    next_check = now + s.health_interval;
                    let healthy = self.check_health(&record).await;
                    let failures = self
                        .inner
                        .registry
                        .update(&spec.id, |r| {
                            r.failed_health_checks = if healthy {
                                0
                            } else {
                                r.failed_health_checks + 1
                            };
                            r.failed_health_checks
                        })
                        .unwrap_or(0);
                    if !healthy {
                        tracing::warn!(worker_id = %spec.id, failures, "worker failed its readiness check");
                    }
                    (failures >= s.health_failures).then_some(CrashCause::FailedHealthChecks)
                }
                _ => None,
            };
            if let Some(cause) = dead {
                process::signal_group(pid, Signal::SIGKILL);
                let status = child.wait().await.ok();
                return Ended::Crashed(cause, exit_info(status));
            }
        }
    }

    async fn check_health(&self, record: &WorkerRecord) -> bool {
        let Some(url) = &record.url else {
            return false;
        };
        let timeout = self
            .inner
            .tuning()
            .settings
            .health_interval
            .min(Duration::from_secs(5));
        let request = self
            .inner
            .http
            .get(format!("{url}/health/ready"))
            .timeout(timeout);
        matches!(send_authenticated(request, &self.inner.auth).await, Ok(r) if r.status().is_success())
    }

    /// HTTP shutdown, then SIGTERM, then SIGKILL, each after the grace.
    async fn stop_process(&self, spec: &Spec, child: &mut tokio::process::Child) {
        let grace = self.inner.tuning().settings.stop_grace;
        let pid = child.id().unwrap_or(0);
        self.inner
            .registry
            .update(&spec.id, |r| r.state = WorkerState::Draining);
        if let Some(url) = self.inner.registry.get(&spec.id).and_then(|r| r.url) {
            let request = self
                .inner
                .http
                .post(format!("{url}/v1/admin/shutdown"))
                .json(&rbee_api::health::AdminShutdown {})
                .timeout(grace.min(Duration::from_secs(5)));
            let _ = send_authenticated(request, &self.inner.auth).await;
            if tokio::time::timeout(grace, child.wait()).await.is_ok() {
                return;
            }
        }
        process::signal_group(pid, Signal::SIGTERM);
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
        tracing::warn!(worker_id = %spec.id, pid, "worker ignored SIGTERM; killing it");
        process::signal_group(pid, Signal::SIGKILL);
        let _ = child.wait().await;
    }
}

/// How a worker's last process ended, in words.
fn ended(cause: CrashCause, exit: &ExitInfo) -> String {
    let how = match (exit.code, exit.signal) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => "no exit status".to_owned(),
    };
    format!("its last process ended ({}, {how})", cause.as_str())
}

/// What a supervisor needs to (re)start a worker.
#[derive(Debug, Clone)]
pub(super) struct Spec {
    pub(super) id: String,
    pub(super) model_ref: String,
    pub(super) local_path: std::path::PathBuf,
    pub(super) backend: rbee_api::worker::Backend,
    pub(super) device: u32,
    pub(super) slots: u16,
    pub(super) kv_tokens: u32,
    pub(super) required: u64,
}

fn exit_info(status: Option<std::process::ExitStatus>) -> ExitInfo {
    use std::os::unix::process::ExitStatusExt;
    ExitInfo {
        code: status.and_then(|s| s.code()),
        signal: status.and_then(|s| s.signal()),
    }
}
