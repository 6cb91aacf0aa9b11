//! The worker client against raw TCP servers on loopback, each a test
//! double that answers (or fails to) the way a worker might.

use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[test]
fn authority_of_worker_urls() {
    assert_eq!(
        authority("http://127.0.0.1:9000").expect("plain"),
        (false, "127.0.0.1:9000", "http://127.0.0.1:9000")
    );
    assert_eq!(
        authority("http://host:1/ignored").expect("with a path"),
        (false, "host:1", "http://host:1")
    );
    assert_eq!(
        authority("https://host:1").expect("TLS"),
        (true, "host:1", "https://host:1")
    );
    assert!(authority("ftp://host:1").is_err());
    assert!(authority("http://").is_err());
}

#[test]
fn the_timeouts_follow_the_workers_stall_timeout() {
    let t = Timeouts::from_stall(Duration::from_secs(30));
    assert_eq!(t.first_byte, Duration::from_secs(35));
    assert_eq!(t.idle, Duration::from_secs(35));
    let t = Timeouts::from_stall(Duration::from_secs(2));
    assert_eq!(t.idle, Duration::from_secs(4));
}

/// How the test server treats a connection after its first answer.
#[derive(Clone, Copy)]
enum After {
    KeepAlive,
    Close,
    /// Read the second request whole, then close without answering: a
    /// worker that dies with the request in hand.
    DropSecond,
}

/// Counts of what a test server saw.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    requests: AtomicUsize,
}

/// Read one whole request (head and `Content-Length` body) from `socket`
/// into `buf`; false when the connection ended first.
async fn read_request(socket: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> bool {
    loop {
        if let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().expect("length"));
            if buf.len() >= head_end + 4 + len {
                buf.drain(..head_end + 4 + len);
                return true;
            }
        }
        let mut chunk = [0u8; 4096];
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

const EVENTS: &[u8] = b"data: a\n\ndata: b\n\ndata: [DONE]\n\n";

/// A raw HTTP/1.1 server on loopback: answers each request with three SSE
/// events written in one `write`, and either keeps the connection or
/// closes it after the first answer.
async fn server(after: After) -> (String, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let seen = Arc::new(Seen::default());
    let count = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            count.connections.fetch_add(1, Ordering::SeqCst);
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut answered = 0;
                while read_request(&mut socket, &mut buf).await {
                    count.requests.fetch_add(1, Ordering::SeqCst);
                    if matches!(after, After::DropSecond) && answered == 1 {
                        return;
                    }
                    answered += 1;
                    let mut answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
                    for e in EVENTS
                        .split_inclusive(|b| *b == b'\n')
                        .collect::<Vec<_>>()
                        .chunks(2)
                    {
                        let e = e.concat();
                        answer.extend_from_slice(format!("{:X}\r\n", e.len()).as_bytes());
                        answer.extend_from_slice(&e);
                        answer.extend_from_slice(b"\r\n");
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
    (url, seen)
}

fn outgoing() -> Outgoing {
    Outgoing {
        method: Method::POST,
        path: http::Uri::from_static("/v1/inference"),
        headers: HeaderMap::new(),
        body: Bytes::from_static(b"{}"),
        streaming: true,
    }
}

fn pool(timeouts: Timeouts) -> Arc<Upstream> {
    Arc::new(Upstream::new(timeouts))
}

const LIMIT: usize = 1 << 20;

#[tokio::test]
async fn events_written_together_come_back_as_one_batch_and_the_connection_is_reused() {
    let (url, seen) = server(After::KeepAlive).await;
    let pool = pool(Timeouts::default());
    for _ in 0..3 {
        let (head, mut exchange) = pool.send(&url, &outgoing()).await.expect("send");
        assert_eq!(head.status, 200);
        let first = exchange.chunk().await.expect("read").expect("a batch");
        let mut all = first.to_vec();
        while let Some(more) = exchange.chunk().await.expect("read") {
            all.extend_from_slice(&more);
        }
        assert_eq!(all, EVENTS);
        assert_eq!(
            pool.idle_count(),
            1,
            "a body read to its end keeps the connection"
        );
    }
    assert_eq!(
        seen.connections.load(Ordering::SeqCst),
        1,
        "one connection for three requests"
    );
}

#[tokio::test]
async fn a_connection_the_worker_closed_is_replaced_without_an_error() {
    let (url, seen) = server(After::Close).await;
    let pool = pool(Timeouts::default());
    for round in 1..=3 {
        let (_, mut exchange) = pool.send(&url, &outgoing()).await.expect("send");
        let body = exchange.bytes(LIMIT).await.expect("body");
        assert!(body.ends_with(b"data: [DONE]\n\n"));
        // Let the close reach this side before the next request.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(seen.connections.load(Ordering::SeqCst), round);
    }
}

#[tokio::test]
async fn a_written_request_is_never_sent_again_when_its_connection_dies_unanswered() {
    let (url, seen) = server(After::DropSecond).await;
    let pool = pool(Timeouts::default());
    let (_, mut exchange) = pool.send(&url, &outgoing()).await.expect("first");
    exchange.bytes(LIMIT).await.expect("body");
    // The worker reads the second request whole and dies: it may have
    // started on it, so the client reports the failure instead of
    // sending the request again (RFC 9110 §9.2.2).
    let err = pool
        .send(&url, &outgoing())
        .await
        .expect_err("the second request's connection died");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        seen.requests.load(Ordering::SeqCst),
        2,
        "the written request reached the worker once: {err}"
    );
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_exchange_dropped_mid_body_closes_its_connection() {
    let (url, seen) = server(After::KeepAlive).await;
    let pool = pool(Timeouts::default());
    let (_, exchange) = pool.send(&url, &outgoing()).await.expect("send");
    drop(exchange);
    assert_eq!(
        pool.idle_count(),
        0,
        "a half-read connection is never reused"
    );
    let (_, mut exchange) = pool.send(&url, &outgoing()).await.expect("send");
    exchange.bytes(LIMIT).await.expect("body");
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
}

/// A server that reads each request whole and answers `answer` as raw
/// bytes, then waits for the client to close (it never closes itself).
async fn raw_server(answer: &'static [u8]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if read_request(&mut socket, &mut buf).await {
                    let _ = socket.write_all(answer).await;
                }
                let mut rest = [0u8; 64];
                while matches!(socket.read(&mut rest).await, Ok(n) if n > 0) {}
            });
        }
    });
    url
}

