//! The queen's HTTP/1.1 client for calls to workers.
//!
//! Every inference request is one exchange with a worker, so this path is
//! the queen's hot loop. A general-purpose client (reqwest, or hyper's
//! connection and its dispatcher) hands the request to the connection over
//! a channel, the answer's head back over another, and its body one chunk
//! at a time over a third. Here the connection belongs to whoever makes
//! the call: the request goes out in one write, the answer's head is parsed
//! from the same read buffer its body is decoded from, and everything the
//! worker has sent so far comes back as one batch, so a batch of events is
//! one write to the client.
//!
//! Only what workers speak is read: HTTP/1.1 answers whose body is chunked,
//! has a `Content-Length`, or ends with the connection; anything else is an
//! error naming what was wrong, and that connection is never reused.
//!
//! Connections are kept per worker address and reused (newest first). One
//! found closed when it is taken is dropped; a request that a reused
//! connection could not deliver (the worker closed it before answering a
//! byte) is sent once more on a fresh connection, because the worker never
//! saw it. Idle connections older than [`IDLE_MAX`] are closed by
//! [`Upstream::prune`].

use std::collections::HashMap;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

mod wire;

use wire::{decode, encode, parse_head, Framing};

/// Idle connections older than this are closed: the same bound as the
/// other daemons' pools ([`rbee_http::client::POOL_IDLE`]), under the
/// workers' header read timeout that closes their idle connections.
pub const IDLE_MAX: Duration = rbee_http::client::POOL_IDLE;

/// Idle connections kept per worker address.
const MAX_IDLE_PER_HOST: usize = 256;

/// Time allowed to open a TCP connection to a worker.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest answer head (status line and headers) accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Bytes read from a worker's socket at a time.
const READ_BYTES: usize = 16 * 1024;

/// One connection to a worker, with what has been read from it and not
/// consumed yet.
struct Conn {
    io: TcpStream,
    buf: BytesMut,
}

impl Conn {
    /// True when an idle connection is still open: it has nothing to read,
    /// while one the worker closed reads as its end.
    fn alive(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Read what the socket has into `buf`; 0 at the end of the stream.
    ///
    /// Through `AsyncRead`, which forgets the socket's readiness when a read
    /// comes back short: the next wait then costs no read that can only
    /// answer "nothing yet", and an idle connection looks idle.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        self.buf.reserve(READ_BYTES);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    async fn fill(&mut self) -> std::io::Result<usize> {
        poll_fn(|cx| self.poll_fill(cx)).await
    }
}

