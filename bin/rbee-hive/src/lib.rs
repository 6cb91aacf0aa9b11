//! `rbee-hive`, the pool manager of one GPU host.
//!
//! This crate holds the daemon as a library (so tests can run it in-process
//! on port 0) and a thin `main`. It serves the shared routes (`/health`,
//! `/health/live`, `/metrics`, `POST /v1/admin/shutdown`) and the model
//! routes ([`models`]) behind the shared stack (auth, deadlines, request
//! ids, JSON errors); its HTTP metrics carry the contract's names
//! `rbee_hive_requests_total` and `rbee_hive_request_duration_seconds`.

pub(crate) mod host;
pub mod models;
pub(crate) mod queen;
pub(crate) mod workers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use audit_logging::ConfigSetting;
use axum::extract::FromRef;
use rbee_http::{Bootstrap, CommonArgs, CoreState, Daemon, DaemonConfig, Identity, StartupError};
use secrecy::SecretString;

use models::{ModelSettings, Models};
use restart_policy::{BreakerConfig, PolicyKind, RestartConfig};
use workers::routes::ReadyRequiresWorker;
use workers::{WorkerSettings, Workers};

/// `rbee-hive`'s flags; each also reads the environment variable it names.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "rbee-hive",
    version,
    about = "The rbee pool manager for one host: provisions models, spawns and supervises workers"
)]
pub struct Config {
    /// Address to listen on; port 0 lets the OS choose.
    #[arg(long, env = "RBEE_HIVE_ADDR", default_value = "127.0.0.1:9200")]
    pub addr: SocketAddr,

    /// Directory of the model catalog (`catalog.sqlite3`) and of downloaded
    /// models (a Hugging Face cache layout under `hf/`).
    #[arg(long, env = "RBEE_MODELS_DIR", value_name = "DIR")]
    pub models_dir: PathBuf,

    /// Hugging Face endpoint (a mirror, or a server with the same layout).
    #[arg(long, env = "HF_ENDPOINT", default_value = "https://huggingface.co")]
    pub hf_endpoint: String,

    /// File holding the Hugging Face token for gated and private repos.
    /// Without it the token comes from `HF_TOKEN`, if set.
    #[arg(long, env = "HF_TOKEN_PATH", value_name = "PATH")]
    pub hf_token_file: Option<PathBuf>,

    /// Free space (MiB) a download must leave on the models filesystem;
    /// a provision that would go below it is refused with 507.
    #[arg(long, env = "RBEE_DISK_RESERVE_MIB", default_value_t = 1024)]
    pub disk_reserve_mib: u64,

    /// Attempts per file when the network fails; each resumes the partial
    /// file.
    #[arg(long, env = "RBEE_DOWNLOAD_ATTEMPTS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub download_attempts: u32,

    /// Seconds a finished download stays queryable on the progress route.
    #[arg(long, env = "RBEE_DOWNLOAD_RETENTION_S", default_value_t = 900, value_parser = clap::value_parser!(u64).range(1..=2_592_000))]
    pub download_retention_s: u64,

    /// The `llm-worker-rbee` binary (default: next to `rbee-hive`).
    #[arg(long, env = "RBEE_WORKER_BINARY", value_name = "PATH")]
    pub worker_binary: Option<PathBuf>,

    /// Working directories and logs of workers (default: `<models-dir>/run`).
    #[arg(long, env = "RBEE_RUN_DIR", value_name = "DIR")]
    pub run_dir: Option<PathBuf>,

    /// Heartbeat interval given to workers, in seconds.
    #[arg(long, env = "RBEE_WORKER_HEARTBEAT_INTERVAL_S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub worker_heartbeat_interval_s: u64,

    /// A ready worker without a heartbeat for this long is declared dead.
    #[arg(long, env = "RBEE_HEARTBEAT_TIMEOUT_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub heartbeat_timeout_s: u64,

    /// Seconds between readiness checks of each ready worker.
    #[arg(long, env = "RBEE_HEALTH_INTERVAL_S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub health_interval_s: u64,

    /// Consecutive failed readiness checks that declare a worker dead.
    #[arg(long, env = "RBEE_HEALTH_FAILURES", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub health_failures: u32,

