//! Circuit breaker per (model, device).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::policy::ConfigError;

/// Circuit breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Failures within `window` that open the breaker (default 5).
    pub failure_threshold: u32,
    /// Sliding window for counting failures (default 300 s).
    pub window: Duration,
    /// Time the breaker stays open before letting one probe spawn through (default 60 s).
    pub cooldown: Duration,
    /// Time a probe spawn may stay out without an outcome before the next
    /// caller gets a probe of its own (default 300 s): a probe whose
    /// outcome was never reported cannot keep the breaker half-open forever.
    pub probe_timeout: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            window: Duration::from_secs(300),
            cooldown: Duration::from_secs(60),
            probe_timeout: Duration::from_secs(300),
        }
    }
}

impl BreakerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.failure_threshold == 0 {
            return Err(ConfigError::ZeroThreshold);
        }
        if self.window.is_zero() {
            return Err(ConfigError::ZeroDuration("breaker window"));
        }
        if self.cooldown.is_zero() {
            return Err(ConfigError::ZeroDuration("breaker cooldown"));
        }
        if self.probe_timeout.is_zero() {
            return Err(ConfigError::ZeroDuration("breaker probe timeout"));
        }
        Ok(())
    }
}

/// What the breaker is doing, for the `rbee_hive_circuit_breaker_open` gauge and `/v1/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerStatus {
    /// Spawns pass.
    Closed,
    /// Spawns are refused until the cooldown ends.
    Open,
    /// One probe spawn is allowed (or out); its result decides.
    HalfOpen,
}

/// A change of state worth a metric and an audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerTransition {
    /// Closed or half-open to open.
    Opened,
    /// Half-open to closed: the probe succeeded.
    Closed,
}

/// Permission to spawn, from [`CircuitBreaker::try_acquire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// The breaker is closed.
    Normal,
    /// The one spawn a half-open breaker lets through; report its outcome
    /// with [`CircuitBreaker::record_success`] or [`CircuitBreaker::record_failure`],
    /// or give it up with [`CircuitBreaker::abandon_probe`].
    Probe(ProbeId),
}

/// Which probe a [`Permit::Probe`] is, so that giving up a probe that timed
/// out cannot end the one that replaced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeId(u64);

/// A spawn refused by an open breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker open; retry after {retry_after:?}")]
pub struct SpawnRefused {
    /// When asking again may succeed (for `Retry-After`).
    pub retry_after: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed,
    Open {
        until: Instant,
    },
    /// `probe`: the probe out and when it was taken.
    HalfOpen {
        probe: Option<(ProbeId, Instant)>,
    },
}

/// Counts failures of one (model, device) pair and refuses spawns while they
/// come too fast.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    failures: VecDeque<Instant>,
    state: State,
    probes: u64,
}

