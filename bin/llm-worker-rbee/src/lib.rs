//! `llm-worker-rbee`, one loaded model served over HTTP.
//!
//! The daemon binds first and loads its model in the background, so
//! `/v1/ready` and `/health/ready` can say `loading` truthfully. The model
//! lives in [`engine`], on its own thread; [`http`] turns requests into jobs
//! and job events into SSE. This is the only crate that depends on candle.

pub mod engine;
pub(crate) mod hive;
pub(crate) mod http;
// The one module where `unsafe` is allowed: SIMD bodies behind run-time
// feature checks, and the compute threads' shared writes.
#[allow(unsafe_code)]
pub mod kernels;
pub mod model;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use audit_logging::ConfigSetting;
use axum::extract::FromRef;
use rbee_api::worker::Backend;
use rbee_http::{Bootstrap, CommonArgs, CoreState, Daemon, DaemonConfig, Identity, StartupError};

use crate::engine::metrics::WorkerMetrics;
use crate::engine::Engine;

/// `--version`: the version and the backends this build has, which the hive
/// reads to know what it can spawn.
pub const VERSION: &str = match (cfg!(feature = "cuda"), cfg!(feature = "metal")) {
    (true, true) => concat!(env!("CARGO_PKG_VERSION"), " backends=cpu,cuda,metal"),
    (true, false) => concat!(env!("CARGO_PKG_VERSION"), " backends=cpu,cuda"),
    (false, true) => concat!(env!("CARGO_PKG_VERSION"), " backends=cpu,metal"),
    (false, false) => concat!(env!("CARGO_PKG_VERSION"), " backends=cpu"),
};

/// `llm-worker-rbee`'s flags; each also reads the environment variable it names.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "llm-worker-rbee",
    version = VERSION,
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

    /// The model: a GGUF file (quantized llama family), or a safetensors
    /// llama directory (`config.json`, `model.safetensors` or shards,
    /// `tokenizer.json`).
    #[arg(long, env = "RBEE_WORKER_MODEL", value_name = "PATH")]
    pub model: PathBuf,

    /// The reference the model is served under (default `file:<model path>`).
    #[arg(long, env = "RBEE_WORKER_MODEL_REF")]
    pub model_ref: Option<String>,

    /// Compute backend: `cpu`; `cuda` and `metal` when built with those features.
    #[arg(long, env = "RBEE_WORKER_BACKEND", default_value = "cpu")]
    pub backend: Backend,

    /// Device ordinal (0 for cpu).
    #[arg(long, env = "RBEE_WORKER_DEVICE", default_value_t = 0)]
    pub device: u32,

    /// Concurrent sequences, run together in one batch; more requests get
    /// 503 `ALL_SLOTS_BUSY`. Default: what the KV cache pool holds at 512
    /// positions per sequence (`--kv-tokens / 512`), 1 to 64.
    #[arg(long, env = "RBEE_WORKER_SLOTS", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub slots: Option<u16>,

    /// Positions the KV cache pool holds, all sequences together (default:
    /// four full contexts, `4 x --ctx`). Each sequence takes blocks of 128
    /// positions as it grows; a request that cannot reserve what it may
    /// need waits for others to finish. Memory: this times the model's
    /// bytes per position (logged at load).
    #[arg(long, env = "RBEE_WORKER_KV_TOKENS", value_parser = clap::value_parser!(u32).range(128..=16_777_216))]
    pub kv_tokens: Option<u32>,

    /// The URL the worker is reachable at, sent to the hive (default:
    /// `http://<bound address>`).
    #[arg(long, env = "RBEE_WORKER_ADVERTISE_URL")]
    pub advertise_url: Option<String>,

    /// The hive to report to: the ready callback, then heartbeats.
    #[arg(long, env = "RBEE_WORKER_HIVE_URL")]
    pub hive_url: Option<String>,

    /// Seconds between heartbeats to the hive.
    #[arg(long, env = "RBEE_WORKER_HEARTBEAT_INTERVAL_S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub heartbeat_interval_s: u64,

    /// Set by the hive that spawns this worker: the worker asks the kernel
    /// for SIGKILL when its parent exits (`PR_SET_PDEATHSIG`), and exits at
    /// once if that parent is already gone.
    #[arg(long, env = "RBEE_WORKER_PARENT_PID")]
    pub parent_pid: Option<u32>,

    /// Compute threads for the forward pass on the CPU (default: the CPUs
    /// this process may use). The HTTP side runs on one more thread.
    #[arg(long, env = "RBEE_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,

    /// Positions per sequence (prompt plus generated tokens); capped at the
    /// model's trained context.
    #[arg(long, env = "RBEE_WORKER_CTX", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(16..=1_048_576))]
    pub ctx: u32,

    /// The KV cache's element type on the CPU: `f32` (the reference's
    /// arithmetic) or `f16` (half the cache memory and bytes read per token).
    #[arg(long, env = "RBEE_WORKER_KV_CACHE", value_enum, default_value_t = model::llama::cpu::KvType::F16)]
    pub kv_cache: model::llama::cpu::KvType,

    /// Seconds with work but no finished engine step before readiness
    /// reports `ENGINE_STALLED`. A quiet stream gets a keep-alive comment
    /// every half of it (at most 15 s) while the engine progresses, and none
    /// while it is stalled, so the queen (same variable) can tell a stalled
    /// worker from a slow one.
    #[arg(long, env = "RBEE_WORKER_STALL_TIMEOUT_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub stall_timeout_s: u64,

    #[command(flatten)]
    /// The flags every daemon has.
    pub common: CommonArgs,
}