    /// A worker still loading after this many seconds is killed.
    #[arg(long, env = "RBEE_LOAD_TIMEOUT_S", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub load_timeout_s: u64,

    /// Grace in seconds for each step of stopping a worker (HTTP shutdown,
    /// then SIGTERM) before the next (SIGTERM, then SIGKILL).
    #[arg(long, env = "RBEE_WORKER_STOP_GRACE_S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub worker_stop_grace_s: u64,

    /// First restart delay in milliseconds (doubles per attempt, +-20 % jitter).
    #[arg(long, env = "RBEE_RESTART_BACKOFF_BASE_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub restart_backoff_base_ms: u64,

    /// Longest restart delay in milliseconds.
    #[arg(long, env = "RBEE_RESTART_BACKOFF_CAP_MS", default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    pub restart_backoff_cap_ms: u64,

    /// Restart attempts before a worker is marked failed.
    #[arg(long, env = "RBEE_RESTART_MAX_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub restart_max_attempts: u32,

    /// Healthy uptime in seconds after which the attempt count resets.
    #[arg(long, env = "RBEE_RESTART_STABLE_UPTIME_S", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub restart_stable_uptime_s: u64,

    /// Failures of one (model, device) pair within the window that open its
    /// circuit breaker.
    #[arg(long, env = "RBEE_BREAKER_THRESHOLD", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub breaker_threshold: u32,

    /// The breaker's failure window, in seconds.
    #[arg(long, env = "RBEE_BREAKER_WINDOW_S", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub breaker_window_s: u64,

    /// How long an open breaker refuses before letting one probe spawn through.
    #[arg(long, env = "RBEE_BREAKER_COOLDOWN_S", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub breaker_cooldown_s: u64,

    /// Report ready only when at least one worker is ready.
    #[arg(long, env = "RBEE_READY_REQUIRES_WORKER")]
    pub ready_requires_worker: bool,

    /// Register with this queen at startup and keep the registration fresh.
    #[arg(long, env = "RBEE_QUEEN_URL")]
    pub queen_url: Option<String>,

    /// This hive's name at the queen (default: the host name).
    #[arg(long, env = "RBEE_NODE_NAME")]
    pub node_name: Option<String>,

    /// The URL the queen should use for this hive (default: the bound address).
    #[arg(long, env = "RBEE_HIVE_ADVERTISE_URL")]
    pub advertise_url: Option<String>,

    /// Seconds between registrations with the queen.
    #[arg(long, env = "RBEE_QUEEN_REGISTER_INTERVAL_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub queen_register_interval_s: u64,

    /// Optional TOML file of settings (keys are flag names); flags and
    /// environment variables win over it.
    #[arg(long, env = "RBEE_HIVE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    /// The flags every daemon has.
    pub common: CommonArgs,
}

impl DaemonConfig for Config {
    const SETTINGS_FILE_ENV: Option<&'static str> = Some("RBEE_HIVE_CONFIG");

