//! Tool calls in a chat template's format: recognising which format a
//! model's template teaches it, the grammar that forces a call in that
//! format (`tool_choice` `required` or a named function), and the parsing
//! of an answer, whole or streamed, into text and calls.
//!
//! The formats, as the templates of the models that use them write them:
//!
//! - Hermes (Qwen 2 and 2.5, Hermes 2 and 3, SmolLM3):
//!   `<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>`, one
//!   block per call;
//! - Mistral: `[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]`;
//! - Llama 3.1 to 3.3: the whole answer is `{"name": "f", "parameters": {...}}`
//!   (after `<|python_tag|>` in some versions).

use rbee_api::openai::{FunctionCall, Tool, ToolCall};
use serde_json::{json, Value};

/// How a model writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>` blocks.
    Hermes,
    /// `[TOOL_CALLS]` and a JSON list.
    Mistral,
    /// The answer is one JSON object with `name` and `parameters`.
    Llama3,
}

/// A call as the model wrote it: the function's name and its arguments as
/// JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCall {
    /// The function's name.
    pub name: String,
    /// Its arguments, a JSON object as compact text.
    pub arguments: String,
}

impl ParsedCall {
    /// The call with a fresh id, as an answer carries it.
    pub fn into_tool_call(self) -> ToolCall {
        ToolCall {
            id: format!("call_{}", uuid::Uuid::new_v4().simple()),
            kind: "function".to_owned(),
            function: FunctionCall {
                name: self.name,
                arguments: self.arguments,
            },
        }
    }
}

/// An answer split into its text and its calls.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parsed {
    /// The text outside the calls, trimmed.
    pub content: String,
    /// The calls, in order.
    pub calls: Vec<ParsedCall>,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL_MARK: &str = "[TOOL_CALLS]";
const PYTHON_TAG: &str = "<|python_tag|>";

impl ToolFormat {
    /// The format a chat template teaches, when it renders `tools`; `None`
    /// for a template that shows no tools or writes calls in a format not
    /// known here.
    pub fn of_template(source: &str, renders_tools: bool) -> Option<Self> {
        if !renders_tools {
            return None;
        }
        if source.contains(HERMES_OPEN) {
            Some(Self::Hermes)
        } else if source.contains(MISTRAL_MARK) {
            Some(Self::Mistral)
        } else if source.contains("\"parameters\"") || source.contains(PYTHON_TAG) {
            Some(Self::Llama3)
        } else {
            None
        }
    }

    /// What starts the calls in an answer: text before it is the answer's
    /// text, streamed as it comes.
    fn start(self) -> &'static str {
        match self {
            Self::Hermes => HERMES_OPEN,
            Self::Mistral => MISTRAL_MARK,
            Self::Llama3 => "{",
        }
    }

    /// A Lark grammar (llguidance's dialect) whose every sentence is one
    /// call of one of `tools`, or several when `parallel`. `special` gives
    /// the id of a special token by its text (Mistral's marker is one).
    pub fn grammar(
        self,
        tools: &[&Tool],
        parallel: bool,
        special: impl Fn(&str) -> Option<u32>,
    ) -> String {
        let key = match self {
            Self::Llama3 => "parameters",
            Self::Hermes | Self::Mistral => "arguments",
        };
        let calls: Vec<Value> = tools
            .iter()
            .map(|t| {
                let parameters = t
                    .function
                    .parameters
                    .clone()
                    .unwrap_or_else(|| json!({"type": "object"}));
                json!({
                    "type": "object",
                    "properties": {"name": {"const": t.function.name}, key: parameters},
                    "required": ["name", key],
                    "additionalProperties": false,
                })
            })
            .collect();
        let layout =
            json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "});
        let one = json!({"anyOf": calls, "x-guidance": layout});
        match self {
            Self::Hermes => {
                let repeat = if parallel { "+" } else { "" };
                format!(
                    "start: call{repeat}\ncall: \"<tool_call>\\n\" body \"\\n</tool_call>\\n\"?\nbody: %json {one}\n"
                )
            }
            Self::Mistral => {
                let mut list = json!({
                    "type": "array",
                    "items": {"anyOf": calls},
                    "minItems": 1,
                    "x-guidance": layout,
                });
                if !parallel {
                    list["maxItems"] = json!(1);
                }
                let mark = match special(MISTRAL_MARK) {
                    Some(id) => format!("<[{id}]>"),
                    None => format!("{MISTRAL_MARK:?}"),
                };
                format!("start: {mark} body\nbody: %json {list}\n")
            }
            Self::Llama3 => format!("start: body\nbody: %json {one}\n"),
        }
    }

    /// Split a whole answer into text and calls. A call that does not
    /// parse stays in the text.
    pub fn parse(self, text: &str) -> Parsed {
        match self {
            Self::Hermes => parse_hermes(text),
            Self::Mistral => parse_mistral(text),
            Self::Llama3 => parse_llama3(text),
        }
    }
}

