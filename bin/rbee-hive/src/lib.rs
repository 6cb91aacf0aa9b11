//! `rbee-hive`, the pool manager of one GPU host.
//!
//! This crate holds the daemon as a library (so tests can run it in-process
//! on port 0) and a thin `main`. Today it serves the shared routes
//! (`/health`, `/health/live`, `/metrics`, `POST /v1/admin/shutdown`) behind
//! the shared stack (auth, deadlines, request ids, JSON errors); its HTTP
//! metrics carry the contract's names `rbee_hive_requests_total` and
//! `rbee_hive_request_duration_seconds`.

use std::net::SocketAddr;

use axum::extract::FromRef;
use axum::Router;
use rbee_http::{Bootstrap, CommonArgs, CoreState, Daemon, DaemonConfig, Identity, StartupError};

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

    #[command(flatten)]
    /// The flags every daemon has.
    pub common: CommonArgs,
}

impl DaemonConfig for Config {
    fn common(&self) -> &CommonArgs {
        &self.common
    }
}

/// State shared by `rbee-hive`'s handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    core: CoreState,
}

impl FromRef<AppState> for CoreState {
    fn from_ref(state: &AppState) -> Self {
        state.core.clone()
    }
}

/// `rbee-hive`'s own routes (the shared ones are added by [`Bootstrap::bind`]).
///
/// Model and worker routes join here; the backend label of `rbee_build_info`
/// names the backends this build can spawn.
pub fn router() -> Router<AppState> {
    Router::new()
}

/// Open the audit trail, check the token and bind policy, then bind
/// `config.addr`. The returned daemon reports its bound address
/// ([`Daemon::local_addr`]) and serves until SIGTERM/SIGINT or
/// `POST /v1/admin/shutdown` ([`Daemon::run`]).
pub async fn build(config: Config) -> Result<Daemon, StartupError> {
    let boot = Bootstrap::new(
        Identity {
            name: "rbee-hive",
            service_id: "rbee-hive".to_owned(),
            metric_prefix: "rbee_hive",
            backend: "cpu",
        },
        config.addr,
        &config.common,
        Vec::new(),
    )?;
    boot.bind(router(), |core| AppState { core }).await
}
