//! Loading a model: weights, tokenizer, chat template, limits.
//!
//! GGUF files carry everything: quantized llama-family weights (through
//! candle-transformers), the tokenizer ([`tokenizer`]) and the chat template
//! ([`chat`]).

pub mod chat;
pub mod tokenizer;

use std::path::Path;
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::Device;
use candle_transformers::models::quantized_llama::{ModelWeights, MAX_SEQ_LEN};

use self::chat::ChatTemplate;

/// Why a model could not be loaded. Displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be opened or read.
    #[error("cannot read model {path}: {source}")]
    Io {
        /// The model path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Not a GGUF file candle can read, or not a llama-family model.
    #[error("cannot load model {path}: {reason}")]
    Format {
        /// The model path.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// A model ready for the engine.
pub struct LoadedModel {
    /// The weights; each slot works on its own clone (shared tensors, own KV cache).
    pub weights: ModelWeights,
    /// Text to ids and back.
    pub tokenizer: tokenizers::Tokenizer,
    /// The chat template for chat requests.
    pub chat_template: ChatTemplate,
    /// Token ids that end generation.
    pub eos_token_ids: Vec<u32>,
    /// Longest sequence (prompt plus generated tokens) the model runs.
    pub context_length: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Time the load took.
    pub load_seconds: f64,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("context_length", &self.context_length)
            .field("vocab_size", &self.vocab_size)
            .field("eos_token_ids", &self.eos_token_ids)
            .finish_non_exhaustive()
    }
}

/// candle errors carry a backtrace after the first line when `RUST_BACKTRACE`
/// is set; operators get the sentence, the log gets no stack.
fn first_line(error: &impl std::fmt::Display) -> String {
    error
        .to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Load a GGUF llama-family model onto `device`.
pub fn load_gguf(path: &Path, device: &Device) -> Result<LoadedModel, LoadError> {
    let started = Instant::now();
    let shown = path.display().to_string();
    let format = |reason: String| LoadError::Format {
        path: shown.clone(),
        reason,
    };
    let mut file = std::fs::File::open(path).map_err(|source| LoadError::Io {
        path: shown.clone(),
        source,
    })?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| format(first_line(&e)))?;
    let arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if arch != "llama" {
        return Err(format(format!(
            "architecture `{arch}` is not supported (llama family only)"
        )));
    }
    let tokenizer = tokenizer::from_gguf(&content).map_err(format)?;
    let chat_template = ChatTemplate::from_gguf(&content).map_err(format)?;
    let eos_token_ids = tokenizer::eos_ids(&content, &tokenizer);
    let gguf_context = content
        .metadata
        .get("llama.context_length")
        .and_then(|v| v.to_u32().ok())
        .map_or(MAX_SEQ_LEN, |n| n as usize);
    let vocab_size = tokenizer.get_vocab_size(true);
    let weights =
        ModelWeights::from_gguf(content, &mut file, device).map_err(|e| format(first_line(&e)))?;
    Ok(LoadedModel {
        weights,
        tokenizer,
        chat_template,
        eos_token_ids,
        // RoPE tables are precomputed for MAX_SEQ_LEN positions.
        context_length: gguf_context.min(MAX_SEQ_LEN),
        vocab_size,
        load_seconds: started.elapsed().as_secs_f64(),
    })
}