/// A call object: `name` and its arguments under `key` (an object, or a
/// JSON text of one).
fn call_of(v: &Value, keys: &[&str]) -> Option<ParsedCall> {
    let name = v.get("name")?.as_str()?.to_owned();
    let args = keys
        .iter()
        .find_map(|k| v.get(*k))
        .cloned()
        .unwrap_or(json!({}));
    let args = match args {
        Value::String(s) => serde_json::from_str::<Value>(&s).ok()?,
        other => other,
    };
    if !args.is_object() {
        return None;
    }
    Some(ParsedCall {
        name,
        arguments: serde_json::to_string(&args).ok()?,
    })
}

fn parse_hermes(text: &str) -> Parsed {
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(HERMES_OPEN) {
        let (before, after) = rest.split_at(at);
        let body_start = &after[HERMES_OPEN.len()..];
        let (body, next) = match body_start.find(HERMES_CLOSE) {
            Some(end) => (&body_start[..end], &body_start[end + HERMES_CLOSE.len()..]),
            None => (body_start, ""),
        };
        match serde_json::from_str::<Value>(body.trim())
            .ok()
            .and_then(|v| call_of(&v, &["arguments", "parameters"]))
        {
            Some(call) => {
                content.push_str(before);
                calls.push(call);
            }
            None => content.push_str(&rest[..rest.len() - next.len()]),
        }
        rest = next;
    }
    content.push_str(rest);
    Parsed {
        content: content.trim().to_owned(),
        calls,
    }
}

fn parse_mistral(text: &str) -> Parsed {
    let Some(at) = text.find(MISTRAL_MARK) else {
        return Parsed {
            content: text.trim().to_owned(),
            calls: Vec::new(),
        };
    };
    let list = text[at + MISTRAL_MARK.len()..].trim();
    let calls: Option<Vec<ParsedCall>> = match serde_json::from_str::<Value>(list) {
        Ok(Value::Array(items)) => items.iter().map(|v| call_of(v, &["arguments"])).collect(),
        Ok(v) => call_of(&v, &["arguments"]).map(|c| vec![c]),
        Err(_) => None,
    };
    match calls {
        Some(calls) => Parsed {
            content: text[..at].trim().to_owned(),
            calls,
        },
        None => Parsed {
            content: text.trim().to_owned(),
            calls: Vec::new(),
        },
    }
}

fn parse_llama3(text: &str) -> Parsed {
    let body = text.trim();
    let body = body.strip_prefix(PYTHON_TAG).unwrap_or(body).trim();
    // Several calls are separated by `;` by some versions.
    let calls: Option<Vec<ParsedCall>> = body
        .split(";\n")
        .flat_map(|part| part.split("; {"))
        .enumerate()
        .map(|(i, part)| {
            let part = if i > 0 && !part.trim_start().starts_with('{') {
                format!("{{{part}")
            } else {
                part.to_owned()
            };
            serde_json::from_str::<Value>(part.trim())
                .ok()
                .and_then(|v| call_of(&v, &["parameters", "arguments"]))
        })
        .collect();
    match calls {
        Some(calls) if !calls.is_empty() => Parsed {
            content: String::new(),
            calls,
        },
        _ => Parsed {
            content: text.trim().to_owned(),
            calls: Vec::new(),
        },
    }
}

/// A streamed answer read as it comes: text before the calls goes out at
/// once; from the first sign of a call on, everything is held, to be
/// parsed whole at the end.
#[derive(Debug)]
pub struct ToolStream {
    format: ToolFormat,
    /// Everything generated so far.
    text: String,
    /// Bytes of `text` already sent as content.
    sent: usize,
    /// A call has begun: nothing more is sent until the end.
    holding: bool,
}

