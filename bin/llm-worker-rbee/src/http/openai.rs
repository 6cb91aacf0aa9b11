//! OpenAI-compatible `/v1/chat/completions` and `/v1/completions`.
//!
//! Requests are turned into the native [`InferenceRequest`] (chat messages
//! through the model's chat template) and go through the same admission,
//! validation and engine as `/v1/inference`. Fields OpenAI clients commonly
//! send but that have no effect here (`user`, `logit_bias`, zero penalties)
//! are accepted and ignored; `n` above 1 is refused.

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::Stream;
use rbee_api::inference::{InferenceRequest, StopReason};
use rbee_api::{ApiError, ErrorCode, FieldError};
use rbee_http::{ApiJson, RequestContext};
use serde::Deserialize;

use super::{admit, Admitted};
use crate::engine::JobEvent;
use crate::model::chat::ChatMessage;
use crate::AppState;

/// Generated tokens when a request names no `max_tokens`.
pub const DEFAULT_MAX_TOKENS: u32 = 512;

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// Message content: a string or a list of text parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// `[{"type":"text","text":"..."}]`.
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Debug, Deserialize)]
pub struct ContentPart {
    /// Only `text` is supported; other kinds (images, audio) are refused.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    #[serde(default)]
    pub text: String,
}

/// A chat message as OpenAI clients send it.
#[derive(Debug, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`.
    pub role: String,
    /// The content.
    pub content: Content,
}

/// Sampling fields shared by both routes.
#[derive(Debug, Deserialize)]
pub struct Sampling {
    /// Model name; informational (the worker serves one model).
    pub model: Option<String>,
    /// Generated tokens at most.
    pub max_tokens: Option<u32>,
    /// Newer name for `max_tokens`.
    pub max_completion_tokens: Option<u32>,
    /// Default 1.
    pub temperature: Option<f32>,
    /// Default 1.
    pub top_p: Option<f32>,
    /// Extension: default 0 (off).
    pub top_k: Option<u32>,
    /// Extension: default 0 (off).
    pub min_p: Option<f32>,
    /// Extension: default 1 (off).
    pub repetition_penalty: Option<f32>,
    /// Reproducible sampling.
    pub seed: Option<u64>,
    /// Stop sequences.
    pub stop: Option<Stop>,
    /// SSE.
    #[serde(default)]
    pub stream: bool,
    /// Choices; only 1.
    pub n: Option<u32>,
    /// Extension: generate past end-of-sequence, up to `max_tokens`.
    #[serde(default)]
    pub ignore_eos: bool,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<Message>,
    /// Sampling.
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// The prompt text.
    pub prompt: String,
    /// Sampling.
    #[serde(flatten)]
    pub sampling: Sampling,
}

fn native(prompt: String, s: &Sampling) -> Result<InferenceRequest, ApiError> {
    if s.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid_fields(
            ErrorCode::InvalidRequest,
            vec![FieldError::new("n", "range", "only n=1 is supported")],
        ));
    }
    Ok(InferenceRequest {
        job_id: None,
        model: s.model.clone(),
        prompt,
        max_tokens: s
            .max_completion_tokens
            .or(s.max_tokens)
            .unwrap_or(DEFAULT_MAX_TOKENS),
        temperature: s.temperature.unwrap_or(1.0),
        top_p: s.top_p.unwrap_or(1.0),
        top_k: s.top_k.unwrap_or(0),
        min_p: s.min_p.unwrap_or(0.0),
        repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
        seed: s.seed,
        stop: match &s.stop {
            None => Vec::new(),
            Some(Stop::One(one)) => vec![one.clone()],
            Some(Stop::Many(many)) => many.clone(),
        },
        stream: s.stream,
        ignore_eos: s.ignore_eos,
    })
}

fn chat_prompt(state: &AppState, messages: Vec<Message>) -> Result<String, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_fields(
            ErrorCode::InvalidRequest,
            vec![FieldError::new(
                "messages",
                "required",
                "messages must not be empty",
            )],
        ));
    }
    let mut bad = Vec::new();
    let mut turns = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let content = match m.content {
            Content::Text(t) => t,
            Content::Parts(parts) => {
                if let Some(other) = parts.iter().find(|p| p.kind != "text") {
                    bad.push(FieldError::new(
                        format!("messages[{i}].content"),
                        "type",
                        format!(
                            "content part type `{}` is not supported: this model reads text only",
                            other.kind
                        ),
                    ));
                }
                parts
                    .into_iter()
                    .map(|p| p.text)
                    .collect::<Vec<_>>()
                    .join("")
            }
        };
        turns.push(ChatMessage {
            role: m.role,
            content,
        });
    }
    if !bad.is_empty() {
        return Err(ApiError::invalid_fields(ErrorCode::InvalidRequest, bad));
    }
    let Some(model) = state.model.get() else {
        return Err(
            ApiError::new(ErrorCode::ModelLoading, "the model is still loading")
                .with_retry_after(1),
        );
    };
    model
        .chat_template
        .render(&turns)
        .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, e))
}

