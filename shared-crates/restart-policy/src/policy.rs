//! Restart decisions for one worker.

use std::time::{Duration, Instant};

use rand::Rng;

use crate::breaker::{BreakerTransition, CircuitBreaker};

/// When a worker that exited is restarted at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    /// After any exit the supervisor did not ask for.
    Always,
    /// Only after a failure (non-zero exit, signal, failed health checks).
    OnFailure,
    /// Never.
    Never,
}

/// How the worker ended, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// Exit code 0.
    Success,
    /// Non-zero exit, killed by a signal, or declared dead by the supervisor
    /// (missed heartbeats, failed health checks, load timeout).
    Failure,
}

impl ExitKind {
    /// Classify a process exit status: only code 0 is a success.
    pub fn from_status(status: std::process::ExitStatus) -> Self {
        if status.code() == Some(0) {
            Self::Success
        } else {
            Self::Failure
        }
    }
}

/// Settings for [`RestartPolicy`]. `Default` gives the contract's values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestartConfig {
    /// Default [`PolicyKind::OnFailure`].
    pub kind: PolicyKind,
    /// First backoff delay (default 1 s).
    pub backoff_base: Duration,
    /// Longest backoff delay before jitter (default 60 s).
    pub backoff_cap: Duration,
    /// Jitter as a fraction of the delay, in `[0, 1)` (default 0.2 for ±20 %).
    pub jitter: f64,
    /// Restart attempts before giving up (default 3).
    pub max_attempts: u32,
    /// Uptime after which the attempt count starts again from zero (default 300 s).
    pub stable_uptime: Duration,
}

impl Default for RestartConfig {
    fn default() -> Self {
        Self {
            kind: PolicyKind::OnFailure,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(60),
            jitter: 0.2,
            max_attempts: 3,
            stable_uptime: Duration::from_secs(300),
        }
    }
}

/// Settings that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A duration that must be positive is zero.
    #[error("{0} must be greater than zero")]
    ZeroDuration(&'static str),
    /// The cap is below the base.
    #[error("backoff cap must not be smaller than the backoff base")]
    CapBelowBase,
    /// Jitter outside `[0, 1)`.
    #[error("jitter must be a fraction in [0, 1)")]
    JitterOutOfRange,
    /// A breaker that opens after zero failures.
    #[error("circuit breaker failure threshold must be at least 1")]
    ZeroThreshold,
}

/// Why a decision was made; `as_str` is the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Restart after a backoff delay.
    Backoff,
    /// No restart: the worker used up its attempts.
    MaxAttempts,
    /// No restart: the (model, device) breaker is open.
    CircuitOpen,
    /// No restart: the policy is `Never`.
    PolicyNever,
    /// No restart: a clean exit under `OnFailure`.
    CleanExit,
}

impl Reason {
    /// `backoff`, `max_attempts`, `circuit_open`, `policy_never` or `clean_exit`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Backoff => "backoff",
            Self::MaxAttempts => "max_attempts",
            Self::CircuitOpen => "circuit_open",
            Self::PolicyNever => "policy_never",
            Self::CleanExit => "clean_exit",
        }
    }
}

/// What to do about an exited worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Restart after `delay`; this is restart number `attempt` (1-based).
    /// The spawn itself must still pass [`CircuitBreaker::try_acquire`].
    Restart {
        /// Wait this long first.
        delay: Duration,
        /// 1 for the first restart.
        attempt: u32,
    },
    /// Leave it stopped.
    Stop {
        /// Why; never [`Reason::Backoff`].
        reason: Reason,
        /// For [`Reason::CircuitOpen`]: when a spawn may pass again.
        retry_after: Option<Duration>,
    },
}

impl Decision {
    /// The reason, for a metric label.
    pub fn reason(&self) -> Reason {
        match self {
            Self::Restart { .. } => Reason::Backoff,
            Self::Stop { reason, .. } => *reason,
        }
    }
}

/// A decision plus what it did to the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitOutcome {
    /// Restart or not.
    pub decision: Decision,
    /// Set when recording this exit opened the breaker.
    pub breaker: Option<BreakerTransition>,
}

/// Per-worker memory of the policy: attempts so far and the current run's start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestartState {
    attempts: u32,
    started_at: Option<Instant>,
}

impl RestartState {
    /// A worker that has not run yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The worker (re)started running at `now`.
    pub fn record_start(&mut self, now: Instant) {
        self.started_at = Some(now);
    }

