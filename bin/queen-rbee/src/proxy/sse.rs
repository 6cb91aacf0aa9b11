//! The SSE side of the relay: splitting the worker's stream into events,
//! reading what the queen needs from them (first token, end, error, token
//! counts) without touching the bytes it forwards, and the events the queen
//! writes itself.

use bytes::Bytes;
use rbee_api::{ErrorCode, Outcome};

use super::outcome_of;

pub(super) fn error_event(openai: bool, code: ErrorCode, message: &str) -> Bytes {
    let value = if openai {
        serde_json::json!({"error": {"code": code, "message": message, "retriable": code.retriable()}})
    } else {
        serde_json::json!({"type": "error", "code": code, "message": message})
    };
    Bytes::from(format!("data: {value}\n\n"))
}

/// Token counts from a non-streaming answer (native or OpenAI `usage`).
pub(super) fn usage_of(body: &[u8]) -> (u32, u32) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (0, 0);
    };
    let n = |v: Option<&serde_json::Value>| {
        v.and_then(serde_json::Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0)
    };
    match v.get("usage") {
        Some(u) => (n(u.get("prompt_tokens")), n(u.get("completion_tokens"))),
        None => (n(v.get("tokens_in")), n(v.get("tokens_out"))),
    }
}

/// The fields of a native stream event the queen reads.
#[derive(serde::Deserialize)]
struct NativeEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    tokens_in: Option<u32>,
    tokens_out: Option<u32>,
    code: Option<ErrorCode>,
}

/// Parser state of one relayed SSE stream.
#[derive(Debug)]
pub(super) struct SseState {
    pub(super) buf: Vec<u8>,
    pub(super) held: Vec<Bytes>,
    /// An event other than `started` has gone to the client.
    pub(super) started_relay: bool,
    pub(super) relayed_tokens: u32,
    pub(super) done: bool,
    pub(super) outcome: Outcome,
    pub(super) tokens_in: u32,
    pub(super) tokens_out: u32,
}

impl Default for SseState {
    fn default() -> Self {
        Self {
            buf: Vec::new(),
            held: Vec::new(),
            started_relay: false,
            relayed_tokens: 0,
            done: false,
            outcome: Outcome::Error,
            tokens_in: 0,
            tokens_out: 0,
        }
    }
}

/// What to send for one complete upstream event.
pub(super) struct Relayed {
    pub(super) out: Vec<Bytes>,
    pub(super) first_token: bool,
}

impl SseState {
    /// Split complete events out of `bytes` and decide what each sends.
    pub(super) fn feed(&mut self, bytes: &[u8], openai: bool) -> Vec<Relayed> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = find_event_end(&self.buf) {
            let event: Vec<u8> = self.buf.drain(..end).collect();
            out.push(self.classify(Bytes::from(event), openai));
        }
        out
    }

    fn classify(&mut self, event: Bytes, openai: bool) -> Relayed {
        let text = std::str::from_utf8(&event).unwrap_or("");
        let mut data_lines = text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(str::trim_start);
        // One `data:` line is the common case; join only when there are more.
        let Some(first) = data_lines.next() else {
            // A comment (the worker's keep-alive during a long prefill):
            // pass it on; it is not the answer starting.
            return Relayed {
                out: vec![event],
                first_token: false,
            };
        };
        let joined;
        let data = match data_lines.next() {
            None => first,
            Some(second) => {
                joined = [first, second]
                    .into_iter()
                    .chain(data_lines)
                    .collect::<Vec<_>>()
                    .join("\n");
                joined.as_str()
            }
        };
        let mut first_token = false;
        let mut is_started = false;
        if data == "[DONE]" {
            self.done = true;
        } else if !openai && data.contains("\"type\":\"token\"") {
            first_token = self.relayed_tokens == 0;
            self.relayed_tokens += 1;
        } else if openai {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(data) {
                if let Some(code) = v.get("error").and_then(|e| e.get("code")) {
                    self.set_error(code);
                } else if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                    self.tokens_in = count(u.get("prompt_tokens"));
                    self.tokens_out = count(u.get("completion_tokens"));
                    self.outcome = Outcome::Ok;
                } else {
                    first_token = self.relayed_tokens == 0;
                    self.relayed_tokens += 1;
                }
            }
        } else if let Ok(e) = serde_json::from_str::<NativeEvent<'_>>(data) {
            match e.kind.as_ref() {
                "started" => is_started = true,
                "end" => {
                    self.tokens_in = e.tokens_in.unwrap_or(0);
                    self.tokens_out = e.tokens_out.unwrap_or(0);
                    self.outcome = Outcome::Ok;
                }
                "error" => {
                    self.outcome = e.code.map_or(Outcome::Error, outcome_of);
                }
                _ => {}
            }
        }
        if is_started && !self.started_relay {
            self.held.push(event);
            return Relayed {
                out: Vec::new(),
                first_token: false,
            };
        }
        self.started_relay = true;
        let mut out = std::mem::take(&mut self.held);
        out.push(event);
        Relayed { out, first_token }
    }

    fn set_error(&mut self, code: &serde_json::Value) {
        self.outcome = serde_json::from_value::<ErrorCode>(code.clone())
            .map(outcome_of)
            .unwrap_or(Outcome::Error);
    }
}