/// `--worker-id` is not an id the hive and the metrics can carry.
#[derive(Debug, thiserror::Error)]
#[error("expected 1 to 64 characters of A-Z a-z 0-9 . _ : -, not starting with a dot")]
struct InvalidWorkerId;

fn parse_worker_id(value: &str) -> Result<String, InvalidWorkerId> {
    if rbee_api::inference::is_valid_id(value, 64) && !value.starts_with('.') {
        Ok(value.to_owned())
    } else {
        Err(InvalidWorkerId)
    }
}

impl DaemonConfig for Config {
    // The model runs on the engine and compute threads (`--threads`); the
    // HTTP side is light and gets one thread of its own.
    const ONE_RUNTIME_THREAD: bool = true;

    fn common(&self) -> &CommonArgs {
        &self.common
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    fn routes() -> Vec<rbee_http::RouteEntry> {
        router().table().to_vec()
    }
}

/// The loaded model as the HTTP side sees it.
#[derive(Debug)]
pub struct Model {
    /// The engine thread's handle.
    pub engine: Engine,
    /// For tokenizing prompts.
    pub tokenizer: tokenizers::Tokenizer,
    /// For chat requests.
    pub chat_template: model::chat::ChatTemplate,
    /// For constrained output: built by the first request that asks for
    /// it (150 ms and 10+ MB for the default model's 49,152 tokens, which a
    /// worker that never sees such a request need not pay); why not, for a
    /// tokenizer llguidance cannot read.
    grammars: OnceLock<Result<model::grammar::Grammars, String>>,
    /// The model's end tokens, for the grammars.
    eos_token_ids: Vec<u32>,
    /// The model's logits per position, for the grammars.
    vocab_size: usize,
    /// Longest prompt plus output.
    pub context_length: usize,
    /// Longest prompt, in bytes, that can fit the context: longer ones are
    /// refused before the tokenizer sees them.
    pub max_prompt_bytes: usize,
    /// The worker's metrics.
    pub metrics: WorkerMetrics,
}

impl Model {
    /// The compiler of constraints, built on first use (blocking: call off
    /// the runtime's threads).
    pub fn grammars(&self) -> Result<&model::grammar::Grammars, &str> {
        let grammars = self.grammars.get_or_init(|| {
            let started = std::time::Instant::now();
            let built = model::grammar::Grammars::new(
                &self.tokenizer,
                &self.eos_token_ids,
                self.vocab_size,
            )
            .map_err(|e| e.to_string());
            match &built {
                Ok(_) => tracing::info!(
                    ms = started.elapsed().as_secs_f64() * 1e3,
                    "constrained output ready"
                ),
                Err(why) => tracing::warn!(error = %why, "constrained output is not available"),
            }
            built
        });
        grammars.as_ref().map_err(String::as_str)
    }
}

/// A loaded embedding model as the HTTP side sees it.
#[derive(Debug)]
pub struct EmbeddingModel {
    /// The encoder.
    pub embedder: model::embed::Embedder,
    /// One permit per slot: a request holds one while its batch runs.
    slots: Arc<tokio::sync::Semaphore>,
    /// Slots in all.
    slots_total: usize,
    /// The worker's metrics.
    pub metrics: WorkerMetrics,
}

impl EmbeddingModel {
    /// Requests running now.
    pub fn active(&self) -> usize {
        self.slots_total - self.slots.available_permits()
    }

