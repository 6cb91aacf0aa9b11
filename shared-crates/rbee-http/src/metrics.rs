//! Prometheus metrics kept in the daemon's own registry: HTTP requests per
//! matched route template, and `rbee_build_info`.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Latency buckets in seconds, from a millisecond probe to a long generation.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteStatus {
    route: String,
    status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Route {
    route: String,
}

type HistogramFamily = Family<Route, Histogram, fn() -> Histogram>;

/// `<prefix>_requests_total{route,status}` and
/// `<prefix>_request_duration_seconds{route}`, labelled with the matched
/// route template (never the raw path), `unmatched` for unknown routes.
#[derive(Debug, Clone)]
pub struct HttpMetrics {
    requests: Family<RouteStatus, Counter>,
    duration: HistogramFamily,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

impl HttpMetrics {
    /// Register under `prefix` (`rbee_hive` gives the contract's
    /// `rbee_hive_requests_total`).
    pub fn register(registry: &mut Registry, prefix: &str) -> Self {
        let metrics = Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
        };
        registry.register(
            format!("{prefix}_requests"),
            "HTTP requests by matched route template and status",
            metrics.requests.clone(),
        );
        registry.register(
            format!("{prefix}_request_duration_seconds"),
            "HTTP request latency to the response head, by matched route template",
            metrics.duration.clone(),
        );
        metrics
    }

    /// Requests counted so far for `route` with `status`.
    pub fn count(&self, route: &str, status: u16) -> u64 {
        self.requests
            .get_or_create(&RouteStatus {
                route: route.to_owned(),
                status,
            })
            .get()
    }
}

/// Middleware counting and timing each request.
pub async fn middleware(
    State(metrics): State<HttpMetrics>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let elapsed = started.elapsed().as_secs_f64();
    metrics
        .requests
        .get_or_create(&RouteStatus {
            route: route.clone(),
            status: response.status().as_u16(),
        })
        .inc();
    metrics
        .duration
        .get_or_create(&Route { route })
        .observe(elapsed);
    response
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildInfo {
    version: String,
    backend: String,
}

/// `rbee_build_info{version,backend} 1`.
pub fn register_build_info(registry: &mut Registry, version: &str, backend: &str) {
    let family = Family::<BuildInfo, Gauge>::default();
    family
        .get_or_create(&BuildInfo {
            version: version.to_owned(),
            backend: backend.to_owned(),
        })
        .set(1);
    registry.register("rbee_build_info", "Build information; always 1", family);
}
