//! `queen-rbee`, the orchestrator users and OpenAI clients talk to.
//!
//! This crate holds the daemon as a library (so tests can run it in-process
//! on port 0) and a thin `main`. The pieces:
//!
//! - [`store`]: the hive registry in SQLite (`--database`);
//! - [`hives`]: the registry in memory, one poller per hive, spawns;
//! - [`sched`]: admission, per-model queues, least-outstanding routing;
//! - [`proxy`]: one request through the queen, streaming relay included;
//! - [`routes`]: the HTTP surface; [`metrics`]: `rbee_queen_*`.

pub(crate) mod hives;
pub(crate) mod metrics;
pub(crate) mod proxy;
pub(crate) mod routes;
pub(crate) mod sched;
pub(crate) mod store;
pub(crate) mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use audit_logging::{AuditSink, ConfigSetting};
use auth_min::{send_authenticated, Authenticator};
use axum::extract::FromRef;
use deadline_propagation::{DefaultDeadline, MaxDeadline};
use rbee_http::{Bootstrap, CommonArgs, CoreState, Daemon, DaemonConfig, Identity, StartupError};

use hives::{normalize_url, Hives, PollSettings};
use metrics::QueenMetrics;
use proxy::Jobs;
use sched::Scheduler;
use store::Store;

/// `queen-rbee`'s flags; each also reads the environment variable it names.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "queen-rbee",
    version,
    about = "The rbee orchestrator: admission, queueing and routing across hives, behind the OpenAI-compatible API"
)]
pub struct Config {
    /// Address to listen on; port 0 lets the OS choose.
    #[arg(long, env = "RBEE_QUEEN_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,

    /// A hive's base URL (repeat the flag, or separate with commas in the
    /// environment variable). Its node name is its `host:port`.
    #[arg(
        long = "hive",
        env = "RBEE_QUEEN_HIVES",
        value_name = "URL",
        value_delimiter = ','
    )]
    pub hives: Vec<String>,

    /// The hive registry (SQLite). Default: `rbee/queen.sqlite3` under the
    /// user's data directory (`$XDG_DATA_HOME`, else `~/.local/share`).
    #[arg(long, env = "RBEE_QUEEN_DATABASE", value_name = "PATH")]
    pub database: Option<PathBuf>,

    /// Waiting requests allowed per model; more are refused with 429.
    #[arg(long, env = "RBEE_QUEEN_MAX_QUEUE", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_queue: u32,

    /// Deadline given to requests that carry neither `X-Deadline` nor
    /// `X-Timeout-Ms`, in milliseconds.
    #[arg(long, env = "RBEE_DEFAULT_DEADLINE_MS", default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    pub default_deadline_ms: u64,

    /// The longest deadline a request may carry, in milliseconds: a later
    /// `X-Deadline` or a longer `X-Timeout-Ms` is shortened to it (and
    /// forwarded so), so that no request holds a worker for longer.
    #[arg(long, env = "RBEE_MAX_DEADLINE_MS", default_value_t = 3_600_000, value_parser = clap::value_parser!(u64).range(1..=deadline_propagation::MAX_TIMEOUT_MS))]
    pub max_deadline_ms: u64,

    /// The workers' stall timeout (`llm-worker-rbee --stall-timeout-s`,
    /// the same environment variable), in seconds. A streaming answer
    /// whose head does not come, or whose body goes quiet, for this much
    /// plus as much again up to 5 s is a failed worker.
    #[arg(long, env = "RBEE_WORKER_STALL_TIMEOUT_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub worker_stall_timeout_s: u64,

    /// Time between polls of each hive, in milliseconds.
    #[arg(long, env = "RBEE_HIVE_POLL_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=600_000))]
    pub hive_poll_interval_ms: u64,

    /// Bound of one poll, in milliseconds.
    #[arg(long, env = "RBEE_HIVE_POLL_TIMEOUT_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(50..=600_000))]
    pub hive_poll_timeout_ms: u64,

    /// Failed polls in a row that mark a hive unreachable.
    #[arg(long, env = "RBEE_HIVE_MISSES", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub hive_misses: u32,

    /// How long a worker the queen asked for may take to become ready, in
    /// seconds.
    #[arg(long, env = "RBEE_SPAWN_TIMEOUT_S", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub spawn_timeout_s: u64,

    /// On SIGTERM, also ask every reachable hive to shut down.
    #[arg(long, env = "RBEE_CASCADE_SHUTDOWN")]
    pub cascade_shutdown: bool,

    /// A TOML settings file; keys are the long flag names (`hive` takes
    /// an array). Flags and environment variables win over it.
    #[arg(long, env = "RBEE_QUEEN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    /// The flags every daemon has.
    pub common: CommonArgs,
}

