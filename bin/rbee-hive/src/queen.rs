//! Registration with the queen (`--queen-url`): `POST /v2/hives/register`
//! at startup, retried with backoff until the queen answers, then repeated
//! every interval so a queen that restarted (and forgot its hives) learns
//! about this one again.

use std::time::Duration;

use auth_min::{send_authenticated, Authenticator};
use rbee_api::fleet::HiveRegistration;
use tokio_util::sync::CancellationToken;

/// Where and how to register.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The queen's base URL.
    pub queen_url: String,
    /// This hive's name.
    pub node_name: String,
    /// This hive's URL as the queen should call it.
    pub url: String,
    /// Time between registrations once registered.
    pub interval: Duration,
}

/// Longest pause between failed attempts.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Register until `shutdown`; never returns early.
pub async fn keep_registered(reg: Registration, auth: Authenticator, shutdown: CancellationToken) {
    let client = rbee_http::client::http_client();
    let body = HiveRegistration {
        node_name: reg.node_name.clone(),
        url: reg.url.clone(),
    };
    let mut retry = Duration::from_secs(1);
    let mut registered = false;
    loop {
        let request = client
            .post(format!("{}/v2/hives/register", reg.queen_url))
            .timeout(Duration::from_secs(10))
            .json(&body);
        let wait = match send_authenticated(request, &auth).await {
            Ok(r) if r.status().is_success() => {
                if !registered {
                    tracing::info!(queen = %reg.queen_url, node_name = %reg.node_name, url = %reg.url, "registered with the queen");
                }
                registered = true;
                retry = Duration::from_secs(1);
                reg.interval
            }
            outcome => {
                let why = match outcome {
                    Ok(r) => format!("HTTP {}", r.status().as_u16()),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(queen = %reg.queen_url, error = %why, retry_in_s = retry.as_secs(), "cannot register with the queen; retrying");
                registered = false;
                let wait = retry;
                retry = (retry * 2).min(MAX_RETRY);
                wait
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}
