//! The HTTP/1.1 wire format as the queen speaks it to workers: a request
//! written out whole, an answer's head parsed, and its body decoded
//! (chunked, `Content-Length`, or until the connection closes).

use bytes::{Buf, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

use super::{Head, Outgoing, UpstreamError};

/// Most headers in an answer head.
const MAX_HEADERS: usize = 64;

/// Longest chunk-size or trailer line accepted.
const MAX_LINE_BYTES: usize = 4096;

/// The request line, headers and body, ready for one write.
pub(super) fn encode(authority: &str, outgoing: &Outgoing) -> Result<Vec<u8>, UpstreamError> {
    if outgoing.path.bytes().any(|b| b <= b' ' || b == 0x7f) || !outgoing.path.starts_with('/') {
        return Err(UpstreamError(format!(
            "`{}` is not a request path",
            outgoing.path
        )));
    }
    if authority.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(UpstreamError(format!("`{authority}` is not a valid host")));
    }
    let mut out = Vec::with_capacity(256 + outgoing.body.len());
    out.extend_from_slice(outgoing.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(outgoing.path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(authority.as_bytes());
    out.extend_from_slice(b"\r\ncontent-length: ");
    out.extend_from_slice(outgoing.body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &outgoing.headers {
        if name == http::header::HOST
            || name == http::header::CONTENT_LENGTH
            || name == http::header::TRANSFER_ENCODING
        {
            continue;
        }
        // Header values cannot hold CR or LF (`HeaderValue` refuses them).
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&outgoing.body);
    Ok(out)
}

/// Parse a complete head at the start of `buf` (consuming it), skipping
/// interim (1xx) answers; `None` while it is incomplete.
pub(super) fn parse_head(
    buf: &mut BytesMut,
    method: &Method,
) -> Result<Option<(Head, Framing, bool)>, String> {
    loop {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut slots);
        let len = match response.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(format!("the answer is not HTTP/1.1: {e}")),
        };
        let code = response.code.unwrap_or(0);
        let status =
            StatusCode::from_u16(code).map_err(|_| format!("status {code} is not valid"))?;
        if response.version != Some(1) {
            return Err("the answer is not HTTP/1.1".to_owned());
        }
        if status.is_informational() {
            buf.advance(len);
            continue;
        }
        let mut headers = HeaderMap::with_capacity(response.headers.len());
        let mut chunked = false;
        let mut length: Option<u64> = None;
        let mut keep_alive = true;
        for h in response.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| format!("header name `{}` is not valid", h.name))?;
            let value = HeaderValue::from_bytes(h.value)
                .map_err(|_| format!("the value of `{name}` is not valid"))?;
            if name == http::header::TRANSFER_ENCODING {
                // Only `chunked` is spoken, and it must come last.
                let text = value.to_str().unwrap_or("");
                let last = text.rsplit(',').next().unwrap_or("").trim();
                if !last.eq_ignore_ascii_case("chunked") || text.split(',').count() > 1 {
                    return Err(format!("transfer encoding `{text}` is not spoken here"));
                }
                chunked = true;
            } else if name == http::header::CONTENT_LENGTH {
                let n = value
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or_else(|| "Content-Length is not a number".to_owned())?;
                if length.is_some_and(|l| l != n) {
                    return Err("two different Content-Length headers".to_owned());
                }
                length = Some(n);
            } else if name == http::header::CONNECTION {
                keep_alive &= !value
                    .to_str()
                    .unwrap_or("")
                    .split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("close"));
            }
            headers.append(name, value);
        }
        buf.advance(len);
        let framing = if *method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::Length(0)
        } else if chunked {
            if length.is_some() {
                // Both framings at once is how requests get smuggled.
                return Err("the answer is both chunked and has a Content-Length".to_owned());
            }
            Framing::Chunked(Chunk::Size)
        } else if let Some(n) = length {
            Framing::Length(n)
        } else {
            keep_alive = false;
            Framing::UntilClose
        };
        return Ok(Some((Head { status, headers }, framing, keep_alive)));
    }
}

/// How an answer's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// This many bytes remain.
    Length(u64),
    /// Chunked, in this state.
    Chunked(Chunk),
    /// When the worker closes the connection.
    UntilClose,
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunk {
    /// At a chunk-size line.
    Size,
    /// In a chunk's data, with this many bytes to go.
    Data(u64),
    /// At the CRLF after a chunk's data.
    DataEnd,
    /// In the trailer section, after the last chunk.
    Trailers,
}

