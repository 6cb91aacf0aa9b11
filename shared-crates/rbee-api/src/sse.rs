//! Server-sent events as the inference routes speak them, for the worker
//! that writes them and the queen that relays them: the two dialects, the
//! framing of one event, the error event, and what an event says.
//!
//! A stream is a sequence of `data:` events ending with `data: [DONE]`. In
//! the native dialect each event is a [`StreamEvent`]; in the OpenAI
//! dialect each is a completion chunk, the last chunk carries `usage`, and
//! a failure is the error envelope ([`ErrorBody`](crate::ErrorBody)).

use std::borrow::Cow;

use serde::Deserialize;

use crate::inference::StreamEvent;
use crate::openai::Route;
use crate::{ApiError, ErrorCode};

/// The data of the event that ends every stream.
pub const DONE: &str = "[DONE]";

/// Which event shapes a stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// [`StreamEvent`]s (`POST /v1/inference`).
    Native,
    /// OpenAI completion chunks (`/v1/chat/completions`, `/v1/completions`).
    OpenAi,
}

/// An inference route, on the queen and on a worker alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/inference`.
    Native,
    /// One of the OpenAI routes.
    OpenAi(Route),
    /// `POST /v1/embeddings` (never streamed).
    Embeddings,
}

impl Endpoint {
    /// The route's path.
    pub fn path(self) -> &'static str {
        match self {
            Self::Native => "/v1/inference",
            Self::OpenAi(Route::Chat) => "/v1/chat/completions",
            Self::OpenAi(Route::Completions) => "/v1/completions",
            Self::Embeddings => "/v1/embeddings",
        }
    }

    /// The dialect its streams speak.
    pub fn dialect(self) -> Dialect {
        match self {
            Self::Native => Dialect::Native,
            Self::OpenAi(_) | Self::Embeddings => Dialect::OpenAi,
        }
    }
}

/// The data of the event that ends a stream with `code`: the native
/// `error` event, or the error envelope an OpenAI client reads.
pub fn error_data(dialect: Dialect, code: ErrorCode, message: &str) -> String {
    // Serializing these types cannot fail: string keys, derived impls.
    match dialect {
        Dialect::Native => serde_json::to_string(&StreamEvent::Error {
            code,
            message: message.to_owned(),
        }),
        Dialect::OpenAi => serde_json::to_string(ApiError::new(code, message).body()),
    }
    .unwrap_or_default()
}

/// Append the event carrying `data` (one line) to `out`.
pub fn frame(data: &str, out: &mut Vec<u8>) {
    out.reserve(data.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(data.as_bytes());
    out.extend_from_slice(b"\n\n");
}

/// The length of the first complete event in `buf`, up to and including
/// the blank line that ends it (`\n\n`, or a `\n` followed by `\r\n`).
pub fn event_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(p) = buf[from..].iter().position(|&b| b == b'\n') {
        let lf = from + p;
        match buf.get(lf + 1) {
            Some(b'\n') => return Some(lf + 2),
            Some(b'\r') if buf.get(lf + 2) == Some(&b'\n') => return Some(lf + 3),
            _ => from = lf + 1,
        }
    }
    None
}

/// The data of one complete event, its `data:` lines joined by newlines;
/// `None` for an event without data (a comment, such as a keep-alive).
pub fn event_data(event: &[u8]) -> Option<Cow<'_, str>> {
    let text = std::str::from_utf8(event).unwrap_or("");
    let mut lines = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim_start);
    let first = lines.next()?;
    // One `data:` line is the common case; join only when there are more.
    match lines.next() {
        None => Some(Cow::Borrowed(first)),
        Some(second) => Some(Cow::Owned(
            [first, second]
                .into_iter()
                .chain(lines)
                .collect::<Vec<_>>()
                .join("\n"),
        )),
    }
}

/// What an event says, as far as a relay needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Said {
    /// `[DONE]`: the stream is over.
    Done,
    /// The native `started` event.
    Started,
    /// Generated text: a native `token` event, or an OpenAI chunk.
    Token,
    /// The generation ended well: the native `end` event, or the OpenAI
    /// chunk that carries `usage`.
    End {
        /// Prompt tokens.
        tokens_in: u32,
        /// Generated tokens.
        tokens_out: u32,
    },
    /// The generation failed, with its code when it names a known one.
    Error(Option<ErrorCode>),
    /// Anything else (data that is not an event of the dialect).
    Other,
}

/// The fields of a native event that [`classify`] reads.
#[derive(Deserialize)]
struct NativeFields<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    tokens_in: Option<u32>,
    tokens_out: Option<u32>,
    /// Kept as text, so that an unknown code still reads as an error.
    #[serde(borrow)]
    code: Option<Cow<'a, str>>,
}

/// The code named `code`, if it is one.
fn known_code(code: &str) -> Option<ErrorCode> {
    use serde::de::value::{Error, StrDeserializer};
    ErrorCode::deserialize(StrDeserializer::<Error>::new(code)).ok()
}