impl ToolStream {
    /// A stream of an answer in `format`.
    pub fn new(format: ToolFormat) -> Self {
        Self {
            format,
            text: String::new(),
            sent: 0,
            holding: false,
        }
    }

    /// Take the next piece of text; what may be sent now as content.
    pub fn push(&mut self, piece: &str) -> String {
        self.text.push_str(piece);
        if self.holding {
            return String::new();
        }
        let start = self.format.start();
        let unsent = &self.text[self.sent..];
        let cut = match self.format {
            // A Llama 3 call is the whole answer: it starts with `{` or
            // the python tag, before any text.
            ToolFormat::Llama3 => {
                let trimmed = self.text.trim_start();
                if self.sent == 0 && (trimmed.is_empty() || PYTHON_TAG.starts_with(trimmed)) {
                    return String::new();
                }
                if self.sent == 0 && (trimmed.starts_with(start) || trimmed.starts_with(PYTHON_TAG))
                {
                    self.holding = true;
                    return String::new();
                }
                unsent.len()
            }
            ToolFormat::Hermes | ToolFormat::Mistral => match unsent.find(start) {
                Some(at) => {
                    self.holding = true;
                    at
                }
                // Hold back a tail that may be the marker's beginning.
                None => {
                    let mut keep = 0;
                    for k in (1..start.len().min(unsent.len() + 1)).rev() {
                        if unsent.is_char_boundary(unsent.len() - k)
                            && start.starts_with(&unsent[unsent.len() - k..])
                        {
                            keep = k;
                            break;
                        }
                    }
                    unsent.len() - keep
                }
            },
        };
        let out = unsent[..cut].to_owned();
        self.sent += cut;
        out
    }