/// [`raw_server`] that closes after its answer.
async fn raw_server_closing(answer: &'static [u8]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = Vec::new();
            if read_request(&mut socket, &mut buf).await {
                let _ = socket.write_all(answer).await;
            }
        }
    });
    url
}

#[tokio::test]
async fn an_answer_that_is_not_http_is_an_error_and_its_connection_is_dropped() {
    let url = raw_server_closing(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").await;
    let pool = pool(Timeouts::default());
    let err = pool.send(&url, &outgoing()).await.expect_err("not HTTP");
    assert!(error_chain(&err).contains("invalid HTTP"), "{err}");
    assert_eq!(pool.idle_count(), 0);
}

#[tokio::test]
async fn smuggling_shapes_and_bad_framing_are_errors() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd"[..],
        b"HTTP/1.1 200 OK\r\ncontent-length: many\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    ] {
        let url = raw_server_closing(answer).await;
        let pool = pool(Timeouts::default());
        let result = match pool.send(&url, &outgoing()).await {
            Ok((_, mut exchange)) => exchange.bytes(LIMIT).await.map(|_| ()),
            Err(e) => Err(e),
        };
        assert!(
            result.is_err(),
            "{:?} was taken",
            String::from_utf8_lossy(answer)
        );
        assert_eq!(pool.idle_count(), 0);
    }
}

#[tokio::test]
async fn a_body_cut_short_hands_out_what_came_then_an_error() {
    let url = raw_server_closing(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n9\r\ndata: a\n\n\r\n20\r\ndata: b",
    )
    .await;
    let pool = pool(Timeouts::default());
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
    assert!(
        error_chain(&err).contains("end of file before message length reached"),
        "{err}"
    );
    assert_eq!(pool.idle_count(), 0, "a cut connection is never reused");
}

#[tokio::test]
async fn an_unreachable_worker_is_an_error_naming_it() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let pool = pool(Timeouts::default());
    let err = pool
        .send(&format!("http://{addr}"), &outgoing())
        .await
        .expect_err("nothing listens");
    assert!(error_chain(&err).contains(&addr.to_string()), "{err}");
}

/// Short timeouts for the stall tests.
fn quick() -> Timeouts {
    Timeouts {
        first_byte: Duration::from_millis(300),
        idle: Duration::from_millis(300),
    }
}

