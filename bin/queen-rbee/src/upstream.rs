//! The queen's client for calls to workers: hyper's HTTP/1.1 client
//! connection, with the queen's own pool and a relay that drives it.
//!
//! Every inference request is one exchange with a worker, so this path is
//! the queen's hot loop. hyper parses and frames the wire (its parser is
//! the fuzzed one every hyper server and client uses); what is the queen's
//! own is around it:
//!
//! - **The connection is driven by whoever reads the answer.** hyper hands
//!   the answer's body from its connection task over a channel; running
//!   that task inside the same poll as the reader (instead of as its own
//!   task) makes each hand-over a local wake-up, and everything the worker
//!   has sent so far comes back as one batch, so a batch of events is one
//!   write to the client.
//! - **A request is sent again only when it was never written.** hyper
//!   gives a request back when its connection failed before any of it went
//!   out (an idle connection the worker had closed); that one is sent once
//!   more on another connection. A request that was written is never sent
//!   again by this client: the worker may have started generating it
//!   (RFC 9110 §9.2.2 for POST).
//! - **Timeouts.** A streaming answer's head must come within
//!   [`Timeouts::first_byte`], and no body may go quiet for longer than
//!   [`Timeouts::idle`]: the worker's stall timeout plus a grace, because a
//!   live worker sends a token, or a keep-alive comment while its engine
//!   progresses, well within it. A non-streaming answer's head comes when
//!   its generation ends, so only the request's deadline bounds it.
//! - **Caps.** An answer's head is at most [`MAX_HEAD_BYTES`]; a body read
//!   whole is at most the caller's limit, refused by its `Content-Length`
//!   before reading or as the bytes arrive.
//!
//! An `https://` worker is reached over TLS ([`rbee_http::tls::Stream`]),
//! its certificate verified against the process's CA bundle (`--tls-ca`).
//! Connections are kept per worker scheme and address and reused (newest
//! first); one found closed when it is taken is dropped. Idle connections
//! older than [`IDLE_MAX`] are closed by [`Upstream::prune`].

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::Full;
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper::client::conn::TrySendError;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use rbee_http::client::error_chain;
use rbee_http::tls::Stream;

/// Idle connections older than this are closed: the same bound as the
/// other daemons' pools ([`rbee_http::client::POOL_IDLE`]), under the
/// workers' header read timeout that closes their idle connections.
pub const IDLE_MAX: Duration = rbee_http::client::POOL_IDLE;

/// Idle connections kept per worker address.
const MAX_IDLE_PER_HOST: usize = 256;

/// Time allowed to open a connection to a worker.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// hyper's read buffer, fixed at this size: the longest answer head
/// (status line and headers) taken. A fixed buffer measured 0.01-0.03 of
/// nginx's requests/s above hyper's adaptive one, which grows and shrinks.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// A batch grows from what has already arrived up to about this size, so
/// that a body's cap is checked as it arrives.
const MAX_BATCH_BYTES: usize = 64 * 1024;

type Conn = Connection<TokioIo<Stream>, Full<Bytes>>;

/// How long a worker may keep the queen waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From a streaming request written to its answer's head.
    pub first_byte: Duration,
    /// The longest quiet gap inside an answer's body.
    pub idle: Duration,
}

impl Timeouts {
    /// Both timeouts from the workers' stall timeout (`--stall-timeout-s`
    /// of `llm-worker-rbee`): that, plus as much again up to 5 s, so that a
    /// worker that is only slow reports its own stall first.
    pub fn from_stall(stall: Duration) -> Self {
        let bound = stall + stall.min(Duration::from_secs(5));
        Self {
            first_byte: bound,
            idle: bound,
        }
    }
}

impl Default for Timeouts {
    /// From the workers' default stall timeout, 30 s.
    fn default() -> Self {
        Self::from_stall(Duration::from_secs(30))
    }
}

/// A connection to one worker, with its driver.
struct Link {
    sender: SendRequest<Full<Bytes>>,
    /// `None` once the connection has ended.
    conn: Option<Conn>,
    /// Why the connection ended, when it ended with an error.
    ended: Option<String>,
}