impl DaemonConfig for Config {
    const SETTINGS_FILE_ENV: Option<&'static str> = Some("RBEE_QUEEN_CONFIG");

    fn common(&self) -> &CommonArgs {
        &self.common
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn routes() -> Vec<rbee_http::RouteEntry> {
        routes::router().table().to_vec()
    }
}

/// The settings a SIGHUP reload applies to the running queen (besides the
/// API token). Hives new to the list are added; hives no longer listed stay
/// registered until `POST /v2/hives/remove`. The others need a restart.
const RELOADABLE: &[&str] = &[
    "hives",
    "max_queue",
    "default_deadline_ms",
    "max_deadline_ms",
    "hive_poll_interval_ms",
    "hive_poll_timeout_ms",
    "hive_misses",
    "spawn_timeout_s",
    "cascade_shutdown",
];

/// The queen's own settings, as audited at startup and compared on reload.
fn settings(config: &Config) -> Vec<ConfigSetting> {
    vec![
        ConfigSetting::new("hives", config.hives.join(",")),
        ConfigSetting::new("database", config.database_path().display()),
        ConfigSetting::new("max_queue", config.max_queue),
        ConfigSetting::new("default_deadline_ms", config.default_deadline_ms),
        ConfigSetting::new("max_deadline_ms", config.max_deadline_ms),
        ConfigSetting::new("worker_stall_timeout_s", config.worker_stall_timeout_s),
        ConfigSetting::new("hive_poll_interval_ms", config.hive_poll_interval_ms),
        ConfigSetting::new("hive_poll_timeout_ms", config.hive_poll_timeout_ms),
        ConfigSetting::new("hive_misses", config.hive_misses),
        ConfigSetting::new("spawn_timeout_s", config.spawn_timeout_s),
        ConfigSetting::new("cascade_shutdown", config.cascade_shutdown),
    ]
}

/// The hive URLs of `--hive`, normalised, or every bad one.
fn hive_urls(config: &Config) -> Result<Vec<String>, Vec<String>> {
    let mut urls = Vec::new();
    let mut bad = Vec::new();
    for url in &config.hives {
        match normalize_url(url) {
            Ok(u) => urls.push(u),
            Err(e) => bad.push(format!("--hive {url}: {}", e.message)),
        }
    }
    if bad.is_empty() {
        Ok(urls)
    } else {
        Err(bad)
    }
}

fn poll_settings(config: &Config) -> PollSettings {
    PollSettings {
        interval: Duration::from_millis(config.hive_poll_interval_ms),
        timeout: Duration::from_millis(config.hive_poll_timeout_ms),
        misses: config.hive_misses,
        spawn_timeout: Duration::from_secs(config.spawn_timeout_s),
    }
}

impl Config {
    /// The registry file: `--database`, else the user's data directory.
    pub fn database_path(&self) -> PathBuf {
        self.database.clone().unwrap_or_else(|| {
            dirs::data_dir()
                .unwrap_or_else(|| PathBuf::from("."))
                .join("rbee")
                .join("queen.sqlite3")
        })
    }
}

/// State shared by `queen-rbee`'s handlers: one allocation, so that a
/// handler's copy is one reference count.
#[derive(Debug, Clone)]
pub struct AppState(std::sync::Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] holds.
#[derive(Debug)]
pub struct Shared {
    core: CoreState,
    sched: Scheduler,
    hives: Hives,
    jobs: Jobs,
    metrics: QueenMetrics,
    audit: AuditSink,
    client: reqwest::Client,
    upstream: std::sync::Arc<upstream::Upstream>,
    auth: Authenticator,
}

impl FromRef<AppState> for CoreState {
    fn from_ref(state: &AppState) -> Self {
        state.core.clone()
    }
}

/// Open the audit trail and the registry, check the token and bind policy,
/// start polling the known hives, then bind `config.addr`. The returned
/// daemon reports its bound address ([`Daemon::local_addr`]) and serves
/// until SIGTERM/SIGINT or `POST /v1/admin/shutdown` ([`Daemon::run`]).
pub async fn build(config: Config) -> Result<Daemon, StartupError> {
    let flag_urls = hive_urls(&config).map_err(|bad| StartupError::Config(bad.join("; ")))?;
    for url in &flag_urls {
        rbee_http::tls::warn_if_plain("--hive", url);
    }
    let database = config.database_path();
    let mut boot = Bootstrap::new(
        Identity {
            name: "queen-rbee",
            service_id: "queen-rbee".to_owned(),
            metric_prefix: "rbee_queen_http",
            backend: "none",
        },
        config.addr,
        &config.common,
        settings(&config),
    )?;
    let store = Store::open(&database)
        .await
        .map_err(|e| StartupError::Config(e.to_string()))?;
    let metrics = QueenMetrics::register(&mut boot.registry);
    let (sched, spawn_orders) = Scheduler::new(config.max_queue as usize, metrics.clone());
    let hives = Hives::new(
        store,
        sched.clone(),
        boot.auth.clone(),
        poll_settings(&config),
        boot.audit.clone(),
        boot.shutdown.clone(),
    );
    hives.run_spawns(spawn_orders);
    sched.run_rechecks(boot.shutdown.clone());
    hives
        .load(&flag_urls)
        .await
        .map_err(|e| StartupError::Config(e.body().error.message.clone()))?;
    let default_deadline = DefaultDeadline::new(Duration::from_millis(config.default_deadline_ms));
    boot.stack = boot.stack.with_default_deadline(default_deadline.clone());
    let max_deadline = MaxDeadline::new(Duration::from_millis(config.max_deadline_ms));
    boot.stack = boot.stack.with_max_deadline(max_deadline.clone());
    let timeouts =
        upstream::Timeouts::from_stall(Duration::from_secs(config.worker_stall_timeout_s));
    let expired = metrics.clone();
    boot.stack = boot.stack.on_deadline_expired(std::sync::Arc::new(move || {
        expired.deadline_exceeded(metrics::Stage::Admission);
    }));
    let auth = boot.auth.clone();
    let audit = boot.audit.clone();
    let reloader = std::sync::Arc::new(rbee_http::Reloader::new(
        config.clone(),
        boot.auth.clone(),
        settings,
        RELOADABLE,
    ));
    let cascade_on =
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(config.cascade_shutdown));
    let reload_hives = hives.clone();
    let reload_sched = sched.clone();
    let reload_cascade = std::sync::Arc::clone(&cascade_on);
    let cascade_sched = sched.clone();
    let cascade_auth = boot.auth.clone();
    let mut daemon = boot
        .bind(routes::router(), |core| {
            AppState(std::sync::Arc::new(Shared {
                core,
                sched,
                hives,
                jobs: Jobs::default(),
                metrics,
                audit,
                client: rbee_http::client::http_client(),
                upstream: upstream_pool(timeouts),
                auth,
            }))
        })
        .await?;
    daemon.on_drain(async move {
        if cascade_on.load(std::sync::atomic::Ordering::Relaxed) {
            cascade(cascade_sched, cascade_auth).await;
        }
    });
    daemon.on_reload(move || {
        let reloader = std::sync::Arc::clone(&reloader);
        let hives = reload_hives.clone();
        let sched = reload_sched.clone();
        let cascade = std::sync::Arc::clone(&reload_cascade);
        let default_deadline = default_deadline.clone();
        let max_deadline = max_deadline.clone();
        async move {
            reloader
                .reload(
                    |new| Ok((hive_urls(new)?, new.clone())),
                    |(urls, new), _| async move {
                        sched.set_max_queue(new.max_queue as usize);
                        default_deadline.set(Duration::from_millis(new.default_deadline_ms));
                        max_deadline.set(Duration::from_millis(new.max_deadline_ms));
                        hives.set_poll(poll_settings(&new));
                        cascade.store(new.cascade_shutdown, std::sync::atomic::Ordering::Relaxed);
                        for url in &urls {
                            if let Err(e) = hives.add_configured(url).await {
                                tracing::error!(hive = %url, error = %e.body().error.message, "cannot add the hive from the reloaded settings");
                            }
                        }
                    },
                )
                .await
        }
    });
    Ok(daemon)
}

