//! Per-request cost of authentication and deadline extraction.
//!
//! - `auth_and_deadline/functions`: `Authenticator::verify` plus
//!   `Deadline::from_headers` on a prepared header map (the work itself).
//! - `router/bare`: a one-route axum router answering a request (baseline).
//! - `router/auth_deadline`: the same router behind `AuthLayer` and
//!   `DeadlineLayer`; the difference to `bare` is what the layers add.
//! - `router/full_stack`: behind the whole `HttpStack` (request id span and
//!   access log, metrics, error envelope, auth, deadline, body limit).
//!
//! Run with `cargo bench -p rbee-http --bench request_overhead`.

use std::hint::black_box;
use std::time::Duration;

use auth_min::{ApiToken, AuthLayer, AuthMetrics, Authenticator};
use axum::body::Body;
use axum::routing::get;
use axum::Router;
use criterion::Criterion;
use deadline_propagation::{Deadline, DeadlineLayer};
use http::{HeaderMap, HeaderValue, Request};
use prometheus_client::registry::Registry;
use tower::ServiceExt;

const TOKEN: &str = "bench-token-0123456789abcdef";

fn headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {TOKEN}")).expect("benchmark setup"),
    );
    let deadline = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("benchmark setup")
        .as_millis() as u64
        + 3_600_000;
    headers.insert("x-deadline", HeaderValue::from(deadline));
    headers
}

fn request(headers: &HeaderMap) -> Request<Body> {
    let mut request = Request::get("/v1/ping")
        .body(Body::empty())
        .expect("benchmark setup");
    *request.headers_mut() = headers.clone();
    request
}

async fn ping() -> &'static str {
    "pong"
}

fn bench(c: &mut Criterion) {
    let token = ApiToken::new(TOKEN.to_owned()).expect("benchmark setup");
    let authenticator = Authenticator::new(&token);
    let headers = headers();

    let mut group = c.benchmark_group("auth_and_deadline");
    group.bench_function("functions", |b| {
        b.iter(|| {
            let who = authenticator.verify(black_box(&headers).get(http::header::AUTHORIZATION));
            let deadline = Deadline::from_headers(black_box(&headers));
            black_box((who.is_ok(), deadline.is_ok()))
        })
    });
    group.finish();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("benchmark setup");
    let bare: Router = Router::new().route("/v1/ping", get(ping));
    let mut registry = Registry::default();
    let layered: Router = Router::new()
        .route("/v1/ping", get(ping))
        .layer(DeadlineLayer::new())
        .layer(AuthLayer::new(
            authenticator.clone(),
            AuthMetrics::register(&mut registry),
        ));
    let stack = rbee_http::HttpStack::new(&mut registry, "rbee_bench", authenticator.clone());
    let full = stack.apply(Router::new().route("/v1/ping", get(ping)));

    let mut group = c.benchmark_group("router");
    group.measurement_time(Duration::from_secs(5));
    for (name, router) in [
        ("bare", bare),
        ("auth_deadline", layered),
        ("full_stack", full),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let response = runtime
                    .block_on(router.clone().oneshot(request(&headers)))
                    .expect("benchmark setup");
                assert!(response.status().is_success());
                black_box(response)
            })
        });
    }
    group.finish();
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    bench(&mut criterion);
    criterion.final_summary();
}
