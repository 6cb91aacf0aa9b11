//! The queen's metrics, with the contract's names (`rbee_queen_*`).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use rbee_api::fleet::HiveState;
use rbee_api::worker::WorkerState;
use rbee_api::Outcome;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ModelOutcome {
    model: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StageLabel {
    stage: &'static str,
}

/// The `model` label of requests rejected for a model no hive knows (not a
/// model reference, so it cannot name a real model).
pub const UNKNOWN_MODEL: &str = "unknown";

type ModelHistograms = Family<ModelLabel, Histogram, fn() -> Histogram>;

/// Latency buckets (seconds), from the queen's own sub-millisecond hops to
/// long generations.
const BUCKETS: [f64; 18] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// Where a deadline ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Already expired on arrival.
    Admission,
    /// While waiting for a worker.
    Queued,
    /// While the worker generated.
    Streaming,
}

impl Stage {
    fn as_str(self) -> &'static str {
        match self {
            Self::Admission => "admission",
            Self::Queued => "queued",
            Self::Streaming => "streaming",
        }
    }
}

/// `rbee_queen_*` metrics; cheap to clone.
#[derive(Debug, Clone)]
pub struct QueenMetrics {
    requests: Family<ModelOutcome, Counter>,
    duration: ModelHistograms,
    queue_time: ModelHistograms,
    queue_size: Family<ModelLabel, Gauge>,
    ttft: ModelHistograms,
    hives: Family<StateLabel, Gauge>,
    workers: Family<StateLabel, Gauge>,
    deadline: Family<StageLabel, Counter>,
    /// Each model's series, looked up once: a request then counts itself
    /// without building, hashing and dropping a label set per metric.
    by_model: Arc<RwLock<SeriesByModel>>,
}

type SeriesByModel = HashMap<Box<str>, Arc<ModelSeries>, ahash::RandomState>;

/// One model's series.
#[derive(Debug)]
struct ModelSeries {
    duration: Histogram,
    queue_time: Histogram,
    queue_size: Gauge,
    ttft: Histogram,
    /// By outcome, filled as outcomes happen.
    requests: RwLock<Vec<(&'static str, Counter)>>,
}

impl QueenMetrics {
    /// Register every metric in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(histogram),
            queue_time: Family::new_with_constructor(histogram),
            queue_size: Family::default(),
            ttft: Family::new_with_constructor(histogram),
            hives: Family::default(),
            workers: Family::default(),
            deadline: Family::default(),
            by_model: Arc::default(),
        };
        registry.register(
            "rbee_queen_requests",
            "Inference requests by model and outcome",
            m.requests.clone(),
        );
        registry.register(
            "rbee_queen_request_duration_seconds",
            "Inference request wall time, admission to last byte",
            m.duration.clone(),
        );
        registry.register(
            "rbee_queen_queue_time_seconds",
            "Time from admission until a worker was assigned",
            m.queue_time.clone(),
        );
        registry.register(
            "rbee_queen_queue_size",
            "Requests waiting for a worker",
            m.queue_size.clone(),
        );
        registry.register(
            "rbee_queen_time_to_first_token_seconds",
            "Time from arrival to the first token relayed to the client",
            m.ttft.clone(),
        );
        registry.register("rbee_queen_hives", "Hives by state", m.hives.clone());
        registry.register(
            "rbee_queen_workers",
            "Workers on reachable hives by state",
            m.workers.clone(),
        );
        registry.register(
            "rbee_queen_deadline_exceeded",
            "Requests whose deadline ran out, by where",
            m.deadline.clone(),
        );
        for stage in [Stage::Admission, Stage::Queued, Stage::Streaming] {
            let _ = m.deadline.get_or_create(&StageLabel {
                stage: stage.as_str(),
            });
        }
        m.set_hives(0, 0);
        // Rejects for models no hive knows share one label value; its
        // client_error series exists from the start.
        let _ = m.requests.get_or_create(&ModelOutcome {
            model: UNKNOWN_MODEL.to_owned(),
            outcome: Outcome::ClientError.as_str(),
        });
        m
    }

    /// `model`'s series, created on first use.
    fn series(&self, model: &str) -> Arc<ModelSeries> {
        if let Some(series) = self.by_model.read().get(model) {
            return Arc::clone(series);
        }
        let label = ModelLabel {
            model: model.to_owned(),
        };
        let series = Arc::new(ModelSeries {
            duration: self.duration.get_or_create(&label).clone(),
            queue_time: self.queue_time.get_or_create(&label).clone(),
            queue_size: self.queue_size.get_or_create(&label).clone(),
            ttft: self.ttft.get_or_create(&label).clone(),
            requests: RwLock::default(),
        });
        Arc::clone(self.by_model.write().entry(model.into()).or_insert(series))
    }

    /// `model` is served by a hive: its series are exported (counters at
    /// 0 for every outcome) before its first request.
    pub fn model_known(&self, model: &str) {
        if self.by_model.read().contains_key(model) {
            return;
        }
        let series = self.series(model);
        let mut requests = series.requests.write();
        for outcome in Outcome::ALL {
            let outcome = outcome.as_str();
            if !requests.iter().any(|(o, _)| *o == outcome) {
                requests.push((outcome, self.requests_counter(model, outcome)));
            }
        }
    }

    fn requests_counter(&self, model: &str, outcome: &'static str) -> Counter {
        self.requests
            .get_or_create(&ModelOutcome {
                model: model.to_owned(),
                outcome,
            })
            .clone()
    }

    /// A request ended.
    pub fn finished(&self, model: &str, outcome: Outcome, seconds: f64) {
        let series = self.series(model);
        series.duration.observe(seconds);
        let outcome = outcome.as_str();
        let known = series
            .requests
            .read()
            .iter()
            .find(|(o, _)| *o == outcome)
            .map(|(_, c)| c.clone());
        let counter = known.unwrap_or_else(|| {
            let counter = self.requests_counter(model, outcome);
            series.requests.write().push((outcome, counter.clone()));
            counter
        });
        counter.inc();
    }

    /// A request got its worker after `seconds` in the queue.
    pub fn queued(&self, model: &str, seconds: f64) {
        self.series(model).queue_time.observe(seconds);
    }

    /// The first token reached the client `seconds` after arrival.
    pub fn first_token(&self, model: &str, seconds: f64) {
        self.series(model).ttft.observe(seconds);
    }

    /// A deadline ran out at `stage`.
    pub fn deadline_exceeded(&self, stage: Stage) {
        self.deadline
            .get_or_create(&StageLabel {
                stage: stage.as_str(),
            })
            .inc();
    }

    pub(crate) fn set_queue_size(&self, model: &str, n: usize) {
        self.series(model).queue_size.set(n as i64);
    }

    pub(crate) fn set_hives(&self, reachable: usize, unreachable: usize) {
        for (state, n) in [
            (HiveState::Reachable, reachable),
            (HiveState::Unreachable, unreachable),
        ] {
            self.hives
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(n as i64);
        }
    }

    pub(crate) fn set_workers(&self, by_state: &HashMap<WorkerState, usize>) {
        for state in [
            WorkerState::Loading,
            WorkerState::Idle,
            WorkerState::Busy,
            WorkerState::Draining,
            WorkerState::Failed,
        ] {
            let n = by_state.get(&state).copied().unwrap_or(0);
            self.workers
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(n as i64);
        }
    }
}
