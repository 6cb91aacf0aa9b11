//! Chat templates: the model's own (`tokenizer.chat_template` in the GGUF
//! metadata), rendered with minijinja, or a documented ChatML default.

use candle_core::quantized::gguf_file::Content;
pub use rbee_api::openai::ChatMessage;

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
        env.add_template_owned("chat", source)
            .map_err(TemplateError::Invalid)?;
        Ok(Self { env, is_default })
    }

    /// Render `messages`, ending with the assistant's turn opened.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template("chat")
            .map_err(TemplateError::Render)?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => "",
                eos_token => "",
            })
            .map_err(TemplateError::Render)
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

    #[test]
    fn a_body_full_of_messages_renders_within_the_fuel_and_a_runaway_loop_does_not() {
        // About the most turns a 1 MiB body holds.
        let many: Vec<ChatMessage> = (0..30_000)
            .map(|_| ChatMessage {
                role: "user".into(),
                content: String::new(),
            })
            .collect();
        let chatml = ChatTemplate::chatml().unwrap();
        assert!(chatml.render(&many).is_ok());
        // A template that loops per message pair: quadratic in what a
        // client sends.
        let quadratic = ChatTemplate::new(
            "{% for a in messages %}{% for b in messages %}{{ a.role }}{% endfor %}{% endfor %}"
                .to_owned(),
            false,
        )
        .unwrap();
        let started = std::time::Instant::now();
        let err = rbee_api::error::chain(&quadratic.render(&many).expect_err("out of fuel"));
        assert!(err.contains("fuel"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }
}