    /// Slots in use, for the readiness probe (no KV cache here).
    pub fn capacity(&self) -> rbee_api::health::Capacity {
        rbee_api::health::Capacity {
            slots_total: self.slots_total,
            slots_running: self.active(),
            requests_waiting: 0,
            kv_blocks_total: 0,
            kv_blocks_used: 0,
            kv_blocks_free: 0,
            kv_blocks_cached: 0,
        }
    }
}

/// State shared by the worker's handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    core: CoreState,
    model: Arc<OnceLock<Arc<Model>>>,
    /// Set instead of `model` when the model is a sentence encoder.
    embedder: Arc<OnceLock<Arc<EmbeddingModel>>>,
    model_ref: String,
    jobs: http::Jobs,
    stalled: Arc<AtomicBool>,
    /// A quiet stream gets a keep-alive comment this often while the
    /// engine progresses: half the stall timeout, within [0.5 s, 15 s].
    keep_alive: Duration,
}

impl AppState {
    /// A model, of either kind, is loaded.
    fn loaded(&self) -> bool {
        self.model.get().is_some() || self.embedder.get().is_some()
    }
}

impl FromRef<AppState> for CoreState {
    fn from_ref(state: &AppState) -> Self {
        state.core.clone()
    }
}

/// `llm-worker-rbee`'s own routes (the shared ones are added by [`Bootstrap::bind`]).
pub fn router() -> rbee_http::Routes<AppState> {
    http::routes()
}

/// The worker's own settings, as audited at startup and compared on reload.
fn settings(config: &Config) -> Vec<ConfigSetting> {
    vec![
        ConfigSetting::new("worker_id", &config.worker_id),
        ConfigSetting::new("model", config.model.display()),
        ConfigSetting::new("model_ref", model_ref(config)),
        ConfigSetting::new("backend", config.backend),
        ConfigSetting::new("device", config.device),
        ConfigSetting::new("slots", slots(config)),
        ConfigSetting::new("threads", threads(config)),
        ConfigSetting::new("ctx", config.ctx),
        ConfigSetting::new("kv_tokens", kv_tokens(config)),
        ConfigSetting::new("kv_cache", format!("{:?}", config.kv_cache).to_lowercase()),
    ]
}

/// `--kv-tokens`, else four full contexts; at least one.
fn kv_tokens(config: &Config) -> usize {
    let tokens = config
        .kv_tokens
        .unwrap_or_else(|| rbee_api::worker::default_kv_tokens(config.ctx));
    tokens.max(config.ctx) as usize
}

/// `--slots`, else as many sequences of 512 positions as the pool holds.
fn slots(config: &Config) -> u16 {
    config
        .slots
        .unwrap_or_else(|| rbee_api::worker::default_slots(kv_tokens(config) as u32))
}

/// `--threads`, else the CPUs the process may use.
fn threads(config: &Config) -> usize {
    config
        .threads
        .map_or_else(model::default_threads, usize::from)
}

/// `--model-ref`, else the model file as a `file:` reference.
fn model_ref(config: &Config) -> String {
    config
        .model_ref
        .clone()
        .unwrap_or_else(|| format!("file:{}", config.model.display()))
}

