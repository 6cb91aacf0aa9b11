//! Startup and shutdown: flags every daemon shares, the bind policy, the
//! listening socket, signals, and a bounded drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use audit_logging::{AuditConfig, AuditEvent, AuditLogger, AuditSink, ConfigSetting};
use auth_min::{check_bind_policy, load_token, ApiToken, Authenticator, BindMode, TokenSources};
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::conn::{ConnectionLimits, ConnectionMetrics};
use crate::telemetry::LogFormat;

/// Flags shared by the three daemons (`#[command(flatten)]`).
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// File holding the API token (mode 0600 or stricter, after symlinks).
    /// Without it the token comes from `$CREDENTIALS_DIRECTORY/api-token`,
    /// then `LLORCH_API_TOKEN`.
    #[arg(long, env = "LLORCH_API_TOKEN_FILE", value_name = "PATH")]
    pub api_token_file: Option<PathBuf>,

    /// Log line format; the filter comes from `RUST_LOG` (default `info`).
    #[arg(long, env = "LLORCH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Seconds to finish in-flight requests after SIGTERM/SIGINT or
    /// `POST /v1/admin/shutdown` before closing them.
    #[arg(long, env = "LLORCH_SHUTDOWN_TIMEOUT_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub shutdown_timeout_s: u64,

    /// Seconds a connection may take to send a complete request head, from
    /// acceptance or from the end of its previous response (so it also
    /// closes idle keep-alive connections).
    #[arg(long, env = "LLORCH_HEADER_READ_TIMEOUT_S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_read_timeout_s: u64,

    /// Client connections served at once; at the cap a new connection
    /// replaces the one idle longest. Default: half of the process's
    /// descriptor limit (raised to its hard limit at start) less 64.
    #[arg(long, env = "LLORCH_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: Option<u64>,

    /// Serve HTTPS with this certificate chain (PEM; read again on
    /// SIGHUP). Needs `--tls-key`.
    #[arg(
        long,
        env = "LLORCH_TLS_CERT",
        value_name = "PATH",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// The private key of `--tls-cert` (PEM; read again on SIGHUP).
    #[arg(
        long,
        env = "LLORCH_TLS_KEY",
        value_name = "PATH",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// Verify the daemons this one calls over https:// against these CA
    /// certificates (PEM) and no others. Without it, against the Mozilla
    /// roots.
    #[arg(long, env = "LLORCH_TLS_CA", value_name = "PATH")]
    pub tls_ca: Option<PathBuf>,

    /// Print every route this daemon serves (method, path, whether it needs
    /// the token) as JSON lines, and exit.
    #[arg(long)]
    pub routes: bool,
}