    /// Restarts since the last stable run.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

/// Validated restart settings; see [`RestartConfig`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestartPolicy {
    config: RestartConfig,
}

impl RestartPolicy {
    /// Validate `config`.
    pub fn try_new(config: RestartConfig) -> Result<Self, ConfigError> {
        if config.backoff_base.is_zero() {
            return Err(ConfigError::ZeroDuration("backoff base"));
        }
        if config.backoff_cap < config.backoff_base {
            return Err(ConfigError::CapBelowBase);
        }
        if !(config.jitter.is_finite() && (0.0..1.0).contains(&config.jitter)) {
            return Err(ConfigError::JitterOutOfRange);
        }
        if config.stable_uptime.is_zero() {
            return Err(ConfigError::ZeroDuration("stable uptime"));
        }
        Ok(Self { config })
    }

    /// The settings.
    pub fn config(&self) -> &RestartConfig {
        &self.config
    }

    /// Longest delay any decision can return: the cap plus full jitter.
    pub fn max_delay(&self) -> Duration {
        self.config.backoff_cap.mul_f64(1.0 + self.config.jitter)
    }

    /// Decide about a worker that exited at `now` without being asked to.
    ///
    /// Records a failure in `breaker` (which is per model and device, shared
    /// by the pair's workers), resets the attempt count after a stable run,
    /// and returns restart-with-delay or stop, each with its reason.
    pub fn on_exit<R: Rng + ?Sized>(
        &self,
        state: &mut RestartState,
        breaker: &mut CircuitBreaker,
        exit: ExitKind,
        now: Instant,
        rng: &mut R,
    ) -> ExitOutcome {
        if let Some(started) = state.started_at.take() {
            if now.saturating_duration_since(started) >= self.config.stable_uptime {
                state.attempts = 0;
            }
        }
        let breaker_transition = match exit {
            ExitKind::Failure => breaker.record_failure(now),
            ExitKind::Success => None,
        };
        let stop = |reason, retry_after| ExitOutcome {
            decision: Decision::Stop {
                reason,
                retry_after,
            },
            breaker: breaker_transition,
        };
        match (self.config.kind, exit) {
            (PolicyKind::Never, _) => return stop(Reason::PolicyNever, None),
            (PolicyKind::OnFailure, ExitKind::Success) => return stop(Reason::CleanExit, None),
            _ => {}
        }
        if let Some(wait) = breaker.would_refuse(now) {
            return stop(Reason::CircuitOpen, Some(wait));
        }
        if state.attempts >= self.config.max_attempts {
            return stop(Reason::MaxAttempts, None);
        }
        let delay = self.backoff(state.attempts, rng);
        state.attempts += 1;
        ExitOutcome {
            decision: Decision::Restart {
                delay,
                attempt: state.attempts,
            },
            breaker: breaker_transition,
        }
    }

