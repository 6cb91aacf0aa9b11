//! `POST /v1/inference`: the request, its validation, and the SSE events.
//!
//! The same body is accepted by the queen and by the worker. [`InferenceRequest`]
//! is what arrives; [`InferenceRequest::validate`] turns it into a
//! [`ValidInferenceRequest`] or reports every bad field at once.

use serde::{Deserialize, Serialize};

use crate::error::FieldError;

/// Most generated tokens one request may ask for.
pub const MAX_TOKENS_LIMIT: u32 = 4096;
/// Most stop sequences one request may carry.
pub const MAX_STOP_SEQUENCES: usize = 4;
/// Longest stop sequence, in bytes.
pub const MAX_STOP_SEQUENCE_BYTES: usize = 256;
/// Longest client-chosen job id, in bytes.
pub const MAX_JOB_ID_BYTES: usize = 128;
/// Most alternatives a request may ask to see per generated token (`logprobs`).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// The body of `POST /v1/inference`, with the contract's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceRequest {
    /// Client-chosen id; minted when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Model ref; required at the queen when it serves several models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The prompt text.
    pub prompt: String,
    /// Tokens to generate at most.
    #[serde(
        default = "default_max_tokens",
        skip_serializing_if = "is_default_max_tokens"
    )]
    pub max_tokens: u32,
    /// 0 is greedy.
    #[serde(
        default = "default_temperature",
        skip_serializing_if = "is_default_temperature"
    )]
    pub temperature: f32,
    /// Nucleus sampling mass.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub top_p: f32,
    /// 0 disables top-k.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub top_k: u32,
    /// Minimum probability relative to the most likely token; 0 disables.
    #[serde(default, skip_serializing_if = "is_zero_f32")]
    pub min_p: f32,
    /// 1 disables.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub repetition_penalty: f32,
    /// Fixed seed for reproducible sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Stop sequences, never emitted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// SSE stream (true) or one JSON answer (false).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub stream: bool,
    /// Keep generating past the end-of-sequence token, up to `max_tokens`
    /// (benchmarks and load tests that need a fixed output length).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_eos: bool,
    /// Report each generated token's log-probability and this many of the
    /// most likely tokens at its position (0 to [`MAX_TOP_LOGPROBS`]);
    /// absent reports none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
    /// What the answer must match, enforced token by token
    /// (`response_format` on the wire, as on the OpenAI routes).
    #[serde(
        default,
        rename = "response_format",
        skip_serializing_if = "Option::is_none"
    )]
    pub constraint: Option<Constraint>,
}

/// What an answer must match. The worker compiles it for its tokenizer and
/// masks, at every step, the tokens that would break it, so the answer
/// matches by construction (unless `max_tokens` cuts it short).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Constraint {
    /// Any JSON object.
    JsonObject,
    /// JSON valid against a JSON Schema.
    JsonSchema {
        /// The schema.
        schema: serde_json::Value,
    },
    /// A grammar in llguidance's Lark dialect (tool calls use one; see
    /// docs/worker.md).
    Lark {
        /// The grammar's text.
        grammar: String,
    },
}

fn default_max_tokens() -> u32 {
    128
}
fn default_temperature() -> f32 {
    0.7
}
fn one() -> f32 {
    1.0
}
fn yes() -> bool {
    true
}

// A field at its default is left out when the request is serialized (the
// queen forwards it to a worker): the reader fills in the same default, and
// the body it parses is shorter.
fn is_zero(v: &u32) -> bool {
    *v == 0
}

fn is_default_max_tokens(v: &u32) -> bool {
    *v == default_max_tokens()
}
// Exact comparison is the point: only the value the default produces is left out.
fn is_default_temperature(v: &f32) -> bool {
    v.to_bits() == default_temperature().to_bits()
}
fn is_one(v: &f32) -> bool {
    v.to_bits() == one().to_bits()
}
fn is_zero_f32(v: &f32) -> bool {
    v.to_bits() == 0f32.to_bits()
}
fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}
fn is_true(v: &bool) -> bool {
    *v
}

