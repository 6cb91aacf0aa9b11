//! The queen's HTTP/1.1 client for calls to workers.
//!
//! Every inference request is one exchange with a worker, so this path is
//! the queen's hot loop. A general-purpose client (reqwest over hyper-util's
//! pool) runs each connection as its own task and hands the answer's body
//! across a channel one chunk at a time: every SSE event then costs a task
//! wake-up and its own write to the client. Here the connection is driven
//! by whoever reads the answer, inside the same poll, and everything the
//! worker has sent so far comes back as one batch, so a batch of events is
//! one write to the client.
//!
//! Connections are kept per worker address and reused (newest first). One
//! found closed when it is taken is dropped; a request that a reused
//! connection could not deliver (the worker had closed it) is sent once more
//! on a fresh connection, because the worker never saw it. Idle connections
//! older than [`IDLE_MAX`] are closed by [`Upstream::prune`].

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, Request};
use http_body_util::Full;
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Idle connections older than this are closed.
pub const IDLE_MAX: Duration = Duration::from_secs(30);

/// Idle connections kept per worker address.
const MAX_IDLE_PER_HOST: usize = 256;

/// Time allowed to open a TCP connection to a worker.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

type Conn = Connection<TokioIo<TcpStream>, Full<Bytes>>;

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

    /// True when the connection is still open, without waiting.
    fn alive(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        self.drive(&mut cx) && !self.sender.is_closed()
    }
}

struct Idle {
    link: Link,
    since: Instant,
}

/// Why a call to a worker failed.
#[derive(Debug)]
pub struct UpstreamError(pub String);

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A request to send to a worker.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// `POST`, `DELETE`.
    pub method: Method,
    /// The path on the worker, e.g. `/v1/inference`.
    pub path: String,
    /// Headers besides `host` and `content-length`.
    pub headers: HeaderMap,
    /// The body, sent as it is.
    pub body: Bytes,
}

/// The pool of worker connections.
#[derive(Default)]
pub struct Upstream {
    idle: Mutex<HashMap<String, Vec<Idle>>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("idle", &self.idle_count())
            .finish()
    }
}

/// `host:port` of an `http://` base URL.
fn authority(base_url: &str) -> Result<&str, UpstreamError> {
    let rest = base_url.strip_prefix("http://").ok_or_else(|| {
        UpstreamError(format!("the worker URL `{base_url}` is not an http:// URL"))
    })?;
    let authority = rest.split('/').next().unwrap_or(rest);
    if authority.is_empty() {
        return Err(UpstreamError(format!(
            "the worker URL `{base_url}` has no host"
        )));
    }
    Ok(authority)
}

impl Upstream {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Idle>>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
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
    fn checkout(&self, authority: &str) -> Option<Link> {
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

    fn checkin(&self, authority: &str, link: Link) {
        let mut idle = self.lock();
        let links = idle.entry(authority.to_owned()).or_default();
        if links.len() >= MAX_IDLE_PER_HOST {
            links.remove(0);
        }
        links.push(Idle {
            link,
            since: Instant::now(),
        });
    }

    async fn connect(authority: &str) -> Result<Link, UpstreamError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(authority))
            .await
            .map_err(|_| UpstreamError(format!("connecting to {authority} timed out")))?
            .map_err(|e| UpstreamError(format!("cannot connect to {authority}: {e}")))?;
        // Small SSE writes must not wait for delayed ACKs.
        stream
            .set_nodelay(true)
            .map_err(|e| UpstreamError(format!("cannot set TCP_NODELAY: {e}")))?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError(format!("HTTP handshake with {authority}: {e}")))?;
        Ok(Link {
            sender,
            conn: Some(conn),
            ended: None,
        })
    }

    /// Send `outgoing` to the worker at `base_url` (`http://host:port`) and
    /// wait for the head of its answer. The body is read from the returned
    /// [`Exchange`], which drives the connection and gives it back to the
    /// pool once the body is read to its end.
    pub async fn send(
        self: &Arc<Self>,
        base_url: &str,
        outgoing: &Outgoing,
    ) -> Result<(http::response::Parts, Exchange), UpstreamError> {
        let authority = authority(base_url)?;
        let mut fresh_only = false;
        loop {
            let (mut link, reused) = match (!fresh_only).then(|| self.checkout(authority)).flatten()
            {
                Some(link) => (link, true),
                None => (Self::connect(authority).await?, false),
            };
            let request = build(authority, outgoing)?;
            match exchange(&mut link, request).await {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    let exchange = Exchange {
                        link: Some(link),
                        body,
                        pending_error: None,
                        done: false,
                        authority: authority.to_owned(),
                        pool: Arc::clone(self),
                    };
                    return Ok((parts, exchange));
                }
                // The worker closed an idle connection as the request went
                // out on it: it never saw the request, so send it again once.
                Err(e) if reused && (e.is_canceled() || e.is_incomplete_message()) => {
                    tracing::debug!(worker = %authority, error = %e, "a reused connection was closed; sending again");
                    fresh_only = true;
                }
                Err(e) => {
                    return Err(UpstreamError(match link.ended.take() {
                        Some(why) => format!("{e} ({why})"),
                        None => e.to_string(),
                    }))
                }
            }
        }
    }
}

