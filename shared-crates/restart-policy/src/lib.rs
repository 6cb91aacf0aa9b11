//! When, and whether, to restart a worker that exited.
//!
//! A pure state machine: it never sleeps, spawns or reads the clock. Callers
//! pass the current [`Instant`](std::time::Instant) and a random number
//! generator, so every decision is reproducible in tests.
//!
//! - [`RestartPolicy`] with its per-worker [`RestartState`]: policy kind
//!   (`Always`, `OnFailure`, `Never`), exponential backoff `base * 2^attempt`
//!   capped, ±jitter, a maximum number of attempts, and an attempt count that
//!   resets after a stable uptime.
//! - [`CircuitBreaker`], kept per (model, device) across workers: opens after
//!   N failures within a window, half-opens after a cooldown to let exactly
//!   one spawn through, and closes when that spawn succeeds.
//!
//! Every decision carries a [`Reason`] whose string is a bounded metric label.
//!
//! Stops the supervisor asked for itself (shutdown, eviction, drain) must not
//! be fed to [`RestartPolicy::on_exit`]: they are not failures.

mod breaker;
mod policy;

pub use breaker::{
    BreakerConfig, BreakerStatus, BreakerTransition, CircuitBreaker, Permit, ProbeId, SpawnRefused,
};
pub use policy::{
    ConfigError, Decision, ExitKind, ExitOutcome, PolicyKind, Reason, RestartConfig, RestartPolicy,
    RestartState,
};