/// What the event whose data is `data` says in `dialect`.
pub fn classify(dialect: Dialect, data: &str) -> Said {
    if data == DONE {
        return Said::Done;
    }
    match dialect {
        // Tokens are most of a stream: recognised without parsing.
        Dialect::Native if data.contains("\"type\":\"token\"") => Said::Token,
        Dialect::Native => match serde_json::from_str::<NativeFields<'_>>(data) {
            Ok(e) => match e.kind.as_ref() {
                "started" => Said::Started,
                "token" => Said::Token,
                "end" => Said::End {
                    tokens_in: e.tokens_in.unwrap_or(0),
                    tokens_out: e.tokens_out.unwrap_or(0),
                },
                "error" => Said::Error(e.code.as_deref().and_then(known_code)),
                _ => Said::Other,
            },
            Err(_) => Said::Other,
        },
        Dialect::OpenAi => {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
                return Said::Other;
            };
            if let Some(error) = v.get("error") {
                let code = error
                    .get("code")
                    .and_then(|c| ErrorCode::deserialize(c).ok());
                Said::Error(code)
            } else if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                Said::End {
                    tokens_in: count(u.get("prompt_tokens")),
                    tokens_out: count(u.get("completion_tokens")),
                }
            } else {
                Said::Token
            }
        }
    }
}

fn count(v: Option<&serde_json::Value>) -> u32 {
    v.and_then(serde_json::Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::StopReason;

    fn native(event: &StreamEvent) -> String {
        serde_json::to_string(event).expect("serializable")
    }

    #[test]
    fn native_events_say_what_they_are() {
        let started = StreamEvent::Started {
            job_id: "j".into(),
            request_id: "r".into(),
            model: "m".into(),
            started_at: "t".into(),
        };
        assert_eq!(classify(Dialect::Native, &native(&started)), Said::Started);
        let token = StreamEvent::Token {
            t: "Hi".into(),
            i: 0,
            lp: None,
        };
        assert_eq!(classify(Dialect::Native, &native(&token)), Said::Token);
        let end = StreamEvent::End {
            tokens_in: 5,
            tokens_out: 2,
            tokens_cached: 0,
            decode_time_ms: 3,
            stop_reason: StopReason::Eos,
        };
        assert_eq!(
            classify(Dialect::Native, &native(&end)),
            Said::End {
                tokens_in: 5,
                tokens_out: 2
            }
        );
        let error = error_data(Dialect::Native, ErrorCode::DeadlineExceeded, "late");
        assert_eq!(
            classify(Dialect::Native, &error),
            Said::Error(Some(ErrorCode::DeadlineExceeded))
        );
        assert_eq!(classify(Dialect::Native, DONE), Said::Done);
        assert_eq!(classify(Dialect::Native, "not json"), Said::Other);
        assert_eq!(
            classify(Dialect::Native, r#"{"type":"error","code":"NOT_A_CODE"}"#),
            Said::Error(None)
        );
    }

    #[test]
    fn openai_chunks_say_what_they_are() {
        let chunk = r#"{"id":"c","choices":[{"delta":{"content":"a"}}]}"#;
        assert_eq!(classify(Dialect::OpenAi, chunk), Said::Token);
        let usage = r#"{"id":"c","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}"#;
        assert_eq!(
            classify(Dialect::OpenAi, usage),
            Said::End {
                tokens_in: 4,
                tokens_out: 2
            }
        );
        let error = error_data(Dialect::OpenAi, ErrorCode::Cancelled, "gone");
        assert_eq!(
            classify(Dialect::OpenAi, &error),
            Said::Error(Some(ErrorCode::Cancelled))
        );
        assert_eq!(classify(Dialect::OpenAi, DONE), Said::Done);
    }

    #[test]
    fn the_error_event_has_each_dialects_shape() {
        let native: serde_json::Value = serde_json::from_str(&error_data(
            Dialect::Native,
            ErrorCode::WorkerFailed,
            "it broke",
        ))
        .expect("json");
        assert_eq!(
            native,
            serde_json::json!({"type": "error", "code": "WORKER_FAILED", "message": "it broke"})
        );
        let openai: serde_json::Value = serde_json::from_str(&error_data(
            Dialect::OpenAi,
            ErrorCode::AllSlotsBusy,
            "busy",
        ))
        .expect("json");
        assert_eq!(
            openai,
            serde_json::json!({"error": {"code": "ALL_SLOTS_BUSY", "message": "busy", "retriable": true}})
        );
    }

    #[test]
    fn events_are_framed_and_found_with_either_line_ending() {
        let mut out = Vec::new();
        frame("one", &mut out);
        frame(DONE, &mut out);
        assert_eq!(out, b"data: one\n\ndata: [DONE]\n\n");
        assert_eq!(event_end(&out), Some(11));
        assert_eq!(event_end(b"data: a\r\n\r\nrest"), Some(11));
        assert_eq!(event_end(b"data: a\n"), None);
        assert_eq!(event_data(b"data: a\ndata: b\n\n").as_deref(), Some("a\nb"));
        assert_eq!(event_data(b": keep-alive\n\n"), None);
    }

    #[test]
    fn endpoints_know_their_path_and_dialect() {
        assert_eq!(Endpoint::Native.path(), "/v1/inference");
        assert_eq!(Endpoint::OpenAi(Route::Chat).path(), "/v1/chat/completions");
        assert_eq!(
            Endpoint::OpenAi(Route::Completions).dialect(),
            Dialect::OpenAi
        );
    }
}