struct Idle {
    conn: Conn,
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

/// The head of a worker's answer.
#[derive(Debug)]
pub struct Head {
    /// Its status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: HeaderMap,
}

/// The pool of worker connections.
#[derive(Default)]
pub struct Upstream {
    idle: Mutex<HashMap<String, Vec<Idle>, ahash::RandomState>>,
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

/// How a call on one connection failed.
enum Failed {
    /// The connection ended before a byte of the answer: the worker may
    /// never have seen the request.
    Unanswered(String),
    /// Anything else.
    Other(String),
}

impl Upstream {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Idle>, ahash::RandomState>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Idle connections held, over all workers.
    pub fn idle_count(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    /// Close idle connections older than [`IDLE_MAX`].
    pub fn prune(&self) {
        let mut idle = self.lock();
        for conns in idle.values_mut() {
            conns.retain(|c| c.since.elapsed() < IDLE_MAX);
        }
        idle.retain(|_, conns| !conns.is_empty());
    }

    /// The newest idle connection to `authority` that is still open.
    fn checkout(&self, authority: &str) -> Option<Conn> {
        let mut idle = self.lock();
        let conns = idle.get_mut(authority)?;
        while let Some(mut idle) = conns.pop() {
            if idle.since.elapsed() >= IDLE_MAX {
                // Everything below is older still.
                conns.clear();
                return None;
            }
            if idle.conn.alive() {
                return Some(idle.conn);
            }
        }
        None
    }

    fn checkin(&self, authority: &str, conn: Conn) {
        let mut idle = self.lock();
        let conns = match idle.get_mut(authority) {
            Some(c) => c,
            None => idle.entry(authority.to_owned()).or_default(),
        };
        if conns.len() >= MAX_IDLE_PER_HOST {
            conns.remove(0);
        }
        conns.push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    async fn connect(authority: &str) -> Result<Conn, UpstreamError> {
        let io = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(authority))
            .await
            .map_err(|_| UpstreamError(format!("connecting to {authority} timed out")))?
            .map_err(|e| UpstreamError(format!("cannot connect to {authority}: {e}")))?;
        // Small SSE writes must not wait for delayed ACKs.
        io.set_nodelay(true)
            .map_err(|e| UpstreamError(format!("cannot set TCP_NODELAY: {e}")))?;
        Ok(Conn {
            io,
            buf: BytesMut::new(),
        })
    }

    /// Send `outgoing` to the worker at `base_url` (`http://host:port`) and
    /// wait for the head of its answer. The body is read from the returned
    /// [`Exchange`], which gives the connection back to the pool once the
    /// body is read to its end.
    pub async fn send(
        self: &Arc<Self>,
        base_url: &str,
        outgoing: &Outgoing,
    ) -> Result<(Head, Exchange), UpstreamError> {
        let authority = authority(base_url)?;
        let request = encode(authority, outgoing)?;
        let mut fresh_only = false;
        loop {
            let (mut conn, reused) = match (!fresh_only).then(|| self.checkout(authority)).flatten()
            {
                Some(conn) => (conn, true),
                None => (Self::connect(authority).await?, false),
            };
            match exchange(&mut conn, &request, &outgoing.method).await {
                Ok((head, body, keep_alive)) => {
                    let exchange = Exchange {
                        conn: Some(conn),
                        body,
                        keep_alive,
                        pending_error: None,
                        done: false,
                        authority: authority.to_owned(),
                        pool: Arc::clone(self),
                    };
                    return Ok((head, exchange));
                }
                // The worker closed an idle connection as the request went
                // out on it: it never saw the request, so send it again once.
                Err(Failed::Unanswered(why)) if reused => {
                    tracing::debug!(worker = %authority, error = %why, "a reused connection was closed; sending again");
                    fresh_only = true;
                }
                Err(Failed::Unanswered(why) | Failed::Other(why)) => {
                    return Err(UpstreamError(format!("{authority}: {why}")))
                }
            }
        }
    }
}

/// Send `request` on `conn` and read the answer's head: the head, how its
/// body is framed, and whether the connection may be reused after it.
async fn exchange(
    conn: &mut Conn,
    request: &[u8],
    method: &Method,
) -> Result<(Head, Framing, bool), Failed> {
    if let Err(e) = conn.io.write_all(request).await {
        // A worker may answer before it has read the whole request (a
        // refusal) and close: what it said is still there to read.
        return match read_head(conn, method).await {
            Ok((head, framing, _)) => Ok((head, framing, false)),
            Err(_) => Err(Failed::Unanswered(format!("sending the request: {e}"))),
        };
    }
    read_head(conn, method).await
}

/// Read the answer's head from `conn`.
async fn read_head(conn: &mut Conn, method: &Method) -> Result<(Head, Framing, bool), Failed> {
    loop {
        if let Some(parsed) = parse_head(&mut conn.buf, method).map_err(Failed::Other)? {
            return Ok(parsed);
        }
        if conn.buf.len() > MAX_HEAD_BYTES {
            return Err(Failed::Other(format!(
                "the answer's head is longer than {MAX_HEAD_BYTES} bytes"
            )));
        }
        let answered = !conn.buf.is_empty();
        match conn.fill().await {
            Ok(0) if answered => {
                return Err(Failed::Other(
                    "the connection closed in the answer's head".to_owned(),
                ))
            }
            Ok(0) => {
                return Err(Failed::Unanswered(
                    "the connection closed before an answer".to_owned(),
                ))
            }
            Ok(_) => {}
            Err(e) if answered => return Err(Failed::Other(format!("reading the answer: {e}"))),
            Err(e) => return Err(Failed::Unanswered(format!("reading the answer: {e}"))),
        }
    }
}

/// The body of a worker's answer, read batch by batch.
pub struct Exchange {
    /// `None` once the body has ended or failed.
    conn: Option<Conn>,
    body: Framing,
    keep_alive: bool,
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
        let mut out = BytesMut::new();
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(Err(UpstreamError("the connection has ended".to_owned())));
            };
            let ended = match decode(&mut self.body, &mut conn.buf, &mut out) {
                Ok(ended) => ended,
                Err(why) => {
                    let why = format!("{}: {why}", self.authority);
                    return Poll::Ready(self.fail(out, why));
                }
            };
            if ended {
                self.done = true;
                self.give_back();
                return Poll::Ready(Ok((!out.is_empty()).then(|| out.freeze())));
            }
            if !out.is_empty() {
                return Poll::Ready(Ok(Some(out.freeze())));
            }
            let why = match conn.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if self.body == Framing::UntilClose => {
                    self.done = true;
                    self.conn = None;
                    return Poll::Ready(Ok(None));
                }
                Poll::Ready(Ok(0)) => {
                    "the connection closed before the end of the answer".to_owned()
                }
                Poll::Ready(Ok(_)) => continue,
                Poll::Ready(Err(e)) => format!("reading the answer: {e}"),
            };
            let why = format!("{}: {why}", self.authority);
            return Poll::Ready(self.fail(out, why));
        }
    }

    /// End the exchange with an error, after handing out `out` if it holds
    /// data. The connection is closed, never reused.
    fn fail(&mut self, out: BytesMut, why: String) -> Result<Option<Bytes>, UpstreamError> {
        self.conn = None;
        if out.is_empty() {
            Err(UpstreamError(why))
        } else {
            self.pending_error = Some(why);
            Ok(Some(out.freeze()))
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
    /// request: keep it, unless the worker said it would close it or sent
    /// more than the answer.
    fn give_back(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && conn.buf.is_empty() {
                self.pool.checkin(&self.authority, conn);
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

    /// A server that reads one request and answers `answer` as raw bytes,
    /// then closes.
    async fn raw_server(answer: &'static [u8]) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut chunk = [0u8; 4096];
                let _ = socket.read(&mut chunk).await;
                let _ = socket.write_all(answer).await;
            }
        });
        url
    }

    #[tokio::test]
    async fn an_answer_that_is_not_http_is_an_error_and_its_connection_is_dropped() {
        let url = raw_server(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").await;
        let pool = Arc::new(Upstream::default());
        let err = pool.send(&url, &outgoing()).await.expect_err("not HTTP");
        assert!(err.0.contains("not HTTP/1.1"), "{err}");
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_body_cut_short_hands_out_what_came_then_an_error() {
        let url = raw_server(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n9\r\ndata: a\n\n\r\n20\r\ndata: b",
        )
        .await;
        let pool = Arc::new(Upstream::default());
        let (head, mut exchange) = pool.send(&url, &outgoing()).await.expect("head");
        assert_eq!(head.status, 200);
        let mut got = Vec::new();
        let err = loop {
            match exchange.chunk().await {
                Ok(Some(b)) => got.extend_from_slice(&b),
                Ok(None) => panic!("a cut body must not end cleanly"),
                Err(e) => break e,
            }
        };
        assert_eq!(got, b"data: a\n\ndata: b");
        assert!(err.0.contains("closed before the end"), "{err}");
        assert_eq!(pool.idle_count(), 0, "a cut connection is never reused");
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
