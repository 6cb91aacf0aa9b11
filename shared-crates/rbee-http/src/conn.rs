//! Serving accepted connections so that no client can take a daemon's
//! descriptors or its probes away.
//!
//! - **Header read timeout.** A connection must send a complete request head
//!   within [`ConnectionLimits::header_timeout`] of being accepted, and of
//!   its previous response ending (hyper's timer restarts whenever the
//!   connection waits for a new request), so the same bound closes half-sent
//!   requests and idle keep-alive connections.
//! - **Connection cap.** At most [`ConnectionLimits::max_connections`] are
//!   served at once (default: half the process's descriptor limit, the other
//!   half left for outgoing calls, model files and databases). When the cap
//!   is reached, a new connection takes the place of the one that has waited
//!   longest without a request in flight, which is closed; a connection that
//!   is serving a request is never closed to make room.
//! - **Probe reserve.** When every connection has a request in flight, up to
//!   [`PROBE_RESERVE`] more are accepted that may ask only the probes
//!   (`/health...`, `/v1/health`); anything else on them is answered 503
//!   `TOO_MANY_CONNECTIONS` and the connection is closed. Beyond that, new
//!   connections are closed as they are accepted.
//! - **TCP keepalive** on every accepted socket, so a peer that vanished
//!   without a FIN (a powered-off host, a dropped NAT entry) is noticed, and
//!   `TCP_NODELAY`, so streamed tokens are not held back by Nagle's algorithm.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::IntoResponse;
use axum::Router;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rbee_api::{ApiError, ErrorCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Connections accepted beyond the cap, for the probes only, when every
/// connection under the cap has a request in flight.
pub const PROBE_RESERVE: usize = 16;

/// Header read timeout on a probe-reserve connection: it exists to answer a
/// probe that is already on its way.
const RESERVE_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// Default header read timeout (and keep-alive idle bound).
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Descriptors a daemon keeps for itself before halving the rest between
/// incoming and outgoing connections.
const RESERVED_DESCRIPTORS: u64 = 64;

/// How many connections a daemon serves and how long it waits for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Time allowed for a complete request head, from acceptance or from
    /// the end of the previous response.
    pub header_timeout: Duration,
    /// Connections served at once, not counting the probe reserve.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_connections: default_max_connections(),
        }
    }
}

/// Raise the soft descriptor limit to the hard one (as Go's runtime does:
/// systemd's default soft limit is 1,024 with a hard limit far above), and
/// return the soft limit in force.
pub fn raise_descriptor_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read or raise the descriptor limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    }
}

/// Half of the descriptors left after the 64 a daemon keeps for itself, less the
/// probe reserve, within 32..=65,536.
pub fn default_max_connections() -> usize {
    let limit = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
    let half = limit.saturating_sub(RESERVED_DESCRIPTORS) / 2;
    let cap = usize::try_from(half).unwrap_or(usize::MAX);
    cap.saturating_sub(PROBE_RESERVE).clamp(32, 65_536)
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DroppedLabels {
    reason: &'static str,
}

/// Why the server closed a connection (the `reason` label).
#[derive(Debug, Clone, Copy)]
enum DropReason {
    HeaderTimeout,
    Evicted,
    Refused,
}

impl DropReason {
    const ALL: [Self; 3] = [Self::HeaderTimeout, Self::Evicted, Self::Refused];

    fn label(self) -> &'static str {
        match self {
            Self::HeaderTimeout => "header_timeout",
            Self::Evicted => "evicted",
            Self::Refused => "refused",
        }
    }
}

/// `<prefix>_connections_open` and `<prefix>_connections_dropped_total{reason}`.
#[derive(Debug, Clone, Default)]
pub struct ConnectionMetrics {
    open: Gauge,
    dropped: Family<DroppedLabels, Counter>,
}

impl ConnectionMetrics {
    /// Register under `prefix` (e.g. `rbee_hive`); every reason is exported
    /// at 0 from the start.
    pub fn register(registry: &mut Registry, prefix: &str) -> Self {
        let metrics = Self::default();
        registry.register(
            format!("{prefix}_connections_open"),
            "Client connections being served, probe-reserve connections included",
            metrics.open.clone(),
        );
        registry.register(
            format!("{prefix}_connections_dropped"),
            "Connections the server closed: header_timeout (no complete request head in time, idle keep-alive included), evicted (idle, to make room at the connection cap), refused (cap and probe reserve full)",
            metrics.dropped.clone(),
        );
        for reason in DropReason::ALL {
            let _ = metrics.dropped.get_or_create(&DroppedLabels {
                reason: reason.label(),
            });
        }
        metrics
    }

    fn drop(&self, reason: DropReason) {
        self.dropped
            .get_or_create(&DroppedLabels {
                reason: reason.label(),
            })
            .inc();
    }
}

