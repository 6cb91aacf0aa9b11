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

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

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

/// Reads fields out of a body, collecting what is wrong with them.
struct Reader<'a> {
    map: &'a Map<String, Value>,
    bad: Vec<FieldError>,
}

impl<'a> Reader<'a> {
    /// The field's value; `null` counts as absent, as OpenAI's API has it.
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    /// Fields asking for what this server does not do (the deprecated
    /// `functions`, echoing, ...): refused, because answering as if they
    /// were absent would hand back the wrong kind of answer. Their neutral
    /// values (`functions: []`, `function_call: "none"`, `echo: false`,
    /// `suffix: ""`, `best_of: 1`,
    /// `modalities: ["text"]`, zero penalties, an empty `logit_bias`) are
    /// accepted.
    fn unsupported(&mut self) {
        let mut refuse = |field: &str, message: &str| {
            self.bad
                .push(FieldError::new(field, "unsupported", message.to_owned()));
        };
        if self
            .map
            .get("functions")
            .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
        {
            refuse(
                "functions",
                "functions is deprecated and not supported: use tools",
            );
        }
        if self
            .map
            .get("function_call")
            .is_some_and(|v| !v.is_null() && v != "none")
        {
            refuse(
                "function_call",
                "function_call is deprecated and not supported: use tool_choice",
            );
        }
        if self.map.get("echo") == Some(&Value::Bool(true)) {
            refuse("echo", "echoing the prompt is not supported by this server");
        }
        if self
            .map
            .get("suffix")
            .is_some_and(|v| !v.is_null() && v != "")
        {
            refuse(
                "suffix",
                "a suffix (fill-in-the-middle) is not supported by this server",
            );
        }
        if self
            .map
            .get("best_of")
            .is_some_and(|v| !v.is_null() && v.as_u64() != Some(1))
        {
            refuse("best_of", "only best_of=1 is supported");
        }
        let other_modality = self
            .map
            .get("modalities")
            .and_then(Value::as_array)
            .is_some_and(|m| m.iter().any(|v| v != "text"));
        if other_modality || self.map.get("audio").is_some_and(|v| !v.is_null()) {
            refuse("modalities", "only text output is supported by this server");
        }
        for field in ["presence_penalty", "frequency_penalty"] {
            if self
                .map
                .get(field)
                .is_some_and(|v| !v.is_null() && v.as_f64() != Some(0.0))
            {
                refuse(
                    field,
                    "only 0 is supported; repetition_penalty is this server's penalty",
                );
            }
        }
        if self
            .map
            .get("logit_bias")
            .is_some_and(|v| !v.is_null() && v.as_object().is_none_or(|m| !m.is_empty()))
        {
            refuse("logit_bias", "logit_bias is not supported by this server");
        }
        if self
            .map
            .get("web_search_options")
            .is_some_and(|v| !v.is_null())
        {
            refuse("web_search_options", "this server does not search the web");
        }
    }

    /// The chat route's `logprobs` (a flag) and `top_logprobs` (a count,
    /// which needs the flag) as one count: `None` when not asked for.
    fn chat_logprobs(&mut self) -> Option<u64> {
        let wanted = self.boolean("logprobs");
        let top = self.token_count("top_logprobs");
        match (wanted, top) {
            (Some(true), top) => Some(top.unwrap_or(0)),
            (_, Some(n)) if n > 0 => {
                self.bad.push(FieldError::new(
                    "top_logprobs",
                    "requires",
                    "top_logprobs needs logprobs: true",
                ));
                None
            }
            _ => None,
        }
    }

    /// `response_format`: text (no constraint), any JSON object, or JSON
    /// matching a schema. The schema's features are checked by the worker,
    /// which compiles it.
    fn response_format(&mut self) -> Option<Constraint> {
        let format = self.get("response_format")?;
        let Some(kind) = format.get("type") else {
            self.wrong_type("response_format", "an object with a `type`");
            return None;
        };
        match kind.as_str() {
            Some("text") => None,
            Some("json_object") => Some(Constraint::JsonObject),
            Some("json_schema") => {
                let schema = format
                    .get("json_schema")
                    .and_then(|j| j.get("schema"))
                    .filter(|s| !s.is_null());
                match schema {
                    Some(schema) if schema.is_object() || schema.is_boolean() => {
                        Some(Constraint::JsonSchema {
                            schema: schema.clone(),
                        })
                    }
                    Some(_) => {
                        self.wrong_type(
                            "response_format.json_schema.schema",
                            "a JSON Schema object",
                        );
                        None
                    }
                    None => {
                        self.missing(
                            "response_format.json_schema.schema",
                            "a json_schema response format needs json_schema.schema",
                        );
                        None
                    }
                }
            }
            _ => {
                self.bad.push(FieldError::new(
                    "response_format.type",
                    "enum",
                    "response_format.type must be text, json_object or json_schema",
                ));
                None
            }
        }
    }

