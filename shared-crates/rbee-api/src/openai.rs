//! The bodies of the OpenAI-compatible routes (`POST /v1/chat/completions`,
//! `POST /v1/completions`) and their checks.
//!
//! The queen and the worker read these bodies with the same code, so both
//! refuse the same requests with the same fields named. Every bad field is
//! reported at once, wrong types included, as the contract asks of every
//! route. Fields that ask for what this server does not do (penalties
//! other than `repetition_penalty`, `n` other than 1, content other than
//! text, the deprecated `functions`, ...) are refused by name rather than answered
//! as if absent; fields with no effect on the answer (`user`, `metadata`,
//! ...) are accepted and ignored. docs/openai.md
//! lists every field. Their answers are in [`answer`].

pub mod answer;
pub mod embeddings;
mod reader;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use self::reader::Reader;
use crate::error::FieldError;
use crate::inference::{Constraint, InferenceRequest, MAX_TOKENS_LIMIT, MAX_TOP_LOGPROBS};

/// Generated tokens when an OpenAI request names no `max_tokens`.
pub const DEFAULT_MAX_TOKENS: u32 = 512;

/// Message roles a chat request may use.
pub const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// Which OpenAI route a body was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `POST /v1/chat/completions`: `messages`.
    Chat,
    /// `POST /v1/completions`: `prompt`.
    Completions,
}

/// One chat message, its content flattened to text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// One of [`ROLES`].
    pub role: String,
    /// The text.
    pub content: String,
    /// An assistant turn's tool calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A tool turn: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A tool turn: the tool's name, when the client gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A plain turn: `role` says `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }
}

/// A call of a function tool, in an assistant turn or an answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id (`call_...`), which the tool turn answering it names.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// What is called, with what.
    pub function: FunctionCall,
}

/// The function of a [`ToolCall`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// The function's name.
    pub name: String,
    /// Its arguments: a JSON object, as text.
    pub arguments: String,
}

/// A function the model may call (`tools[]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function.
    pub function: FunctionTool,
}

/// The function of a [`Tool`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionTool {
    /// 1 to 64 of `a-z A-Z 0-9 _ -`.
    pub name: String,
    /// What it does, for the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Its arguments, as a JSON Schema object; absent takes none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
}

/// Whether and which tool the model must call (`tool_choice`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// No call: the tools are not shown to the model.
    None,
    /// The model decides (the default when there are tools).
    #[default]
    Auto,
    /// At least one call, of any of the tools.
    Required,
    /// A call of this function.
    Function(String),
}

impl ToolChoice {
    /// OpenAI's form.
    pub fn to_value(&self) -> Value {
        match self {
            Self::None => Value::from("none"),
            Self::Auto => Value::from("auto"),
            Self::Required => Value::from("required"),
            Self::Function(name) => {
                serde_json::json!({"type": "function", "function": {"name": name}})
            }
        }
    }
}

/// The tools of a chat request and what the model may do with them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tools {
    /// The functions.
    pub tools: Vec<Tool>,
    /// Whether and which to call.
    pub choice: ToolChoice,
    /// More than one call in an answer (`parallel_tool_calls`, default true).
    pub parallel: bool,
}

/// A checked OpenAI body.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenAiRequest {
    /// The conversation (chat route); empty for the completions route.
    pub messages: Vec<ChatMessage>,
    /// The same request in native form. Its `prompt` is the completion
    /// prompt, or empty for a chat until the worker renders the messages
    /// through the model's chat template.
    pub request: InferenceRequest,
    /// `stream_options.include_usage`: a streamed answer ends with a chunk
    /// that has no choices and carries `usage`.
    pub include_usage: bool,
    /// The chat's tools; none for a completion.
    pub tools: Tools,
}

