//! The circuit breaker of each (model, device) pair, as the hive uses it:
//! a spawn asks it for a permit, and a half-open breaker's one probe is held
//! as a [`Probe`] guard that reports an outcome however the spawn ends.

use std::collections::HashMap;
use std::time::Instant;

use audit_logging::AuditEvent;
use rbee_api::{ApiError, ErrorCode};
use restart_policy::{BreakerTransition, CircuitBreaker, Permit, ProbeId};

use super::Workers;

/// The permit a spawn holds. For a half-open breaker's probe, dropping it
/// before the worker reported ready or failed (the process could not be
/// started, the worker was stopped while loading, its record could not be
/// made) gives the probe up as a failure: the breaker opens for another
/// cooldown and then lets a new probe through, instead of refusing every
/// spawn of the pair for good.
pub(crate) struct Probe {
    workers: Workers,
    model_ref: String,
    device: u32,
    id: Option<ProbeId>,
    request_id: Option<String>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else { return };
        let transition = {
            let mut breakers = self.workers.lock_breakers();
            self.workers
                .breaker_entry(&mut breakers, &self.model_ref, self.device)
                .abandon_probe(id, Instant::now())
        };
        if transition == Some(BreakerTransition::Opened) {
            tracing::warn!(model_ref = %self.model_ref, device = self.device, "the breaker's probe spawn ended before it was ready; the breaker is open again");
            self.workers
                .breaker_opened(&self.model_ref, self.device, self.request_id.as_deref());
        }
    }
}

impl Workers {
    pub(super) fn lock_breakers(
        &self,
    ) -> parking_lot::MutexGuard<'_, HashMap<(String, u32), CircuitBreaker>> {
        self.inner.breakers.lock()
    }

    /// A permit to spawn a worker of (`model_ref`, `device`), or 503
    /// `CIRCUIT_OPEN` with `Retry-After`.
    pub(super) fn acquire_breaker(
        &self,
        model_ref: &str,
        device: u32,
        request_id: Option<&str>,
    ) -> Result<Probe, ApiError> {
        let permit = {
            let mut breakers = self.lock_breakers();
            self.breaker_entry(&mut breakers, model_ref, device)
                .try_acquire(Instant::now())
        };
        match permit {
            Ok(permit) => Ok(Probe {
                workers: self.clone(),
                model_ref: model_ref.to_owned(),
                device,
                id: match permit {
                    Permit::Probe(id) => Some(id),
                    Permit::Normal => None,
                },
                request_id: request_id.map(str::to_owned),
            }),
            Err(refused) => Err(ApiError::new(
                ErrorCode::CircuitOpen,
                format!(
                    "the circuit breaker for {model_ref} on device {device} is open after repeated failures; retry in {}s",
                    refused.retry_after.as_secs().max(1)
                ),
            )
            .with_retry_after(refused.retry_after.as_secs().max(1))),
        }
    }

    pub(super) fn breaker_entry<'a>(
        &self,
        breakers: &'a mut HashMap<(String, u32), CircuitBreaker>,
        model_ref: &str,
        device: u32,
    ) -> &'a mut CircuitBreaker {
        breakers
            .entry((model_ref.to_owned(), device))
            .or_insert_with(|| self.inner.tuning().breaker_template.clone())
    }

    /// Count, log and audit a breaker that opened.
    pub(super) fn breaker_opened(&self, model_ref: &str, device: u32, request_id: Option<&str>) {
        self.inner
            .metrics
            .activations
            .get_or_create(&vec![("model".to_owned(), model_ref.to_owned())])
            .inc();
        self.inner.audit.emit(
            request_id,
            AuditEvent::CircuitBreakerOpened {
                model_ref: model_ref.to_owned(),
                device,
            },
        );
    }
}
