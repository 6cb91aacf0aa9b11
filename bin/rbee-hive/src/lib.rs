//! `rbee-hive`, the pool manager of one GPU host.
//!
//! This crate holds the daemon as a library (so tests can run it in-process
//! on port 0) and a thin `main`. It serves the shared routes (`/health`,
//! `/health/live`, `/metrics`, `POST /v1/admin/shutdown`) and the model
//! routes ([`models`]) behind the shared stack (auth, deadlines, request
//! ids, JSON errors); its HTTP metrics carry the contract's names
//! `rbee_hive_requests_total` and `rbee_hive_request_duration_seconds`.

pub mod models;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use audit_logging::ConfigSetting;
use axum::extract::FromRef;
use axum::Router;
use rbee_http::{Bootstrap, CommonArgs, CoreState, Daemon, DaemonConfig, Identity, StartupError};
use secrecy::SecretString;

use models::{ModelSettings, Models};

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
    #[arg(long, env = "RBEE_DOWNLOAD_RETENTION_S", default_value_t = 900)]
    pub download_retention_s: u64,

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
    models: Models,
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
pub fn router() -> Router<AppState> {
    models::routes::router()
}

/// Open the audit trail, check the token and bind policy, then bind
/// `config.addr`. The returned daemon reports its bound address
/// ([`Daemon::local_addr`]) and serves until SIGTERM/SIGINT or
/// `POST /v1/admin/shutdown` ([`Daemon::run`]).
pub async fn build(config: Config) -> Result<Daemon, StartupError> {
    let hf_token = check_model_flags(&config)?;
    let hf_token_fp = hf_token
        .as_ref()
        .map(|t| auth_min::Fingerprint::of(secrecy::ExposeSecret::expose_secret(t)));
    let settings = vec![
        ConfigSetting::new("models_dir", config.models_dir.display()),
        ConfigSetting::new("hf_endpoint", &config.hf_endpoint),
        ConfigSetting::secret("hf_token", hf_token_fp.as_ref()),
        ConfigSetting::new("disk_reserve_mib", config.disk_reserve_mib),
        ConfigSetting::new("download_attempts", config.download_attempts),
        ConfigSetting::new("download_retention_s", config.download_retention_s),
    ];
    let mut boot = Bootstrap::new(
        Identity {
            name: "rbee-hive",
            service_id: "rbee-hive".to_owned(),
            metric_prefix: "rbee_hive",
            backend: "cpu",
        },
        config.addr,
        &config.common,
        settings,
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
    boot.bind(router(), |core| AppState { core, models }).await
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