    fn common(&self) -> &CommonArgs {
        &self.common
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn routes() -> Vec<rbee_http::RouteEntry> {
        router().table().to_vec()
    }
}

/// The settings a SIGHUP reload applies to the running hive (besides the
/// API token): supervision limits, the restart policy, the circuit breaker
/// and the readiness rule. The others need a restart.
const RELOADABLE: &[&str] = &[
    "worker_heartbeat_interval_s",
    "heartbeat_timeout_s",
    "health_interval_s",
    "health_failures",
    "load_timeout_s",
    "worker_stop_grace_s",
    "restart_backoff_base_ms",
    "restart_backoff_cap_ms",
    "restart_max_attempts",
    "restart_stable_uptime_s",
    "breaker_threshold",
    "breaker_window_s",
    "breaker_cooldown_s",
    "ready_requires_worker",
];

/// The hive's own settings, as audited at startup and compared on reload.
fn settings(config: &Config) -> Vec<ConfigSetting> {
    let path = |p: &Option<PathBuf>| {
        p.as_ref()
            .map_or_else(|| "none".to_owned(), |p| p.display().to_string())
    };
    let text = |t: &Option<String>| t.clone().unwrap_or_else(|| "none".to_owned());
    vec![
        ConfigSetting::new("models_dir", config.models_dir.display()),
        ConfigSetting::new("hf_endpoint", &config.hf_endpoint),
        ConfigSetting::new("hf_token_file", path(&config.hf_token_file)),
        ConfigSetting::new("disk_reserve_mib", config.disk_reserve_mib),
        ConfigSetting::new("download_attempts", config.download_attempts),
        ConfigSetting::new("download_retention_s", config.download_retention_s),
        ConfigSetting::new("worker_binary", path(&config.worker_binary)),
        ConfigSetting::new("run_dir", path(&config.run_dir)),
        ConfigSetting::new(
            "worker_heartbeat_interval_s",
            config.worker_heartbeat_interval_s,
        ),
        ConfigSetting::new("heartbeat_timeout_s", config.heartbeat_timeout_s),
        ConfigSetting::new("health_interval_s", config.health_interval_s),
        ConfigSetting::new("health_failures", config.health_failures),
        ConfigSetting::new("load_timeout_s", config.load_timeout_s),
        ConfigSetting::new("worker_stop_grace_s", config.worker_stop_grace_s),
        ConfigSetting::new("restart_backoff_base_ms", config.restart_backoff_base_ms),
        ConfigSetting::new("restart_backoff_cap_ms", config.restart_backoff_cap_ms),
        ConfigSetting::new("restart_max_attempts", config.restart_max_attempts),
        ConfigSetting::new("restart_stable_uptime_s", config.restart_stable_uptime_s),
        ConfigSetting::new("breaker_threshold", config.breaker_threshold),
        ConfigSetting::new("breaker_window_s", config.breaker_window_s),
        ConfigSetting::new("breaker_cooldown_s", config.breaker_cooldown_s),
        ConfigSetting::new("ready_requires_worker", config.ready_requires_worker),
        ConfigSetting::new("queen_url", text(&config.queen_url)),
        ConfigSetting::new("node_name", text(&config.node_name)),
        ConfigSetting::new("advertise_url", text(&config.advertise_url)),
        ConfigSetting::new(
            "queen_register_interval_s",
            config.queen_register_interval_s,
        ),
    ]
}

/// State shared by `rbee-hive`'s handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    core: CoreState,
    models: Models,
    workers: Workers,
    ready_requires_worker: ReadyRequiresWorker,
}

impl FromRef<AppState> for Workers {
    fn from_ref(state: &AppState) -> Self {
        state.workers.clone()
    }
}

impl FromRef<AppState> for ReadyRequiresWorker {
    fn from_ref(state: &AppState) -> Self {
        state.ready_requires_worker.clone()
    }
}

impl FromRef<AppState> for Models {
    fn from_ref(state: &AppState) -> Self {
        state.models.clone()
    }
}

impl FromRef<AppState> for CoreState {
    fn from_ref(state: &AppState) -> Self {
        state.core.clone()
    }
}

/// `rbee-hive`'s own routes (the shared ones are added by [`Bootstrap::bind`]).
///
/// Worker routes join here; the backend label of `rbee_build_info` names
/// the backends this build can spawn.
pub fn router() -> rbee_http::Routes<AppState> {
    models::routes::router().merge(workers::routes::router())
}

/// A bound hive: the daemon plus its workers, which never outlive it.
#[derive(Debug)]
pub struct Hive {
    daemon: Daemon,
    workers: Workers,
}

impl Hive {
    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.daemon.local_addr()
    }

    /// Serve until SIGTERM/SIGINT or `POST /v1/admin/shutdown`; workers are
    /// stopped in parallel during the drain, and any left are killed.
    pub async fn run(self) -> Result<(), StartupError> {
        let result = self.daemon.run().await;
        self.workers.kill_all();
        result
    }
}