fn finish_reason(reason: StopReason) -> &'static str {
    match reason {
        StopReason::Eos | StopReason::StopSequence => "stop",
        StopReason::MaxTokens => "length",
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    ctx: RequestContext,
    ApiJson(request): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let prompt = chat_prompt(&state, request.messages)?;
    let native = native(prompt, &request.sampling)?;
    respond(state, ctx, native, Kind::Chat).await
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<AppState>,
    ctx: RequestContext,
    ApiJson(request): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let native = native(request.prompt, &request.sampling)?;
    respond(state, ctx, native, Kind::Text).await
}

async fn respond(
    state: AppState,
    ctx: RequestContext,
    request: InferenceRequest,
    kind: Kind,
) -> Result<Response, ApiError> {
    let (admitted, request) = admit(&state, &ctx, request).await?;
    let meta = Meta {
        id: match kind {
            Kind::Chat => format!("chatcmpl-{}", admitted.job_id),
            Kind::Text => format!("cmpl-{}", admitted.job_id),
        },
        created: now_secs(),
        model: state.model_ref.clone(),
        kind,
    };
    if request.stream {
        Ok(Sse::new(chunks(meta, admitted))
            .keep_alive(KeepAlive::default())
            .into_response())
    } else {
        whole(meta, admitted).await.map(IntoResponse::into_response)
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Meta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    fn choice(
        &self,
        text: Option<String>,
        first: bool,
        finish: Option<&str>,
        chunk: bool,
    ) -> serde_json::Value {
        match self.kind {
            Kind::Chat if chunk => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                serde_json::json!({"index": 0, "delta": delta, "finish_reason": finish})
            }
            Kind::Chat => serde_json::json!({
                "index": 0,
                "message": {"role": "assistant", "content": text.unwrap_or_default()},
                "finish_reason": finish,
            }),
            Kind::Text => serde_json::json!({
                "index": 0, "text": text.unwrap_or_default(), "logprobs": null, "finish_reason": finish,
            }),
        }
    }

    fn body(
        &self,
        choices: Vec<serde_json::Value>,
        usage: Option<serde_json::Value>,
        chunk: bool,
    ) -> serde_json::Value {
        let mut body = serde_json::json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            body["usage"] = u;
        }
        body
    }
}

fn usage(tokens_in: u32, tokens_out: u32) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": tokens_in,
        "completion_tokens": tokens_out,
        "total_tokens": tokens_in + tokens_out,
    })
}

async fn whole(meta: Meta, mut admitted: Admitted) -> Result<Json<serde_json::Value>, ApiError> {
    let done = super::collect_text(&mut admitted).await?;
    let choice = meta.choice(
        Some(done.text),
        true,
        Some(finish_reason(done.stop_reason)),
        false,
    );
    Ok(Json(meta.body(
        vec![choice],
        Some(usage(done.tokens_in, done.tokens_out)),
        false,
    )))
}

fn chunks(meta: Meta, admitted: Admitted) -> impl Stream<Item = Result<Event, Infallible>> {
    struct Chunks {
        meta: Meta,
        admitted: Admitted,
        first: bool,
        queue: std::collections::VecDeque<Event>,
        finished: bool,
    }
    let data = |v: serde_json::Value| Event::default().data(v.to_string());
    let start = Chunks {
        meta,
        admitted,
        first: true,
        queue: std::collections::VecDeque::new(),
        finished: false,
    };
    futures_util::stream::unfold(start, move |mut s| async move {
        loop {
            if let Some(event) = s.queue.pop_front() {
                return Some((Ok(event), s));
            }
            if s.finished {
                return None;
            }
            let meta = &s.meta;
            match s.admitted.events.recv().await {
                Some(JobEvent::Token { t: text, .. }) => {
                    let chunk = meta.body(
                        vec![meta.choice(Some(text), s.first, None, true)],
                        None,
                        true,
                    );
                    s.first = false;
                    s.queue.push_back(data(chunk));
                }
                Some(JobEvent::End {
                    tokens_in,
                    tokens_out,
                    stop_reason,
                    ..
                }) => {
                    let last = meta.body(
                        vec![meta.choice(None, s.first, Some(finish_reason(stop_reason)), true)],
                        None,
                        true,
                    );
                    s.queue.push_back(data(last));
                    s.queue.push_back(data(meta.body(
                        Vec::new(),
                        Some(usage(tokens_in, tokens_out)),
                        true,
                    )));
                    s.queue.push_back(Event::default().data("[DONE]"));
                    s.finished = true;
                }
                Some(JobEvent::Error { code, message }) => {
                    let err = serde_json::json!({"error": {"code": code, "message": message, "retriable": code.retriable()}});
                    s.queue.push_back(data(err));
                    s.queue.push_back(Event::default().data("[DONE]"));
                    s.finished = true;
                }
                Some(JobEvent::Started { .. }) => {}
                None => s.finished = true,
            }
        }
    })
}
