//! Prometheus metrics kept in the daemon's own registry: HTTP requests per
//! matched route template, and `rbee_build_info`.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
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
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    requests: Family<RouteStatus, Counter>,
    duration: HistogramFamily,
    /// The series already used, by route: counting a request is then a
    /// lookup, not a label set built, hashed and dropped per request.
    seen: RwLock<HashMap<Box<str>, RouteSeries>>,
}

#[derive(Debug, Clone)]
struct RouteSeries {
    duration: Histogram,
    by_status: Vec<(u16, Counter)>,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

impl HttpMetrics {
    /// Register under `prefix` (`rbee_hive` gives the contract's
    /// `rbee_hive_requests_total`).
    pub fn register(registry: &mut Registry, prefix: &str) -> Self {
        let inner = Inner {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            seen: RwLock::default(),
        };
        registry.register(
            format!("{prefix}_requests"),
            "HTTP requests by matched route template and status",
            inner.requests.clone(),
        );
        registry.register(
            format!("{prefix}_request_duration_seconds"),
            "HTTP request latency to the response head, by matched route template",
            inner.duration.clone(),
        );
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Requests counted so far for `route` with `status`.
    pub fn count(&self, route: &str, status: u16) -> u64 {
        self.inner
            .requests
            .get_or_create(&RouteStatus {
                route: route.to_owned(),
                status,
            })
            .get()
    }

    /// Count one request to `route` answered with `status` after `seconds`.
    pub fn observe(&self, route: &str, status: u16, seconds: f64) {
        {
            let seen = self.inner.seen.read();
            if let Some(series) = seen.get(route) {
                if let Some((_, counter)) = series.by_status.iter().find(|(s, _)| *s == status) {
                    counter.inc();
                    series.duration.observe(seconds);
                    return;
                }
            }
        }
        let counter = self
            .inner
            .requests
            .get_or_create(&RouteStatus {
                route: route.to_owned(),
                status,
            })
            .clone();
        let mut seen = self.inner.seen.write();
        let series = seen.entry(route.into()).or_insert_with(|| RouteSeries {
            duration: self
                .inner
                .duration
                .get_or_create(&Route {
                    route: route.to_owned(),
                })
                .clone(),
            by_status: Vec::new(),
        });
        if !series.by_status.iter().any(|(s, _)| *s == status) {
            series.by_status.push((status, counter.clone()));
        }
        counter.inc();
        series.duration.observe(seconds);
    }
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
