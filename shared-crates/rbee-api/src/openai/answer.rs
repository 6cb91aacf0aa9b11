//! The answers of the OpenAI-compatible routes: a whole completion, the
//! chunks of a streamed one, their `usage`, and the model list.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::inference::{StopReason, TokenLogprob};
use crate::openai::ToolCall;

/// What an answer or chunk is (`object`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Object {
    /// A whole chat answer.
    #[serde(rename = "chat.completion")]
    ChatCompletion,
    /// One chunk of a streamed chat answer.
    #[serde(rename = "chat.completion.chunk")]
    ChatCompletionChunk,
    /// A completion, whole or one chunk.
    #[serde(rename = "text_completion")]
    TextCompletion,
}

/// Why a choice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End of sequence or a stop sequence.
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The answer is tool calls.
    ToolCalls,
}

impl From<StopReason> for FinishReason {
    fn from(reason: StopReason) -> Self {
        match reason {
            StopReason::Eos | StopReason::StopSequence => Self::Stop,
            StopReason::MaxTokens => Self::Length,
        }
    }
}

/// A chat answer's message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnswerMessage {
    /// Always `assistant`.
    pub role: String,
    /// The generated text; `null` when the answer is only tool calls.
    pub content: Option<String>,
    /// The tool calls the answer makes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
}

/// One tool call in a streamed chunk: the first chunk of a call carries
/// its id, type and name; its arguments follow, in pieces, to be joined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCallDelta {
    /// Which call of the answer (0, 1, ...).
    pub index: u32,
    /// In the call's first chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `function`, in the call's first chunk.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The name (first chunk) and a piece of the arguments.
    pub function: FunctionDelta,
}

/// The function part of a [`ToolCallDelta`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionDelta {
    /// In the call's first chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A piece of the arguments' text.
    pub arguments: String,
}

/// What one chunk of a streamed chat answer adds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// `assistant`, in the first chunk only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Text generated since the last chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Tool calls, or pieces of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// The body of a choice, by route and by whole answer or chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ChoiceBody {
    /// A whole chat answer.
    Message {
        /// The message.
        message: AnswerMessage,
    },
    /// A chunk of a chat answer.
    Delta {
        /// What it adds.
        delta: Delta,
    },
    /// A completion, whole or one chunk.
    Text {
        /// The text.
        text: String,
    },
}

/// One choice (there is only ever one, index 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// Always 0.
    pub index: u32,
    /// Message, delta or text.
    #[serde(flatten)]
    pub body: ChoiceBody,
    /// The log-probabilities of the tokens this choice (or chunk) carries,
    /// when the request asked for them; `null` otherwise.
    #[serde(default)]
    pub logprobs: Option<ChoiceLogprobs>,
    /// `null` until the choice ends.
    pub finish_reason: Option<FinishReason>,
}

/// A choice's `logprobs`, in the shape of its route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ChoiceLogprobs {
    /// `/v1/chat/completions`.
    Chat(ChatLogprobs),
    /// `/v1/completions` (the legacy shape: parallel lists).
    Text(TextLogprobs),
}

/// A chat choice's `logprobs`: one entry per generated token.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatLogprobs {
    /// The tokens, in order.
    pub content: Vec<ChatTokenLogprob>,
}

/// One generated token of a chat answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatTokenLogprob {
    /// The token, decoded alone.
    pub token: String,
    /// Natural log of its probability.
    pub logprob: f32,
    /// The UTF-8 bytes of `token`.
    pub bytes: Vec<u8>,
    /// The most likely tokens at this position, most likely first
    /// (`top_logprobs` of them).
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// One of the most likely tokens at a position of a chat answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatTopLogprob {
    /// The token, decoded alone.
    pub token: String,
    /// Natural log of its probability.
    pub logprob: f32,
    /// The UTF-8 bytes of `token`.
    pub bytes: Vec<u8>,
}

impl From<&TokenLogprob> for ChatTokenLogprob {
    fn from(lp: &TokenLogprob) -> Self {
        Self {
            token: lp.token.clone(),
            logprob: lp.logprob,
            bytes: lp.token.as_bytes().to_vec(),
            top_logprobs: lp
                .top
                .iter()
                .map(|t| ChatTopLogprob {
                    token: t.token.clone(),
                    logprob: t.logprob,
                    bytes: t.token.as_bytes().to_vec(),
                })
                .collect(),
        }
    }
}

/// A completion's `logprobs`: parallel lists, one entry per generated token.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TextLogprobs {
    /// The tokens, decoded alone.
    pub tokens: Vec<String>,
    /// Their log-probabilities.
    pub token_logprobs: Vec<f32>,
    /// Per token: the most likely tokens at its position and their
    /// log-probabilities.
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    /// Per token: where its text starts in the choice's text, in bytes.
    pub text_offset: Vec<usize>,
}

impl TextLogprobs {
    /// Append one token whose text starts at byte `offset` of the answer.
    pub fn push(&mut self, lp: &TokenLogprob, offset: usize) {
        self.tokens.push(lp.token.clone());
        self.token_logprobs.push(lp.logprob);
        self.top_logprobs.push(
            lp.top
                .iter()
                .map(|t| (t.token.clone(), t.logprob))
                .collect(),
        );
        self.text_offset.push(offset);
    }
}

/// Cached prompt tokens, as OpenAI reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose prefill the worker's prefix cache skipped.
    pub cached_tokens: u32,
}