/// The position of the first CRLF in `buf`.
fn line_end(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// Decode what `buf` holds of the body into `out`. True at the body's end.
pub(super) fn decode(
    framing: &mut Framing,
    buf: &mut BytesMut,
    out: &mut BytesMut,
) -> Result<bool, String> {
    match framing {
        Framing::Length(n) => {
            let take = usize::try_from(*n).unwrap_or(usize::MAX).min(buf.len());
            out.extend_from_slice(&buf[..take]);
            buf.advance(take);
            *n -= take as u64;
            Ok(*n == 0)
        }
        Framing::UntilClose => {
            out.extend_from_slice(buf);
            buf.clear();
            Ok(false)
        }
        Framing::Chunked(state) => loop {
            match state {
                Chunk::Size => {
                    let Some(end) = line_end(buf) else {
                        return short_line(buf, "chunk-size");
                    };
                    let line = std::str::from_utf8(&buf[..end]).unwrap_or("");
                    let hex = line.split(';').next().unwrap_or("").trim();
                    let size = u64::from_str_radix(hex, 16)
                        .map_err(|_| format!("chunk size `{hex}` is not hexadecimal"))?;
                    buf.advance(end + 2);
                    *state = if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    };
                }
                Chunk::Data(n) => {
                    if buf.is_empty() {
                        return Ok(false);
                    }
                    let take = usize::try_from(*n).unwrap_or(usize::MAX).min(buf.len());
                    out.extend_from_slice(&buf[..take]);
                    buf.advance(take);
                    *n -= take as u64;
                    if *n == 0 {
                        *state = Chunk::DataEnd;
                    }
                }
                Chunk::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(false);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err("a chunk does not end with CRLF".to_owned());
                    }
                    buf.advance(2);
                    *state = Chunk::Size;
                }
                Chunk::Trailers => {
                    let Some(end) = line_end(buf) else {
                        return short_line(buf, "trailer");
                    };
                    buf.advance(end + 2);
                    if end == 0 {
                        return Ok(true);
                    }
                }
            }
        },
    }
}

/// An incomplete line: wait for more, unless it is already too long.
fn short_line(buf: &[u8], what: &str) -> Result<bool, String> {
    if buf.len() > MAX_LINE_BYTES {
        Err(format!(
            "a {what} line is longer than {MAX_LINE_BYTES} bytes"
        ))
    } else {
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decode `wire` (a whole body) fed in two parts split at `cut`.
    fn decode_split(framing: Framing, wire: &[u8], cut: usize) -> Result<(Vec<u8>, bool), String> {
        let mut framing = framing;
        let mut buf = BytesMut::new();
        let mut out = BytesMut::new();
        let mut ended = false;
        for part in [&wire[..cut], &wire[cut..]] {
            if ended {
                assert!(part.is_empty(), "the body ended before its last byte");
                break;
            }
            buf.extend_from_slice(part);
            ended = decode(&mut framing, &mut buf, &mut out)?;
        }
        assert!(buf.is_empty() || ended, "undecoded bytes left: {buf:?}");
        Ok((out.to_vec(), ended))
    }

    #[test]
    fn a_chunked_body_split_anywhere_decodes_the_same() {
        let wire =
            b"9\r\ndata: a\n\n\r\n10;ext=1\r\ndata: [DONE]\n\n\r\n\r\n0\r\nx-trailer: t\r\n\r\n";
        for cut in 0..=wire.len() {
            let (body, ended) =
                decode_split(Framing::Chunked(Chunk::Size), wire, cut).expect("valid");
            assert_eq!(body, b"data: a\n\ndata: [DONE]\n\n\r\n", "cut at {cut}");
            assert!(ended, "cut at {cut}");
        }
    }

    #[test]
    fn a_length_body_ends_at_its_length_and_a_close_delimited_one_never_does() {
        for cut in 0..=5 {
            assert_eq!(
                decode_split(Framing::Length(5), b"hello", cut).expect("valid"),
                (b"hello".to_vec(), true)
            );
        }
        assert_eq!(
            decode_split(Framing::UntilClose, b"hello", 2).expect("valid"),
            (b"hello".to_vec(), false)
        );
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for wire in [
            &b"zz\r\nabc\r\n"[..],
            b"3\r\nabcXY",
            &[b'1'; MAX_LINE_BYTES + 10],
        ] {
            let mut framing = Framing::Chunked(Chunk::Size);
            let mut buf = BytesMut::from(wire);
            let mut out = BytesMut::new();
            assert!(
                decode(&mut framing, &mut buf, &mut out).is_err(),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
    }

    #[test]
    fn heads_are_parsed_with_their_framing_and_bad_ones_refused() {
        let parse = |text: &str| parse_head(&mut BytesMut::from(text), &Method::POST);
        let (head, framing, keep) = parse(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 2\r\n\r\n{}",
        )
        .expect("valid")
        .expect("complete");
        assert_eq!(head.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(head.headers.get("retry-after").expect("kept"), "1");
        assert_eq!((framing, keep), (Framing::Length(2), true));

        let (_, framing, keep) =
            parse("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
                .expect("valid")
                .expect("complete");
        assert_eq!((framing, keep), (Framing::Chunked(Chunk::Size), false));

        let (_, framing, keep) = parse("HTTP/1.1 200 OK\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert_eq!((framing, keep), (Framing::UntilClose, false));

        assert!(parse("HTTP/1.1 200 OK\r\ncontent-le")
            .expect("valid")
            .is_none());
        for bad in [
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: many\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
            "HTTP/1.0 200 OK\r\n\r\n",
            "SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