/// A fresh job id: a random UUID, within the job id's format.
pub fn new_job_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// An inference request whose every field is within the contract's limits.
///
/// Only [`InferenceRequest::validate`] makes one, so code holding a
/// `ValidInferenceRequest` need not check again.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidInferenceRequest(InferenceRequest);

impl ValidInferenceRequest {
    /// The validated fields.
    pub fn get(&self) -> &InferenceRequest {
        &self.0
    }

    /// The request as the queen forwards it: `model` named (routing has
    /// checked it as a model reference; [`InferenceRequest::validate`] does
    /// not look at it) and a job id, a fresh UUID when the client sent
    /// none; returns that id too. It stays valid: the id is the one
    /// validated or a UUID.
    pub fn routed(mut self, model: String) -> (Self, String) {
        let job_id = self.0.job_id.get_or_insert_with(new_job_id).clone();
        self.0.model = Some(model);
        (self, job_id)
    }
}

/// Read access to the validated fields; there is no write access, so they
/// stay valid.
impl std::ops::Deref for ValidInferenceRequest {
    type Target = InferenceRequest;

    fn deref(&self) -> &InferenceRequest {
        &self.0
    }
}

impl InferenceRequest {
    /// Check every field against the contract's limits, reporting all
    /// violations at once. The model's context limit is checked by the worker,
    /// which knows the tokenizer.
    pub fn validate(self) -> Result<ValidInferenceRequest, Vec<FieldError>> {
        let mut bad = Vec::new();
        if self.prompt.trim().is_empty() {
            bad.push(FieldError::new(
                "prompt",
                "required",
                "prompt must not be empty",
            ));
        }
        self.check_generation(&mut bad);
        if let Some(id) = &self.job_id {
            if !is_valid_id(id, MAX_JOB_ID_BYTES) {
                bad.push(FieldError::new(
                    "job_id",
                    "format",
                    format!(
                        "job_id must be 1 to {MAX_JOB_ID_BYTES} characters of A-Z a-z 0-9 . _ : -"
                    ),
                ));
            }
        }
        if bad.is_empty() {
            Ok(ValidInferenceRequest(self))
        } else {
            Err(bad)
        }
    }

    /// Check the generation settings (`max_tokens`, sampling, `stop`) against
    /// the contract's limits, adding one entry to `bad` per bad field. Shared
    /// with the OpenAI-compatible routes, which carry the same settings.
    pub fn check_generation(&self, bad: &mut Vec<FieldError>) {
        if !(1..=MAX_TOKENS_LIMIT).contains(&self.max_tokens) {
            bad.push(FieldError::new(
                "max_tokens",
                "range",
                format!("max_tokens must be between 1 and {MAX_TOKENS_LIMIT}"),
            ));
        }
        check_unit_range(bad, "temperature", self.temperature, 2.0);
        check_unit_range(bad, "top_p", self.top_p, 1.0);
        check_unit_range(bad, "min_p", self.min_p, 1.0);
        if !(self.repetition_penalty.is_finite()
            && self.repetition_penalty > 0.0
            && self.repetition_penalty <= 10.0)
        {
            bad.push(FieldError::new(
                "repetition_penalty",
                "range",
                "repetition_penalty must be greater than 0 and at most 10",
            ));
        }
        if self.stop.len() > MAX_STOP_SEQUENCES {
            bad.push(FieldError::new(
                "stop",
                "max_items",
                format!("at most {MAX_STOP_SEQUENCES} stop sequences are allowed"),
            ));
        }
        for (i, s) in self.stop.iter().enumerate() {
            if s.is_empty() || s.len() > MAX_STOP_SEQUENCE_BYTES {
                bad.push(FieldError::new(
                    format!("stop[{i}]"),
                    "length",
                    format!("stop sequences must be 1 to {MAX_STOP_SEQUENCE_BYTES} bytes"),
                ));
            }
        }
        if self.logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            bad.push(FieldError::new(
                "logprobs",
                "range",
                format!("logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
            ));
        }
    }
}