/// Open the audit trail, check the token and bind policy, then bind
/// `config.addr`. The returned daemon reports its bound address
/// ([`Daemon::local_addr`]) and serves until SIGTERM/SIGINT or
/// `POST /v1/admin/shutdown` ([`Daemon::run`]).
pub async fn build(config: Config) -> Result<Hive, StartupError> {
    let hf_token = check_model_flags(&config)?;
    let hf_token_fp = hf_token
        .as_ref()
        .map(|t| auth_min::Fingerprint::of(secrecy::ExposeSecret::expose_secret(t)));
    let mut all = settings(&config);
    all.push(ConfigSetting::secret("hf_token", hf_token_fp.as_ref()));
    let mut boot = Bootstrap::new(
        Identity {
            name: "rbee-hive",
            service_id: "rbee-hive".to_owned(),
            metric_prefix: "rbee_hive",
            backend: "cpu",
        },
        config.addr,
        &config.common,
        all,
    )?;
    let models = Models::open(
        ModelSettings {
            models_dir: config.models_dir.clone(),
            hf_endpoint: config.hf_endpoint.clone(),
            hf_token,
            disk_reserve_bytes: config.disk_reserve_mib.saturating_mul(1024 * 1024),
            download_attempts: config.download_attempts,
            retention: Duration::from_secs(config.download_retention_s),
        },
        boot.audit.clone(),
        &mut boot.registry,
        boot.shutdown.clone(),
    )
    .await
    .map_err(|e| StartupError::Config(e.to_string()))?;
    let workers = Workers::start(
        worker_settings(&config)?,
        models.clone(),
        boot.audit.clone(),
        boot.auth.clone(),
        &mut boot.registry,
        boot.shutdown.clone(),
    )
    .await
    .map_err(|e| StartupError::Config(rbee_api::error::chain(&e)))?;
    let shutdown = boot.shutdown.clone();
    let auth = boot.auth.clone();
    let ready_requires_worker = ReadyRequiresWorker::new(config.ready_requires_worker);
    let reloader = std::sync::Arc::new(rbee_http::Reloader::new(
        config.clone(),
        boot.auth.clone(),
        settings,
        RELOADABLE,
    ));
    let state_workers = workers.clone();
    let state_ready = ready_requires_worker.clone();
    let mut daemon = boot
        .bind(router(), |core| AppState {
            core,
            models,
            workers: state_workers,
            ready_requires_worker: state_ready,
        })
        .await?;
    let reload_workers = workers.clone();
    daemon.on_reload(move || {
        let reloader = std::sync::Arc::clone(&reloader);
        let workers = reload_workers.clone();
        let ready = ready_requires_worker.clone();
        async move {
            reloader
                .reload(
                    |new| {
                        let mut errors = Vec::new();
                        if let Err(e) = check_model_flags(new) {
                            errors.push(e.to_string());
                        }
                        let tuning = worker_settings(new)
                            .map_err(|e| e.to_string())
                            .and_then(|s| {
                                workers::Tuning::try_new(s).map_err(|e| rbee_api::error::chain(&e))
                            })
                            .map_err(|e| errors.push(e))
                            .ok();
                        match tuning {
                            Some(t) if errors.is_empty() => Ok((t, new.ready_requires_worker)),
                            _ => Err(errors),
                        }
                    },
                    |(tuning, requires), token| {
                        workers.retune(tuning);
                        ready.set(requires);
                        if let Some(new) = token.new_token() {
                            workers.forward_token(new);
                        }
                        std::future::ready(())
                    },
                )
                .await
        }
    });
    let local = daemon.local_addr();
    let callback_host = if local.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        local.ip()
    };
    let scheme = daemon.scheme();
    workers.set_hive_url(format!(
        "{scheme}://{}",
        SocketAddr::new(callback_host, local.port())
    ));
    let draining = workers.clone();
    daemon.on_drain(async move { draining.shutdown_all().await });
    if let Some(queen_url) = &config.queen_url {
        rbee_http::tls::warn_if_plain("--queen-url", queen_url);
        let registration = queen::Registration {
            queen_url: queen_url.trim_end_matches('/').to_owned(),
            node_name: config.node_name.clone().unwrap_or_else(host::hostname),
            url: config.advertise_url.clone().unwrap_or_else(|| {
                format!(
                    "{scheme}://{}",
                    SocketAddr::new(callback_host, local.port())
                )
            }),
            interval: Duration::from_secs(config.queen_register_interval_s),
        };
        rbee_http::task::spawn(queen::keep_registered(registration, auth, shutdown));
    }
    Ok(Hive { daemon, workers })
}