/// Open the audit trail, check the token and bind policy, bind
/// `config.addr`, then load the model in the background. A model that fails
/// to load stops the daemon with exit code 1.
pub async fn build(config: Config) -> Result<Daemon, StartupError> {
    if let Some(parent) = config.parent_pid {
        exit_with_parent(parent)?;
    }
    let device = model::device(config.backend, config.device)
        .map_err(|e| StartupError::Config(rbee_api::error::chain(&e)))?;
    let model_ref = model_ref(&config);
    let mut boot = Bootstrap::new(
        Identity {
            name: "llm-worker-rbee",
            service_id: format!("llm-worker-rbee-{}", config.worker_id),
            metric_prefix: "rbee_worker_http",
            backend: model::built_backends(),
        },
        config.addr,
        &config.common,
        settings(&config),
    )?;
    let metrics = WorkerMetrics::register(&mut boot.registry);
    let auth = boot.auth.clone();
    // The hive rewrites the token file and sends SIGHUP when the token is
    // rotated; nothing else of a worker's changes while it runs.
    let reloader = Arc::new(rbee_http::Reloader::new(
        config.clone(),
        boot.auth.clone(),
        settings,
        &[],
    ));
    let shutdown = boot.shutdown.clone();
    metrics.slots_total.set(i64::from(slots(&config)));
    let model = Arc::new(OnceLock::new());
    let state_model = Arc::clone(&model);
    let embedder: Arc<OnceLock<Arc<EmbeddingModel>>> = Arc::new(OnceLock::new());
    let state_embedder = Arc::clone(&embedder);
    let stall_timeout = Duration::from_secs(config.stall_timeout_s);
    let stalled: Arc<AtomicBool> = Arc::default();
    let state_stalled = Arc::clone(&stalled);
    let mut daemon = boot
        .bind(router(), |core| AppState {
            core,
            model: state_model,
            embedder: state_embedder,
            model_ref,
            jobs: http::Jobs::default(),
            stalled: state_stalled,
            keep_alive: (stall_timeout / 2)
                .clamp(Duration::from_millis(500), Duration::from_secs(15)),
        })
        .await?;

    daemon.on_reload(move || {
        let reloader = Arc::clone(&reloader);
        async move {
            reloader
                .reload(|_| Ok(()), |(), _| std::future::ready(()))
                .await
        }
    });
    let fatal = daemon.fatal_handle();
    let advertise_url = config
        .advertise_url
        .clone()
        .unwrap_or_else(|| format!("{}://{}", daemon.scheme(), daemon.local_addr()));
    if let Some(url) = &config.hive_url {
        rbee_http::tls::warn_if_plain("--hive-url", url);
    }
    let reporter = config.hive_url.clone().map(|hive_url| hive::HiveReporter {
        hive_url,
        auth,
        callback: rbee_api::worker::ReadyCallback {
            worker_id: config.worker_id.clone(),
            url: advertise_url,
            model_ref: self::model_ref(&config),
            backend: config.backend,
            device: config.device,
            slots_total: u32::from(slots(&config)),
            vram_bytes: 0,
        },
        interval: Duration::from_secs(config.heartbeat_interval_s),
    });
    let path = config.model.clone();
    let options = model::LoadOptions {
        cache_positions: kv_tokens(&config),
        context: config.ctx as usize,
        threads: threads(&config),
        kv: config.kv_cache,
        candle_on_cpu: false,
        dequantize: false,
    };
    let drain = Duration::from_secs(config.common.shutdown_timeout_s);
    let slots = slots(&config);
    rbee_http::task::spawn(async move {
        if model::embed::is_embedding_model(&path) {
            let loaded = rbee_http::task::spawn_blocking(move || {
                let started = std::time::Instant::now();
                model::embed::Embedder::load(&path, &device).map(|e| (e, started.elapsed()))
            })
            .await;
            let (encoder, took) = match loaded {
                Ok(Ok(loaded)) => loaded,
                Ok(Err(e)) => return fatal.fail(e.to_string()),
                Err(e) => return fatal.fail(format!("model loader failed: {e}")),
            };
            metrics.model_load_seconds.set(took.as_secs_f64());
            tracing::info!(
                load_s = took.as_secs_f64(),
                dimensions = encoder.dimensions,
                max_tokens = encoder.max_tokens,
                "embedding model loaded; ready"
            );
            let ready = Arc::new(EmbeddingModel {
                embedder: encoder,
                slots: Arc::new(tokio::sync::Semaphore::new(usize::from(slots))),
                slots_total: usize::from(slots),
                metrics,
            });
            let _ = embedder.set(Arc::clone(&ready));
            if let Some(reporter) = reporter {
                rbee_http::task::spawn(reporter.run(move || ready.active() > 0, shutdown));
            }
            return;
        }
        let loaded = rbee_http::task::spawn_blocking(move || {
            #[cfg(feature = "fault-injection")]
            engine::fault::before_load();
            model::load(&path, &device, options)
        })
        .await;
        let loaded = match loaded {
            Ok(Ok(loaded)) => loaded,
            Ok(Err(e)) => return fatal.fail(e.to_string()),
            Err(e) => return fatal.fail(format!("model loader failed: {e}")),
        };
        metrics.model_load_seconds.set(loaded.load_seconds);
        let model::LoadedModel {
            model: forward,
            tokenizer,
            chat_template,
            eos_token_ids,
            context_length,
            vocab_size,
            load_seconds,
            engine_summary,
            weight_bytes,
            kv_bytes_per_position,
            ..
        } = loaded;
        let on_death = fatal.clone();
        let engine = match Engine::start(
            forward,
            tokenizer.clone(),
            eos_token_ids.clone(),
            metrics.clone(),
            usize::from(slots),
            move |why| on_death.fail(why),
        ) {
            Ok(engine) => engine,
            Err(e) => return fatal.fail(format!("cannot start the engine thread: {e}")),
        };
        let max_prompt_bytes = model::tokenizer::max_prompt_bytes(&tokenizer, context_length);
        tracing::info!(
            load_s = load_seconds,
            context_length,
            max_prompt_bytes,
            vocab_size,
            engine = %engine_summary,
            weight_bytes,
            kv_bytes_per_position,
            chat_template = if chat_template.is_default {
                "chatml-default"
            } else {
                "model"
            },
            "model loaded; ready"
        );
        let ready = Arc::new(Model {
            engine,
            tokenizer,
            chat_template,
            grammars: OnceLock::new(),
            eos_token_ids,
            vocab_size,
            context_length,
            max_prompt_bytes,
            metrics,
        });
        let _ = model.set(Arc::clone(&ready));
        rbee_http::task::spawn(watch_for_stalls(
            Arc::clone(&ready),
            stalled,
            stall_timeout,
            shutdown.clone(),
        ));
        rbee_http::task::spawn(abort_before_drain_bound(
            Arc::clone(&ready),
            shutdown.clone(),
            drain,
        ));
        if let Some(reporter) = reporter {
            rbee_http::task::spawn(reporter.run(move || ready.engine.active() > 0, shutdown));
        }
    });
    Ok(daemon)
}

