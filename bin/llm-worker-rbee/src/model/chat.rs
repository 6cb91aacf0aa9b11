//! Chat templates: the model's own (`tokenizer.chat_template` in the GGUF
//! metadata), rendered with minijinja, or a documented ChatML default.

use candle_core::quantized::gguf_file::Content;
pub use rbee_api::openai::ChatMessage;

/// The template used when a model carries none: ChatML.
pub const DEFAULT_CHATML: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    /// True when the model carried no template and ChatML is used.
    pub is_default: bool,
}

impl ChatTemplate {
    /// The GGUF's template, or ChatML when it has none.
    pub fn from_gguf(content: &Content) -> Result<Self, String> {
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
    pub fn chatml() -> Result<Self, String> {
        Self::new(DEFAULT_CHATML.to_owned(), true)
    }

    /// Compile `source`; `is_default` marks the built-in ChatML.
    pub fn new(source: String, is_default: bool) -> Result<Self, String> {
        let mut env = minijinja::Environment::new();
        env.add_template_owned("chat", source)
            .map_err(|e| format!("invalid chat template: {e}"))?;
        Ok(Self { env, is_default })
    }

    /// Render `messages`, ending with the assistant's turn opened.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, String> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| format!("chat template: {e}"))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => "",
                eos_token => "",
            })
            .map_err(|e| format!("chat template: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_chatml_renders_turns_and_opens_the_assistant_turn() {
        let t = ChatTemplate::new(DEFAULT_CHATML.to_owned(), true).unwrap();
        let text = t
            .render(&[
                ChatMessage {
                    role: "system".into(),
                    content: "Be brief.".into(),
                },
                ChatMessage {
                    role: "user".into(),
                    content: "Hi".into(),
                },
            ])
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
