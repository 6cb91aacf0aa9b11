//! The worker's events as the relay reads them: split out of the batches
//! they arrive in, read for what the queen needs (first token, end, error,
//! token counts; [`rbee_api::sse::classify`]) without touching the bytes it
//! forwards, and the `started` event held back until the first token.

use rbee_api::sse::{self, Dialect, Said};
use rbee_api::Outcome;

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

/// Parser state of one relayed SSE stream.
#[derive(Debug)]
pub(super) struct SseState {
    /// The start of an event whose end has not arrived yet.
    pub(super) buf: Vec<u8>,
    /// `started` events held back until the first token.
    pub(super) held: Vec<u8>,
    /// An event other than `started` has gone to the client.
    pub(super) started_relay: bool,
    pub(super) relayed_tokens: u32,
    pub(super) done: bool,
    pub(super) outcome: Outcome,
    pub(super) tokens_in: u32,
    pub(super) tokens_out: u32,
    /// Read the OpenAI chunk that carries `usage`, but do not send it on.
    drop_usage: bool,
}

impl Default for SseState {
    fn default() -> Self {
        Self::new(false)
    }
}

impl SseState {
    /// A stream's state before its first byte; `drop_usage`: see the field.
    pub(super) fn new(drop_usage: bool) -> Self {
        Self {
            buf: Vec::new(),
            held: Vec::new(),
            started_relay: false,
            relayed_tokens: 0,
            done: false,
            outcome: Outcome::Error,
            tokens_in: 0,
            tokens_out: 0,
            drop_usage,
        }
    }