/// Why a daemon could not start. Displays as one line; the process exits 1.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// No usable token.
    #[error(transparent)]
    Token(#[from] auth_min::TokenError),
    /// Bind policy refused the address.
    #[error(transparent)]
    BindPolicy(#[from] auth_min::BindPolicyError),
    /// The socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Requested address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// A daemon-specific setting is invalid.
    #[error("{0}")]
    Config(String),
    /// The server failed while serving.
    #[error("server error: {0}")]
    Serve(std::io::Error),
    /// The audit trail could not be opened.
    #[error(transparent)]
    Audit(#[from] audit_logging::AuditError),
    /// A task of the daemon failed in a way it cannot serve through.
    #[error("{0}")]
    Fatal(String),
}

/// Lets a background task stop the daemon with an error: it drains like a
/// shutdown, then [`Daemon::run`] returns [`StartupError::Fatal`] (exit 1).
#[derive(Debug, Clone)]
pub struct FatalHandle {
    message: std::sync::Arc<parking_lot::Mutex<Option<String>>>,
    shutdown: CancellationToken,
}

impl FatalHandle {
    /// Stop the daemon because of `message`.
    pub fn fail(&self, message: impl Into<String>) {
        let message = message.into();
        tracing::error!("{message}");
        self.message.lock().get_or_insert(message);
        self.shutdown.cancel();
    }
}

/// The token `common`'s sources name (`--api-token-file`, the credentials
/// directory, `LLORCH_API_TOKEN`), checked: at startup and on every reload.
pub(crate) fn configured_token(
    common: &CommonArgs,
) -> Result<Option<ApiToken>, auth_min::TokenError> {
    load_token(&TokenSources::from_process_env(
        common.api_token_file.clone(),
    ))
}

/// Load the token and apply the bind policy for `addr`; the authenticator
/// checks incoming requests and holds the token for outgoing calls. Warns
/// once when serving open on loopback.
pub fn resolve_auth(addr: SocketAddr, common: &CommonArgs) -> Result<Authenticator, StartupError> {
    let token = configured_token(common)?;
    match check_bind_policy(addr, token.as_ref())? {
        BindMode::OpenLoopback => tracing::warn!(
            %addr,
            "no API token configured: serving without authentication on loopback (development only)"
        ),
        BindMode::Authenticated => {
            if let Some(t) = &token {
                tracing::info!(token_fp = %t.fingerprint(), "API token loaded");
            }
        }
    }
    Ok(Authenticator::from_config(token.as_ref()))
}

/// The process's CA bundle for its clients (`--tls-ca`), and the server's
/// certificate and key when it serves HTTPS (`--tls-cert`, `--tls-key`).
fn load_tls(
    common: &CommonArgs,
) -> Result<Option<std::sync::Arc<crate::tls::ServerTls>>, StartupError> {
    crate::tls::set_client_ca(common.tls_ca.as_deref())
        .map_err(|e| StartupError::Config(format!("--tls-ca: {e}")))?;
    match (&common.tls_cert, &common.tls_key) {
        (Some(cert), Some(key)) => crate::tls::ServerTls::load(cert, key)
            .map(|tls| Some(std::sync::Arc::new(tls)))
            .map_err(|e| StartupError::Config(format!("--tls-cert/--tls-key: {e}"))),
        _ => Ok(None),
    }
}

/// A bound, not yet serving daemon.
pub struct Daemon {
    name: &'static str,
    listener: TcpListener,
    local_addr: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
    drain: Duration,
    audit: Option<AuditLogger>,
    fatal: FatalHandle,
    drain_hooks: Vec<DrainHook>,
    reload: Option<crate::reload::ReloadHook>,
    reload_metrics: crate::reload::ReloadMetrics,
    limits: ConnectionLimits,
    conn_metrics: ConnectionMetrics,
    tls: Option<std::sync::Arc<crate::tls::ServerTls>>,
}

/// Work to do while draining, awaited (within the drain bound) before
/// [`Daemon::run`] returns.
type DrainHook = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("name", &self.name)
            .field("local_addr", &self.local_addr)
            .field("drain", &self.drain)
            .field("drain_hooks", &self.drain_hooks.len())
            .field("reload", &self.reload.is_some())
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// Bind `addr` (port 0 lets the OS choose; see [`local_addr`](Self::local_addr)).
    pub async fn bind(
        name: &'static str,
        addr: SocketAddr,
        router: Router,
        shutdown: CancellationToken,
        drain: Duration,
    ) -> Result<Self, StartupError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartupError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| StartupError::Bind { addr, source })?;
        Ok(Self {
            name,
            listener,
            local_addr,
            router,
            fatal: FatalHandle {
                message: std::sync::Arc::default(),
                shutdown: shutdown.clone(),
            },
            shutdown,
            drain,
            audit: None,
            drain_hooks: Vec::new(),
            reload: None,
            reload_metrics: crate::reload::ReloadMetrics::default(),
            limits: ConnectionLimits::default(),
            conn_metrics: ConnectionMetrics::default(),
            tls: None,
        })
    }

    /// `https` when this daemon serves TLS, else `http`: the scheme of the
    /// URLs it gives others for itself.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Serve with `limits` instead of the defaults.
    pub fn set_connection_limits(&mut self, limits: ConnectionLimits) {
        self.limits = limits;
    }

    /// Run `hook` on SIGHUP: it reads the configuration again, checks it
    /// whole and applies it, or returns every problem and changes nothing.
    /// Without a hook SIGHUP is logged and ignored. See [`crate::reload`].
    pub fn on_reload<F, Fut>(&mut self, hook: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = crate::reload::ReloadResult> + Send + 'static,
    {
        self.reload = Some(std::sync::Arc::new(move || Box::pin(hook())));
    }

    /// Run `hook` once draining starts, alongside the server's own drain;
    /// [`run`](Self::run) waits for it within the drain bound.
    pub fn on_drain(&mut self, hook: impl std::future::Future<Output = ()> + Send + 'static) {
        self.drain_hooks.push(Box::pin(hook));
    }

    /// A handle for background tasks to stop the daemon with an error.
    pub fn fatal_handle(&self) -> FatalHandle {
        self.fatal.clone()
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serve until SIGTERM/SIGINT or the shutdown token; then stop accepting,
    /// let in-flight requests finish for at most the drain bound, and return.
    pub async fn run(self) -> Result<(), StartupError> {
        // Register the handlers before announcing the address: a SIGTERM that
        // arrives right after the listening line must drain, not kill.
        let signals = SignalHandlers::install();
        let scheme = self.scheme();
        let reload = self.reload.map(|hook| crate::reload::Reload {
            name: self.name,
            tls: self.tls.clone(),
            hook,
            audit: self.audit.as_ref().map(AuditLogger::sink),
            metrics: self.reload_metrics,
        });
        crate::task::spawn(signals.cancel_on_signal(self.shutdown.clone(), reload));
        tracing::info!(addr = %self.local_addr, scheme, version = env!("CARGO_PKG_VERSION"), "{} listening", self.name);
        // Under systemd (`Type=notify`) the unit becomes active now, once
        // the socket accepts; without NOTIFY_SOCKET this does nothing.
        notify_service_manager(&[sd_notify::NotifyState::Ready]);
        tracing::info!(
            max_connections = self.limits.max_connections,
            header_read_timeout_s = self.limits.header_timeout.as_secs(),
            "serving connections"
        );
        let server = crate::conn::serve(
            self.listener,
            self.router,
            self.limits,
            self.conn_metrics,
            self.shutdown.clone(),
            self.tls,
        );
        let shutdown = self.shutdown.clone();
        let drain = self.drain;
        let hooks: Vec<_> = self
            .drain_hooks
            .into_iter()
            .map(|hook| {
                let shutdown = shutdown.clone();
                crate::task::spawn(async move {
                    shutdown.cancelled().await;
                    hook.await;
                })
            })
            .collect();
        let drain_started = std::sync::Arc::new(std::sync::OnceLock::<tokio::time::Instant>::new());
        let started = std::sync::Arc::clone(&drain_started);
        let watch = shutdown.clone();
        // Whoever sees the drain start first tells systemd, once: this task,
        // or the code after the server returns (an idle server can stop
        // before the task has run).
        let stopping = |started: &std::sync::OnceLock<tokio::time::Instant>| {
            if started.set(tokio::time::Instant::now()).is_ok() {
                notify_service_manager(&[sd_notify::NotifyState::Stopping]);
            }
        };
        crate::task::spawn(async move {
            watch.cancelled().await;
            stopping(&started);
        });
        let result = tokio::select! {
            () = server => {
                tracing::info!("{} stopped", self.name);
                Ok(())
            }
            () = async move {
                shutdown.cancelled().await;
                tokio::time::sleep(drain).await;
            } => {
                tracing::warn!(drain_s = drain.as_secs(), "drain bound reached; closing remaining connections");
                Ok(())
            }
        };
        stopping(&drain_started);
        let bound = drain_started
            .get()
            .map_or(drain, |t| drain.saturating_sub(t.elapsed()));
        if !hooks.is_empty()
            && tokio::time::timeout(bound, async move {
                // Already running concurrently: awaiting in turn waits for all.
                for hook in hooks {
                    let _ = hook.await;
                }
            })
            .await
            .is_err()
        {
            tracing::warn!("drain bound reached before every drain task finished");
        }
        if let Some(audit) = self.audit {
            // Write and fsync every queued record before the process exits.
            let _ = crate::task::spawn_blocking(move || audit.shutdown()).await;
        }
        let fatal = self.fatal.message.lock().take();
        match fatal {
            Some(message) => Err(StartupError::Fatal(message)),
            None => result,
        }
    }
}

/// Tell systemd (the socket in `NOTIFY_SOCKET`) about a state change; a
/// daemon not started by systemd has no socket and nothing is sent.
fn notify_service_manager(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

struct SignalHandlers {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl SignalHandlers {
    fn install() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        if term.is_err() || int.is_err() {
            tracing::error!(
                "cannot install SIGTERM/SIGINT handlers; only the admin route can stop the daemon gracefully"
            );
        }
        // SIGHUP's default action ends the process; a daemon asked to
        // reload must not die of it, even one that cannot reload.
        let hup = signal(SignalKind::hangup());
        Self {
            term: term.ok(),
            int: int.ok(),
            hup: hup.ok(),
        }
    }

    async fn cancel_on_signal(
        self,
        shutdown: CancellationToken,
        reload: Option<crate::reload::Reload>,
    ) {
        let (Some(mut term), Some(mut int)) = (self.term, self.int) else {
            return;
        };
        let mut hup = self.hup;
        loop {
            tokio::select! {
                _ = term.recv() => {
                    tracing::info!("SIGTERM received; draining");
                    break;
                }
                _ = int.recv() => {
                    tracing::info!("SIGINT received; draining");
                    break;
                }
                Some(()) = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => match &reload {
                    // One reload at a time, in the order the signals came;
                    // a drain signal waits for the reload in progress.
                    Some(r) => {
                        // systemd shows the unit as reloading until READY=1.
                        notify_service_manager(&[sd_notify::NotifyState::Reloading]);
                        r.run().await;
                        notify_service_manager(&[sd_notify::NotifyState::Ready]);
                    }
                    None => tracing::warn!(
                        "SIGHUP received: this daemon has no settings to reload; running settings unchanged"
                    ),
                },
                () = shutdown.cancelled() => return,
            }
        }
        shutdown.cancel();
    }
}

/// A daemon's configuration, as far as the shared startup needs it.
pub trait DaemonConfig: clap::Parser {
    /// The shared flags.
    fn common(&self) -> &CommonArgs;

    /// The address to listen on.
    fn addr(&self) -> SocketAddr;

    /// The environment variable that, like `--config`, names the daemon's
    /// TOML settings file; `None` for a daemon without one.
    const SETTINGS_FILE_ENV: Option<&'static str> = None;

    /// Run the HTTP side on one thread whatever the CPUs: for a daemon whose
    /// real work runs on threads of its own (the worker's compute threads),
    /// where more runtime threads would only compete with them for cores.
    const ONE_RUNTIME_THREAD: bool = false;

    /// Read the configuration from the process's arguments and environment,
    /// merging the settings file if the daemon has one; exits like clap on
    /// errors.
    fn load() -> Self {
        match Self::SETTINGS_FILE_ENV {
            Some(env) => crate::config_file::parse_with_file(
                Self::command().get_name(),
                env,
                std::env::args_os().collect(),
            ),
            None => Self::parse(),
        }
    }

    /// [`load`](Self::load) again while running (SIGHUP): the same
    /// arguments, environment and settings file, with every problem
    /// returned instead of ending the process.
    fn try_load() -> Result<Self, Vec<String>> {
        match Self::SETTINGS_FILE_ENV {
            Some(env) => {
                crate::config_file::try_parse_with_file(env, std::env::args_os().collect())
            }
            None => Self::try_parse().map_err(|e| vec![crate::config_file::clap_message(&e)]),
        }
    }

    /// The daemon's own routes, as its router has them (`--routes`; the
    /// shared routes are added by [`main_entry`]).
    fn routes() -> Vec<crate::RouteEntry>;
}

/// The usual `main`: parse flags, start logging, build a multi-threaded
/// runtime, run `serve`. A startup error is printed as one line and exits 1;
/// a graceful stop exits 0.
pub fn main_entry<C, F, Fut>(name: &'static str, serve: F) -> std::process::ExitCode
where
    C: DaemonConfig,
    F: FnOnce(C) -> Fut,
    Fut: std::future::Future<Output = Result<(), StartupError>>,
{
    let config = C::load();
    if config.common().routes {
        let shared = crate::Routes::<crate::CoreState>::new().merge(crate::core_routes());
        for route in C::routes().iter().chain(shared.table()) {
            match serde_json::to_string(route) {
                Ok(line) => println!("{line}"),
                Err(e) => {
                    eprintln!("{name}: error: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            }
        }
        return std::process::ExitCode::SUCCESS;
    }
    crate::telemetry::init_tracing(config.common().log_format);
    let descriptors = crate::conn::raise_descriptor_limit();
    tracing::debug!(descriptors, "descriptor limit");
    let runtime = match runtime_builder(C::ONE_RUNTIME_THREAD).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(async {
        // SIGHUP's default action ends the process. Catch it from here on
        // (tokio's handler stays installed for the life of the process), so
        // one that arrives before the daemon serves, such as a hive handing
        // a rotated token to a worker that is just starting, is harmless.
        let early_hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        drop(early_hup);
        serve(config).await
    }) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The async runtime for a daemon: work-stealing across threads when the
/// process may use several CPUs; one thread when it may use one (a
/// container's limit, `taskset`), where stealing has no one to steal from
/// and its bookkeeping is pure cost on every wake-up, or when the daemon
/// asks for one.
fn runtime_builder(one_thread: bool) -> tokio::runtime::Builder {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    if cpus == 1 || one_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
}

/// Who a daemon is, for logs, metrics and the audit trail.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Binary name, e.g. `rbee-hive`.
    pub name: &'static str,
    /// Audit service id: `queen-rbee`, `rbee-hive`, `llm-worker-rbee-<worker_id>`.
    pub service_id: String,
    /// Prefix of the HTTP metrics (`rbee_hive` gives `rbee_hive_requests_total`).
    pub metric_prefix: &'static str,
    /// The `backend` label of `rbee_build_info`.
    pub backend: &'static str,
}

/// Everything a daemon needs before it adds its own routes: the audit
/// trail, the checked token, a metrics registry with the shared metrics in
/// it, the shutdown token and the layer stack.
#[derive(Debug)]
pub struct Bootstrap {
    name: &'static str,
    addr: SocketAddr,
    drain: Duration,
    audit_logger: AuditLogger,
    reload_metrics: crate::reload::ReloadMetrics,
    limits: ConnectionLimits,
    conn_metrics: ConnectionMetrics,
    tls: Option<std::sync::Arc<crate::tls::ServerTls>>,
    /// Emits audit events (a no-op when audit is disabled).
    pub audit: AuditSink,
    /// The accepted token set, shared with the auth layer, and the token
    /// for outgoing calls ([`auth_min::send_authenticated`]); a reload
    /// rotates it in place.
    pub auth: Authenticator,
    /// Register the daemon's own metrics here before [`bind`](Self::bind).
    pub registry: prometheus_client::registry::Registry,
    /// Cancelled when draining starts.
    pub shutdown: CancellationToken,
    /// The layers; adjust before [`bind`](Self::bind).
    pub stack: crate::HttpStack,
}

impl Bootstrap {
    /// Open the audit trail (`LLORCH_AUDIT_*`), check the token and bind
    /// policy for `addr`, and register the shared metrics. The configuration
    /// is audited: `config_loaded` with the common settings plus `settings`,
    /// or `config_invalid` with the reason before the error is returned.
    pub fn new(
        identity: Identity,
        addr: SocketAddr,
        common: &CommonArgs,
        settings: Vec<ConfigSetting>,
    ) -> Result<Self, StartupError> {
        let audit_config = AuditConfig::from_env(identity.service_id.clone())?;
        let audit_logger = AuditLogger::open(&audit_config)?;
        let audit = audit_logger.sink();
        let checked = resolve_auth(addr, common).and_then(|auth| Ok((auth, load_tls(common)?)));
        let (auth, tls) = match checked {
            Ok(checked) => checked,
            Err(e) => {
                audit.emit(
                    None,
                    AuditEvent::ConfigInvalid {
                        errors: vec![e.to_string()],
                    },
                );
                audit_logger.shutdown();
                return Err(e);
            }
        };
        let mut all = crate::reload::common_settings(addr, common, auth.token().as_ref());
        all.push(ConfigSetting::new(
            "audit_flush",
            format!("{:?}", audit_config.flush),
        ));
        all.extend(settings);
        audit.emit(None, AuditEvent::ConfigLoaded { settings: all });

        let mut registry = prometheus_client::registry::Registry::default();
        crate::metrics::register_build_info(
            &mut registry,
            env!("CARGO_PKG_VERSION"),
            identity.backend,
        );
        audit.register_metrics(&mut registry);
        let reload_metrics = crate::reload::ReloadMetrics::register(&mut registry);
        let conn_metrics = ConnectionMetrics::register(&mut registry, identity.metric_prefix);
        let limits = ConnectionLimits {
            header_timeout: Duration::from_secs(common.header_read_timeout_s),
            max_connections: common
                .max_connections
                .map_or_else(crate::conn::default_max_connections, |n| {
                    usize::try_from(n).unwrap_or(usize::MAX)
                }),
        };
        let mut stack = crate::HttpStack::new(&mut registry, identity.metric_prefix, auth.clone());
        if audit.is_enabled() {
            stack = stack.with_auth_observer(std::sync::Arc::new(
                crate::audit::AuditAuthObserver::new(audit.clone()),
            ));
        }
        Ok(Self {
            name: identity.name,
            addr,
            drain: Duration::from_secs(common.shutdown_timeout_s),
            audit_logger,
            audit,
            auth,
            reload_metrics,
            limits,
            conn_metrics,
            tls,
            registry,
            shutdown: CancellationToken::new(),
            stack,
        })
    }

    /// Merge the shared routes into `routes`, give them the state
    /// `make_state` builds around the [`CoreState`](crate::CoreState), wrap
    /// everything in the stack and bind the socket.
    pub async fn bind<S>(
        self,
        routes: crate::Routes<S>,
        make_state: impl FnOnce(crate::CoreState) -> S,
    ) -> Result<Daemon, StartupError>
    where
        S: Clone + Send + Sync + 'static,
        crate::CoreState: axum::extract::FromRef<S>,
    {
        let core = crate::CoreState::new(
            self.registry,
            self.shutdown.clone(),
            env!("CARGO_PKG_VERSION"),
        );
        let router = routes
            .merge(crate::core_routes())
            .into_router()
            .with_state(make_state(core));
        let mut daemon = Daemon::bind(
            self.name,
            self.addr,
            self.stack.apply(router),
            self.shutdown,
            self.drain,
        )
        .await?;
        daemon.audit = Some(self.audit_logger);
        daemon.reload_metrics = self.reload_metrics;
        daemon.limits = self.limits;
        daemon.conn_metrics = self.conn_metrics;
        daemon.tls = self.tls;
        Ok(daemon)
    }
}