fn build(authority: &str, outgoing: &Outgoing) -> Result<Request<Full<Bytes>>, UpstreamError> {
    let mut request = Request::builder()
        .method(outgoing.method.clone())
        .uri(outgoing.path.as_str())
        .body(Full::new(outgoing.body.clone()))
        .map_err(|e| UpstreamError(format!("cannot build the request: {e}")))?;
    let headers = request.headers_mut();
    headers.clone_from(&outgoing.headers);
    let host = http::HeaderValue::from_str(authority)
        .map_err(|_| UpstreamError(format!("`{authority}` is not a valid host")))?;
    headers.insert(http::header::HOST, host);
    Ok(request)
}

/// Wait until the connection can take a request, send it, and wait for the
/// answer's head, driving the connection all along.
async fn exchange(
    link: &mut Link,
    request: Request<Full<Bytes>>,
) -> Result<http::Response<Incoming>, hyper::Error> {
    let ready = poll_fn(|cx| {
        let open = link.drive(cx);
        match link.sender.poll_ready(cx) {
            Poll::Pending if !open => Poll::Ready(Err(None)),
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => Poll::Ready(r.map_err(Some)),
        }
    })
    .await;
    match ready {
        Ok(()) => {}
        Err(Some(e)) => return Err(e),
        // The connection ended without the sender noticing yet: sending
        // reports it as canceled or closed.
        Err(None) => {}
    }
    let mut response = std::pin::pin!(link.sender.send_request(request));
    poll_fn(|cx| {
        link.drive(cx);
        response.as_mut().poll(cx)
    })
    .await
}

/// The body of a worker's answer, read batch by batch.
pub struct Exchange {
    link: Option<Link>,
    body: Incoming,
    /// An error seen after data that was returned first.
    pending_error: Option<String>,
    done: bool,
    authority: String,
    pool: Arc<Upstream>,
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
            return Poll::Ready(Err(UpstreamError(e)));
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
                    match (&mut more, first.take()) {
                        (Some(m), _) => m.extend_from_slice(&data),
                        (None, None) => first = Some(data),
                        (None, Some(f)) => {
                            let mut m = BytesMut::with_capacity(f.len() + data.len());
                            m.extend_from_slice(&f);
                            m.extend_from_slice(&data);
                            more = Some(m);
                        }
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    let why = match self.link.as_mut().and_then(|l| l.ended.take()) {
                        Some(ended) => format!("{e} ({ended})"),
                        None => e.to_string(),
                    };
                    self.link = None; // never reused
                    return match batch(first, more) {
                        Some(b) => {
                            self.pending_error = Some(why);
                            Poll::Ready(Ok(Some(b)))
                        }
                        None => Poll::Ready(Err(UpstreamError(why))),
                    };
                }
                Poll::Ready(None) => {
                    self.done = true;
                    self.give_back();
                    return Poll::Ready(Ok(batch(first, more)));
                }
                Poll::Pending => {
                    return match batch(first, more) {
                        Some(b) => Poll::Ready(Ok(Some(b))),
                        None => Poll::Pending,
                    };
                }
            }
        }
    }

    /// The whole body.
    pub async fn bytes(&mut self) -> Result<Bytes, UpstreamError> {
        let mut all = BytesMut::new();
        while let Some(b) = self.chunk().await? {
            all.extend_from_slice(&b);
        }
        Ok(all.freeze())
    }

    /// A body read to its end leaves the connection ready for the next
    /// request: keep it.
    fn give_back(&mut self) {
        if let Some(mut link) = self.link.take() {
            if link.alive() {
                self.pool.checkin(&self.authority, link);
            }
        }
    }
}