/// The worker connection pool, with a task that closes its stale
/// connections (the task ends with the runtime).
fn upstream_pool(timeouts: upstream::Timeouts) -> std::sync::Arc<upstream::Upstream> {
    let pool = std::sync::Arc::new(upstream::Upstream::new(timeouts));
    let weak = std::sync::Arc::downgrade(&pool);
    rbee_http::task::spawn(async move {
        let mut tick = tokio::time::interval(upstream::IDLE_MAX / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match weak.upgrade() {
                Some(pool) => pool.prune(),
                None => return,
            }
        }
    });
    pool
}

/// Ask every reachable hive to shut down (`--cascade-shutdown`).
async fn cascade(sched: Scheduler, auth: Authenticator) {
    let client = rbee_http::client::http_client();
    let calls = sched.reachable_urls().into_iter().map(|url| {
        let request = client
            .post(format!("{url}/v1/admin/shutdown"))
            .json(&rbee_api::health::AdminShutdown {})
            .timeout(Duration::from_secs(10));
        let auth = auth.clone();
        async move {
            match send_authenticated(request, &auth).await {
                Ok(r) => tracing::info!(hive = %url, status = r.status().as_u16(), "asked the hive to shut down"),
                Err(e) => tracing::warn!(hive = %url, error = %e, "could not ask the hive to shut down"),
            }
        }
    });
    futures_util::future::join_all(calls).await;
}