    /// `stream_options.include_usage`, which only a streamed request may set.
    fn stream_options(&mut self, stream: bool) -> bool {
        let Some(options) = self.get("stream_options") else {
            return false;
        };
        let Value::Object(options) = options else {
            self.wrong_type("stream_options", "an object");
            return false;
        };
        if !stream {
            self.bad.push(FieldError::new(
                "stream_options",
                "requires",
                "stream_options is only allowed when stream is true",
            ));
            return false;
        }
        match options.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                self.wrong_type("stream_options.include_usage", "a boolean");
                false
            }
        }
    }

    fn wrong_type(&mut self, field: impl Into<String>, expected: &str) {
        let field = field.into();
        let message = format!("{field} must be {expected}");
        self.bad.push(FieldError::new(field, "type", message));
    }

    fn missing(&mut self, field: impl Into<String>, message: &str) {
        self.bad.push(FieldError::new(field, "required", message));
    }

    fn string(&mut self, name: &str) -> Option<&'a str> {
        match self.get(name)? {
            Value::String(s) => Some(s),
            _ => {
                self.wrong_type(name, "a string");
                None
            }
        }
    }

    fn boolean(&mut self, name: &str) -> Option<bool> {
        match self.get(name)? {
            Value::Bool(b) => Some(*b),
            _ => {
                self.wrong_type(name, "a boolean");
                None
            }
        }
    }

    /// Sampling settings are f32 on the wire types: a number beyond f32's
    /// range reads as infinite and is then refused by the range check.
    fn number(&mut self, name: &str) -> Option<f32> {
        match f32::deserialize(self.get(name)?) {
            Ok(v) => Some(v),
            Err(_) => {
                self.wrong_type(name, "a number");
                None
            }
        }
    }

    /// A non-negative integer; anything else is a wrong type.
    fn uint(&mut self, name: &str, expected: &str) -> Option<u64> {
        let value = self.get(name)?.as_u64();
        if value.is_none() {
            self.wrong_type(name, expected);
        }
        value
    }

    /// A token count: any integer, a negative one read as 0 so that the
    /// range check names the field with its limits.
    fn token_count(&mut self, name: &str) -> Option<u64> {
        let value = self.get(name)?;
        if value.is_i64() && value.as_u64().is_none() {
            return Some(0);
        }
        self.uint(name, "an integer")
    }

    fn stop(&mut self) -> Vec<String> {
        match self.get("stop") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => {
                let mut stop = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) => stop.push(s.clone()),
                        _ => self.wrong_type(format!("stop[{i}]"), "a string"),
                    }
                }
                stop
            }
            Some(_) => {
                self.wrong_type("stop", "a string or an array of strings");
                Vec::new()
            }
        }
    }

    fn prompt(&mut self) -> String {
        let prompt = match self.get("prompt") {
            Some(Value::String(s)) => s.as_str(),
            Some(Value::Array(items)) if items.len() > 1 => {
                self.bad.push(FieldError::new(
                    "prompt",
                    "max_items",
                    "only one prompt per request is supported",
                ));
                return String::new();
            }
            Some(Value::Array(items)) => match items.first() {
                Some(Value::String(s)) => s.as_str(),
                _ => "",
            },
            None => "",
            Some(_) => {
                self.wrong_type("prompt", "a string");
                return String::new();
            }
        };
        if prompt.trim().is_empty() {
            self.missing("prompt", "prompt must be a non-empty string");
        }
        prompt.to_owned()
    }

    fn messages(&mut self) -> Vec<ChatMessage> {
        let items = match self.get("messages") {
            Some(Value::Array(items)) if !items.is_empty() => items,
            Some(Value::Array(_)) | None => {
                self.missing("messages", "messages must be a non-empty array");
                return Vec::new();
            }
            Some(_) => {
                self.wrong_type("messages", "a non-empty array of messages");
                return Vec::new();
            }
        };
        let mut messages = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let Value::Object(message) = item else {
                self.wrong_type(
                    format!("messages[{i}]"),
                    "an object with `role` and `content`",
                );
                continue;
            };
            let role = self.role(i, message.get("role"));
            let content = self.content(i, &role, message.get("content"));
            let mut turn = ChatMessage::new(role, content);
            if turn.role == "assistant" {
                turn.tool_calls = self.tool_calls(i, message.get("tool_calls"));
            }
            if turn.role == "tool" {
                turn.tool_call_id = self.optional_string(
                    &format!("messages[{i}].tool_call_id"),
                    message.get("tool_call_id"),
                );
                turn.name =
                    self.optional_string(&format!("messages[{i}].name"), message.get("name"));
            }
            messages.push(turn);
        }
        messages
    }

    fn optional_string(&mut self, field: &str, value: Option<&Value>) -> Option<String> {
        match value {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                self.wrong_type(field, "a string");
                None
            }
        }
    }

    /// An assistant turn's earlier tool calls.
    fn tool_calls(&mut self, i: usize, value: Option<&Value>) -> Vec<ToolCall> {
        let field = format!("messages[{i}].tool_calls");
        let items = match value {
            None | Some(Value::Null) => return Vec::new(),
            Some(Value::Array(items)) => items,
            Some(_) => {
                self.wrong_type(field, "an array of tool calls");
                return Vec::new();
            }
        };
        let mut calls = Vec::with_capacity(items.len());
        for (j, item) in items.iter().enumerate() {
            match ToolCall::deserialize(item) {
                Ok(call) if call.kind == "function" => calls.push(call),
                _ => self.wrong_type(
                    format!("{field}[{j}]"),
                    "{\"id\", \"type\": \"function\", \"function\": {\"name\", \"arguments\"}}",
                ),
            }
        }
        calls
    }

    /// `tools`, `tool_choice` and `parallel_tool_calls`.
    fn tools(&mut self) -> Tools {
        let mut tools = Vec::new();
        match self.get("tools") {
            None => {}
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    match Tool::deserialize(item) {
                        Ok(tool) if tool.kind != "function" => self.bad.push(FieldError::new(
                            format!("tools[{i}].type"),
                            "enum",
                            "only function tools are supported",
                        )),
                        Ok(tool) if !is_function_name(&tool.function.name) => {
                            self.bad.push(FieldError::new(
                                format!("tools[{i}].function.name"),
                                "format",
                                "a function name is 1 to 64 of a-z A-Z 0-9 _ -",
                            ))
                        }
                        Ok(tool)
                            if tool
                                .function
                                .parameters
                                .as_ref()
                                .is_some_and(|p| !p.is_object()) =>
                        {
                            self.wrong_type(
                                format!("tools[{i}].function.parameters"),
                                "a JSON Schema object",
                            )
                        }
                        Ok(tool) => tools.push(tool),
                        Err(_) => self.wrong_type(
                            format!("tools[{i}]"),
                            "{\"type\": \"function\", \"function\": {\"name\", \"description\", \"parameters\"}}",
                        ),
                    }
                }
            }
            Some(_) => self.wrong_type("tools", "an array of tools"),
        }
        let choice = match self.get("tool_choice") {
            None => ToolChoice::Auto,
            Some(Value::String(s)) if s == "none" => ToolChoice::None,
            Some(Value::String(s)) if s == "auto" => ToolChoice::Auto,
            Some(Value::String(s)) if s == "required" => ToolChoice::Required,
            Some(v) => match v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
            {
                Some(name) if v.get("type").is_some_and(|t| t == "function") => {
                    if !tools.iter().any(|t| t.function.name == name) {
                        self.bad.push(FieldError::new(
                            "tool_choice",
                            "enum",
                            format!("tool_choice names `{name}`, which is not one of tools"),
                        ));
                    }
                    ToolChoice::Function(name.to_owned())
                }
                _ => {
                    self.wrong_type(
                        "tool_choice",
                        "none, auto, required or {\"type\": \"function\", \"function\": {\"name\"}}",
                    );
                    ToolChoice::Auto
                }
            },
        };
        if tools.is_empty() && choice == ToolChoice::Required {
            self.bad.push(FieldError::new(
                "tool_choice",
                "requires",
                "tool_choice required needs tools",
            ));
        }
        let parallel = self.boolean("parallel_tool_calls").unwrap_or(true);
        Tools {
            tools,
            choice,
            parallel,
        }
    }

    fn role(&mut self, i: usize, role: Option<&Value>) -> String {
        let field = format!("messages[{i}].role");
        match role {
            Some(Value::String(r)) if ROLES.contains(&r.as_str()) => r.clone(),
            Some(Value::String(r)) => {
                let message = format!("role `{r}` is not one of {}", ROLES.join(", "));
                self.bad.push(FieldError::new(field, "enum", message));
                String::new()
            }
            None | Some(Value::Null) => {
                self.missing(field, "each message needs a role");
                String::new()
            }
            Some(_) => {
                self.wrong_type(field, "a string");
                String::new()
            }
        }
    }

    /// Text, or a list of text parts joined; absent only for an assistant
    /// turn (one that carried tool calls).
    fn content(&mut self, i: usize, role: &str, content: Option<&Value>) -> String {
        let field = format!("messages[{i}].content");
        match content {
            Some(Value::String(text)) => text.clone(),
            None | Some(Value::Null) if role == "assistant" => String::new(),
            None | Some(Value::Null) => {
                self.missing(field, "each message needs content");
                String::new()
            }
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    let kind = part.get("type").and_then(Value::as_str);
                    match (kind, part.get("text")) {
                        (Some("text"), Some(Value::String(t))) => text.push_str(t),
                        (Some("text"), _) => {
                            self.wrong_type(format!("{field}[{j}].text"), "a string");
                        }
                        (Some(other), _) => {
                            let message = format!(
                                "content part type `{other}` is not supported: this model reads text only"
                            );
                            self.bad.push(FieldError::new(
                                format!("{field}[{j}].type"),
                                "enum",
                                message,
                            ));
                        }
                        (None, _) => self.wrong_type(
                            format!("{field}[{j}]"),
                            "an object with `type` and `text`",
                        ),
                    }
                }
                text
            }
            Some(_) => {
                self.wrong_type(field, "a string or an array of text parts");
                String::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn any_request() -> impl Strategy<Value = (Route, Value)> {
        let text = "[ -~\\PC]{1,12}";
        let message = (prop::sample::select(ROLES.to_vec()), text)
            .prop_map(|(role, content)| json!({"role": role, "content": content}));
        (
            any::<bool>(),
            prop::collection::vec(message, 1..4),
            "[a-z][ -~\\PC]{0,11}",
            prop::option::of("[a-z]{1,8}"),
            prop::option::of(1u32..=MAX_TOKENS_LIMIT),
            prop::option::of(0.0f32..2.0),
            prop::option::of(0.01f32..=1.0),
            prop::option::of(0u32..100),
            prop::option::of(any::<u64>()),
            prop::collection::vec(text, 0..3),
            (
                prop::option::of(any::<bool>()),
                prop::option::of(any::<bool>()),
                prop::option::of(0u32..=MAX_TOP_LOGPROBS),
                prop::option::of(prop::sample::select(vec![
                    json!({"type": "text"}),
                    json!({"type": "json_object"}),
                    json!({"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object", "properties": {"k": {"type": "string"}}}}}),
                ])),
            ),
        )
            .prop_map(
                |(
                    chat,
                    messages,
                    prompt,
                    model,
                    max,
                    temp,
                    top_p,
                    top_k,
                    seed,
                    stop,
                    (stream, include_usage, logprobs, format),
                )| {
                    let mut body = if chat {
                        json!({ "messages": messages })
                    } else {
                        json!({ "prompt": prompt })
                    };
                    let set = |body: &mut Value, k: &str, v: Option<Value>| {
                        if let Some(v) = v {
                            body[k] = v;
                        }
                    };
                    set(&mut body, "model", model.map(Value::from));
                    set(&mut body, "max_tokens", max.map(Value::from));
                    set(&mut body, "temperature", temp.map(Value::from));
                    set(&mut body, "top_p", top_p.map(Value::from));
                    set(&mut body, "top_k", top_k.map(Value::from));
                    set(&mut body, "seed", seed.map(Value::from));
                    set(&mut body, "stream", stream.map(Value::from));
                    if stream == Some(true) {
                        set(
                            &mut body,
                            "stream_options",
                            include_usage.map(|u| json!({"include_usage": u})),
                        );
                    }
                    if chat {
                        set(&mut body, "logprobs", logprobs.map(|_| Value::from(true)));
                        set(&mut body, "top_logprobs", logprobs.map(Value::from));
                    } else {
                        set(&mut body, "logprobs", logprobs.map(Value::from));
                    }
                    set(&mut body, "response_format", format);
                    body["stop"] = json!(stop);
                    let route = if chat {
                        Route::Chat
                    } else {
                        Route::Completions
                    };
                    (route, body)
                },
            )
    }

    proptest! {
        #[test]
        fn a_forwarded_body_parses_back_to_the_request_it_came_from((route, body) in any_request()) {
            let first = OpenAiRequest::parse(route, &body).expect("the generated bodies are valid");
            let forwarded = serde_json::to_value(first.body(route)).unwrap();
            let again = OpenAiRequest::parse(route, &forwarded).expect("a forwarded body parses");
            prop_assert_eq!(again, first);
        }
    }

    #[test]
    fn logprobs_are_a_flag_and_a_count_on_chat_and_a_count_on_completions() {
        let user = json!([{"role": "user", "content": "hi"}]);
        let chat = |extra: Value| {
            let mut body = json!({ "messages": user });
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            OpenAiRequest::parse(Route::Chat, &body).map(|r| r.request.logprobs)
        };
        assert_eq!(chat(json!({})), Ok(None));
        assert_eq!(chat(json!({"logprobs": false})), Ok(None));
        assert_eq!(chat(json!({"logprobs": true})), Ok(Some(0)));
        assert_eq!(
            chat(json!({"logprobs": true, "top_logprobs": 20})),
            Ok(Some(20))
        );
        let refused = |r: Result<Option<u32>, Vec<FieldError>>| {
            r.expect_err("refused")
                .into_iter()
                .map(|e| (e.field, e.constraint))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            refused(chat(json!({"logprobs": true, "top_logprobs": 21}))),
            [("top_logprobs".to_owned(), "range".to_owned())]
        );
        assert_eq!(
            refused(chat(json!({"top_logprobs": 3}))),
            [("top_logprobs".to_owned(), "requires".to_owned())]
        );
        assert_eq!(
            refused(chat(json!({"logprobs": 2}))),
            [("logprobs".to_owned(), "type".to_owned())]
        );
        let completion = |logprobs: Value| {
            OpenAiRequest::parse(
                Route::Completions,
                &json!({"prompt": "hi", "logprobs": logprobs}),
            )
            .map(|r| r.request.logprobs)
        };
        assert_eq!(completion(json!(3)), Ok(Some(3)));
        assert_eq!(completion(json!(0)), Ok(Some(0)));
        assert_eq!(completion(Value::Null), Ok(None));
        assert_eq!(
            refused(completion(json!(21))),
            [("logprobs".to_owned(), "range".to_owned())]
        );
    }

    #[test]
    fn response_format_is_text_any_object_or_a_schema() {
        let parse = |format: Value| {
            OpenAiRequest::parse(
                Route::Chat,
                &json!({"messages": [{"role": "user", "content": "hi"}], "response_format": format}),
            )
            .map(|r| r.request.constraint)
        };
        assert_eq!(parse(json!({"type": "text"})), Ok(None));
        assert_eq!(
            parse(json!({"type": "json_object"})),
            Ok(Some(Constraint::JsonObject))
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            parse(
                json!({"type": "json_schema", "json_schema": {"name": "x", "strict": true, "schema": schema}})
            ),
            Ok(Some(Constraint::JsonSchema { schema }))
        );
        let bad = |format: Value| {
            parse(format)
                .expect_err("refused")
                .into_iter()
                .map(|e| e.field)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            bad(json!({"type": "json_schema", "json_schema": {"name": "x"}})),
            ["response_format.json_schema.schema"]
        );
        assert_eq!(
            bad(json!({"type": "json_schema", "json_schema": {"name": "x", "schema": "no"}})),
            ["response_format.json_schema.schema"]
        );
        assert_eq!(bad(json!({"type": "yaml"})), ["response_format.type"]);
        assert_eq!(bad(json!("json")), ["response_format"]);
    }

    #[test]
    fn tools_and_tool_choice_are_read_and_checked() {
        let body = |extra: Value| {
            let mut body = json!({"messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}
            ]});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            OpenAiRequest::parse(Route::Chat, &body)
        };
        let weather = json!({"type": "function", "function": {"name": "weather", "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}});
        let r = body(json!({"tools": [weather], "tool_choice": {"type": "function", "function": {"name": "weather"}},
                            "parallel_tool_calls": false}))
        .expect("valid");
        assert_eq!(r.tools.tools.len(), 1);
        assert_eq!(r.tools.choice, ToolChoice::Function("weather".into()));
        assert!(!r.tools.parallel);
        assert_eq!(r.messages[1].tool_calls[0].function.name, "weather");
        assert_eq!(r.messages[1].content, "");
        assert_eq!(r.messages[2].tool_call_id.as_deref(), Some("call_1"));
        let again = OpenAiRequest::parse(
            Route::Chat,
            &serde_json::to_value(r.body(Route::Chat)).unwrap(),
        )
        .expect("the forwarded body parses");
        assert_eq!(again, r);
        let refused = |extra: Value| {
            body(extra)
                .expect_err("refused")
                .into_iter()
                .map(|e| e.field)
                .collect::<Vec<_>>()
        };
        assert_eq!(refused(json!({"tool_choice": "required"})), ["tool_choice"]);
        assert_eq!(
            refused(
                json!({"tools": [weather], "tool_choice": {"type": "function", "function": {"name": "other"}}})
            ),
            ["tool_choice"]
        );
        assert_eq!(
            refused(json!({"tools": [{"type": "function", "function": {"name": "no spaces"}}]})),
            ["tools[0].function.name"]
        );
        assert_eq!(
            refused(json!({"tools": [{"type": "code_interpreter"}]})),
            ["tools[0]"]
        );
        assert_eq!(refused(json!({"tool_choice": "always"})), ["tool_choice"]);
    }

    #[test]
    fn include_usage_needs_a_stream() {
        let body = |stream: bool, options: Value| json!({"prompt": "hi", "stream": stream, "stream_options": options});
        let parse = |b: Value| OpenAiRequest::parse(Route::Completions, &b);
        assert!(
            parse(body(true, json!({"include_usage": true})))
                .expect("valid")
                .include_usage
        );
        assert!(!parse(body(true, json!({}))).expect("valid").include_usage);
        assert_eq!(
            parse(body(false, json!({"include_usage": true}))).expect_err("refused")[0].constraint,
            "requires"
        );
        assert_eq!(
            parse(body(true, json!({"include_usage": "yes"}))).expect_err("refused")[0].field,
            "stream_options.include_usage"
        );
    }

    fn fields(route: Route, body: Value) -> Vec<String> {
        OpenAiRequest::parse(route, &body)
            .expect_err("refused")
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn asking_for_what_is_not_served_is_refused_and_neutral_values_are_not() {
        let chat = |extra: Value| {
            let mut body = json!({"messages": [{"role": "user", "content": "hi"}]});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            body
        };
        let tool = json!({"type": "function", "function": {"name": "f", "parameters": {}}});
        assert_eq!(
            fields(
                Route::Chat,
                chat(json!({
                    "functions": [tool["function"]],
                    "function_call": "auto",
                }))
            ),
            ["functions", "function_call"]
        );
        assert_eq!(
            fields(Route::Completions, json!({"prompt": "hi", "tools": [tool]})),
            ["tools"]
        );
        assert_eq!(
            fields(
                Route::Completions,
                json!({"prompt": "hi", "logprobs": 2, "echo": true, "suffix": "end", "best_of": 3})
            ),
            ["echo", "suffix", "best_of"]
        );
        assert_eq!(
            fields(Route::Chat, chat(json!({"modalities": ["text", "audio"]}))),
            ["modalities"]
        );
        let neutral = chat(json!({
            "tools": [],
            "tool_choice": "none",
            "response_format": {"type": "text"},
            "logprobs": false,
            "top_logprobs": 0,
            "functions": null,
            "modalities": ["text"],
            "echo": false,
            "suffix": "",
            "best_of": 1,
            "presence_penalty": 0,
            "frequency_penalty": 0.0,
            "logit_bias": {},
        }));
        assert_eq!(
            fields(
                Route::Chat,
                chat(json!({
                    "presence_penalty": 0.5,
                    "frequency_penalty": -1,
                    "logit_bias": {"50256": -100},
                    "web_search_options": {},
                }))
            ),
            [
                "presence_penalty",
                "frequency_penalty",
                "logit_bias",
                "web_search_options"
            ]
        );
        assert!(OpenAiRequest::parse(Route::Chat, &neutral).is_ok());
    }

    #[test]
    fn a_good_chat_becomes_messages_and_native_settings() {
        let body = json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": null},
            ],
            "max_completion_tokens": 7,
            "temperature": 0,
            "stop": "\n",
            "stream": true,
            "n": 1,
            "user": "ignored",
            "logit_bias": {},
        });
        let parsed = OpenAiRequest::parse(Route::Chat, &body).unwrap();
        assert_eq!(parsed.messages.len(), 3);
        assert_eq!(parsed.messages[1].content, "Hi there");
        assert_eq!(parsed.messages[2].content, "");
        let r = parsed.request;
        assert_eq!(r.model.as_deref(), Some("m"));
        assert_eq!((r.max_tokens, r.temperature, r.stream), (7, 0.0, true));
        assert_eq!(r.stop, ["\n"]);
        assert!(r.prompt.is_empty());
    }

    #[test]
    fn defaults_follow_openai_not_the_native_route() {
        let parsed = OpenAiRequest::parse(Route::Completions, &json!({"prompt": "x"})).unwrap();
        let r = parsed.request;
        assert_eq!(r.prompt, "x");
        assert_eq!(
            (r.max_tokens, r.temperature, r.top_p, r.stream),
            (DEFAULT_MAX_TOKENS, 1.0, 1.0, false)
        );
        let one = OpenAiRequest::parse(Route::Completions, &json!({"prompt": ["y"]})).unwrap();
        assert_eq!(one.request.prompt, "y");
    }

    #[test]
    fn every_bad_field_is_named_types_and_ranges_together() {
        let got = fields(
            Route::Chat,
            json!({
                "messages": [],
                "temperature": -1,
                "max_tokens": 0,
                "top_p": "high",
                "stream": "yes",
                "model": 3,
                "n": 2,
                "stop": ["a", 1],
            }),
        );
        assert_eq!(
            got,
            [
                "messages",
                "model",
                "top_p",
                "stop[1]",
                "stream",
                "n",
                "max_tokens",
                "temperature"
            ]
        );
    }

    #[test]
    fn each_message_is_checked_with_its_index() {
        let got = fields(
            Route::Chat,
            json!({"messages": [
                {"role": "wizard", "content": "x"},
                {"content": "x"},
                {"role": "user"},
                {"role": "user", "content": [{"type": "image_url", "image_url": {}}, {"type": "text"}]},
                "hello",
                {"role": "user", "content": 5},
            ]}),
        );
        assert_eq!(
            got,
            [
                "messages[0].role",
                "messages[1].role",
                "messages[2].content",
                "messages[3].content[0].type",
                "messages[3].content[1].text",
                "messages[4]",
                "messages[5].content",
            ]
        );
    }

    #[test]
    fn the_prompt_and_max_completion_tokens_are_named_as_sent() {
        let got = fields(
            Route::Completions,
            json!({"prompt": "  ", "max_completion_tokens": 5000, "max_tokens": 3}),
        );
        assert_eq!(got, ["prompt", "max_completion_tokens"]);
        assert_eq!(
            fields(Route::Completions, json!({"prompt": ["a", "b"]})),
            ["prompt"]
        );
        assert_eq!(fields(Route::Completions, json!({"prompt": 7})), ["prompt"]);
        assert_eq!(fields(Route::Completions, json!([1, 2])), ["body"]);
        assert_eq!(
            fields(
                Route::Completions,
                json!({"prompt": "x", "max_tokens": -3, "seed": -1})
            ),
            ["seed", "max_tokens"]
        );
    }

    #[test]
    fn huge_numbers_are_refused_not_wrapped() {
        let got = fields(
            Route::Completions,
            json!({"prompt": "x", "max_tokens": 1u64 << 40, "temperature": 1e300, "top_k": 1u64 << 40}),
        );
        assert_eq!(got, ["max_tokens", "temperature"]);
    }
}