/// Once draining starts, let running generations finish; shortly before the
/// drain bound, end the rest with a `SHUTTING_DOWN` error event so their
/// clients learn why, instead of seeing the connection cut.
async fn abort_before_drain_bound(
    model: Arc<Model>,
    shutdown: tokio_util::sync::CancellationToken,
    drain: Duration,
) {
    shutdown.cancelled().await;
    // Leave a quarter of the drain time (0.25 s to 2 s) for the last step and
    // the error events to reach the clients before the connections close.
    let margin = (drain / 4).clamp(Duration::from_millis(250), Duration::from_secs(2));
    tokio::time::sleep(drain.saturating_sub(margin)).await;
    if model.engine.active() > 0 {
        tracing::warn!(
            running = model.engine.active(),
            "drain time is up; ending running generations"
        );
        model.engine.abort_all();
    }
}

/// Check the engine's progress every half stall timeout (at most every
/// second): with work and no token for the timeout, mark the worker stalled
/// (readiness answers 503 `ENGINE_STALLED`), count the stall once and log it;
/// clear the mark when tokens flow again. Runs whether or not anyone probes.
pub async fn watch_for_stalls(
    model: Arc<Model>,
    stalled: Arc<AtomicBool>,
    timeout: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use std::sync::atomic::Ordering;
    let mut tick = tokio::time::interval((timeout / 2).min(Duration::from_secs(1)));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let waiting = model.engine.stalled_for().filter(|d| *d >= timeout);
        match (waiting, stalled.load(Ordering::Acquire)) {
            (Some(for_how_long), false) => {
                stalled.store(true, Ordering::Release);
                model.metrics.engine_stalls.inc();
                tracing::error!(
                    stalled_s = for_how_long.as_secs(),
                    "engine stalled: work in progress but no token produced"
                );
            }
            (None, true) => {
                stalled.store(false, Ordering::Release);
                tracing::warn!("engine progressing again after a stall");
            }
            _ => {}
        }
    }
}

/// Die with the parent: `PR_SET_PDEATHSIG` fires when the thread that
/// forked us exits (the hive forks from a thread that lives as long as it
/// does); checking the parent afterwards closes the race with a parent that
/// died before the call.
fn exit_with_parent(parent: u32) -> Result<(), StartupError> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| StartupError::Config(format!("cannot set the parent-death signal: {e}")))?;
    let actual = nix::unistd::getppid().as_raw();
    if u32::try_from(actual).ok() != Some(parent) {
        return Err(StartupError::Config(format!(
            "--parent-pid {parent} is not this process's parent ({actual}); the hive is gone"
        )));
    }
    Ok(())
}