    /// `min(base * 2^attempt, cap)`, then scaled by a uniform factor in
    /// `[1 - jitter, 1 + jitter)`.
    pub fn backoff<R: Rng + ?Sized>(&self, attempt: u32, rng: &mut R) -> Duration {
        let factor = 2u32.checked_pow(attempt).unwrap_or(u32::MAX);
        let raw = self
            .config
            .backoff_base
            .checked_mul(factor)
            .unwrap_or(self.config.backoff_cap)
            .min(self.config.backoff_cap);
        let unit: f64 = rng.random();
        raw.mul_f64(1.0 + self.config.jitter * (2.0 * unit - 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::BreakerConfig;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn policy(kind: PolicyKind) -> RestartPolicy {
        RestartPolicy::try_new(RestartConfig {
            kind,
            ..Default::default()
        })
        .unwrap()
    }

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::try_new(BreakerConfig::default()).unwrap()
    }

    fn no_jitter() -> RestartPolicy {
        RestartPolicy::try_new(RestartConfig {
            jitter: 0.0,
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn backoff_doubles_from_base_then_gives_up_after_max_attempts() {
        let p = no_jitter();
        let mut state = RestartState::new();
        let mut b = breaker();
        let mut rng = StdRng::seed_from_u64(1);
        let t0 = Instant::now();
        let mut delays = Vec::new();
        for i in 0..3 {
            state.record_start(t0 + Duration::from_secs(i));
            let out = p.on_exit(
                &mut state,
                &mut b,
                ExitKind::Failure,
                t0 + Duration::from_secs(i + 1),
                &mut rng,
            );
            match out.decision {
                Decision::Restart { delay, attempt } => {
                    assert_eq!(attempt as u64, i + 1);
                    delays.push(delay);
                }
                other => panic!("expected restart, got {other:?}"),
            }
        }
        assert_eq!(delays, [1, 2, 4].map(Duration::from_secs));
        let out = p.on_exit(
            &mut state,
            &mut b,
            ExitKind::Failure,
            t0 + Duration::from_secs(10),
            &mut rng,
        );
        assert_eq!(out.decision.reason(), Reason::MaxAttempts);
    }

    #[test]
    fn backoff_is_capped() {
        let p = no_jitter();
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(p.backoff(6, &mut rng), Duration::from_secs(60));
        assert_eq!(p.backoff(40, &mut rng), Duration::from_secs(60));
        assert_eq!(p.backoff(u32::MAX, &mut rng), Duration::from_secs(60));
    }

    #[test]
    fn never_policy_never_restarts() {
        let p = policy(PolicyKind::Never);
        let out = p.on_exit(
            &mut RestartState::new(),
            &mut breaker(),
            ExitKind::Failure,
            Instant::now(),
            &mut StdRng::seed_from_u64(0),
        );
        assert_eq!(out.decision.reason(), Reason::PolicyNever);
        assert_eq!(Reason::PolicyNever.as_str(), "policy_never");
    }

    #[test]
    fn on_failure_ignores_clean_exits_but_always_restarts_them() {
        let mut rng = StdRng::seed_from_u64(0);
        let out = policy(PolicyKind::OnFailure).on_exit(
            &mut RestartState::new(),
            &mut breaker(),
            ExitKind::Success,
            Instant::now(),
            &mut rng,
        );
        assert_eq!(out.decision.reason(), Reason::CleanExit);
        let out = policy(PolicyKind::Always).on_exit(
            &mut RestartState::new(),
            &mut breaker(),
            ExitKind::Success,
            Instant::now(),
            &mut rng,
        );
        assert_eq!(out.decision.reason(), Reason::Backoff);
    }

    #[test]
    fn clean_exits_do_not_count_towards_the_breaker() {
        let p = policy(PolicyKind::Always);
        let mut b = breaker();
        let mut rng = StdRng::seed_from_u64(0);
        let t0 = Instant::now();
        for _ in 0..10 {
            let out = p.on_exit(
                &mut RestartState::new(),
                &mut b,
                ExitKind::Success,
                t0,
                &mut rng,
            );
            assert_eq!(out.breaker, None);
        }
        assert_eq!(b.recent_failures(t0), 0);
    }

    #[test]
    fn open_breaker_stops_restarts_with_retry_after() {
        let p = policy(PolicyKind::OnFailure);
        let mut b = breaker();
        let mut rng = StdRng::seed_from_u64(0);
        let t0 = Instant::now();
        // Five different workers of the same pair fail once each.
        let mut last = None;
        for _ in 0..5 {
            last = Some(p.on_exit(
                &mut RestartState::new(),
                &mut b,
                ExitKind::Failure,
                t0,
                &mut rng,
            ));
        }
        let last = last.unwrap();
        assert_eq!(last.breaker, Some(BreakerTransition::Opened));
        assert_eq!(
            last.decision,
            Decision::Stop {
                reason: Reason::CircuitOpen,
                retry_after: Some(Duration::from_secs(60))
            }
        );
    }

    #[test]
    fn stable_uptime_resets_the_attempt_count() {
        let p = no_jitter();
        let mut state = RestartState::new();
        let mut b = CircuitBreaker::try_new(BreakerConfig {
            failure_threshold: 100,
            ..Default::default()
        })
        .unwrap();
        let mut rng = StdRng::seed_from_u64(0);
        let mut now = Instant::now();
        for _ in 0..3 {
            state.record_start(now);
            now += Duration::from_secs(5);
            p.on_exit(&mut state, &mut b, ExitKind::Failure, now, &mut rng);
        }
        assert_eq!(state.attempts(), 3);
        // The fourth run lasts five minutes: the count starts over.
        state.record_start(now);
        now += Duration::from_secs(300);
        let out = p.on_exit(&mut state, &mut b, ExitKind::Failure, now, &mut rng);
        assert_eq!(
            out.decision,
            Decision::Restart {
                delay: Duration::from_secs(1),
                attempt: 1
            }
        );
    }

    #[test]
    fn invalid_settings_are_rejected_with_typed_errors() {
        let bad = |c: RestartConfig| RestartPolicy::try_new(c).unwrap_err();
        let d = RestartConfig::default();
        assert_eq!(
            bad(RestartConfig {
                backoff_base: Duration::ZERO,
                ..d
            }),
            ConfigError::ZeroDuration("backoff base")
        );
        assert_eq!(
            bad(RestartConfig {
                backoff_cap: Duration::from_millis(10),
                ..d
            }),
            ConfigError::CapBelowBase
        );
        assert_eq!(
            bad(RestartConfig { jitter: 1.0, ..d }),
            ConfigError::JitterOutOfRange
        );
        assert_eq!(
            bad(RestartConfig { jitter: -0.1, ..d }),
            ConfigError::JitterOutOfRange
        );
        assert_eq!(
            bad(RestartConfig {
                jitter: f64::NAN,
                ..d
            }),
            ConfigError::JitterOutOfRange
        );
        assert_eq!(
            bad(RestartConfig {
                stable_uptime: Duration::ZERO,
                ..d
            }),
            ConfigError::ZeroDuration("stable uptime")
        );
    }

    #[test]
    fn same_seed_same_delays() {
        let p = RestartPolicy::try_new(RestartConfig::default()).unwrap();
        let a: Vec<_> = (0..5)
            .map(|i| p.backoff(i, &mut StdRng::seed_from_u64(42)))
            .collect();
        let b: Vec<_> = (0..5)
            .map(|i| p.backoff(i, &mut StdRng::seed_from_u64(42)))
            .collect();
        assert_eq!(a, b);
    }

    proptest! {
        #[test]
        fn delay_stays_within_cap_plus_jitter(
            base_ms in 1u64..10_000,
            cap_factor in 1u64..1000,
            jitter in 0.0f64..0.99,
            attempt in 0u32..200,
            seed in any::<u64>(),
        ) {
            let config = RestartConfig {
                backoff_base: Duration::from_millis(base_ms),
                backoff_cap: Duration::from_millis(base_ms * cap_factor),
                jitter,
                ..Default::default()
            };
            let p = RestartPolicy::try_new(config).unwrap();
            let delay = p.backoff(attempt, &mut StdRng::seed_from_u64(seed));
            prop_assert!(delay <= p.max_delay());
            // Never below the jittered base: non-negative and not collapsing to zero.
            prop_assert!(delay >= config.backoff_base.mul_f64(1.0 - jitter).saturating_sub(Duration::from_nanos(1)));
        }

        #[test]
        fn jitter_stays_within_twenty_percent_of_the_nominal_delay(attempt in 0u32..10, seed in any::<u64>()) {
            let p = RestartPolicy::try_new(RestartConfig::default()).unwrap();
            let nominal = Duration::from_secs(1u64 << attempt).min(Duration::from_secs(60));
            let delay = p.backoff(attempt, &mut StdRng::seed_from_u64(seed));
            prop_assert!(delay >= nominal.mul_f64(0.8));
            prop_assert!(delay <= nominal.mul_f64(1.2));
        }

        #[test]
        fn a_stable_run_always_restarts_from_attempt_one(prior in 0u32..3, uptime_s in 300u64..100_000, seed in any::<u64>()) {
            let p = RestartPolicy::try_new(RestartConfig::default()).unwrap();
            let mut b = CircuitBreaker::try_new(BreakerConfig { failure_threshold: 1000, ..Default::default() }).unwrap();
            let mut rng = StdRng::seed_from_u64(seed);
            let mut state = RestartState::new();
            let mut now = Instant::now();
            for _ in 0..prior {
                state.record_start(now);
                now += Duration::from_secs(1);
                p.on_exit(&mut state, &mut b, ExitKind::Failure, now, &mut rng);
            }
            state.record_start(now);
            now += Duration::from_secs(uptime_s);
            let out = p.on_exit(&mut state, &mut b, ExitKind::Failure, now, &mut rng);
            let restarted_fresh = matches!(out.decision, Decision::Restart { attempt: 1, .. });
            prop_assert!(restarted_fresh, "decision was {:?}", out.decision);
        }
    }
}
