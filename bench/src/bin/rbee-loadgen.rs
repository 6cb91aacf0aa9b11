//! `rbee-loadgen`: keep `--concurrency` streaming requests open against
//! `--url` until `--requests` have completed, and print one JSON line:
//! requests, errors, wall time, requests/s, time to first token and
//! inter-token latency (p50/p99, milliseconds).
//!
//! It reads SSE `data:` events as they arrive: the first `token` event
//! (native) or chunk with `choices` (OpenAI) is the first token.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::StreamExt;
use parking_lot::Mutex;
use rbee_bench::percentile;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "rbee-loadgen",
    about = "Streaming load generator for rbee benchmarks"
)]
struct Args {
    /// Full URL of the inference route.
    #[arg(long)]
    url: String,
    /// Streams kept open at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Requests to complete (after the warm-up).
    #[arg(long, default_value_t = 1000)]
    requests: u64,
    /// Requests sent first and not measured.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Tokens per request.
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// Bearer token.
    #[arg(long)]
    token: Option<String>,
    /// Model to name in the body.
    #[arg(long)]
    model: Option<String>,
    /// Spread the streams' first requests evenly over this many
    /// milliseconds, so arrivals are steady rather than one burst.
    #[arg(long, default_value_t = 0)]
    stagger_ms: u64,
    /// Label echoed in the output.
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(Default)]
struct Samples {
    ttft: Vec<f64>,
    itl: Vec<f64>,
}

async fn one(
    client: &reqwest::Client,
    args: &Args,
    body: &serde_json::Value,
) -> Result<(f64, Vec<f64>), String> {
    let mut req = client.post(&args.url).json(body);
    if let Some(t) = &args.token {
        req = req.bearer_auth(t);
    }
    let sent = Instant::now();
    let response = req.send().await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("HTTP {}", response.status().as_u16()));
    }
    let mut stream = response.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut first: Option<f64> = None;
    let mut last: Option<Instant> = None;
    let mut gaps = Vec::new();
    let mut done = false;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            let now = Instant::now();
            if text.contains("[DONE]") {
                done = true;
            } else if text.contains("\"type\":\"token\"") || text.contains("\"choices\":[{") {
                match last {
                    None => first = Some((now - sent).as_secs_f64() * 1000.0),
                    Some(prev) => gaps.push((now - prev).as_secs_f64() * 1000.0),
                }
                last = Some(now);
            } else if text.contains("\"error\"") || text.contains("\"type\":\"error\"") {
                return Err(text.trim().to_owned());
            }
        }
    }
    match (done, first) {
        (true, Some(ttft)) => Ok((ttft, gaps)),
        _ => Err("the stream ended without [DONE] or tokens".to_owned()),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Arc::new(Args::parse());
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .timeout(Duration::from_secs(300))
        .build()
        .expect("http client");
    let mut body = json!({
        "prompt": "Write a long story about a lighthouse keeper.",
        "max_tokens": args.max_tokens,
        "ignore_eos": true,
        "temperature": 0,
        "stream": true,
    });
    if let Some(m) = &args.model {
        body["model"] = json!(m);
    }
    let body = Arc::new(body);
    let total = args.warmup + args.requests;
    let issued = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(Mutex::new(Samples::default()));
    let measured_start = Arc::new(Mutex::new(None::<Instant>));
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|i| {
            let (client, args, body) = (client.clone(), Arc::clone(&args), Arc::clone(&body));
            let (issued, errors, samples, start) = (
                Arc::clone(&issued),
                Arc::clone(&errors),
                Arc::clone(&samples),
                Arc::clone(&measured_start),
            );
            tokio::spawn(async move {
                let offset = args.stagger_ms * i as u64 / args.concurrency.max(1) as u64;
                tokio::time::sleep(Duration::from_millis(offset)).await;
                loop {
                    let n = issued.fetch_add(1, Ordering::AcqRel);
                    if n >= total {
                        return;
                    }
                    if n == args.warmup {
                        start.lock().get_or_insert_with(Instant::now);
                    }
                    let result = one(&client, &args, &body).await;
                    if n < args.warmup {
                        continue;
                    }
                    match result {
                        Ok((ttft, gaps)) => {
                            let mut s = samples.lock();
                            s.ttft.push(ttft);
                            s.itl.extend(gaps);
                        }
                        Err(e) => {
                            if errors.fetch_add(1, Ordering::AcqRel) < 3 {
                                eprintln!("rbee-loadgen: request failed: {e}");
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let wall = measured_start
        .lock()
        .as_ref()
        .map_or(0.0, |s| s.elapsed().as_secs_f64());
    let mut s = std::mem::take(&mut *samples.lock());
    s.ttft.sort_by(f64::total_cmp);
    s.itl.sort_by(f64::total_cmp);
    let ok = s.ttft.len() as f64;
    println!(
        "{}",
        json!({
            "label": args.label,
            "requests": s.ttft.len(),
            "errors": errors.load(Ordering::Acquire),
            "wall_s": wall,
            "rps": if wall > 0.0 { ok / wall } else { 0.0 },
            "ttft_p50_ms": percentile(&s.ttft, 50.0),
            "ttft_p99_ms": percentile(&s.ttft, 99.0),
            "itl_p50_ms": percentile(&s.itl, 50.0),
            "itl_p99_ms": percentile(&s.itl, 99.0),
        })
    );
}