fn check_unit_range(bad: &mut Vec<FieldError>, field: &str, value: f32, max: f32) {
    if !(value.is_finite() && (0.0..=max).contains(&value)) {
        bad.push(FieldError::new(
            field,
            "range",
            format!("{field} must be between 0 and {max}"),
        ));
    }
}

/// Whether `id` is a safe identifier: 1..=`max_len` bytes of
/// `[A-Za-z0-9._:-]`. Used for job ids, request ids and worker ids, which end
/// up in logs, file names and URLs.
pub fn is_valid_id(id: &str, max_len: usize) -> bool {
    !id.is_empty()
        && id.len() <= max_len
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced its end-of-sequence token.
    Eos,
    /// `max_tokens` were generated.
    MaxTokens,
    /// A stop sequence matched (and was not emitted).
    StopSequence,
}

/// One SSE `data:` event of an inference stream; `data: [DONE]` follows the last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent {
    /// First event: the job is running.
    Started {
        /// The job id.
        job_id: String,
        /// The request id of the HTTP request that started it.
        request_id: String,
        /// The model ref serving it.
        model: String,
        /// RFC 3339 UTC start time.
        started_at: String,
    },
    /// One generated token's text, sent as it is produced.
    Token {
        /// Decoded text (may be empty while a UTF-8 sequence is incomplete).
        t: String,
        /// 0-based index of the generated token.
        i: u32,
        /// Its log-probability, when the request asked for `logprobs`
        /// (absent on the event that only releases held-back text).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lp: Option<TokenLogprob>,
    },
    /// Last event of a successful generation.
    End {
        /// Prompt tokens.
        tokens_in: u32,
        /// Generated tokens.
        tokens_out: u32,
        /// Prompt tokens whose prefill the worker's prefix cache skipped
        /// (part of `tokens_in`); absent when none.
        #[serde(default, skip_serializing_if = "is_zero")]
        tokens_cached: u32,
        /// Time spent decoding, in milliseconds.
        decode_time_ms: u64,
        /// Why generation ended.
        stop_reason: StopReason,
    },
    /// Last event of a failed generation.
    Error {
        /// Stable code, as in the error envelope.
        code: crate::ErrorCode,
        /// Human sentence.
        message: String,
    },
}

/// A generated token's log-probability under the model's distribution at
/// its position (the log-softmax of the raw logits, before temperature,
/// penalties and truncation), and the most likely tokens there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token's id.
    pub id: u32,
    /// The token decoded alone (a piece of a multi-byte character decodes
    /// to U+FFFD).
    pub token: String,
    /// Natural log of its probability.
    pub logprob: f32,
    /// The `logprobs` most likely tokens, most likely first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<TopLogprob>,
}

/// One of the most likely tokens at a position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    /// The token's id.
    pub id: u32,
    /// The token decoded alone.
    pub token: String,
    /// Natural log of its probability.
    pub logprob: f32,
}

