//! Chat templates: the model's own (`tokenizer.chat_template` in the GGUF
//! metadata), rendered with minijinja, or a documented ChatML default.

use candle_core::quantized::gguf_file::Content;
pub use rbee_api::openai::ChatMessage;
use rbee_api::openai::Tool;
use serde_json::Value;

use super::tools::ToolFormat;

/// The template used when a model carries none: ChatML.
pub const DEFAULT_CHATML: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Instructions one rendering may run. A turn costs a template some tens;
/// the largest body the worker takes (1 MiB) holds about 30,000 empty
/// messages. A template that loops further (by design or because of what
/// a client sent) is stopped with an error instead of holding a thread.
pub const RENDER_FUEL: u64 = 2_000_000;

/// Why a chat template cannot be used or rendered.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template does not compile.
    #[error("invalid chat template")]
    Invalid(#[source] minijinja::Error),
    /// Rendering failed (the messages, the template's logic, or its fuel).
    #[error("chat template")]
    Render(#[source] minijinja::Error),
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    /// True when the model carried no template and ChatML is used.
    pub is_default: bool,
    /// How the template shows tools and writes calls; `None` when it
    /// shows no tools.
    pub tools: Option<ToolFormat>,
}

impl ChatTemplate {
    /// The GGUF's template, or ChatML when it has none.
    pub fn from_gguf(content: &Content) -> Result<Self, TemplateError> {
        match content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
        {
            Some(source) => Self::new(source.clone(), false),
            None => Self::chatml(),
        }
    }

    /// The built-in ChatML template.
    pub fn chatml() -> Result<Self, TemplateError> {
        Self::new(DEFAULT_CHATML.to_owned(), true)
    }

    /// Compile `source`; `is_default` marks the built-in ChatML.
    pub fn new(source: String, is_default: bool) -> Result<Self, TemplateError> {
        let mut env = minijinja::Environment::new();
        env.set_fuel(Some(RENDER_FUEL));
        env.add_template_owned("chat", source.clone())
            .map_err(TemplateError::Invalid)?;
        let renders_tools = env
            .get_template("chat")
            .map_err(TemplateError::Invalid)?
            .undeclared_variables(false)
            .contains("tools");
        let tools = ToolFormat::of_template(&source, renders_tools);
        Ok(Self {
            env,
            is_default,
            tools,
        })
    }

    /// Render `messages` (and `tools`, for a template that shows them),
    /// ending with the assistant's turn opened. Earlier calls' arguments
    /// are given to the template as objects, as templates written for
    /// Hugging Face's convention expect.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        tools: &[Tool],
    ) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template("chat")
            .map_err(TemplateError::Render)?;
        let messages: Vec<Value> = messages.iter().map(template_message).collect();
        let tools = (!tools.is_empty()).then_some(tools);
        template
            .render(minijinja::context! {
                messages => messages,
                tools => tools,
                add_generation_prompt => true,
                bos_token => "",
                eos_token => "",
            })
            .map_err(TemplateError::Render)
    }
}

/// A message as templates read it: each call's `arguments` an object.
fn template_message(message: &ChatMessage) -> Value {
    let mut v = serde_json::to_value(message).unwrap_or(Value::Null);
    if let Some(calls) = v.get_mut("tool_calls").and_then(Value::as_array_mut) {
        for call in calls {
            let function = &mut call["function"];
            if let Some(text) = function["arguments"].as_str() {
                if let Ok(args) = serde_json::from_str::<Value>(text) {
                    function["arguments"] = args;
                }
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_chatml_renders_turns_and_opens_the_assistant_turn() {
        let t = ChatTemplate::new(DEFAULT_CHATML.to_owned(), true).unwrap();
        let text = t
            .render(
                &[
                    ChatMessage::new("system", "Be brief."),
                    ChatMessage::new("user", "Hi"),
                ],
                &[],
            )
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    /// A Hermes-style template that shows tools (the system tests' too).
    const HERMES: &str = include_str!("../../tests/data/hermes-tools.jinja");

    #[test]
    fn a_template_with_tools_shows_them_and_renders_calls_and_their_results() {
        let t = ChatTemplate::new(HERMES.to_owned(), false).unwrap();
        assert_eq!(t.tools, Some(ToolFormat::Hermes));
        assert_eq!(ChatTemplate::chatml().unwrap().tools, None);
        let tool: Tool = serde_json::from_value(serde_json::json!({"type": "function",
            "function": {"name": "weather", "parameters": {"type": "object"}}}))
        .unwrap();
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls = vec![rbee_api::openai::ToolCall {
            id: "call_1".into(),
            kind: "function".into(),
            function: rbee_api::openai::FunctionCall {
                name: "weather".into(),
                arguments: "{\"city\":\"Paris\"}".into(),
            },
        }];
        let mut result = ChatMessage::new("tool", "18 C");
        result.tool_call_id = Some("call_1".into());
        let text = t
            .render(
                &[ChatMessage::new("user", "Weather in Paris?"), call, result],
                &[tool],
            )
            .unwrap();
        let tools_part = "<tools>\n{\"type\":\"function\",\"function\":{\"name\":\"weather\",\"parameters\":{\"type\":\"object\"}}}\n</tools>";
        assert!(text.contains(tools_part), "{text}");
        let turns = "<|im_start|>user\nWeather in Paris?<|im_end|>\n\
            <|im_start|>assistant\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\":\"Paris\"}}\n</tool_call><|im_end|>\n\
            <|im_start|>user\n<tool_response>\n18 C\n</tool_response><|im_end|>\n\
            <|im_start|>assistant\n";
        assert!(text.ends_with(turns), "{text}");
    }

    #[test]
    fn a_body_full_of_messages_renders_within_the_fuel_and_a_runaway_loop_does_not() {
        // About the most turns a 1 MiB body holds.
        let many: Vec<ChatMessage> = (0..30_000).map(|_| ChatMessage::new("user", "")).collect();
        let chatml = ChatTemplate::chatml().unwrap();
        assert!(chatml.render(&many, &[]).is_ok());
        // A template that loops per message pair: quadratic in what a
        // client sends.
        let quadratic = ChatTemplate::new(
            "{% for a in messages %}{% for b in messages %}{{ a.role }}{% endfor %}{% endfor %}"
                .to_owned(),
            false,
        )
        .unwrap();
        let started = std::time::Instant::now();
        let err = rbee_api::error::chain(&quadratic.render(&many, &[]).expect_err("out of fuel"));
        assert!(err.contains("fuel"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }
}
