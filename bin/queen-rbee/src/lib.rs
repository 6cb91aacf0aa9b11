//! `queen-rbee`, the orchestrator users and OpenAI clients talk to.
//!
//! This crate holds the daemon as a library (so tests can run it in-process
//! on port 0) and a thin `main`. Today it serves the shared routes
//! (`/health`, `/health/live`, `/metrics`, `POST /v1/admin/shutdown`) behind
//! the shared stack (auth, deadlines, request ids, JSON errors).

use std::net::SocketAddr;

use axum::extract::FromRef;
use axum::Router;
use rbee_http::{Bootstrap, CommonArgs, CoreState, Daemon, DaemonConfig, Identity, StartupError};

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

    #[command(flatten)]
    /// The flags every daemon has.
    pub common: CommonArgs,
}

impl DaemonConfig for Config {
    fn common(&self) -> &CommonArgs {
        &self.common
    }
}

/// State shared by `queen-rbee`'s handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    core: CoreState,
}

impl FromRef<AppState> for CoreState {
    fn from_ref(state: &AppState) -> Self {
        state.core.clone()
    }
}

/// `queen-rbee`'s own routes (the shared ones are added by [`Bootstrap::bind`]).
///
/// Admission, queueing and routing routes join here; the backend label of
/// `rbee_build_info` is `none` because the queen runs no model.
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
            name: "queen-rbee",
            service_id: "queen-rbee".to_owned(),
            metric_prefix: "rbee_queen_http",
            backend: "none",
        },
        config.addr,
        &config.common,
        Vec::new(),
    )?;
    boot.bind(router(), |core| AppState { core }).await
}