/// One served connection, as the table sees it.
#[derive(Debug)]
struct Conn {
    in_flight: AtomicUsize,
    /// Milliseconds since the table's epoch when the connection was accepted
    /// or last finished a response.
    last_active: AtomicU64,
    evict: CancellationToken,
}

#[derive(Debug, Default)]
struct Slots {
    next_id: u64,
    capped: HashMap<u64, Arc<Conn>>,
    reserve: usize,
}

/// The connections being served, for the cap and eviction.
#[derive(Debug)]
struct Table {
    slots: Mutex<Slots>,
    max: usize,
    epoch: Instant,
}

enum Admission {
    Capped(u64, Arc<Conn>),
    Reserve,
    Refused,
}

impl Table {
    fn new(max: usize) -> Self {
        Self {
            slots: Mutex::new(Slots::default()),
            max: max.max(1),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, Slots> {
        self.slots.lock()
    }

    /// A place for a new connection: under the cap, in place of the
    /// connection idle longest, in the probe reserve, or none.
    fn admit(&self, metrics: &ConnectionMetrics) -> Admission {
        let now = self.now_ms();
        let mut slots = self.lock();
        if slots.capped.len() >= self.max {
            let idlest = slots
                .capped
                .iter()
                .filter(|(_, c)| c.in_flight.load(Ordering::Acquire) == 0)
                .min_by_key(|(_, c)| c.last_active.load(Ordering::Relaxed))
                .map(|(id, _)| *id);
            match idlest {
                Some(id) => {
                    if let Some(conn) = slots.capped.remove(&id) {
                        conn.evict.cancel();
                        metrics.drop(DropReason::Evicted);
                    }
                }
                None if slots.reserve < PROBE_RESERVE => {
                    slots.reserve += 1;
                    return Admission::Reserve;
                }
                None => return Admission::Refused,
            }
        }
        slots.next_id += 1;
        let id = slots.next_id;
        let conn = Arc::new(Conn {
            in_flight: AtomicUsize::new(0),
            last_active: AtomicU64::new(now),
            evict: CancellationToken::new(),
        });
        slots.capped.insert(id, Arc::clone(&conn));
        Admission::Capped(id, conn)
    }

    fn release(&self, id: Option<u64>) {
        let mut slots = self.lock();
        match id {
            Some(id) => {
                slots.capped.remove(&id);
            }
            None => slots.reserve = slots.reserve.saturating_sub(1),
        }
    }
}

/// Frees a connection's place in the table when its task ends.
struct Place {
    table: Arc<Table>,
    id: Option<u64>,
    open: Gauge,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.table.release(self.id);
        self.open.dec();
    }
}

/// Marks a request in flight on its connection until its response body is
/// finished or dropped.
struct InFlight {
    conn: Arc<Conn>,
    table: Arc<Table>,
}

impl InFlight {
    fn begin(conn: &Arc<Conn>, table: &Arc<Table>) -> Self {
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        Self {
            conn: Arc::clone(conn),
            table: Arc::clone(table),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.conn
            .last_active
            .store(self.table.now_ms(), Ordering::Relaxed);
        self.conn.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

fn is_probe(path: &str) -> bool {
    path == "/health" || path.starts_with("/health/") || path == "/v1/health"
}

/// Serve `router` on `listener` until `shutdown`; then stop accepting, let
/// every connection finish its request in flight, and return once all have
/// closed. The caller bounds that wait (the drain timeout).
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    metrics: ConnectionMetrics,
    shutdown: CancellationToken,
    tls: Option<Arc<crate::tls::ServerTls>>,
) {
    let table = Arc::new(Table::new(limits.max_connections));
    let tracker = TaskTracker::new();
    let shared = Arc::new(Shared {
        router,
        tls,
        header_timeout: limits.header_timeout,
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
    });
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_error(&e).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let admission = table.admit(&metrics);
        let (id, conn) = match admission {
            Admission::Capped(id, conn) => (Some(id), Some(conn)),
            Admission::Reserve => (None, None),
            Admission::Refused => {
                metrics.drop(DropReason::Refused);
                drop(stream);
                continue;
            }
        };
        configure_socket(&stream);
        metrics.open.inc();
        let place = Place {
            table: Arc::clone(&table),
            id,
            open: metrics.open.clone(),
        };
        tracker.spawn(serve_connection(
            Accepted {
                stream,
                remote,
                conn,
                place,
            },
            Arc::clone(&shared),
        ));
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// Accept errors: a connection that failed before it was accepted is
/// skipped; running out of descriptors or memory is logged and retried
/// after a pause, so the loop does not spin.
async fn accept_error(e: &std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::Interrupted
    ) {
        return;
    }
    tracing::warn!(error = %e, "accept failed; retrying in 100 ms");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

fn configure_socket(stream: &TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY on a connection");
    }
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(5);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "cannot set TCP keepalive on a connection");
    }
}

/// What every connection of one server shares.
struct Shared {
    router: Router,
    /// HTTPS: each connection's handshake comes first, within the header
    /// read timeout.
    tls: Option<Arc<crate::tls::ServerTls>>,
    header_timeout: Duration,
    metrics: ConnectionMetrics,
    shutdown: CancellationToken,
}

/// One accepted connection and its place: under the cap (`conn`), or in
/// the probe reserve (`conn` is `None`).
struct Accepted {
    stream: TcpStream,
    remote: SocketAddr,
    conn: Option<Arc<Conn>>,
    place: Place,
}

async fn serve_connection(accepted: Accepted, shared: Arc<Shared>) {
    let Accepted {
        stream,
        remote,
        conn,
        place,
    } = accepted;
    let Some(tls) = shared.tls.as_ref() else {
        return serve_io(stream, remote, conn, place, shared).await;
    };
    match tokio::time::timeout(shared.header_timeout, tls.acceptor().accept(stream)).await {
        Ok(Ok(stream)) => serve_io(stream, remote, conn, place, shared).await,
        Ok(Err(e)) => tracing::debug!(error = %e, peer = %remote, "TLS handshake failed"),
        Err(_) => shared.metrics.drop(DropReason::HeaderTimeout),
    }
}

/// Serve HTTP/1.1 on `stream` (a TCP or TLS stream) until it closes.
async fn serve_io<I>(
    stream: I,
    remote: SocketAddr,
    conn: Option<Arc<Conn>>,
    place: Place,
    shared: Arc<Shared>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let reserve = conn.is_none();
    let evicted = conn
        .as_ref()
        .map_or_else(CancellationToken::new, |c| c.evict.clone());
    let table = Arc::clone(&place.table);
    let shared_router = shared.router.clone();
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        let in_flight = conn.as_ref().map(|c| InFlight::begin(c, &table));
        let router = shared_router.clone();
        async move {
            if in_flight.is_none() && !is_probe(request.uri().path()) {
                let mut response = ApiError::new(
                    ErrorCode::TooManyConnections,
                    "every connection is serving a request; this one may only ask the probes",
                )
                .with_retry_after(1)
                .into_response();
                response.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
                return Ok::<_, Infallible>(response);
            }
            request.extensions_mut().insert(ConnectInfo(remote));
            let response = match router.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            // The request stays in flight until its body is finished or
            // dropped: a stream is work in progress, not an idle connection.
            Ok(response.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _held = &in_flight;
                    frame
                }))
            }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(if reserve {
            shared.header_timeout.min(RESERVE_HEADER_TIMEOUT)
        } else {
            shared.header_timeout
        })
        .keep_alive(!reserve);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = evicted.cancelled() => return,
        () = shared.shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            shared.metrics.drop(DropReason::HeaderTimeout);
        } else {
            tracing::debug!(error = %e, peer = %remote, "connection ended with an error");
        }
    }
    drop(place);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idlest_connection_without_a_request_makes_room_and_busy_ones_never_do() {
        let metrics = ConnectionMetrics::default();
        let table = Arc::new(Table::new(2));
        let Admission::Capped(first, a) = table.admit(&metrics) else {
            panic!("under the cap")
        };
        let Admission::Capped(_, b) = table.admit(&metrics) else {
            panic!("under the cap")
        };
        // `a` is older, but it is serving a request: `b` goes.
        let held = InFlight::begin(&a, &table);
        let Admission::Capped(_, c) = table.admit(&metrics) else {
            panic!("an idle connection makes room")
        };
        assert!(b.evict.is_cancelled());
        assert!(!a.evict.is_cancelled());
        // Both capped connections busy: the reserve, then refusal.
        let _busy = InFlight::begin(&c, &table);
        for _ in 0..PROBE_RESERVE {
            assert!(matches!(table.admit(&metrics), Admission::Reserve));
        }
        assert!(matches!(table.admit(&metrics), Admission::Refused));
        // A finished request makes its connection evictable again.
        drop(held);
        assert!(matches!(table.admit(&metrics), Admission::Capped(..)));
        assert!(a.evict.is_cancelled());
        table.release(Some(first));
        assert_eq!(table.lock().capped.len(), 2);
    }

    #[test]
    fn only_probe_paths_pass_on_the_reserve() {
        for path in ["/health", "/health/live", "/health/ready", "/v1/health"] {
            assert!(is_probe(path), "{path}");
        }
        for path in ["/healthz", "/metrics", "/v1/inference", "/v1/healthy"] {
            assert!(!is_probe(path), "{path}");
        }
    }

    #[test]
    fn the_default_cap_leaves_descriptors_for_outgoing_calls() {
        let cap = default_max_connections();
        assert!((32..=65_536).contains(&cap));
        let limit = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
        assert!(u64::try_from(cap + PROBE_RESERVE).unwrap_or(u64::MAX) <= limit.max(96));
    }
}
