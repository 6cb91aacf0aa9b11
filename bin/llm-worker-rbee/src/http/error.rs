//! Why the worker refuses a request before generating. Handlers answer it
//! with `?`; the envelope is made in `rbee_api` from [`Coded`].

use rbee_api::{Coded, ErrorCode, FieldError};
use serde::Serialize;

/// A refused inference or chat request.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AdmitError {
    /// The worker is draining.
    #[error("the worker is shutting down")]
    ShuttingDown,
    /// The model has not finished loading.
    #[error("the model is still loading")]
    Loading,
    /// The engine has not produced a token for too long.
    #[error("the engine has produced no token for {seconds} s")]
    Stalled { seconds: u64 },
    /// Every slot is taken.
    #[error("all {slots} slots are busy")]
    AllSlotsBusy { slots: usize },
    /// Fields of the body are invalid.
    #[error("{}", rbee_api::error::fields_message(.0))]
    Invalid(Vec<FieldError>),
    /// A job with the same id is running.
    #[error("job `{job_id}` is already running")]
    JobRunning { job_id: String },
    /// The prompt has more bytes than any prompt that fits the context.
    #[error("the prompt is {} bytes; no prompt over {} bytes fits this model's context of {} tokens", .0.prompt_bytes, .0.max_prompt_bytes, .0.context_length)]
    PromptBytes(PromptBytes),
    /// The prompt leaves no room in the context (or is empty).
    #[error("the prompt is {} tokens; this model's context is {} tokens, prompt and output together", .0.prompt_tokens, .0.context_length)]
    PromptTokens(PromptTokens),
    /// The tokenizer refused the prompt.
    #[error("cannot tokenize the prompt: {0}")]
    Tokenize(String),
    /// The tokenizer's thread ended without an answer.
    #[error("tokenization failed")]
    TokenizerLost,
    /// The chat template refused the messages.
    #[error(transparent)]
    Template(#[from] crate::model::chat::TemplateError),
    /// The template's thread ended without an answer.
    #[error("rendering the chat template failed")]
    TemplateLost,
    /// The engine took no more jobs.
    #[error("the engine is not running")]
    EngineDown(ErrorCode),
    /// A text route on a worker whose model makes embeddings.
    #[error("this worker serves an embedding model: use /v1/embeddings")]
    NotGenerative,
    /// `/v1/embeddings` on a worker whose model generates text.
    #[error("this worker's model generates text and does not make embeddings")]
    NotEmbedding,
    /// The embedding pass failed.
    #[error("{0}")]
    Embed(String),
    /// The embedding thread ended without an answer.
    #[error("the embedding pass failed")]
    EmbedderLost,
}

/// `details` of [`AdmitError::PromptBytes`].
#[derive(Debug, Serialize)]
pub(crate) struct PromptBytes {
    pub prompt_bytes: usize,
    pub max_prompt_bytes: usize,
    pub context_length: usize,
}

/// `details` of [`AdmitError::PromptTokens`].
#[derive(Debug, Serialize)]
pub(crate) struct PromptTokens {
    pub prompt_tokens: usize,
    pub context_length: usize,
}

impl Coded for AdmitError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::ShuttingDown => ErrorCode::ShuttingDown,
            Self::Loading => ErrorCode::ModelLoading,
            Self::Stalled { .. } => ErrorCode::EngineStalled,
            Self::AllSlotsBusy { .. } => ErrorCode::AllSlotsBusy,
            Self::Invalid(_)
            | Self::Tokenize(_)
            | Self::Template(_)
            | Self::NotGenerative
            | Self::NotEmbedding => ErrorCode::InvalidRequest,
            Self::JobRunning { .. } => ErrorCode::Conflict,
            Self::PromptBytes(_) | Self::PromptTokens(_) => ErrorCode::PromptTooLong,
            Self::TokenizerLost | Self::TemplateLost | Self::Embed(_) | Self::EmbedderLost => {
                ErrorCode::Internal
            }
            Self::EngineDown(code) => *code,
        }
    }

    fn details(&self) -> Option<serde_json::Value> {
        match self {
            Self::Invalid(fields) => Some(rbee_api::error::fields_details(fields)),
            Self::PromptBytes(d) => serde_json::to_value(d).ok(),
            Self::PromptTokens(d) => serde_json::to_value(d).ok(),
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::ShuttingDown | Self::Loading | Self::AllSlotsBusy { .. } => Some(1),
            _ => None,
        }
    }
}
