//! OpenAI-compatible `/v1/chat/completions` and `/v1/completions`.
//!
//! Bodies are read and checked by [`rbee_api::openai`] (the same code the
//! queen uses, so both name the same bad fields) and turned into the native
//! [`InferenceRequest`]: chat messages through the model's chat template.
//! From there they go through the same admission, validation and engine as
//! `/v1/inference`.

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::Stream;
use rbee_api::inference::Constraint;
use rbee_api::inference::InferenceRequest;
use rbee_api::inference::TokenLogprob;
use rbee_api::openai::answer::{
    AnswerMessage, ChatLogprobs, ChatTokenLogprob, Choice, ChoiceBody, ChoiceLogprobs, Completion,
    Delta, FinishReason, Object, TextLogprobs, Usage,
};
use rbee_api::openai::answer::{FunctionDelta, ToolCallDelta};
use rbee_api::openai::{ChatMessage, OpenAiRequest, Route, Tool, ToolChoice, Tools};
use rbee_api::sse::{self, Dialect};
use rbee_api::ApiError;
use rbee_api::FieldError;
use rbee_http::{ApiJson, RequestContext};
use serde_json::Value;

use super::error::AdmitError;
use super::{admit, Admitted};
use crate::engine::JobEvent;
use crate::model::tools::{ParsedCall, ToolFormat, ToolStream};
use crate::AppState;

fn parse(route: Route, body: &Value) -> Result<OpenAiRequest, AdmitError> {
    OpenAiRequest::parse(route, body).map_err(AdmitError::Invalid)
}