impl CircuitBreaker {
    /// A closed breaker; rejects invalid settings.
    pub fn try_new(config: BreakerConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            config,
            failures: VecDeque::new(),
            state: State::Closed,
            probes: 0,
        })
    }

    /// The settings.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// Take new settings (a configuration reload) and keep the state: the
    /// failures already counted are judged against the new threshold and
    /// window from the next failure on, and an open breaker stays open until
    /// the end of the cooldown it started with. Settings
    /// [`try_new`](Self::try_new) would refuse are ignored.
    pub fn reconfigure(&mut self, config: BreakerConfig) {
        if config.validate().is_ok() {
            self.config = config;
        }
    }

    /// The current status; an open breaker whose cooldown has ended reads as half-open.
    pub fn status(&self, now: Instant) -> BreakerStatus {
        match self.state {
            State::Closed => BreakerStatus::Closed,
            State::Open { until } if now < until => BreakerStatus::Open,
            State::Open { .. } | State::HalfOpen { .. } => BreakerStatus::HalfOpen,
        }
    }

    /// Failures counted in the current window.
    pub fn recent_failures(&self, now: Instant) -> usize {
        self.failures
            .iter()
            .filter(|t| now.saturating_duration_since(**t) < self.config.window)
            .count()
    }

    /// Whether a spawn now would be refused, and for how long; does not take the probe.
    pub fn would_refuse(&self, now: Instant) -> Option<Duration> {
        match self.state {
            State::Closed => None,
            State::Open { until } if now < until => Some(until - now),
            State::Open { .. } => None,
            State::HalfOpen { probe } => match probe {
                Some((_, since)) if !self.probe_expired(since, now) => {
                    Some(self.probe_left(since, now))
                }
                _ => None,
            },
        }
    }

    fn probe_expired(&self, since: Instant, now: Instant) -> bool {
        now.saturating_duration_since(since) >= self.config.probe_timeout
    }

    /// Until the probe out times out, at least a second.
    fn probe_left(&self, since: Instant, now: Instant) -> Duration {
        self.config
            .probe_timeout
            .saturating_sub(now.saturating_duration_since(since))
            .max(Duration::from_secs(1))
    }

    /// Ask to spawn now. In half-open state exactly one caller gets a
    /// [`Permit::Probe`]; everyone else is refused until it reports back or
    /// its `probe_timeout` passes.
    pub fn try_acquire(&mut self, now: Instant) -> Result<Permit, SpawnRefused> {
        match self.state {
            State::Closed => Ok(Permit::Normal),
            State::Open { until } if now < until => Err(SpawnRefused {
                retry_after: until - now,
            }),
            State::HalfOpen {
                probe: Some((_, since)),
            } if !self.probe_expired(since, now) => Err(SpawnRefused {
                retry_after: self.probe_left(since, now),
            }),
            State::Open { .. } | State::HalfOpen { .. } => {
                self.probes += 1;
                let id = ProbeId(self.probes);
                self.state = State::HalfOpen {
                    probe: Some((id, now)),
                };
                Ok(Permit::Probe(id))
            }
        }
    }

    /// The probe `id` ended without an outcome of its own (it could not be
    /// started, it was stopped before it was ready, its record was lost):
    /// counted as the failure it may be, so the breaker opens again for a
    /// cooldown and then lets another probe through. A probe that already
    /// reported, or that timed out and was replaced, changes nothing.
    pub fn abandon_probe(&mut self, id: ProbeId, now: Instant) -> Option<BreakerTransition> {
        match self.state {
            State::HalfOpen {
                probe: Some((out, _)),
            } if out == id => self.open(now),
            _ => None,
        }
    }

    /// A worker of this pair failed (crashed, failed health checks, failed to load).
    pub fn record_failure(&mut self, now: Instant) -> Option<BreakerTransition> {
        match self.state {
            State::Closed => {
                self.failures.push_back(now);
                let window = self.config.window;
                while let Some(oldest) = self.failures.front() {
                    if now.saturating_duration_since(*oldest) >= window {
                        self.failures.pop_front();
                    } else {
                        break;
                    }
                }
                if self.failures.len() >= self.config.failure_threshold as usize {
                    self.open(now)
                } else {
                    None
                }
            }
            // The probe (or a worker started before the breaker opened) failed.
            State::HalfOpen { .. } => self.open(now),
            State::Open { .. } => None,
        }
    }

    /// A worker of this pair became ready. Closes a half-open breaker.
    pub fn record_success(&mut self, _now: Instant) -> Option<BreakerTransition> {
        match self.state {
            State::HalfOpen { .. } => {
                self.state = State::Closed;
                self.failures.clear();
                Some(BreakerTransition::Closed)
            }
            State::Closed | State::Open { .. } => None,
        }
    }

    fn open(&mut self, now: Instant) -> Option<BreakerTransition> {
        self.state = State::Open {
            until: now + self.config.cooldown,
        };
        self.failures.clear();
        Some(BreakerTransition::Opened)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::try_new(BreakerConfig::default()).unwrap()
    }

    #[test]
    fn opens_at_the_fifth_failure_within_the_window() {
        let mut b = breaker();
        let t0 = Instant::now();
        for i in 0..4 {
            assert_eq!(b.record_failure(t0 + Duration::from_secs(i * 10)), None);
            assert_eq!(b.status(t0), BreakerStatus::Closed);
        }
        assert_eq!(
            b.record_failure(t0 + Duration::from_secs(40)),
            Some(BreakerTransition::Opened)
        );
        let t = t0 + Duration::from_secs(41);
        assert_eq!(b.status(t), BreakerStatus::Open);
        let refused = b.try_acquire(t).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(59));
    }

    #[test]
    fn a_reconfigured_breaker_keeps_its_failures_and_counts_against_the_new_threshold() {
        let mut b = breaker();
        let t0 = Instant::now();
        assert_eq!(b.record_failure(t0), None);
        assert_eq!(b.record_failure(t0), None);
        b.reconfigure(BreakerConfig {
            failure_threshold: 3,
            ..BreakerConfig::default()
        });
        assert_eq!(b.config().failure_threshold, 3);
        assert_eq!(b.record_failure(t0), Some(BreakerTransition::Opened));
        // Invalid settings change nothing.
        b.reconfigure(BreakerConfig {
            failure_threshold: 0,
            ..BreakerConfig::default()
        });
        assert_eq!(b.config().failure_threshold, 3);
        assert_eq!(b.status(t0), BreakerStatus::Open);
    }

    #[test]
    fn failures_outside_the_window_do_not_count() {
        let mut b = breaker();
        let t0 = Instant::now();
        for i in 0..10 {
            // One failure every 76 s: never 5 within 300 s.
            assert_eq!(b.record_failure(t0 + Duration::from_secs(i * 76)), None);
        }
        assert_eq!(
            b.status(t0 + Duration::from_secs(800)),
            BreakerStatus::Closed
        );
    }

    #[test]
    fn half_open_lets_exactly_one_probe_through_and_its_success_closes() {
        let mut b = breaker();
        let t0 = Instant::now();
        for _ in 0..5 {
            b.record_failure(t0);
        }
        let after = t0 + Duration::from_secs(60);
        assert_eq!(b.status(after), BreakerStatus::HalfOpen);
        assert_eq!(b.would_refuse(after), None);
        assert!(matches!(b.try_acquire(after), Ok(Permit::Probe(_))));
        assert!(b.try_acquire(after).is_err());
        assert!(b.would_refuse(after).is_some());
        assert_eq!(b.record_success(after), Some(BreakerTransition::Closed));
        assert_eq!(b.try_acquire(after), Ok(Permit::Normal));
    }

    #[test]
    fn failed_probe_reopens_for_another_cooldown() {
        let mut b = breaker();
        let t0 = Instant::now();
        for _ in 0..5 {
            b.record_failure(t0);
        }
        let t1 = t0 + Duration::from_secs(61);
        assert!(matches!(b.try_acquire(t1), Ok(Permit::Probe(_))));
        assert_eq!(b.record_failure(t1), Some(BreakerTransition::Opened));
        assert_eq!(b.status(t1 + Duration::from_secs(59)), BreakerStatus::Open);
        assert_eq!(
            b.status(t1 + Duration::from_secs(60)),
            BreakerStatus::HalfOpen
        );
    }

    #[test]
    fn an_abandoned_probe_reopens_and_a_lost_one_times_out() {
        let mut b = breaker();
        let t0 = Instant::now();
        for _ in 0..5 {
            b.record_failure(t0);
        }
        let t1 = t0 + Duration::from_secs(60);
        let Ok(Permit::Probe(first)) = b.try_acquire(t1) else {
            panic!("a probe after the cooldown")
        };
        // Given up without an outcome: open for another cooldown, then
        // another probe.
        assert_eq!(b.abandon_probe(first, t1), Some(BreakerTransition::Opened));
        assert_eq!(b.status(t1), BreakerStatus::Open);
        let t2 = t1 + Duration::from_secs(60);
        let Ok(Permit::Probe(second)) = b.try_acquire(t2) else {
            panic!("a probe after the second cooldown")
        };
        assert_eq!(b.abandon_probe(first, t2), None, "not the probe out");
        // Never reported: refused until the probe timeout, then replaced.
        let waiting = b.try_acquire(t2 + Duration::from_secs(299)).unwrap_err();
        assert_eq!(waiting.retry_after, Duration::from_secs(1));
        let t3 = t2 + Duration::from_secs(300);
        assert_eq!(b.would_refuse(t3), None);
        let Ok(Permit::Probe(third)) = b.try_acquire(t3) else {
            panic!("a lost probe is replaced after its timeout")
        };
        assert_eq!(b.abandon_probe(second, t3), None, "replaced already");
        assert_eq!(b.record_success(t3), Some(BreakerTransition::Closed));
        assert_eq!(b.abandon_probe(third, t3), None, "reported already");
        assert_eq!(b.try_acquire(t3), Ok(Permit::Normal));
    }

    #[test]
    fn invalid_settings_are_rejected() {
        let zero = BreakerConfig {
            failure_threshold: 0,
            ..Default::default()
        };
        assert_eq!(
            CircuitBreaker::try_new(zero).unwrap_err(),
            ConfigError::ZeroThreshold
        );
        let no_window = BreakerConfig {
            window: Duration::ZERO,
            ..Default::default()
        };
        assert!(CircuitBreaker::try_new(no_window).is_err());
    }

    proptest! {
        #[test]
        fn opens_exactly_when_threshold_failures_fall_in_the_window(
            threshold in 1u32..10,
            gaps in proptest::collection::vec(0u64..200, 1..30),
        ) {
            let config = BreakerConfig { failure_threshold: threshold, window: Duration::from_secs(300), cooldown: Duration::from_secs(60), ..Default::default() };
            let mut b = CircuitBreaker::try_new(config).unwrap();
            let t0 = Instant::now();
            let mut now = t0;
            let mut times: Vec<Instant> = Vec::new();
            for gap in gaps {
                now += Duration::from_secs(gap);
                times.push(now);
                let in_window = times.iter().filter(|t| now.duration_since(**t) < config.window).count();
                let transition = b.record_failure(now);
                if in_window >= threshold as usize {
                    prop_assert_eq!(transition, Some(BreakerTransition::Opened));
                    // Model what the breaker does: it forgets counted failures once open.
                    prop_assert_eq!(b.status(now), BreakerStatus::Open);
                    break;
                } else {
                    prop_assert_eq!(transition, None);
                    prop_assert_eq!(b.status(now), BreakerStatus::Closed);
                }
            }
        }
    }
}