/// `stream=false` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceResponse {
    /// The job id.
    pub job_id: String,
    /// All generated text.
    pub text: String,
    /// Prompt tokens.
    pub tokens_in: u32,
    /// Generated tokens.
    pub tokens_out: u32,
    /// Prompt tokens whose prefill the worker's prefix cache skipped
    /// (part of `tokens_in`); absent when none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tokens_cached: u32,
    /// Why generation ended.
    pub stop_reason: StopReason,
    /// Time spent decoding, in milliseconds.
    pub decode_time_ms: u64,
    /// Each generated token's log-probability, when the request asked for
    /// `logprobs`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<TokenLogprob>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: &str) -> InferenceRequest {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_routed_request_keeps_its_job_id_or_gets_a_valid_one_and_names_the_model() {
        let named = request(r#"{"prompt":"hi","job_id":"job-1"}"#)
            .validate()
            .unwrap();
        let (named, id) = named.routed("hf:o/r".to_owned());
        assert_eq!(id, "job-1");
        assert_eq!(named.job_id.as_deref(), Some("job-1"));
        assert_eq!(named.model.as_deref(), Some("hf:o/r"));

        let (minted, id) = request(r#"{"prompt":"hi"}"#)
            .validate()
            .unwrap()
            .routed("hf:o/r".to_owned());
        assert_eq!(minted.job_id.as_deref(), Some(id.as_str()));
        // Still what validation accepts.
        assert!(minted.get().clone().validate().is_ok());
    }

    #[test]
    fn defaults_follow_the_contract() {
        let r = request(r#"{"prompt":"hi"}"#);
        assert_eq!(r.max_tokens, 128);
        assert!((r.temperature - 0.7).abs() < f32::EPSILON);
        assert!((r.top_p - 1.0).abs() < f32::EPSILON);
        assert_eq!(r.top_k, 0);
        assert_eq!(r.min_p, 0.0);
        assert!((r.repetition_penalty - 1.0).abs() < f32::EPSILON);
        assert!(r.stream);
        assert!(r.stop.is_empty());
        assert!(r.validate().is_ok());
    }

    #[test]
    fn validation_reports_every_bad_field_at_once() {
        let r = request(
            r#"{"prompt":"  ","max_tokens":0,"temperature":3,"top_p":-0.1,
                "stop":["a","b","c","d",""],"job_id":"../etc"}"#,
        );
        let errors = r.validate().unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "prompt",
                "max_tokens",
                "temperature",
                "top_p",
                "stop",
                "stop[4]",
                "job_id"
            ]
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(
            serde_json::from_str::<InferenceRequest>(r#"{"prompt":"x","max_token":5}"#).is_err()
        );
    }

    #[test]
    fn a_constraint_is_the_response_format() {
        let r = request(
            r#"{"prompt":"x","response_format":{"type":"json_schema","schema":{"type":"object"}}}"#,
        );
        assert_eq!(
            r.constraint,
            Some(Constraint::JsonSchema {
                schema: serde_json::json!({"type": "object"})
            })
        );
        let r =
            request(r#"{"prompt":"x","response_format":{"type":"lark","grammar":"start: /a+/"}}"#);
        assert!(matches!(r.constraint, Some(Constraint::Lark { .. })));
        assert!(serde_json::from_str::<InferenceRequest>(
            r#"{"prompt":"x","response_format":{"type":"xml"}}"#
        )
        .is_err());
    }

    #[test]
    fn stream_events_are_tagged_by_type() {
        let token = serde_json::to_value(StreamEvent::Token {
            t: "Par".into(),
            i: 0,
            lp: None,
        })
        .unwrap();
        assert_eq!(token, serde_json::json!({"type":"token","t":"Par","i":0}));
        let end = serde_json::to_value(StreamEvent::End {
            tokens_in: 3,
            tokens_out: 1,
            tokens_cached: 0,
            decode_time_ms: 5,
            stop_reason: StopReason::MaxTokens,
        })
        .unwrap();
        assert_eq!(end["stop_reason"], "max_tokens");
        assert!(
            end.get("tokens_cached").is_none(),
            "absent when none: {end}"
        );
        let cached = StreamEvent::End {
            tokens_in: 300,
            tokens_out: 1,
            tokens_cached: 256,
            decode_time_ms: 5,
            stop_reason: StopReason::Eos,
        };
        let json = serde_json::to_string(&cached).unwrap();
        assert!(json.contains(r#""tokens_cached":256"#), "{json}");
        assert_eq!(serde_json::from_str::<StreamEvent>(&json).unwrap(), cached);
        let err = serde_json::to_value(StreamEvent::Error {
            code: crate::ErrorCode::DeadlineExceeded,
            message: "late".into(),
        })
        .unwrap();
        assert_eq!(err["code"], "DEADLINE_EXCEEDED");
    }

    #[test]
    fn ids_allow_only_safe_characters() {
        assert!(is_valid_id("job-1.a_b:c", 128));
        assert!(!is_valid_id("", 128));
        assert!(!is_valid_id("a b", 128));
        assert!(!is_valid_id("a/b", 128));
        assert!(!is_valid_id(&"x".repeat(129), 128));
    }
}
