//! Loading a model: weights, tokenizer, chat template, limits.
//!
//! GGUF files carry everything: quantized llama-family weights (through
//! candle-transformers), the tokenizer ([`tokenizer`]) and the chat template
//! ([`chat`]). Safetensors llama-family directories ([`dense`]) carry
//! `config.json`, the weights and `tokenizer.json`.

pub mod chat;
pub mod dense;
pub mod tokenizer;

use std::path::Path;
use std::time::Instant;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
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

/// The weights of one sequence: tensors shared between slots, a KV cache of its own.
#[derive(Debug)]
pub enum Weights {
    /// A quantized GGUF model; the KV cache lives inside.
    Quantized(Box<ModelWeights>),
    /// A dense safetensors model and its cache.
    Dense(Box<dense::DenseLlama>),
}

impl Weights {
    /// Logits of the next token after `input` (shape `(1, seq_len)`) placed at `pos`.
    pub fn forward(&mut self, input: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        match self {
            Self::Quantized(m) => m.forward(input, pos)?.squeeze(0),
            Self::Dense(m) => m.forward(input, pos),
        }
    }

    /// Forget the sequence (empty the KV cache) so the slot can take another.
    pub fn reset(&mut self) -> candle_core::Result<()> {
        match self {
            Self::Quantized(m) => {
                m.clear_kv_cache();
                Ok(())
            }
            Self::Dense(m) => m.reset(),
        }
    }

    /// Another set for another slot: same tensors, empty cache.
    pub fn fork(&self) -> candle_core::Result<Self> {
        Ok(match self {
            Self::Quantized(m) => {
                let mut m = m.clone();
                m.clear_kv_cache();
                Self::Quantized(m)
            }

            Self::Dense(m) => Self::Dense(Box::new(m.fork()?)),
        })
    }
}

/// A model ready for the engine.
pub struct LoadedModel {
    /// The weights; each slot works on its own fork (shared tensors, own KV cache).
    pub weights: Weights,
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
    /// Where the weights live; inputs go there too.
    pub device: Device,
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
pub(crate) fn first_line(error: &impl std::fmt::Display) -> String {
    error
        .to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// What to do with the weights' quantization at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Requantize {
    /// Keep the file's formats.
    #[default]
    None,
    /// Turn 4- and 5-bit tensors into Q8_0, for which candle has SIMD CPU
    /// kernels: faster on CPU, about twice the memory of Q4.
    #[value(name = "q8_0")]
    Q8_0,
}

/// The candle device for `backend` and `ordinal`, when this build has the backend.
pub fn device(backend: rbee_api::worker::Backend, ordinal: u32) -> Result<Device, String> {
    use rbee_api::worker::Backend;
    let _ = ordinal;
    match backend {
        Backend::Cpu => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        Backend::Cuda => Device::new_cuda(ordinal as usize)
            .map_err(|e| format!("cannot open CUDA device {ordinal}: {}", first_line(&e))),
        #[cfg(feature = "metal")]
        Backend::Metal => Device::new_metal(ordinal as usize)
            .map_err(|e| format!("cannot open Metal device {ordinal}: {}", first_line(&e))),
        #[cfg(not(feature = "cuda"))]
        Backend::Cuda => Err(not_built(backend)),
        #[cfg(not(feature = "metal"))]
        Backend::Metal => Err(not_built(backend)),
    }
}

#[cfg(not(all(feature = "cuda", feature = "metal")))]
fn not_built(backend: rbee_api::worker::Backend) -> String {
    format!("backend `{backend}` is not built into this binary (build with --features {backend})")
}

/// The backends this build supports, for `rbee_build_info` and errors.
pub fn built_backends() -> &'static str {
    match (cfg!(feature = "cuda"), cfg!(feature = "metal")) {
        (true, true) => "cpu,cuda,metal",
        (true, false) => "cpu,cuda",
        (false, true) => "cpu,metal",
        (false, false) => "cpu",
    }
}

/// Load a model: a safetensors llama directory, or a GGUF file.
pub fn load(
    path: &Path,
    device: &Device,
    requantize: Requantize,
) -> Result<LoadedModel, LoadError> {
    if path.is_dir() {
        dense::load_safetensors(path, device)
    } else {
        load_gguf(path, device, requantize)
    }
}

/// Load a GGUF llama-family model onto `device`.
pub fn load_gguf(
    path: &Path,
    device: &Device,
    requantize: Requantize,
) -> Result<LoadedModel, LoadError> {
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
    let weights = match requantize {
        Requantize::None => ModelWeights::from_gguf(content, &mut file, device),
        Requantize::Q8_0 => requantized(&content, &mut file, device)
            .and_then(|(c, mut buf)| ModelWeights::from_gguf(c, &mut buf, device)),
    }
    .map_err(|e| format(first_line(&e)))?;
    Ok(LoadedModel {
        weights: Weights::Quantized(Box::new(weights)),
        tokenizer,
        chat_template,
        eos_token_ids,
        // RoPE tables are precomputed for MAX_SEQ_LEN positions.
        context_length: gguf_context.min(MAX_SEQ_LEN),
        vocab_size,
        load_seconds: started.elapsed().as_secs_f64(),
        device: device.clone(),
    })
}

/// Rewrite the model in memory with its 4/5-bit tensors as Q8_0.
fn requantized(
    content: &gguf_file::Content,
    file: &mut std::fs::File,
    device: &Device,
) -> candle_core::Result<(gguf_file::Content, std::io::Cursor<Vec<u8>>)> {
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(&str, QTensor)> = Vec::with_capacity(names.len());
    for name in names {
        let tensor = content.tensor(file, name, device)?;
        let small = matches!(
            tensor.dtype(),
            GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1
        );
        let row = tensor.shape().dims().last().copied().unwrap_or(0);
        let tensor = if small && row % GgmlDType::Q8_0.block_size() == 0 {
            QTensor::quantize(&tensor.dequantize(device)?, GgmlDType::Q8_0)?
        } else {
            tensor
        };
        tensors.push((name.as_str(), tensor));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let mut buffer = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut buffer, &metadata, &refs)?;
    buffer.set_position(0);
    let rewritten = gguf_file::Content::read(&mut buffer)?;
    Ok((rewritten, buffer))
}
