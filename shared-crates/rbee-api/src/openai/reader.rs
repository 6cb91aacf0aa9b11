//! Reading an OpenAI body's fields, collecting every bad one.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{is_function_name, ChatMessage, Tool, ToolCall, ToolChoice, Tools, ROLES};
use crate::error::FieldError;
use crate::inference::Constraint;

/// Reads fields out of a body, collecting what is wrong with them.
pub(super) struct Reader<'a> {
    pub(super) map: &'a Map<String, Value>,
    pub(super) bad: Vec<FieldError>,
}

impl<'a> Reader<'a> {
    /// The field's value; `null` counts as absent, as OpenAI's API has it.
    pub(super) fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    /// Fields asking for what this server does not do (the deprecated
    /// `functions`, echoing, ...): refused, because answering as if they
    /// were absent would hand back the wrong kind of answer. Their neutral
    /// values (`functions: []`, `function_call: "none"`, `echo: false`,
    /// `suffix: ""`, `best_of: 1`,
    /// `modalities: ["text"]`, zero penalties, an empty `logit_bias`) are
    /// accepted.
    pub(super) fn unsupported(&mut self) {
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
    pub(super) fn chat_logprobs(&mut self) -> Option<u64> {
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
    pub(super) fn response_format(&mut self) -> Option<Constraint> {
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
    pub(super) fn stream_options(&mut self, stream: bool) -> bool {
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

    pub(super) fn wrong_type(&mut self, field: impl Into<String>, expected: &str) {
        let field = field.into();
        let message = format!("{field} must be {expected}");
        self.bad.push(FieldError::new(field, "type", message));
    }

    pub(super) fn missing(&mut self, field: impl Into<String>, message: &str) {
        self.bad.push(FieldError::new(field, "required", message));
    }

    pub(super) fn string(&mut self, name: &str) -> Option<&'a str> {
        match self.get(name)? {
            Value::String(s) => Some(s),
            _ => {
                self.wrong_type(name, "a string");
                None
            }
        }
    }

    pub(super) fn boolean(&mut self, name: &str) -> Option<bool> {
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
    pub(super) fn number(&mut self, name: &str) -> Option<f32> {
        match f32::deserialize(self.get(name)?) {
            Ok(v) => Some(v),
            Err(_) => {
                self.wrong_type(name, "a number");
                None
            }
        }
    }

    /// A non-negative integer; anything else is a wrong type.
    pub(super) fn uint(&mut self, name: &str, expected: &str) -> Option<u64> {
        let value = self.get(name)?.as_u64();
        if value.is_none() {
            self.wrong_type(name, expected);
        }
        value
    }

    /// A token count: any integer, a negative one read as 0 so that the
    /// range check names the field with its limits.
    pub(super) fn token_count(&mut self, name: &str) -> Option<u64> {
        let value = self.get(name)?;
        if value.is_i64() && value.as_u64().is_none() {
            return Some(0);
        }
        self.uint(name, "an integer")
    }

    pub(super) fn stop(&mut self) -> Vec<String> {
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

    pub(super) fn prompt(&mut self) -> String {
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

    pub(super) fn messages(&mut self) -> Vec<ChatMessage> {
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

    pub(super) fn optional_string(&mut self, field: &str, value: Option<&Value>) -> Option<String> {
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
    pub(super) fn tool_calls(&mut self, i: usize, value: Option<&Value>) -> Vec<ToolCall> {
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
    pub(super) fn tools(&mut self) -> Tools {
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

    pub(super) fn role(&mut self, i: usize, role: Option<&Value>) -> String {
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
    pub(super) fn content(&mut self, i: usize, role: &str, content: Option<&Value>) -> String {
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