impl Link {
    /// Drive the connection's I/O; true while it is still open.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(conn) = self.conn.as_mut() {
            if let Poll::Ready(result) = Pin::new(conn).poll(cx) {
                self.conn = None;
                if let Err(e) = result {
                    self.ended = Some(e.to_string());
                }
            }
        }
        self.conn.is_some()
    }

    /// True when the connection is still open and idle, without waiting.
    fn alive(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        self.drive(&mut cx) && !self.sender.is_closed()
    }

    /// `e` with its causes, and why the connection ended when that adds
    /// something.
    fn explain(&mut self, e: &hyper::Error) -> String {
        let why = error_chain(e);
        match self.ended.take() {
            Some(ended) if !why.contains(&ended) => format!("{why} ({ended})"),
            _ => why,
        }
    }
}

struct Idle {
    link: Box<Link>,
    since: Instant,
}

/// Why a call to a worker failed. Each variant's message leaves out its
/// cause; [`error_chain`] writes both, at the edge.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The worker's URL is not an `http://` or `https://` URL.
    #[error("the worker URL `{url}` is not an http:// or https:// URL")]
    NotHttp {
        /// The URL.
        url: String,
    },
    /// The worker's URL names no host.
    #[error("the worker URL `{url}` has no host")]
    NoHost {
        /// The URL.
        url: String,
    },
    /// The host cannot be a `Host` header.
    #[error("`{authority}` is not a valid host")]
    BadHost {
        /// The worker's address.
        authority: String,
    },
    /// No connection within the connect timeout.
    #[error("connecting to {authority} timed out")]
    ConnectTimeout {
        /// The worker's address.
        authority: String,
    },
    /// The connection (or its TLS handshake) failed.
    #[error("cannot connect to {authority}")]
    Connect {
        /// The worker's address.
        authority: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// hyper could not start HTTP on the connection.
    #[error("HTTP handshake with {authority}")]
    Handshake {
        /// The worker's address.
        authority: String,
        /// Why.
        #[source]
        source: hyper::Error,
    },
    /// The request could not be built.
    #[error("cannot build the request")]
    Request(#[source] http::Error),
    /// The exchange failed: the connection, the answer's framing, a
    /// timeout; `why` says which, with hyper's causes.
    #[error("{authority}: {why}")]
    Exchange {
        /// The worker's address.
        authority: String,
        /// What went wrong.
        why: String,
    },
    /// The answer is longer than the caller takes.
    #[error("{authority}: the answer is longer than {limit} bytes")]
    TooLong {
        /// The worker's address.
        authority: String,
        /// The caller's limit.
        limit: usize,
    },
    /// The request's deadline passed while the answer was read.
    #[error("the deadline passed")]
    DeadlinePassed,
}

/// A request to send to a worker.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// `POST`, `DELETE`.
    pub method: Method,
    /// The path on the worker, e.g. `/v1/inference`.
    pub path: http::Uri,
    /// Headers besides `host` and `content-length`.
    pub headers: HeaderMap,
    /// The body, sent as it is.
    pub body: Bytes,
    /// The answer streams: its head comes at once, so it gets
    /// [`Timeouts::first_byte`].
    pub streaming: bool,
}

/// The head of a worker's answer.
#[derive(Debug)]
pub struct Head {
    /// Its status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: HeaderMap,
}

/// The pool of worker connections.
pub struct Upstream {
    idle: Mutex<HashMap<String, Vec<Idle>, ahash::RandomState>>,
    timeouts: Timeouts,
}

impl Default for Upstream {
    fn default() -> Self {
        Self::new(Timeouts::default())
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("idle", &self.idle_count())
            .field("timeouts", &self.timeouts)
            .finish()
    }
}