/// The TLS flags a worker gets from its hive, with absolute paths: workers
/// start in their own directories.
fn tls_args(common: &rbee_http::CommonArgs) -> Result<Vec<String>, StartupError> {
    let mut args = Vec::new();
    for (flag, path) in [
        ("--tls-cert", &common.tls_cert),
        ("--tls-key", &common.tls_key),
        ("--tls-ca", &common.tls_ca),
    ] {
        if let Some(path) = path {
            let path = std::path::absolute(path)
                .map_err(|e| StartupError::Config(format!("{flag} {}: {e}", path.display())))?;
            args.push(flag.to_owned());
            args.push(path.display().to_string());
        }
    }
    Ok(args)
}

fn worker_settings(config: &Config) -> Result<WorkerSettings, StartupError> {
    let worker_binary = match &config.worker_binary {
        // Workers start in their own directories: a relative path is taken
        // from the directory the hive was started in, once, here.
        Some(path) if path.is_relative() => std::env::current_dir()
            .map(|dir| dir.join(path))
            .map_err(|e| {
                StartupError::Config(format!(
                    "cannot resolve the worker binary {}: {e}",
                    path.display()
                ))
            })?,
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join("llm-worker-rbee")))
            .unwrap_or_else(|| PathBuf::from("llm-worker-rbee")),
    };
    Ok(WorkerSettings {
        worker_binary,
        run_dir: config
            .run_dir
            .clone()
            .unwrap_or_else(|| config.models_dir.join("run")),
        bind_host: config.addr.ip(),
        advertise_host: config.advertise_url.as_deref().and_then(workers::url_host),
        tls_args: tls_args(&config.common)?,
        heartbeat_interval: Duration::from_secs(config.worker_heartbeat_interval_s),
        heartbeat_timeout: Duration::from_secs(config.heartbeat_timeout_s),
        health_interval: Duration::from_secs(config.health_interval_s),
        health_failures: config.health_failures,
        load_timeout: Duration::from_secs(config.load_timeout_s),
        stop_grace: Duration::from_secs(config.worker_stop_grace_s),
        restart: RestartConfig {
            kind: PolicyKind::OnFailure,
            backoff_base: Duration::from_millis(config.restart_backoff_base_ms),
            backoff_cap: Duration::from_millis(config.restart_backoff_cap_ms),
            jitter: 0.2,
            max_attempts: config.restart_max_attempts,
            stable_uptime: Duration::from_secs(config.restart_stable_uptime_s),
        },
        breaker: BreakerConfig {
            failure_threshold: config.breaker_threshold,
            window: Duration::from_secs(config.breaker_window_s),
            cooldown: Duration::from_secs(config.breaker_cooldown_s),
            // A probe that loads longer than this has been killed and
            // counted already; past it, the probe is taken as lost.
            probe_timeout: Duration::from_secs(config.load_timeout_s.saturating_mul(2).max(1)),
        },
    })
}

