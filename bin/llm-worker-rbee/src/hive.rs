//! Reporting to the hive: the ready callback once the model is loaded, then
//! a heartbeat every interval. Both carry the API token. A failed callback is
//! retried with backoff and logged; the worker keeps serving meanwhile (the
//! hive also finds workers by heartbeat and health check).

use std::time::Duration;

use auth_min::{send_authenticated, Authenticator};
use rbee_api::worker::{Heartbeat, ReadyCallback, WorkerState};
use tokio_util::sync::CancellationToken;

/// First retry delay of the ready callback; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// Longest wait between ready-callback attempts.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// Bound on each call to the hive.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and how to report.
#[derive(Debug, Clone)]
pub struct HiveReporter {
    /// The hive's base URL.
    pub hive_url: String,
    /// The token sent with every call (rotated in place by a reload).
    pub auth: Authenticator,
    /// The ready callback's body.
    pub callback: ReadyCallback,
    /// Heartbeat period.
    pub interval: Duration,
}

impl HiveReporter {
    /// Send the ready callback until the hive takes it, then heartbeat until
    /// `shutdown`; `busy` says whether the model has work now.
    pub async fn run(self, busy: impl Fn() -> bool, shutdown: CancellationToken) {
        let client = match rbee_http::client::http_client_builder()
            .timeout(CALL_TIMEOUT)
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the HTTP client for hive callbacks");
                return;
            }
        };
        let base = self.hive_url.trim_end_matches('/').to_owned();
        let mut delay = FIRST_RETRY;
        let mut attempt = 1u32;
        loop {
            let sent = send_authenticated(
                client
                    .post(format!("{base}/v1/workers/ready"))
                    .json(&self.callback),
                &self.auth,
            )
            .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    tracing::info!(hive = %base, attempt, "ready callback accepted by the hive");
                    break;
                }
                Ok(r) => {
                    tracing::warn!(hive = %base, attempt, status = r.status().as_u16(), retry_in_ms = delay.as_millis() as u64, "ready callback refused; retrying")
                }
                Err(e) => {
                    tracing::warn!(hive = %base, attempt, error = %e, retry_in_ms = delay.as_millis() as u64, "ready callback failed; retrying")
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => return,
            }
            delay = (delay * 2).min(MAX_RETRY);
            attempt += 1;
        }
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        let mut failing = false;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let state = if shutdown.is_cancelled() {
                WorkerState::Draining
            } else if busy() {
                WorkerState::Busy
            } else {
                WorkerState::Idle
            };
            let beat = Heartbeat {
                worker_id: self.callback.worker_id.clone(),
                timestamp: humantime::format_rfc3339_millis(std::time::SystemTime::now())
                    .to_string(),
                state,
            };
            let sent = send_authenticated(
                client
                    .post(format!("{base}/v1/workers/heartbeat"))
                    .json(&beat),
                &self.auth,
            )
            .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    if failing {
                        tracing::info!(hive = %base, "heartbeats reach the hive again");
                    }
                    failing = false;
                }
                outcome => {
                    if !failing {
                        let why = match outcome {
                            Ok(r) => format!("status {}", r.status().as_u16()),
                            Err(e) => e.to_string(),
                        };
                        tracing::warn!(hive = %base, why, "heartbeat failed; the worker keeps serving");
                    }
                    failing = true;
                }
            }
        }
    }
}