// An exchange dropped before its end closes its connection: that is how a
// worker learns that the client went away and stops generating.

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[test]
    fn authority_of_worker_urls() {
        assert_eq!(
            authority("http://127.0.0.1:9000").expect("plain"),
            "127.0.0.1:9000"
        );
        assert_eq!(
            authority("http://host:1/ignored").expect("with a path"),
            "host:1"
        );
        assert!(authority("https://host:1").is_err());
        assert!(authority("http://").is_err());
    }

    /// How the test server treats a connection after its first answer.
    #[derive(Clone, Copy)]
    enum After {
        KeepAlive,
        Close,
        /// Answer the first request, then close on the next without
        /// answering: an idle close racing the next request.
        DropSecond,
    }

    /// A raw HTTP/1.1 server on loopback: counts connections, answers each
    /// request with three SSE events written in one `write`, and either
    /// keeps the connection or closes it after the first answer.
    async fn server(after: After) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut answered = 0;
                    loop {
                        let mut chunk = [0u8; 4096];
                        let Ok(n) = socket.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        // Bodies here are short: head and body arrive together.
                        let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().expect("length"));
                        if buf.len() < head_end + 4 + len {
                            continue;
                        }
                        buf.drain(..head_end + 4 + len);
                        if matches!(after, After::DropSecond) && answered == 1 {
                            return;
                        }
                        answered += 1;
                        let events = ["data: a\n\n", "data: b\n\n", "data: [DONE]\n\n"];
                        let mut answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
                        for e in events {
                            answer
                                .extend_from_slice(format!("{:X}\r\n{e}\r\n", e.len()).as_bytes());
                        }
                        answer.extend_from_slice(b"0\r\n\r\n");
                        if socket.write_all(&answer).await.is_err() {
                            return;
                        }
                        if matches!(after, After::Close) {
                            return;
                        }
                    }
                });
            }
        });
        (url, accepted)
    }

    fn outgoing() -> Outgoing {
        Outgoing {
            method: Method::POST,
            path: "/v1/inference".to_owned(),
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"{}"),
        }
    }

    #[tokio::test]
    async fn events_written_together_come_back_as_one_batch_and_the_connection_is_reused() {
        let (url, accepted) = server(After::KeepAlive).await;
        let pool = Arc::new(Upstream::default());
        for _ in 0..3 {
            let (head, mut exchange) = pool.send(&url, &outgoing()).await.expect("send");
            assert_eq!(head.status, 200);
            let first = exchange.chunk().await.expect("read").expect("a batch");
            let mut all = first.to_vec();
            while let Some(more) = exchange.chunk().await.expect("read") {
                all.extend_from_slice(&more);
            }
            assert_eq!(all, b"data: a\n\ndata: b\n\ndata: [DONE]\n\n");
            assert_eq!(
                pool.idle_count(),
                1,
                "a body read to its end keeps the connection"
            );
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection for three requests"
        );
    }

    #[tokio::test]
    async fn a_connection_the_worker_closed_is_replaced_without_an_error() {
        let (url, accepted) = server(After::Close).await;
        let pool = Arc::new(Upstream::default());
        for round in 1..=3 {
            let (_, mut exchange) = pool.send(&url, &outgoing()).await.expect("send");
            let body = exchange.bytes().await.expect("body");
            assert!(body.ends_with(b"data: [DONE]\n\n"));
            // Let the close reach this side before the next request.
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(accepted.load(Ordering::SeqCst), round);
        }
    }

    #[tokio::test]
    async fn a_request_lost_on_a_reused_connection_is_sent_again_on_a_fresh_one() {
        let (url, accepted) = server(After::DropSecond).await;
        let pool = Arc::new(Upstream::default());
        for _ in 0..2 {
            let (head, mut exchange) = pool.send(&url, &outgoing()).await.expect("send");
            assert_eq!(head.status, 200);
            exchange.bytes().await.expect("body");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_exchange_dropped_mid_body_closes_its_connection() {
        let (url, accepted) = server(After::KeepAlive).await;
        let pool = Arc::new(Upstream::default());
        let (_, exchange) = pool.send(&url, &outgoing()).await.expect("send");
        drop(exchange);
        assert_eq!(
            pool.idle_count(),
            0,
            "a half-read connection is never reused"
        );
        let (_, mut exchange) = pool.send(&url, &outgoing()).await.expect("send");
        exchange.bytes().await.expect("body");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_unreachable_worker_is_an_error_naming_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let pool = Arc::new(Upstream::default());
        let err = pool
            .send(&format!("http://{addr}"), &outgoing())
            .await
            .expect_err("nothing listens");
        assert!(err.0.contains(&addr.to_string()), "{err}");
    }
}