#[tokio::test]
async fn a_worker_that_takes_the_request_and_never_answers_times_out_when_streaming() {
    // Reads the request whole, then says nothing and keeps the socket.
    let url = raw_server(b"").await;
    let pool = pool(quick());
    let started = Instant::now();
    let err = pool
        .send(&url, &outgoing())
        .await
        .expect_err("no head ever comes");
    let waited = started.elapsed();
    assert!(
        error_chain(&err).contains("no answer within 0.3 s"),
        "{err}"
    );
    assert!(
        (Duration::from_millis(290)..Duration::from_secs(2)).contains(&waited),
        "{waited:?}"
    );
    // A non-streaming answer's head comes when its generation ends: only
    // the request's deadline bounds that wait.
    let whole = Outgoing {
        streaming: false,
        ..outgoing()
    };
    let waiting = tokio::time::timeout(Duration::from_millis(900), pool.send(&url, &whole)).await;
    assert!(
        waiting.is_err(),
        "a non-streaming request waits past the first-byte timeout"
    );
}

#[tokio::test]
async fn a_stream_that_goes_quiet_times_out_after_its_events() {
    let url = raw_server(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n9\r\ndata: a\n\n\r\n",
    )
    .await;
    let pool = pool(quick());
    let (_, mut exchange) = pool.send(&url, &outgoing()).await.expect("head");
    assert_eq!(
        exchange.chunk().await.expect("the first event").as_deref(),
        Some(&b"data: a\n\n"[..])
    );
    let started = Instant::now();
    let err = exchange.chunk().await.expect_err("nothing more comes");
    let waited = started.elapsed();
    assert!(
        error_chain(&err).contains("sent nothing for 0.3 s"),
        "{err}"
    );
    assert!(
        (Duration::from_millis(250)..Duration::from_secs(2)).contains(&waited),
        "{waited:?}"
    );
    assert_eq!(pool.idle_count(), 0, "a stalled connection is never reused");
}

#[tokio::test]
async fn a_stream_that_keeps_sending_outlives_the_idle_timeout() {
    // One event every 100 ms for 1 s, against a 300 ms idle timeout.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let Ok((mut socket, _)) = listener.accept().await else {
            return;
        };
        let mut buf = Vec::new();
        read_request(&mut socket, &mut buf).await;
        let _ = socket
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            .await;
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = socket.write_all(b"9\r\ndata: a\n\n\r\n").await;
        }
        let _ = socket.write_all(b"0\r\n\r\n").await;
    });
    let pool = pool(quick());
    let (_, mut exchange) = pool.send(&url, &outgoing()).await.expect("head");
    let body = exchange.bytes(LIMIT).await.expect("a live stream");
    assert_eq!(body.len(), 90);
}

#[tokio::test]
async fn a_body_over_the_cap_is_refused_by_its_length_or_as_it_arrives() {
    let url = raw_server(b"HTTP/1.1 200 OK\r\ncontent-length: 2000000\r\n\r\n").await;
    let pool = pool(Timeouts::default());
    let (_, mut exchange) = pool.send(&url, &outgoing()).await.expect("head");
    let err = exchange.bytes(LIMIT).await.expect_err("over the cap");
    assert!(
        error_chain(&err).contains("longer than 1048576 bytes"),
        "{err}"
    );

    // Chunked, with no length to go by: refused once the cap is passed.
    static BIG: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let big = BIG.get_or_init(|| {
        let mut answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..20 {
            answer.extend_from_slice(format!("{:X}\r\n", 100_000).as_bytes());
            answer.extend(std::iter::repeat_n(b'x', 100_000));
            answer.extend_from_slice(b"\r\n");
        }
        answer.extend_from_slice(b"0\r\n\r\n");
        answer
    });
    let url = raw_server(big).await;
    let (_, mut exchange) = pool.send(&url, &outgoing()).await.expect("head");
    let err = exchange.bytes(LIMIT).await.expect_err("over the cap");
    assert!(
        error_chain(&err).contains("longer than 1048576 bytes"),
        "{err}"
    );
    assert_eq!(pool.idle_count(), 0);
}

#[tokio::test]
async fn a_head_over_its_cap_is_an_error() {
    static HEAD: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let head = HEAD.get_or_init(|| {
        let mut answer = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..40 {
            answer.extend_from_slice(format!("x-filler-{i}: ").as_bytes());
            answer.extend(std::iter::repeat_n(b'y', 5000));
            answer.extend_from_slice(b"\r\n");
        }
        answer.extend_from_slice(b"content-length: 0\r\n\r\n");
        answer
    });
    let url = raw_server(head).await;
    let pool = pool(Timeouts::default());
    let Err(err) = pool.send(&url, &outgoing()).await else {
        panic!("a 200 KB head was taken");
    };
    assert!(error_chain(&err).contains("too large"), "{err}");
}