/// Check the model flags, all at once, and load the Hugging Face token.
fn check_model_flags(config: &Config) -> Result<Option<SecretString>, StartupError> {
    let mut errors = Vec::new();
    if !(config.hf_endpoint.starts_with("http://") || config.hf_endpoint.starts_with("https://")) {
        errors.push(format!(
            "--hf-endpoint / HF_ENDPOINT {:?} must be an http:// or https:// URL",
            config.hf_endpoint
        ));
    }
    let token = match &config.hf_token_file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) if !text.trim().is_empty() => Some(text.trim().to_owned()),
            Ok(_) => {
                errors.push(format!("--hf-token-file {} is empty", path.display()));
                None
            }
            Err(e) => {
                errors.push(format!("--hf-token-file {}: {e}", path.display()));
                None
            }
        },
        None => std::env::var("HF_TOKEN")
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty()),
    };
    if errors.is_empty() {
        Ok(token.map(SecretString::from))
    } else {
        Err(StartupError::Config(errors.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use restart_policy::{
        BreakerTransition, CircuitBreaker, Decision, ExitKind, Permit, Reason, RestartPolicy,
        RestartState,
    };

    fn defaults() -> WorkerSettings {
        let config = Config::try_parse_from(["rbee-hive", "--models-dir", "/models"]).unwrap();
        worker_settings(&config).unwrap()
    }

    #[test]
    fn the_default_flags_are_the_contracts_policy() {
        let s = defaults();
        assert_eq!(s.restart.backoff_base, Duration::from_secs(1));
        assert_eq!(s.restart.backoff_cap, Duration::from_secs(60));
        assert!((s.restart.jitter - 0.2).abs() < f64::EPSILON);
        assert_eq!(s.restart.max_attempts, 3);
        assert_eq!(s.restart.stable_uptime, Duration::from_secs(300));
        assert_eq!(s.breaker.failure_threshold, 5);
        assert_eq!(s.breaker.window, Duration::from_secs(300));
        assert_eq!(s.health_failures, 3);
        assert_eq!(s.run_dir, PathBuf::from("/models/run"));
    }

    /// The supervisor's decisions with the default settings, on tokio's
    /// paused clock (the policy reads the time the supervisor passes it).
    #[tokio::test(start_paused = true)]
    async fn default_policy_backs_off_gives_up_and_trips_the_breaker() {
        let s = defaults();
        let policy = RestartPolicy::try_new(s.restart).unwrap();
        let mut breaker = CircuitBreaker::try_new(s.breaker).unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let now = || tokio::time::Instant::now().into_std();

        // One worker crashing right after each start: 1, 2, 4 s (+-20 %),
        // then it is failed for max_attempts.
        let mut worker = RestartState::new();
        for attempt in 0..3u32 {
            worker.record_start(now());
            tokio::time::advance(Duration::from_secs(1)).await;
            let out = policy.on_exit(
                &mut worker,
                &mut breaker,
                ExitKind::Failure,
                now(),
                &mut rng,
            );
            let Decision::Restart { delay, .. } = out.decision else {
                panic!("attempt {attempt}: {:?}", out.decision);
            };
            let nominal = Duration::from_secs(1 << attempt);
            assert!(
                delay >= nominal.mul_f64(0.8) && delay <= nominal.mul_f64(1.2),
                "{delay:?}"
            );
            tokio::time::advance(delay).await;
        }
        worker.record_start(now());
        let out = policy.on_exit(
            &mut worker,
            &mut breaker,
            ExitKind::Failure,
            now(),
            &mut rng,
        );
        assert_eq!(out.decision.reason(), Reason::MaxAttempts);

        // Four failures so far in the window; a second worker of the same
        // (model, device) crashing is the fifth: the breaker opens.
        let mut other = RestartState::new();
        other.record_start(now());
        let out = policy.on_exit(&mut other, &mut breaker, ExitKind::Failure, now(), &mut rng);
        assert_eq!(out.breaker, Some(BreakerTransition::Opened));
        assert_eq!(out.decision.reason(), Reason::CircuitOpen);
        let refused = breaker.try_acquire(now()).unwrap_err();
        assert!(refused.retry_after <= s.breaker.cooldown);

        // After the cooldown exactly one probe spawn goes through; its
        // success closes the breaker.
        tokio::time::advance(s.breaker.cooldown).await;
        assert!(matches!(breaker.try_acquire(now()), Ok(Permit::Probe(_))));
        assert!(breaker.try_acquire(now()).is_err());
        assert_eq!(
            breaker.record_success(now()),
            Some(BreakerTransition::Closed)
        );
        assert_eq!(breaker.try_acquire(now()), Ok(Permit::Normal));

        // Five minutes of healthy uptime reset the attempt count.
        let mut stable = RestartState::new();
        for _ in 0..3 {
            stable.record_start(now());
            let out = policy.on_exit(
                &mut stable,
                &mut breaker,
                ExitKind::Failure,
                now(),
                &mut rng,
            );
            if let Decision::Restart { delay, .. } = out.decision {
                tokio::time::advance(delay).await;
            }
        }
        tokio::time::advance(s.breaker.window).await;
        stable.record_start(now());
        tokio::time::advance(s.restart.stable_uptime).await;
        let out = policy.on_exit(
            &mut stable,
            &mut breaker,
            ExitKind::Failure,
            now(),
            &mut rng,
        );
        assert!(
            matches!(out.decision, Decision::Restart { attempt: 1, .. }),
            "{:?}",
            out.decision
        );
    }
}