fn count(v: Option<&serde_json::Value>) -> u32 {
    v.and_then(serde_json::Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0)
}

/// The end (exclusive) of the first complete event: after a blank line.
fn find_event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(r: &[Relayed]) -> Vec<String> {
        r.iter()
            .flat_map(|r| r.out.iter())
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }

    #[test]
    fn started_is_held_until_the_first_token_and_split_events_are_joined() {
        let mut s = SseState::default();
        let r = s.feed(
            b"data: {\"type\":\"started\",\"job_id\":\"j\"}\n\ndata: {\"ty",
            false,
        );
        assert!(texts(&r).is_empty(), "started is held");
        assert!(!s.started_relay);

        let r = s.feed(b"pe\":\"token\",\"t\":\"Hi\",\"i\":0}\n\n", false);
        let out = texts(&r);
        assert_eq!(out.len(), 2);
        assert!(out[0].contains("started") && out[1].contains("Hi"));
        assert!(r[0].first_token);
        let r = s.feed(
            b"data: {\"type\":\"end\",\"tokens_in\":5,\"tokens_out\":1,\"decode_time_ms\":3,\"stop_reason\":\"eos\"}\n\ndata: [DONE]\n\n",
            false,
        );
        assert_eq!(texts(&r).len(), 2);
        assert!(s.done);
        assert_eq!((s.outcome, s.tokens_in, s.tokens_out), (Outcome::Ok, 5, 1));
    }

    #[test]
    fn keep_alive_comments_pass_through_without_releasing_started() {
        let mut s = SseState::default();
        assert!(texts(&s.feed(b"data: {\"type\":\"started\"}\n\n", false)).is_empty());
        let r = s.feed(b":\n\n", false);
        assert_eq!(texts(&r), [":\n\n"]);
        assert!(!s.started_relay, "a failure now could still be retried");
    }

    #[test]
    fn errors_and_openai_usage_set_the_outcome() {
        let mut s = SseState::default();
        s.feed(
            b"data: {\"type\":\"error\",\"code\":\"DEADLINE_EXCEEDED\",\"message\":\"m\"}\n\n",
            false,
        );
        assert_eq!(s.outcome, Outcome::DeadlineExceeded);
        let mut s = SseState::default();
        let r = s.feed(
            b"data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\r\n\r\n",
            true,
        );
        assert!(r[0].first_token);
        s.feed(b"data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2}}\n\n", true);
        assert_eq!((s.outcome, s.tokens_in, s.tokens_out), (Outcome::Ok, 4, 2));
        s.feed(
            b"data: {\"error\":{\"code\":\"CANCELLED\",\"message\":\"m\"}}\n\n",
            true,
        );
        assert_eq!(s.outcome, Outcome::Cancelled);
    }

    #[test]
    fn usage_is_read_from_both_answer_shapes() {
        assert_eq!(usage_of(br#"{"tokens_in":3,"tokens_out":9}"#), (3, 9));
        assert_eq!(
            usage_of(br#"{"usage":{"prompt_tokens":2,"completion_tokens":5}}"#),
            (2, 5)
        );
        assert_eq!(usage_of(b"not json"), (0, 0));
    }
}