    /// The answer has ended: the content not yet sent, and the calls.
    pub fn finish(self) -> Parsed {
        let parsed = self.format.parse(&self.text);
        if parsed.calls.is_empty() {
            // No call after all: the rest is text.
            let rest = self.text[self.sent..].to_owned();
            return Parsed {
                content: rest,
                calls: Vec::new(),
            };
        }
        // Content already sent stays sent; what was held back of it (text
        // between the marker's prefix and the calls) is the rest.
        let sent = self.text[..self.sent].trim();
        let rest = parsed
            .content
            .strip_prefix(sent)
            .unwrap_or(&parsed.content)
            .to_owned();
        Parsed {
            content: rest,
            calls: parsed.calls,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, arguments: &str) -> ParsedCall {
        ParsedCall {
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    // Answers in each model family's format, as its model cards and
    // function-calling guides show them.

    #[test]
    fn hermes_calls_as_qwen_writes_them() {
        // Qwen2.5-7B-Instruct, two calls in one answer (Qwen's
        // function-calling guide).
        let text = "<tool_call>\n{\"name\": \"get_current_temperature\", \"arguments\": {\"location\": \"San Francisco, CA, USA\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_temperature_date\", \"arguments\": {\"location\": \"San Francisco, CA, USA\", \"date\": \"2024-10-01\"}}\n</tool_call>";
        let p = ToolFormat::Hermes.parse(text);
        assert_eq!(p.content, "");
        assert_eq!(
            p.calls,
            [
                call(
                    "get_current_temperature",
                    r#"{"location":"San Francisco, CA, USA"}"#
                ),
                call(
                    "get_temperature_date",
                    r#"{"location":"San Francisco, CA, USA","date":"2024-10-01"}"#
                ),
            ]
        );
        // Hermes-2-Pro, with text before the call.
        let text = "Let me check that for you.\n<tool_call>\n{\"arguments\": {\"symbol\": \"TSLA\"}, \"name\": \"get_stock_fundamentals\"}\n</tool_call>";
        let p = ToolFormat::Hermes.parse(text);
        assert_eq!(p.content, "Let me check that for you.");
        assert_eq!(
            p.calls,
            [call("get_stock_fundamentals", r#"{"symbol":"TSLA"}"#)]
        );
        // Cut short by the token limit: the text stays text.
        let p = ToolFormat::Hermes.parse("<tool_call>\n{\"name\": \"f\", \"argum");
        assert!(p.calls.is_empty());
        assert_eq!(p.content, "<tool_call>\n{\"name\": \"f\", \"argum");
    }

    #[test]
    fn mistral_calls_as_mistral_writes_them() {
        // Mistral-7B-Instruct-v0.3.
        let text = "[TOOL_CALLS] [{\"name\": \"get_current_weather\", \"arguments\": {\"location\": \"Paris, France\", \"format\": \"celsius\"}}]";
        let p = ToolFormat::Mistral.parse(text);
        assert_eq!(p.content, "");
        assert_eq!(
            p.calls,
            [call(
                "get_current_weather",
                r#"{"location":"Paris, France","format":"celsius"}"#
            )]
        );
        assert!(ToolFormat::Mistral.parse("No call here.").calls.is_empty());
    }

    #[test]
    fn llama3_calls_as_llama_writes_them() {
        // Llama-3.1-8B-Instruct, JSON-based tool calling.
        let text = "{\"name\": \"get_current_conditions\", \"parameters\": {\"location\": \"San Francisco, CA\", \"unit\": \"Fahrenheit\"}}";
        let p = ToolFormat::Llama3.parse(text);
        assert_eq!(
            p.calls,
            [call(
                "get_current_conditions",
                r#"{"location":"San Francisco, CA","unit":"Fahrenheit"}"#
            )]
        );
        // Llama-3.2-3B-Instruct with the python tag.
        let p = ToolFormat::Llama3
            .parse("<|python_tag|>{\"name\": \"search\", \"parameters\": {\"query\": \"rbee\"}}");
        assert_eq!(p.calls, [call("search", r#"{"query":"rbee"}"#)]);
        let p = ToolFormat::Llama3.parse("The answer is {not a call}.");
        assert!(p.calls.is_empty());
        assert_eq!(p.content, "The answer is {not a call}.");
    }

    #[test]
    fn templates_name_their_format() {
        assert_eq!(
            ToolFormat::of_template("{{ tools }} <tool_call>", true),
            Some(ToolFormat::Hermes)
        );
        assert_eq!(
            ToolFormat::of_template("[TOOL_CALLS]", true),
            Some(ToolFormat::Mistral)
        );
        assert_eq!(ToolFormat::of_template("<tool_call>", false), None);
        assert_eq!(ToolFormat::of_template("{{ tools }}", true), None);
    }

    #[test]
    fn a_stream_sends_text_until_a_call_begins_and_the_calls_at_the_end() {
        let answer =
            "Checking.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call>";
        for size in 1..8 {
            let mut s = ToolStream::new(ToolFormat::Hermes);
            let mut sent = String::new();
            let chars: Vec<char> = answer.chars().collect();
            for piece in chars.chunks(size) {
                sent.push_str(&s.push(&piece.iter().collect::<String>()));
            }
            let end = s.finish();
            assert_eq!(sent.trim(), "Checking.", "pieces of {size}");
            assert_eq!(end.calls, [call("f", r#"{"x":1}"#)]);
        }
        // Text that only looks like a marker's start goes out in the end.
        let mut s = ToolStream::new(ToolFormat::Hermes);
        let mut sent = s.push("a <tool");
        sent.push_str(&s.push("box> b"));
        let end = s.finish();
        sent.push_str(&end.content);
        assert_eq!(sent, "a <toolbox> b");
        assert!(end.calls.is_empty());
    }

    #[test]
    fn grammars_force_calls_in_each_format() {
        let tool: Tool = serde_json::from_value(json!({"type": "function", "function": {"name": "weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}))
        .expect("tool");
        let g = ToolFormat::Hermes.grammar(&[&tool], false, |_| None);
        assert!(g.starts_with("start: call\n"), "{g}");
        assert!(g.contains("\"const\":\"weather\""), "{g}");
        let g = ToolFormat::Mistral.grammar(&[&tool], true, |_| Some(5));
        assert!(g.starts_with("start: <[5]> body"), "{g}");
        assert!(!g.contains("maxItems"), "{g}");
        let g = ToolFormat::Llama3.grammar(&[&tool], false, |_| None);
        assert!(g.contains("\"parameters\""), "{g}");
    }
}