/// Token counts of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// The two together.
    pub total_tokens: u32,
    /// Of the prompt tokens, the cached ones.
    pub prompt_tokens_details: PromptTokensDetails,
}

impl Usage {
    /// The usage of a generation of `tokens_out` tokens after a prompt of
    /// `tokens_in`, `tokens_cached` of them from the prefix cache.
    pub fn new(tokens_in: u32, tokens_out: u32, tokens_cached: u32) -> Self {
        Self {
            prompt_tokens: tokens_in,
            completion_tokens: tokens_out,
            total_tokens: tokens_in.saturating_add(tokens_out),
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: tokens_cached,
            },
        }
    }
}

/// A whole answer, or one chunk of a streamed one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// `chatcmpl-...` or `cmpl-...`, the same in every chunk.
    pub id: String,
    /// What this is.
    pub object: Object,
    /// Unix seconds when the generation began.
    pub created: u64,
    /// The model ref.
    pub model: String,
    /// One choice, or none in the chunk that carries `usage`.
    pub choices: Vec<Choice>,
    /// In a whole answer and in the last chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    /// The models.
    pub data: Vec<Model>,
}

impl ModelList {
    /// A list of `data`.
    pub fn new(data: Vec<Model>) -> Self {
        Self {
            object: "list".to_owned(),
            data,
        }
    }
}

/// One model of [`ModelList`], with where it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Model {
    /// The model ref.
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// Always 0: models have no creation time here.
    pub created: u64,
    /// Always `rbee`.
    pub owned_by: String,
    /// At a worker: whether its model is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    /// At the queen: the hives that have it provisioned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hives: Option<Vec<String>>,
    /// At the queen: its workers ready now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers_ready: Option<usize>,
}

impl Model {
    /// The model `id`, with nothing said of where it runs.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            object: "model".to_owned(),
            created: 0,
            owned_by: "rbee".to_owned(),
            ready: None,
            hives: None,
            workers_ready: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answers_have_openais_shapes() {
        let chunk = Completion {
            id: "chatcmpl-j".into(),
            object: Object::ChatCompletionChunk,
            created: 7,
            model: "m".into(),
            choices: vec![Choice {
                index: 0,
                body: ChoiceBody::Delta {
                    delta: Delta {
                        role: Some("assistant".into()),
                        content: Some("Hi".into()),
                        tool_calls: None,
                    },
                },
                logprobs: None,
                finish_reason: None,
            }],
            usage: None,
        };
        assert_eq!(
            serde_json::to_value(&chunk).expect("json"),
            json!({"id": "chatcmpl-j", "object": "chat.completion.chunk", "created": 7, "model": "m",
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "logprobs": null, "finish_reason": null}]})
        );
        let text = Choice {
            index: 0,
            body: ChoiceBody::Text { text: "x".into() },
            logprobs: None,
            finish_reason: Some(StopReason::MaxTokens.into()),
        };
        assert_eq!(
            serde_json::to_value(&text).expect("json"),
            json!({"index": 0, "text": "x", "logprobs": null, "finish_reason": "length"})
        );
        assert_eq!(
            serde_json::to_value(Usage::new(4, 2, 1)).expect("json"),
            json!({"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6,
                   "prompt_tokens_details": {"cached_tokens": 1}})
        );
    }

    #[test]
    fn a_whole_chat_answer_reads_back() {
        let body = json!({"id": "chatcmpl-j", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris"}, "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4, "prompt_tokens_details": {"cached_tokens": 0}}});
        let answer: Completion = serde_json::from_value(body.clone()).expect("reads");
        assert_eq!(
            answer.choices[0].body,
            ChoiceBody::Message {
                message: AnswerMessage {
                    role: "assistant".into(),
                    content: Some("Paris".into()),
                    tool_calls: Vec::new(),
                }
            }
        );
        assert_eq!(serde_json::to_value(&answer).expect("json"), body);
    }

    #[test]
    fn logprobs_take_each_routes_shape() {
        use crate::inference::TopLogprob;
        let lp = TokenLogprob {
            id: 9,
            token: " Paris".into(),
            logprob: -0.5,
            top: vec![
                TopLogprob {
                    id: 9,
                    token: " Paris".into(),
                    logprob: -0.5,
                },
                TopLogprob {
                    id: 4,
                    token: " Lyon".into(),
                    logprob: -2.0,
                },
            ],
        };
        let chat = ChoiceLogprobs::Chat(ChatLogprobs {
            content: vec![ChatTokenLogprob::from(&lp)],
        });
        let bytes = json!([32, 80, 97, 114, 105, 115]);
        assert_eq!(
            serde_json::to_value(&chat).expect("json"),
            json!({"content": [{"token": " Paris", "logprob": -0.5, "bytes": bytes,
                "top_logprobs": [{"token": " Paris", "logprob": -0.5, "bytes": bytes},
                                 {"token": " Lyon", "logprob": -2.0, "bytes": [32, 76, 121, 111, 110]}]}]})
        );
        let mut text = TextLogprobs::default();
        text.push(&lp, 3);
        let text = ChoiceLogprobs::Text(text);
        let value = serde_json::to_value(&text).expect("json");
        assert_eq!(
            value,
            json!({"tokens": [" Paris"], "token_logprobs": [-0.5],
                   "top_logprobs": [{" Paris": -0.5, " Lyon": -2.0}], "text_offset": [3]})
        );
        for shape in [chat, text] {
            let back: ChoiceLogprobs =
                serde_json::from_value(serde_json::to_value(&shape).expect("json")).expect("reads");
            assert_eq!(back, shape);
        }
    }
}
