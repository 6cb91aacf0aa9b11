//! `llm-worker-rbee`, one loaded model served over HTTP.
//!
//! This crate holds the daemon as a library (so tests can run it in-process
//! on port 0) and a thin `main`. Today it serves the shared routes
//! (`/health`, `/health/live`, `/metrics`, `POST /v1/admin/shutdown`) behind
//! the shared stack (auth, deadlines, request ids, JSON errors). It is the
//! only crate that will depend on candle.

use std::net::SocketAddr;

use audit_logging::ConfigSetting;
use axum::extract::FromRef;
use axum::Router;
use rbee_http::{Bootstrap, CommonArgs, CoreState, Daemon, DaemonConfig, Identity, StartupError};

/// `llm-worker-rbee`'s flags; each also reads the environment variable it names.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "llm-worker-rbee",
    version,
    about = "One loaded model served over HTTP, tokens streamed as they are produced"
)]
pub struct Config {
    /// Address to listen on; port 0 lets the OS choose.
    #[arg(long, env = "RBEE_WORKER_ADDR", default_value = "127.0.0.1:8001")]
    pub addr: SocketAddr,

    /// The id the hive gave this worker (1 to 64 of `A-Z a-z 0-9 . _ : -`);
    /// names its audit directory `llm-worker-rbee-<id>`.
    #[arg(long, env = "RBEE_WORKER_ID", default_value = "standalone", value_parser = parse_worker_id)]
    pub worker_id: String,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: CommonArgs,
}

fn parse_worker_id(value: &str) -> Result<String, String> {
    if rbee_api::inference::is_valid_id(value, 64) && !value.starts_with('.') {
        Ok(value.to_owned())
    } else {
        Err(
            "expected 1 to 64 characters of A-Z a-z 0-9 . _ : -, not starting with a dot"
                .to_owned(),
        )
    }
}

impl DaemonConfig for Config {
    fn common(&self) -> &CommonArgs {
        &self.common
    }
}

/// State shared by `llm-worker-rbee`'s handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    core: CoreState,
}

impl FromRef<AppState> for CoreState {
    fn from_ref(state: &AppState) -> Self {
        state.core.clone()
    }
}

/// `llm-worker-rbee`'s own routes (the shared ones are added by [`Bootstrap::bind`]).
///
/// Inference routes join here; the backend label of `rbee_build_info` is the
/// backend this build was compiled for.
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
            name: "llm-worker-rbee",
            service_id: format!("llm-worker-rbee-{}", config.worker_id),
            metric_prefix: "rbee_worker_http",
            backend: "cpu",
        },
        config.addr,
        &config.common,
        vec![ConfigSetting::new("worker_id", &config.worker_id)],
    )?;
    boot.bind(router(), |core| AppState { core }).await
}