/// Render the chat's prompt, off the runtime's thread and within the
/// template's fuel; a worker with no free slot refuses before rendering
/// (admission reserves the slot for good afterwards).
async fn chat_prompt(
    state: &AppState,
    messages: Vec<ChatMessage>,
    tools: Vec<Tool>,
) -> Result<String, ApiError> {
    let model = super::generation_model(state)?;
    if model.engine.active() >= model.engine.slots() {
        model.metrics.request_finished(rbee_api::Outcome::Busy, 0.0);
        return Err(super::all_slots_busy(&model).into());
    }
    let rendered =
        rbee_http::task::spawn_blocking(move || model.chat_template.render(&messages, &tools))
            .await;
    match rendered {
        Ok(Ok(prompt)) => Ok(prompt),
        Ok(Err(e)) => Err(AdmitError::from(e).into()),
        Err(_) => Err(AdmitError::TemplateLost.into()),
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    ctx: RequestContext,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let OpenAiRequest {
        messages,
        mut request,
        include_usage,
        tools,
    } = parse(Route::Chat, &body)?;
    let format = tool_plan(&state, &tools, &mut request)?;
    let shown = if format.is_some() {
        tools.tools
    } else {
        Vec::new()
    };
    request.prompt = chat_prompt(&state, messages, shown).await?;
    respond(state, ctx, request, Route::Chat, include_usage, format).await
}

/// What the answer does with `tools`: the format its calls are parsed in
/// (none when there are no tools or `tool_choice` is `none`), and, for
/// `required` or a named function, the grammar that forces the call, set
/// as the request's constraint.
fn tool_plan(
    state: &AppState,
    tools: &Tools,
    request: &mut InferenceRequest,
) -> Result<Option<ToolFormat>, AdmitError> {
    if tools.tools.is_empty() || tools.choice == ToolChoice::None {
        return Ok(None);
    }
    let model = super::generation_model(state)?;
    let Some(format) = model.chat_template.tools else {
        return Err(AdmitError::Invalid(vec![FieldError::new(
            "tools",
            "unsupported",
            "this model's chat template does not show tools to the model (or writes calls in a format rbee does not read), so it cannot call them",
        )]));
    };
    let forced: Vec<&Tool> = match &tools.choice {
        ToolChoice::Required => tools.tools.iter().collect(),
        ToolChoice::Function(name) => tools
            .tools
            .iter()
            .filter(|t| &t.function.name == name)
            .collect(),
        ToolChoice::Auto | ToolChoice::None => Vec::new(),
    };
    if !forced.is_empty() {
        if request.constraint.is_some() {
            return Err(AdmitError::Invalid(vec![FieldError::new(
                "response_format",
                "conflict",
                "a response_format cannot be combined with a tool_choice that forces a call",
            )]));
        }
        let grammar = format.grammar(&forced, tools.parallel, |text| {
            model.tokenizer.token_to_id(text)
        });
        request.constraint = Some(Constraint::Lark { grammar });
    }
    Ok(Some(format))
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<AppState>,
    ctx: RequestContext,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let OpenAiRequest {
        request,
        include_usage,
        ..
    } = parse(Route::Completions, &body)?;
    respond(state, ctx, request, Route::Completions, include_usage, None).await
}

async fn respond(
    state: AppState,
    ctx: RequestContext,
    request: InferenceRequest,
    route: Route,
    include_usage: bool,
    tools: Option<ToolFormat>,
) -> Result<Response, ApiError> {
    let (admitted, request) = admit(&state, &ctx, request).await?;
    let meta = Meta {
        id: match route {
            Route::Chat => format!("chatcmpl-{}", admitted.job_id),
            Route::Completions => format!("cmpl-{}", admitted.job_id),
        },
        created: now_secs(),
        model: state.model_ref.clone(),
        route,
        logprobs: request.logprobs.is_some(),
        include_usage,
        tools,
    };
    if request.stream {
        Ok(Sse::new(super::keep_alive(&state, chunks(meta, admitted))).into_response())
    } else {
        whole(meta, admitted).await.map(IntoResponse::into_response)
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    route: Route,
    /// The request asked for log-probabilities.
    logprobs: bool,
    /// A stream ends with a chunk that carries `usage`.
    include_usage: bool,
    /// The format of the tool calls the answer may make.
    tools: Option<ToolFormat>,
}

impl Meta {
    fn object(&self, chunk: bool) -> Object {
        match (self.route, chunk) {
            (Route::Chat, false) => Object::ChatCompletion,
            (Route::Chat, true) => Object::ChatCompletionChunk,
            (Route::Completions, _) => Object::TextCompletion,
        }
    }

    /// The log-probabilities of `tokens` (each with where its text starts)
    /// in the route's shape, when the request asked for them.
    fn logprobs(&self, tokens: &[(TokenLogprob, usize)]) -> Option<ChoiceLogprobs> {
        if !self.logprobs {
            return None;
        }
        Some(match self.route {
            Route::Chat => ChoiceLogprobs::Chat(ChatLogprobs {
                content: tokens
                    .iter()
                    .map(|(lp, _)| ChatTokenLogprob::from(lp))
                    .collect(),
            }),
            Route::Completions => {
                let mut text = TextLogprobs::default();
                for (lp, offset) in tokens {
                    text.push(lp, *offset);
                }
                ChoiceLogprobs::Text(text)
            }
        })
    }

    /// The one choice: `text` as a chat message, a chat chunk's delta (the
    /// role in the `first` one) or completion text, with the
    /// log-probabilities of its tokens.
    fn choice(
        &self,
        text: Option<String>,
        first: bool,
        finish: Option<FinishReason>,
        chunk: bool,
        logprobs: Option<ChoiceLogprobs>,
    ) -> Choice {
        let body = match self.route {
            Route::Chat if chunk => ChoiceBody::Delta {
                delta: Delta {
                    role: first.then(|| "assistant".to_owned()),
                    content: text,
                    tool_calls: None,
                },
            },
            Route::Chat => ChoiceBody::Message {
                message: AnswerMessage {
                    role: "assistant".to_owned(),
                    content: Some(text.unwrap_or_default()),
                    tool_calls: Vec::new(),
                },
            },
            Route::Completions => ChoiceBody::Text {
                text: text.unwrap_or_default(),
            },
        };
        Choice {
            index: 0,
            body,
            logprobs,
            finish_reason: finish,
        }
    }

    fn body(&self, choices: Vec<Choice>, usage: Option<Usage>, chunk: bool) -> Completion {
        Completion {
            id: self.id.clone(),
            object: self.object(chunk),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }
}

async fn whole(meta: Meta, mut admitted: Admitted) -> Result<Json<Completion>, ApiError> {
    let done = super::collect_text(&mut admitted).await?;
    let logprobs = meta.logprobs(&done.logprobs);
    let mut finish: FinishReason = done.stop_reason.into();
    let parsed = meta.tools.map(|format| format.parse(&done.text));
    let mut choice = meta.choice(Some(done.text), true, None, false, logprobs);
    if let (Some(parsed), ChoiceBody::Message { message }) = (parsed, &mut choice.body) {
        if !parsed.calls.is_empty() {
            message.content = (!parsed.content.is_empty()).then_some(parsed.content);
            message.tool_calls = parsed
                .calls
                .into_iter()
                .map(ParsedCall::into_tool_call)
                .collect();
            if finish == FinishReason::Stop {
                finish = FinishReason::ToolCalls;
            }
        }
    }
    choice.finish_reason = Some(finish);
    Ok(Json(meta.body(
        vec![choice],
        Some(Usage::new(
            done.tokens_in,
            done.tokens_out,
            done.tokens_cached,
        )),
        false,
    )))
}

/// The chunks that stream `calls`: per call, its id, type and name, then
/// its arguments.
fn call_chunks(calls: Vec<ParsedCall>) -> Vec<Vec<ToolCallDelta>> {
    let mut out = Vec::with_capacity(calls.len() * 2);
    for (index, call) in calls.into_iter().enumerate() {
        let call = call.into_tool_call();
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        out.push(vec![ToolCallDelta {
            index,
            id: Some(call.id),
            kind: Some(call.kind),
            function: FunctionDelta {
                name: Some(call.function.name),
                arguments: String::new(),
            },
        }]);
        out.push(vec![ToolCallDelta {
            index,
            id: None,
            kind: None,
            function: FunctionDelta {
                name: None,
                arguments: call.function.arguments,
            },
        }]);
    }
    out
}

fn chunks(meta: Meta, admitted: Admitted) -> impl Stream<Item = Result<Event, Infallible>> {
    struct Chunks {
        meta: Meta,
        admitted: Admitted,
        first: bool,
        /// Bytes of text sent so far.
        offset: usize,
        /// Tool calls being read out of the text.
        tools: Option<ToolStream>,
        queue: std::collections::VecDeque<Event>,
        finished: bool,
    }
    let data = |chunk: Completion| {
        // Serializing an answer cannot fail: string keys, derived impls.
        Event::default().data(serde_json::to_string(&chunk).unwrap_or_default())
    };
    let start = Chunks {
        tools: meta.tools.map(ToolStream::new),
        meta,
        admitted,
        first: true,
        offset: 0,
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
                Some(JobEvent::Token { t: text, lp, .. }) => {
                    let tokens: Vec<_> = lp.into_iter().map(|lp| (lp, s.offset)).collect();
                    let logprobs = meta.logprobs(&tokens);
                    s.offset += text.len();
                    let text = match s.tools.as_mut() {
                        Some(calls) => calls.push(&text),
                        None => text,
                    };
                    if text.is_empty() && logprobs.is_none() && s.tools.is_some() {
                        continue;
                    }
                    let chunk = meta.body(
                        vec![meta.choice(Some(text), s.first, None, true, logprobs)],
                        None,
                        true,
                    );
                    s.first = false;
                    s.queue.push_back(data(chunk));
                }
                Some(JobEvent::End {
                    tokens_in,
                    tokens_out,
                    tokens_cached,
                    stop_reason,
                    ..
                }) => {
                    let mut finish: FinishReason = stop_reason.into();
                    if let Some(calls) = s.tools.take() {
                        let parsed = calls.finish();
                        if !parsed.content.is_empty() {
                            let chunk =
                                meta.choice(Some(parsed.content), s.first, None, true, None);
                            s.first = false;
                            s.queue.push_back(data(meta.body(vec![chunk], None, true)));
                        }
                        if !parsed.calls.is_empty() && finish == FinishReason::Stop {
                            finish = FinishReason::ToolCalls;
                        }
                        for deltas in call_chunks(parsed.calls) {
                            let mut choice = meta.choice(None, s.first, None, true, None);
                            s.first = false;
                            if let ChoiceBody::Delta { delta } = &mut choice.body {
                                delta.tool_calls = Some(deltas);
                            }
                            s.queue.push_back(data(meta.body(vec![choice], None, true)));
                        }
                    }
                    let last = meta.body(
                        vec![meta.choice(None, s.first, Some(finish), true, None)],
                        None,
                        true,
                    );
                    s.queue.push_back(data(last));
                    if meta.include_usage {
                        s.queue.push_back(data(meta.body(
                            Vec::new(),
                            Some(Usage::new(tokens_in, tokens_out, tokens_cached)),
                            true,
                        )));
                    }
                    s.queue.push_back(Event::default().data(sse::DONE));
                    s.finished = true;
                }
                Some(JobEvent::Error { code, message }) => {
                    s.queue.push_back(Event::default().data(sse::error_data(
                        Dialect::OpenAi,
                        code,
                        &message,
                    )));
                    s.queue.push_back(Event::default().data(sse::DONE));
                    s.finished = true;
                }
                Some(JobEvent::Started { .. }) => {}
                None => s.finished = true,
            }
        }
    })
}