impl OpenAiRequest {
    /// Read and check `body` as sent to `route`, naming every bad field.
    pub fn parse(route: Route, body: &Value) -> Result<Self, Vec<FieldError>> {
        let Value::Object(map) = body else {
            return Err(vec![FieldError::new(
                "body",
                "type",
                "the body must be a JSON object",
            )]);
        };
        let mut r = Reader {
            map,
            bad: Vec::new(),
        };
        let mut messages = Vec::new();
        let mut prompt = String::new();
        let mut tools = Tools::default();
        match route {
            Route::Chat => {
                messages = r.messages();
                tools = r.tools();
            }
            Route::Completions => {
                prompt = r.prompt();
                if r.get("tools")
                    .is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty()))
                {
                    r.bad.push(FieldError::new(
                        "tools",
                        "unsupported",
                        "tools are for /v1/chat/completions",
                    ));
                }
            }
        }
        let model = r.string("model").map(str::to_owned);
        let max_tokens = r.token_count("max_tokens");
        let max_completion_tokens = r.token_count("max_completion_tokens");
        let temperature = r.number("temperature");
        let top_p = r.number("top_p");
        let top_k = r.uint("top_k", "a non-negative integer");
        let min_p = r.number("min_p");
        let repetition_penalty = r.number("repetition_penalty");
        let seed = r.uint("seed", "a non-negative integer");
        let stop = r.stop();
        let stream = r.boolean("stream");
        let include_usage = r.stream_options(stream.unwrap_or(false));
        let ignore_eos = r.boolean("ignore_eos");
        let logprobs = match route {
            Route::Chat => r.chat_logprobs(),
            Route::Completions => r.token_count("logprobs"),
        };
        let constraint = r.response_format();
        if r.uint("n", "1").is_some_and(|n| n != 1) {
            r.bad
                .push(FieldError::new("n", "range", "only n=1 is supported"));
        }
        r.unsupported();
        let request = InferenceRequest {
            job_id: None,
            model,
            prompt,
            max_tokens: max_completion_tokens
                .or(max_tokens)
                .map_or(DEFAULT_MAX_TOKENS, |n| u32::try_from(n).unwrap_or(u32::MAX)),
            temperature: temperature.unwrap_or(1.0),
            top_p: top_p.unwrap_or(1.0),
            top_k: top_k.map_or(0, |k| u32::try_from(k).unwrap_or(u32::MAX)),
            min_p: min_p.unwrap_or(0.0),
            repetition_penalty: repetition_penalty.unwrap_or(1.0),
            seed,
            stop,
            stream: stream.unwrap_or(false),
            ignore_eos: ignore_eos.unwrap_or(false),
            logprobs: logprobs.map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
            constraint,
        };
        let mut ranges = Vec::new();
        request.check_generation(&mut ranges);
        for mut e in ranges {
            if e.field == "max_tokens" && max_completion_tokens.is_some() {
                "max_completion_tokens".clone_into(&mut e.field);
                e.message =
                    format!("max_completion_tokens must be between 1 and {MAX_TOKENS_LIMIT}");
            }
            if e.field == "logprobs" && route == Route::Chat {
                "top_logprobs".clone_into(&mut e.field);
                e.message = format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}");
            }
            r.bad.push(e);
        }
        if r.bad.is_empty() {
            Ok(Self {
                messages,
                request,
                include_usage,
                tools,
            })
        } else {
            Err(r.bad)
        }
    }
}

/// A checked request in the OpenAI shape again, every setting explicit:
/// what the queen forwards to a worker's OpenAI route. Parsing it gives the
/// same [`OpenAiRequest`] back, so the worker reads exactly what the queen
/// checked, and the wire shape has one definition.
#[derive(Debug, Serialize)]
pub struct OpenAiBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<&'a [ChatMessage]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    max_tokens: u32,
    temperature: f32,
    top_p: f32,
    top_k: u32,
    min_p: f32,
    repetition_penalty: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
    ignore_eos: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<LogprobsField>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logprobs: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<Value>,
    #[serde(skip_serializing_if = "<[Tool]>::is_empty")]
    tools: &'a [Tool],
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
}

/// `stream_options`.
#[derive(Debug, Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// `logprobs`: a flag on the chat route (the count is `top_logprobs`), a
/// count on the completions route.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum LogprobsField {
    Flag(bool),
    Count(u32),
}

impl OpenAiRequest {
    /// This request as an OpenAI body for `route` (the route it was parsed
    /// from).
    pub fn body(&self, route: Route) -> OpenAiBody<'_> {
        let r = &self.request;
        OpenAiBody {
            messages: (route == Route::Chat).then_some(self.messages.as_slice()),
            prompt: (route == Route::Completions).then_some(r.prompt.as_str()),
            model: r.model.as_deref(),
            max_tokens: r.max_tokens,
            temperature: r.temperature,
            top_p: r.top_p,
            top_k: r.top_k,
            min_p: r.min_p,
            repetition_penalty: r.repetition_penalty,
            seed: r.seed,
            stop: &r.stop,
            stream: r.stream,
            stream_options: r.stream.then_some(StreamOptions {
                include_usage: self.include_usage,
            }),
            ignore_eos: r.ignore_eos,
            logprobs: r.logprobs.map(|n| match route {
                Route::Chat => LogprobsField::Flag(true),
                Route::Completions => LogprobsField::Count(n),
            }),
            top_logprobs: r.logprobs.filter(|_| route == Route::Chat),
            response_format: r.constraint.as_ref().and_then(response_format),
            tools: &self.tools.tools,
            tool_choice: (route == Route::Chat).then(|| self.tools.choice.to_value()),
            parallel_tool_calls: (route == Route::Chat).then_some(self.tools.parallel),
        }
    }
}

fn is_function_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A constraint as OpenAI's `response_format`; `None` for one that has no
/// such form (a grammar).
fn response_format(constraint: &Constraint) -> Option<Value> {
    match constraint {
        Constraint::JsonObject => Some(serde_json::json!({"type": "json_object"})),
        Constraint::JsonSchema { schema } => Some(serde_json::json!({
            "type": "json_schema",
            "json_schema": {"name": "schema", "schema": schema, "strict": true},
        })),
        Constraint::Lark { .. } => None,
    }
}

#[cfg(test)]
mod tests;
