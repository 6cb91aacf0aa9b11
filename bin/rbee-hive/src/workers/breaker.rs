//! The circuit breaker of each (model, device) pair, as the hive uses it:
//! a spawn asks it for a permit, and a half-open breaker's one probe is held
//! as a [`Probe`] guard that reports an outcome however the spawn ends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use audit_logging::{AuditEvent, AuditSink};
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use restart_policy::{
    BreakerConfig, BreakerStatus, BreakerTransition, CircuitBreaker, Permit, ProbeId,
};

use super::error::WorkerError;

/// The breakers of every (model, device) pair: each made from the
/// settings' template on first use, reconfigured on reload, counted and
/// audited when it opens.
pub(super) struct Breakers {
    map: Mutex<HashMap<(String, u32), CircuitBreaker>>,
    audit: AuditSink,
    /// `rbee_hive_circuit_breaker_activations_total`, by model.
    activations: Family<Vec<(String, String)>, Counter>,
}

impl Breakers {
    pub(super) fn new(
        audit: AuditSink,
        activations: Family<Vec<(String, String)>, Counter>,
    ) -> Self {
        Self {
            map: Mutex::default(),
            audit,
            activations,
        }
    }

    /// Run `f` on the breaker of (`model_ref`, `device`), made from
    /// `template` if the pair has none yet.
    pub(super) fn with<T>(
        &self,
        model_ref: &str,
        device: u32,
        template: &CircuitBreaker,
        f: impl FnOnce(&mut CircuitBreaker) -> T,
    ) -> T {
        let mut map = self.map.lock();
        let breaker = map
            .entry((model_ref.to_owned(), device))
            .or_insert_with(|| template.clone());
        f(breaker)
    }

    /// New thresholds for every breaker; each keeps its state and counts.
    pub(super) fn reconfigure(&self, config: BreakerConfig) {
        for breaker in self.map.lock().values_mut() {
            breaker.reconfigure(config);
        }
    }

    /// Every pair, and whether its breaker is open at `now`.
    pub(super) fn open_at(&self, now: Instant) -> Vec<((String, u32), bool)> {
        self.map
            .lock()
            .iter()
            .map(|(pair, b)| (pair.clone(), b.status(now) == BreakerStatus::Open))
            .collect()
    }

    /// A permit to spawn a worker of (`model_ref`, `device`), or 503
    /// `CIRCUIT_OPEN` with `Retry-After`.
    pub(super) fn acquire(
        self: &Arc<Self>,
        model_ref: &str,
        device: u32,
        template: &CircuitBreaker,
        request_id: Option<&str>,
    ) -> Result<Probe, WorkerError> {
        let permit = self.with(model_ref, device, template, |b| {
            b.try_acquire(Instant::now())
        });
        match permit {
            Ok(permit) => Ok(Probe {
                breakers: Arc::clone(self),
                template: template.clone(),
                model_ref: model_ref.to_owned(),
                device,
                id: match permit {
                    Permit::Probe(id) => Some(id),
                    Permit::Normal => None,
                },
                request_id: request_id.map(str::to_owned),
            }),
            Err(refused) => Err(WorkerError::CircuitOpen {
                model_ref: model_ref.to_owned(),
                device,
                retry_after_s: refused.retry_after.as_secs().max(1),
            }),
        }
    }

    /// Count, log and audit a breaker that opened.
    pub(super) fn opened(&self, model_ref: &str, device: u32, request_id: Option<&str>) {
        self.activations
            .get_or_create(&vec![("model".to_owned(), model_ref.to_owned())])
            .inc();
        self.audit.emit(
            request_id,
            AuditEvent::CircuitBreakerOpened {
                model_ref: model_ref.to_owned(),
                device,
            },
        );
    }
}

/// The permit a spawn holds. For a half-open breaker's probe, dropping it
/// before the worker reported ready or failed (the process could not be
/// started, the worker was stopped while loading, its record could not be
/// made) gives the probe up as a failure: the breaker opens for another
/// cooldown and then lets a new probe through, instead of refusing every
/// spawn of the pair for good.
pub(crate) struct Probe {
    breakers: Arc<Breakers>,
    template: CircuitBreaker,
    model_ref: String,
    device: u32,
    id: Option<ProbeId>,
    request_id: Option<String>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else { return };
        let transition = self
            .breakers
            .with(&self.model_ref, self.device, &self.template, |b| {
                b.abandon_probe(id, Instant::now())
            });
        if transition == Some(BreakerTransition::Opened) {
            tracing::warn!(model_ref = %self.model_ref, device = self.device, "the breaker's probe spawn ended before it was ready; the breaker is open again");
            self.breakers
                .opened(&self.model_ref, self.device, self.request_id.as_deref());
        }
    }
}
