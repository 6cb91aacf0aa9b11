//! The worker's metrics, with the contract's names.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use rbee_api::Outcome;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

type OutcomeHistograms = Family<OutcomeLabel, Histogram, fn() -> Histogram>;

/// Request latency buckets (seconds), up to long generations.
const DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Per-token latency buckets (seconds).
const TOKEN_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// `rbee_worker_*` metrics.
#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    requests: Family<OutcomeLabel, Counter>,
    /// `rbee_worker_requests_running`.
    pub requests_running: Gauge,
    /// `rbee_worker_slots_total`.
    pub slots_total: Gauge,
    /// `rbee_worker_time_to_first_token_seconds`.
    pub time_to_first_token: Histogram,
    /// `rbee_worker_inter_token_latency_seconds`.
    pub inter_token_latency: Histogram,
    request_duration: OutcomeHistograms,
    /// `rbee_worker_prompt_tokens_total`.
    pub prompt_tokens: Counter,
    /// `rbee_worker_generation_tokens_total`.
    pub generation_tokens: Counter,
    /// `rbee_worker_model_load_seconds`.
    pub model_load_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// `rbee_worker_engine_stalls_total`.
    pub engine_stalls: Counter,
    /// `rbee_worker_requests_waiting`: admitted requests waiting for KV
    /// cache blocks.
    pub requests_waiting: Gauge,
    /// `rbee_worker_kv_blocks_total`.
    pub kv_blocks_total: Gauge,
    /// `rbee_worker_kv_blocks_used`: held by running sequences.
    pub kv_blocks_used: Gauge,
    /// `rbee_worker_kv_blocks_free`: not held (empty, or cached).
    pub kv_blocks_free: Gauge,
    /// `rbee_worker_kv_blocks_cached`: free blocks keeping a reusable prefix.
    pub kv_blocks_cached: Gauge,
    /// `rbee_worker_prefix_cache_hits_total`.
    pub prefix_cache_hits: Counter,
    /// `rbee_worker_prompt_tokens_cached_total`.
    pub prompt_tokens_cached: Counter,
    /// `rbee_worker_engine_steps_total`: forward passes, each over every
    /// running sequence.
    pub engine_steps: Counter,
    /// `rbee_worker_engine_step_rows_total`: rows (tokens) of those passes.
    pub engine_step_rows: Counter,
}

impl WorkerMetrics {
    /// Metrics that no registry exposes, for an engine run outside the
    /// daemon (tests, tools).
    pub fn unregistered() -> Self {
        Self::register(&mut Registry::default())
    }

    /// Register every metric in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            requests_running: Gauge::default(),
            slots_total: Gauge::default(),
            time_to_first_token: duration_histogram(),
            inter_token_latency: Histogram::new(TOKEN_BUCKETS),
            request_duration: Family::new_with_constructor(duration_histogram),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            model_load_seconds: Gauge::default(),
            engine_stalls: Counter::default(),
            requests_waiting: Gauge::default(),
            kv_blocks_total: Gauge::default(),
            kv_blocks_used: Gauge::default(),
            kv_blocks_free: Gauge::default(),
            kv_blocks_cached: Gauge::default(),
            prefix_cache_hits: Counter::default(),
            prompt_tokens_cached: Counter::default(),
            engine_steps: Counter::default(),
            engine_step_rows: Counter::default(),
        };
        registry.register(
            "rbee_worker_requests",
            "Inference requests by outcome",
            m.requests.clone(),
        );
        registry.register(
            "rbee_worker_requests_running",
            "Inference requests holding a slot",
            m.requests_running.clone(),
        );
        registry.register(
            "rbee_worker_slots_total",
            "Concurrent sequences the worker runs",
            m.slots_total.clone(),
        );
        registry.register(
            "rbee_worker_time_to_first_token_seconds",
            "Time from admission to the first generated token",
            m.time_to_first_token.clone(),
        );
        registry.register(
            "rbee_worker_inter_token_latency_seconds",
            "Time between consecutive generated tokens",
            m.inter_token_latency.clone(),
        );
        registry.register(
            "rbee_worker_request_duration_seconds",
            "Inference request duration by outcome",
            m.request_duration.clone(),
        );
        registry.register(
            "rbee_worker_prompt_tokens",
            "Prompt tokens processed",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "rbee_worker_generation_tokens",
            "Tokens generated",
            m.generation_tokens.clone(),
        );
        registry.register(
            "rbee_worker_model_load_seconds",
            "Time the model took to load",
            m.model_load_seconds.clone(),
        );
        registry.register(
            "rbee_worker_engine_stalls",
            "Times the engine had work but produced no token for the stall timeout",
            m.engine_stalls.clone(),
        );
        registry.register(
            "rbee_worker_requests_waiting",
            "Requests holding a slot that wait for KV cache blocks",
            m.requests_waiting.clone(),
        );
        registry.register(
            "rbee_worker_kv_blocks_total",
            "Blocks in the KV cache pool (128 positions each)",
            m.kv_blocks_total.clone(),
        );
        registry.register(
            "rbee_worker_kv_blocks_used",
            "KV cache blocks held by running sequences",
            m.kv_blocks_used.clone(),
        );
        registry.register(
            "rbee_worker_kv_blocks_free",
            "KV cache blocks not held by a sequence (empty or cached)",
            m.kv_blocks_free.clone(),
        );
        registry.register(
            "rbee_worker_kv_blocks_cached",
            "Free KV cache blocks that keep a prompt prefix for reuse",
            m.kv_blocks_cached.clone(),
        );
        registry.register(
            "rbee_worker_prefix_cache_hits",
            "Requests whose prompt started with tokens already in the KV cache",
            m.prefix_cache_hits.clone(),
        );
        registry.register(
            "rbee_worker_prompt_tokens_cached",
            "Prompt tokens whose prefill the prefix cache skipped",
            m.prompt_tokens_cached.clone(),
        );
        registry.register(
            "rbee_worker_engine_steps",
            "Forward passes of the engine, each over every running sequence",
            m.engine_steps.clone(),
        );
        registry.register(
            "rbee_worker_engine_step_rows",
            "Rows (prompt and generated tokens) of the engine's forward passes",
            m.engine_step_rows.clone(),
        );
        // Every outcome at 0 from the start, so rate() and alerts work
        // before the first request of each kind.
        for outcome in Outcome::ALL {
            let label = OutcomeLabel {
                outcome: outcome.as_str(),
            };
            let _ = m.requests.get_or_create(&label);
            let _ = m.request_duration.get_or_create(&label);
        }
        m
    }

    /// Count a finished (or refused) request.
    pub fn request_finished(&self, outcome: Outcome, seconds: f64) {
        let label = OutcomeLabel {
            outcome: outcome.as_str(),
        };
        self.requests.get_or_create(&label).inc();
        self.request_duration.get_or_create(&label).observe(seconds);
    }
}
