//! `fake-worker`: a test double of `llm-worker-rbee` for benchmarks. It
//! accepts the flags a hive passes to a worker, calls the hive back when
//! "loaded", heartbeats, and answers `POST /v1/inference` by emitting
//! `max_tokens` tokens, one every `RBEE_FAKE_TOKEN_INTERVAL_US`
//! microseconds (default 10000), with `--slots` concurrent requests at most.
//! It runs no model.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use bytes::Bytes;
use rbee_api::inference::{InferenceRequest, InferenceResponse, StopReason, StreamEvent};
use rbee_api::sse;
use rbee_api::worker::{Backend, Heartbeat, ReadyCallback, WorkerReadiness, WorkerState};
use rbee_api::{ApiError, ErrorCode};

#[derive(Debug, Default)]
struct Args {
    addr: String,
    worker_id: String,
    model_ref: String,
    slots: u32,
    hive_url: Option<String>,
    token_file: Option<String>,
    heartbeat_s: u64,
}

fn parse_args() -> Args {
    let mut args = Args {
        addr: "127.0.0.1:0".into(),
        worker_id: "fake".into(),
        model_ref: "fake:model".into(),
        slots: 1,
        heartbeat_s: 10,
        ..Args::default()
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--version" {
            println!("0.1.0 backends=cpu");
            std::process::exit(0);
        }
        let value = it.next().unwrap_or_default();
        match flag.as_str() {
            "--addr" => args.addr = value,
            "--worker-id" => args.worker_id = value,
            "--model-ref" => args.model_ref = value,
            "--slots" => args.slots = value.parse().unwrap_or(1),
            "--hive-url" => args.hive_url = Some(value),
            "--api-token-file" => args.token_file = Some(value),
            "--heartbeat-interval-s" => args.heartbeat_s = value.parse().unwrap_or(10),
            // --model, --backend, --device, --parent-pid, --log-format: accepted, unused.
            _ => {}
        }
    }
    args
}

struct Fake {
    slots: u32,
    running: AtomicU32,
    served: AtomicU64,
    interval: Duration,
    model_ref: String,
}

struct SlotGuard(Arc<Fake>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
    }
}

fn busy(slots: u32) -> Response {
    ApiError::new(
        ErrorCode::AllSlotsBusy,
        format!("all {slots} slots are busy"),
    )
    .with_retry_after(1)
    .into_response()
}

/// One event as the worker frames it.
fn event(event: &StreamEvent) -> Bytes {
    let mut out = Vec::new();
    sse::frame(&serde_json::to_string(event).unwrap_or_default(), &mut out);
    Bytes::from(out)
}