    /// Take the complete events out of `bytes` (after what an earlier call
    /// left incomplete), append what they send to `out`, and keep the rest
    /// for the next call. True when the stream's first token was among them.
    pub(super) fn feed(&mut self, bytes: &[u8], dialect: Dialect, out: &mut Vec<u8>) -> bool {
        if self.buf.is_empty() {
            // The common case: the batch starts where an event starts, and
            // is read where it lies.
            let (used, first) = self.events(bytes, dialect, out);
            self.buf.extend_from_slice(&bytes[used..]);
            return first;
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.extend_from_slice(bytes);
        let (used, first) = self.events(&buf, dialect, out);
        buf.drain(..used);
        self.buf = buf;
        first
    }

    /// How long the incomplete event left after `bytes` would be: what
    /// [`feed`](Self::feed) would hold until its end arrives.
    pub(super) fn unfinished_after(&self, bytes: &[u8]) -> usize {
        let mut all = Vec::with_capacity(self.buf.len() + bytes.len());
        all.extend_from_slice(&self.buf);
        all.extend_from_slice(bytes);
        let mut at = 0;
        while let Some(len) = sse::event_end(&all[at..]) {
            at += len;
        }
        all.len() - at
    }

    /// Classify each complete event in `data`: how many bytes they took, and
    /// whether the first token was among them.
    fn events(&mut self, data: &[u8], dialect: Dialect, out: &mut Vec<u8>) -> (usize, bool) {
        let mut at = 0;
        let mut first = false;
        while let Some(len) = sse::event_end(&data[at..]) {
            first |= self.classify(&data[at..at + len], dialect, out);
            at += len;
        }
        (at, first)
    }

    /// Decide what one event sends; true when it is the first token.
    fn classify(&mut self, event: &[u8], dialect: Dialect, out: &mut Vec<u8>) -> bool {
        let Some(data) = sse::event_data(event) else {
            // A comment (the worker's keep-alive during a long prefill):
            // pass it on; it is not the answer starting.
            out.extend_from_slice(event);
            return false;
        };
        let mut first_token = false;
        match sse::classify(dialect, &data) {
            Said::Done => self.done = true,
            Said::Token => {
                first_token = self.relayed_tokens == 0;
                self.relayed_tokens += 1;
            }
            Said::Started if !self.started_relay => {
                self.held.extend_from_slice(event);
                return false;
            }
            Said::End {
                tokens_in,
                tokens_out,
            } => {
                self.tokens_in = tokens_in;
                self.tokens_out = tokens_out;
                self.outcome = Outcome::Ok;
                if self.drop_usage && dialect == Dialect::OpenAi {
                    return false;
                }
            }
            Said::Error(code) => self.outcome = code.map_or(Outcome::Error, Outcome::from),
            Said::Started | Said::Other => {}
        }
        self.started_relay = true;
        out.append(&mut self.held);
        out.extend_from_slice(event);
        first_token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unfinished_event_is_measured_across_batches() {
        let mut s = SseState::default();
        let many = "data: {\"type\":\"token\",\"t\":\"a\",\"i\":0}\n\n".repeat(1000);
        assert_eq!(s.unfinished_after(many.as_bytes()), 0);
        feed(&mut s, b"data: {\"type\":\"tok", Dialect::Native);
        assert_eq!(s.unfinished_after(b"en\""), 21);
        assert_eq!(s.unfinished_after(b"en\"}\n\ndata: x"), 7);
    }

    /// Feed `bytes`; what goes to the client, and whether the first token
    /// was in it.
    fn feed(s: &mut SseState, bytes: &[u8], dialect: Dialect) -> (String, bool) {
        let mut out = Vec::new();
        let first = s.feed(bytes, dialect, &mut out);
        (String::from_utf8(out).expect("utf-8"), first)
    }

    #[test]
    fn started_is_held_until_the_first_token_and_split_events_are_joined() {
        let mut s = SseState::default();
        let (out, _) = feed(
            &mut s,
            b"data: {\"type\":\"started\",\"job_id\":\"j\"}\n\ndata: {\"ty",
            Dialect::Native,
        );
        assert!(out.is_empty(), "started is held");
        assert!(!s.started_relay);

        let (out, first) = feed(
            &mut s,
            b"pe\":\"token\",\"t\":\"Hi\",\"i\":0}\n\n",
            Dialect::Native,
        );
        assert_eq!(
            out,
            "data: {\"type\":\"started\",\"job_id\":\"j\"}\n\ndata: {\"type\":\"token\",\"t\":\"Hi\",\"i\":0}\n\n"
        );
        assert!(first);
        let end = "data: {\"type\":\"end\",\"tokens_in\":5,\"tokens_out\":1,\"decode_time_ms\":3,\"stop_reason\":\"eos\"}\n\ndata: [DONE]\n\n";
        let (out, first) = feed(&mut s, end.as_bytes(), Dialect::Native);
        assert_eq!(out, end);
        assert!(!first);
        assert!(s.done);
        assert_eq!((s.outcome, s.tokens_in, s.tokens_out), (Outcome::Ok, 5, 1));
        assert!(s.buf.is_empty());
    }

    #[test]
    fn an_event_split_anywhere_comes_out_whole_and_once() {
        let stream: &[u8] = b"data: {\"type\":\"started\"}\r\n\r\ndata: {\"type\":\"token\",\"t\":\"a\",\"i\":0}\n\ndata: {\"type\":\"token\",\"t\":\"b\",\"i\":1}\n\n: keep-alive\n\ndata: [DONE]\n\n";
        for cut in 0..=stream.len() {
            let mut s = SseState::default();
            let mut out = Vec::new();
            let mut firsts = 0;
            for part in [&stream[..cut], &stream[cut..]] {
                firsts += usize::from(s.feed(part, Dialect::Native, &mut out));
            }
            assert_eq!(out, stream, "cut at {cut}");
            assert_eq!(firsts, 1, "cut at {cut}");
            assert_eq!(s.relayed_tokens, 2);
            assert!(s.done && s.buf.is_empty(), "cut at {cut}");
        }
    }

    #[test]
    fn keep_alive_comments_pass_through_without_releasing_started() {
        let mut s = SseState::default();
        assert!(
            feed(&mut s, b"data: {\"type\":\"started\"}\n\n", Dialect::Native)
                .0
                .is_empty()
        );
        let (out, _) = feed(&mut s, b":\n\n", Dialect::Native);
        assert_eq!(out, ":\n\n");
        assert!(!s.started_relay, "a failure now could still be retried");
    }

    #[test]
    fn errors_and_openai_usage_set_the_outcome() {
        let mut s = SseState::default();
        feed(
            &mut s,
            b"data: {\"type\":\"error\",\"code\":\"DEADLINE_EXCEEDED\",\"message\":\"m\"}\n\n",
            Dialect::Native,
        );
        assert_eq!(s.outcome, Outcome::DeadlineExceeded);
        let mut s = SseState::default();
        let (_, first) = feed(
            &mut s,
            b"data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\r\n\r\n",
            Dialect::OpenAi,
        );
        assert!(first);
        feed(&mut s, b"data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2}}\n\n", Dialect::OpenAi);
        assert_eq!((s.outcome, s.tokens_in, s.tokens_out), (Outcome::Ok, 4, 2));
        feed(
            &mut s,
            b"data: {\"error\":{\"code\":\"CANCELLED\",\"message\":\"m\"}}\n\n",
            Dialect::OpenAi,
        );
        assert_eq!(s.outcome, Outcome::Cancelled);
    }

    #[test]
    fn the_usage_chunk_is_read_and_dropped_unless_the_client_asked_for_it() {
        let stream = b"data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n";
        for asked in [true, false] {
            let mut s = SseState::new(!asked);
            let (out, first) = feed(&mut s, stream, Dialect::OpenAi);
            assert!(first);
            assert_eq!(out.contains("usage"), asked, "{out}");
            assert!(out.ends_with("data: [DONE]\n\n"));
            assert_eq!((s.outcome, s.tokens_in, s.tokens_out), (Outcome::Ok, 4, 1));
        }
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