/// Whether a base URL is `https://`, its `host:port`, and the two as the
/// pool's key (`scheme://host:port`).
fn authority(base_url: &str) -> Result<(bool, &str, &str), UpstreamError> {
    let (https, rest) = match (
        base_url.strip_prefix("http://"),
        base_url.strip_prefix("https://"),
    ) {
        (Some(rest), _) => (false, rest),
        (_, Some(rest)) => (true, rest),
        _ => {
            return Err(UpstreamError::NotHttp {
                url: base_url.to_owned(),
            })
        }
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    if authority.is_empty() {
        return Err(UpstreamError::NoHost {
            url: base_url.to_owned(),
        });
    }
    let key = &base_url[..base_url.len() - rest.len() + authority.len()];
    Ok((https, authority, key))
}

/// How a call on one connection failed.
enum Failed {
    /// Before any of the request was written: it is handed back.
    Unsent(Box<Request<Full<Bytes>>>, String),
    /// Anything else.
    Other(String),
}

impl Upstream {
    /// A pool whose calls wait as `timeouts` say.
    pub fn new(timeouts: Timeouts) -> Self {
        Self {
            idle: Mutex::default(),
            timeouts,
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, HashMap<String, Vec<Idle>, ahash::RandomState>> {
        self.idle.lock()
    }

    /// Idle connections held, over all workers.
    pub fn idle_count(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    /// Close idle connections older than [`IDLE_MAX`].
    pub fn prune(&self) {
        let mut idle = self.lock();
        for links in idle.values_mut() {
            links.retain(|l| l.since.elapsed() < IDLE_MAX);
        }
        idle.retain(|_, links| !links.is_empty());
    }

    /// The newest idle connection to `authority` that is still open.
    fn checkout(&self, authority: &str) -> Option<Box<Link>> {
        let mut idle = self.lock();
        let links = idle.get_mut(authority)?;
        while let Some(mut idle) = links.pop() {
            if idle.since.elapsed() >= IDLE_MAX {
                // Everything below is older still.
                links.clear();
                return None;
            }
            if idle.link.alive() {
                return Some(idle.link);
            }
        }
        None
    }

    fn checkin(&self, authority: &str, link: Box<Link>) {
        let mut idle = self.lock();
        let links = match idle.get_mut(authority) {
            Some(l) => l,
            None => idle.entry(authority.to_owned()).or_default(),
        };
        if links.len() >= MAX_IDLE_PER_HOST {
            links.remove(0);
        }
        links.push(Idle {
            link,
            since: Instant::now(),
        });
    }

    /// A new connection; boxed, because hyper's connection state is large
    /// and a relay moves its exchange with every batch.
    async fn connect(authority: &str, https: bool) -> Result<Box<Link>, UpstreamError> {
        let stream =
            tokio::time::timeout(CONNECT_TIMEOUT, rbee_http::tls::connect(authority, https))
                .await
                .map_err(|_| UpstreamError::ConnectTimeout {
                    authority: authority.to_owned(),
                })?
                .map_err(|source| UpstreamError::Connect {
                    authority: authority.to_owned(),
                    source,
                })?;
        let (sender, conn) = http1::Builder::new()
            .read_buf_exact_size(Some(MAX_HEAD_BYTES))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| UpstreamError::Handshake {
                authority: authority.to_owned(),
                source,
            })?;
        Ok(Box::new(Link {
            sender,
            conn: Some(conn),
            ended: None,
        }))
    }

    /// Send `outgoing` to the worker at `base_url` (`http://host:port`) and
    /// wait for the head of its answer. The body is read from the returned
    /// [`Exchange`], which drives the connection and gives it back to the
    /// pool once the body is read to its end.
    pub async fn send(
        self: &Arc<Self>,
        base_url: &str,
        outgoing: &Outgoing,
    ) -> Result<(Head, Exchange), UpstreamError> {
        let (https, authority, key) = authority(base_url)?;
        let mut request = build(authority, outgoing)?;
        let first_byte = outgoing.streaming.then_some(self.timeouts.first_byte);
        loop {
            let (mut link, reused) = match self.checkout(key) {
                Some(link) => (link, true),
                None => (Self::connect(authority, https).await?, false),
            };
            match exchange(&mut link, request, first_byte).await {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    let exchange = Exchange {
                        link: Some(link),
                        body,
                        pending_error: None,
                        done: false,
                        authority: authority.to_owned(),
                        pool: Arc::clone(self),
                        key: key.to_owned(),
                        idle: self.timeouts.idle,
                        timer: None,
                        last_data: tokio::time::Instant::now(),
                    };
                    let head = Head {
                        status: parts.status,
                        headers: parts.headers,
                    };
                    return Ok((head, exchange));
                }
                // The connection failed before any of the request went out
                // (the worker had closed it while it was idle): the worker
                // never saw it, so it may go on another connection.
                Err(Failed::Unsent(again, why)) if reused => {
                    tracing::debug!(worker = %authority, error = %why, "a reused connection was closed; sending on another");
                    request = *again;
                }
                Err(Failed::Unsent(_, why) | Failed::Other(why)) => {
                    return Err(UpstreamError::Exchange {
                        authority: authority.to_owned(),
                        why,
                    })
                }
            }
        }
    }
}

fn build(authority: &str, outgoing: &Outgoing) -> Result<Request<Full<Bytes>>, UpstreamError> {
    let mut request = Request::builder()
        .method(outgoing.method.clone())
        .uri(outgoing.path.clone())
        .body(Full::new(outgoing.body.clone()))
        .map_err(UpstreamError::Request)?;
    let headers = request.headers_mut();
    headers.clone_from(&outgoing.headers);
    let host = http::HeaderValue::from_str(authority).map_err(|_| UpstreamError::BadHost {
        authority: authority.to_owned(),
    })?;
    headers.insert(http::header::HOST, host);
    Ok(request)
}

/// Wait until the connection can take a request, send it, and wait for the
/// answer's head (at most `first_byte`, when given), driving the
/// connection all along.
async fn exchange(
    link: &mut Link,
    request: Request<Full<Bytes>>,
    first_byte: Option<Duration>,
) -> Result<http::Response<Incoming>, Failed> {
    let ready = poll_fn(|cx| {
        let open = link.drive(cx);
        match link.sender.poll_ready(cx) {
            Poll::Pending if !open => Poll::Ready(Err("the connection closed".to_owned())),
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => Poll::Ready(r.map_err(|e| link.explain(&e))),
        }
    })
    .await;
    if let Err(why) = ready {
        return Err(Failed::Unsent(Box::new(request), why));
    }
    let mut response = std::pin::pin!(link.sender.try_send_request(request));
    let head = poll_fn(|cx| {
        link.drive(cx);
        response.as_mut().poll(cx)
    });
    let result = match first_byte {
        Some(limit) => tokio::time::timeout(limit, head).await.map_err(|_| {
            Failed::Other(format!(
                "no answer within {} s of the request",
                limit.as_secs_f64()
            ))
        })?,
        None => head.await,
    };
    result.map_err(|mut e: TrySendError<_>| {
        let why = link.explain(e.error());
        match e.take_message() {
            Some(request) => Failed::Unsent(Box::new(request), why),
            None => Failed::Other(why),
        }
    })
}

/// The body of a worker's answer, read batch by batch.
pub struct Exchange {
    link: Option<Box<Link>>,
    body: Incoming,
    /// An error seen after data that was returned first.
    pending_error: Option<UpstreamError>,
    done: bool,
    authority: String,
    /// The pool's key for the connection: scheme and authority.
    key: String,
    pool: Arc<Upstream>,
    /// The longest quiet gap allowed.
    idle: Duration,
    /// Fires at `last_data + idle` or earlier; made at the first wait.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// When the last bytes (or the head) arrived.
    last_data: tokio::time::Instant,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("authority", &self.authority)
            .field("done", &self.done)
            .finish()
    }
}

impl Exchange {
    /// Everything the worker has sent since the last call, waiting for at
    /// least one byte; `Ok(None)` at the end of the body.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        poll_fn(|cx| self.poll_chunk(cx)).await
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, UpstreamError>> {
        if let Some(e) = self.pending_error.take() {
            return Poll::Ready(Err(e));
        }
        if self.done {
            return Poll::Ready(Ok(None));
        }
        let mut first: Option<Bytes> = None;
        let mut more: Option<BytesMut> = None;
        let batch = |first: Option<Bytes>, more: Option<BytesMut>| match more {
            Some(m) => Some(m.freeze()),
            None => first,
        };
        loop {
            if let Some(link) = self.link.as_mut() {
                link.drive(cx);
            }
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue; // trailers: nothing to relay
                    };
                    if data.is_empty() {
                        continue;
                    }
                    let size = match (&mut more, first.take()) {
                        (Some(m), _) => {
                            m.extend_from_slice(&data);
                            m.len()
                        }
                        (None, None) => {
                            first = Some(data);
                            first.as_ref().map_or(0, Bytes::len)
                        }
                        (None, Some(f)) => {
                            let mut m = BytesMut::with_capacity(f.len() + data.len());
                            m.extend_from_slice(&f);
                            m.extend_from_slice(&data);
                            let size = m.len();
                            more = Some(m);
                            size
                        }
                    };
                    if size >= MAX_BATCH_BYTES {
                        self.last_data = tokio::time::Instant::now();
                        return Poll::Ready(Ok(batch(first, more)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    let why = match self.link.as_mut() {
                        Some(link) => link.explain(&e),
                        None => error_chain(&e),
                    };
                    return Poll::Ready(self.fail(batch(first, more), why));
                }
                Poll::Ready(None) => {
                    self.done = true;
                    self.give_back();
                    return Poll::Ready(Ok(batch(first, more)));
                }
                Poll::Pending => {
                    if let Some(b) = batch(first, more) {
                        self.last_data = tokio::time::Instant::now();
                        return Poll::Ready(Ok(Some(b)));
                    }
                    return match self.poll_quiet(cx) {
                        Poll::Ready(()) => {
                            let why = format!(
                                "the worker sent nothing for {} s",
                                self.idle.as_secs_f64()
                            );
                            Poll::Ready(self.fail(None, why))
                        }
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    }

    /// Ready once the body has been quiet for the idle timeout. The timer
    /// is set once and moved on only when it fires early, so that a stream
    /// of batches does not reset a timer for each.
    fn poll_quiet(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let due = self.last_data + self.idle;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let due = self.last_data + self.idle;
            if tokio::time::Instant::now() >= due {
                return Poll::Ready(());
            }
            timer.as_mut().reset(due);
        }
    }

    /// End the exchange with an error, after handing out `data` if there
    /// is some. The connection is closed, never reused.
    fn fail(&mut self, data: Option<Bytes>, why: String) -> Result<Option<Bytes>, UpstreamError> {
        self.link = None;
        self.done = true;
        let error = UpstreamError::Exchange {
            authority: self.authority.clone(),
            why,
        };
        match data {
            Some(b) => {
                self.pending_error = Some(error);
                Ok(Some(b))
            }
            None => Err(error),
        }
    }

    /// The whole body, refused when longer than `limit` bytes: by its
    /// `Content-Length` before reading, or as the bytes arrive.
    pub async fn bytes(&mut self, limit: usize) -> Result<Bytes, UpstreamError> {
        let too_long = |authority: &str| UpstreamError::TooLong {
            authority: authority.to_owned(),
            limit,
        };
        if self
            .body
            .size_hint()
            .exact()
            .is_some_and(|n| n > u64::try_from(limit).unwrap_or(u64::MAX))
        {
            self.link = None;
            return Err(too_long(&self.authority));
        }
        let mut all = BytesMut::new();
        while let Some(b) = self.chunk().await? {
            if all.len() + b.len() > limit {
                self.link = None;
                self.done = true;
                return Err(too_long(&self.authority));
            }
            all.extend_from_slice(&b);
        }
        Ok(all.freeze())
    }

    /// A body read to its end leaves the connection ready for the next
    /// request: keep it, unless the worker closed it.
    fn give_back(&mut self) {
        if let Some(mut link) = self.link.take() {
            if link.alive() {
                self.pool.checkin(&self.key, link);
            }
        }
    }
}

// An exchange dropped before its end closes its connection: that is how a
// worker learns that the client went away and stops generating.

#[cfg(test)]
mod tests;