async fn inference(State(fake): State<Arc<Fake>>, Json(body): Json<InferenceRequest>) -> Response {
    let taken = fake.running.fetch_add(1, Ordering::AcqRel);
    let guard = SlotGuard(Arc::clone(&fake));
    if taken >= fake.slots {
        drop(guard);
        return busy(fake.slots);
    }
    let max_tokens = body.max_tokens.max(1);
    let job_id = body.job_id.unwrap_or_else(|| "fake-job".to_owned());
    let interval = fake.interval;
    fake.served.fetch_add(1, Ordering::Relaxed);
    if !body.stream {
        tokio::time::sleep(interval * (max_tokens - 1)).await;
        drop(guard);
        return Json(InferenceResponse {
            job_id,
            text: "tok".repeat(max_tokens as usize),
            tokens_in: 4,
            tokens_out: max_tokens,
            tokens_cached: 0,
            stop_reason: StopReason::MaxTokens,
            decode_time_ms: 0,
            logprobs: Vec::new(),
        })
        .into_response();
    }
    let model = fake.model_ref.clone();
    let started = tokio::time::Instant::now();
    let events = futures_util::stream::unfold(0u32, move |i| {
        let job_id = job_id.clone();
        let model = model.clone();
        async move {
            let bytes = if i == 0 {
                event(&StreamEvent::Started {
                    job_id,
                    request_id: String::new(),
                    model,
                    started_at: String::new(),
                })
            } else if i <= max_tokens {
                // The first token at once, then one every interval.
                tokio::time::sleep_until(started + interval * (i - 1)).await;
                event(&StreamEvent::Token {
                    t: "tok".to_owned(),
                    i: i - 1,
                    lp: None,
                })
            } else if i == max_tokens + 1 {
                event(&StreamEvent::End {
                    tokens_in: 4,
                    tokens_out: max_tokens,
                    tokens_cached: 0,
                    decode_time_ms: 0,
                    stop_reason: StopReason::MaxTokens,
                })
            } else if i == max_tokens + 2 {
                let mut out = Vec::new();
                sse::frame(sse::DONE, &mut out);
                Bytes::from(out)
            } else {
                return None;
            };
            Some((Ok::<_, Infallible>(bytes), i + 1))
        }
    });
    let guarded = futures_util::StreamExt::map(events, move |e| {
        let _keep = &guard;
        e
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(guarded))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The hive's stop path: answer, then exit.
async fn shutdown() -> StatusCode {
    tokio::spawn(async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::process::exit(0);
    });
    StatusCode::ACCEPTED
}

async fn metrics(State(fake): State<Arc<Fake>>) -> String {
    format!(
        "fake_worker_requests_running {}\nfake_worker_requests_total {}\n",
        fake.running.load(Ordering::Relaxed),
        fake.served.load(Ordering::Relaxed)
    )
}

async fn report(args: Args, url: String, token: Option<String>) {
    let Some(hive) = args.hive_url.clone() else {
        return;
    };
    let client = reqwest::Client::new();
    let auth = |r: reqwest::RequestBuilder| match &token {
        Some(t) => r.bearer_auth(t),
        None => r,
    };
    let callback = ReadyCallback {
        worker_id: args.worker_id.clone(),
        url,
        model_ref: args.model_ref.clone(),
        backend: Backend::Cpu,
        device: 0,
        slots_total: args.slots,
        vram_bytes: 0,
    };
    loop {
        let sent = auth(
            client
                .post(format!("{hive}/v1/workers/ready"))
                .json(&callback),
        )
        .send()
        .await;
        if sent.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    loop {
        tokio::time::sleep(Duration::from_secs(args.heartbeat_s)).await;
        let beat = Heartbeat {
            worker_id: args.worker_id.clone(),
            timestamp: "1970-01-01T00:00:00Z".to_owned(),
            state: WorkerState::Idle,
        };
        let _ = auth(
            client
                .post(format!("{hive}/v1/workers/heartbeat"))
                .json(&beat),
        )
        .send()
        .await;
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = parse_args();
    let interval = std::env::var("RBEE_FAKE_TOKEN_INTERVAL_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_millis(10), Duration::from_micros);
    let token = args
        .token_file
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|t| t.trim().to_owned());
    let fake = Arc::new(Fake {
        slots: args.slots,
        running: AtomicU32::new(0),
        served: AtomicU64::new(0),
        interval,
        model_ref: args.model_ref.clone(),
    });
    let ok = || async {
        Json(WorkerReadiness {
            ready: true,
            state: WorkerState::Idle,
            model_loaded: true,
        })
    };
    let app = Router::new()
        .route("/v1/inference", post(inference))
        .route(
            "/v1/inference/{job_id}",
            delete(|| async { StatusCode::NO_CONTENT }),
        )
        .route("/health/ready", get(ok))
        .route("/health/live", get(ok))
        .route("/health", get(ok))
        .route("/v1/ready", get(ok))
        .route("/metrics", get(metrics))
        .route("/v1/admin/shutdown", post(shutdown))
        .with_state(fake);
    let listener = tokio::net::TcpListener::bind(&args.addr).await?;
    let addr: SocketAddr = listener.local_addr()?;
    let url = format!("http://{addr}");
    eprintln!("{{\"message\":\"fake-worker listening\",\"addr\":\"{addr}\"}}");
    tokio::spawn(report(args, url, token));
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await
}
