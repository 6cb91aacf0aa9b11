//! Embedding models: BERT-family sentence encoders in the Hugging Face
//! layout that sentence-transformers writes (all-MiniLM-L6-v2 and its
//! kind): `config.json` (`model_type: bert`), `model.safetensors`,
//! `tokenizer.json`, and sentence-transformers' `modules.json`,
//! `1_Pooling/config.json` and `sentence_bert_config.json`, which say how
//! token vectors become one sentence vector (mean or CLS pooling, then L2
//! normalization or not) and how many tokens a sentence keeps.
//!
//! The encoder is candle-transformers' BERT. A request's inputs run as one
//! batch, padded to the longest, each truncated to the model's window as
//! the reference implementation truncates it.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use serde::Deserialize;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::error::{BuildError, CandleError};
use super::safetensors::HfDir;
use super::LoadError;

/// Inputs per forward pass.
pub const BATCH: usize = 32;

/// How token vectors become the sentence's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pooling {
    /// The mean of the tokens' vectors (padding left out).
    Mean,
    /// The first token's (`[CLS]`).
    Cls,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
}

#[derive(Deserialize)]
struct SentenceConfig {
    max_seq_length: Option<usize>,
}

#[derive(Deserialize)]
struct Module {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct Kind {
    model_type: Option<String>,
}

/// Whether `dir` holds an embedding model this module loads.
pub fn is_embedding_model(dir: &Path) -> bool {
    HfDir::new(dir)
        .optional_json::<Kind>("config.json")
        .and_then(|k| k.model_type)
        .is_some_and(|t| t == "bert")
}

/// A loaded sentence encoder.
pub struct Embedder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    pooling: Pooling,
    normalize: bool,
    /// Length of the vectors.
    pub dimensions: usize,
    /// Tokens of an input that count; the rest is cut.
    pub max_tokens: usize,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("dimensions", &self.dimensions)
            .field("max_tokens", &self.max_tokens)
            .field("pooling", &self.pooling)
            .field("normalize", &self.normalize)
            .finish()
    }
}

/// Why inputs could not be embedded.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The tokenizer refused an input.
    #[error("cannot tokenize the input: {0}")]
    Tokenize(String),
    /// The forward pass failed.
    #[error("the embedding pass failed: {0}")]
    Forward(#[from] CandleError),
}

impl From<candle_core::Error> for EmbedError {
    fn from(e: candle_core::Error) -> Self {
        Self::Forward(e.into())
    }
}

impl Embedder {
    /// Load the model in `dir` onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, LoadError> {
        let hf = HfDir::new(dir);
        let config: Config = hf.config()?;
        let dimensions = config.hidden_size;
        let mut tokenizer = hf.tokenizer()?;
        // sentence-transformers' own files, when present.
        let pooling = match hf.optional_json::<PoolingConfig>("1_Pooling/config.json") {
            Some(p) if p.pooling_mode_cls_token => Pooling::Cls,
            _ => Pooling::Mean,
        };
        let normalize = hf
            .optional_json::<Vec<Module>>("modules.json")
            .is_some_and(|m| m.iter().any(|m| m.kind.ends_with("Normalize")));
        let max_tokens = hf
            .optional_json::<SentenceConfig>("sentence_bert_config.json")
            .and_then(|c| c.max_seq_length)
            .unwrap_or(config.max_position_embeddings)
            .min(config.max_position_embeddings);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..TruncationParams::default()
            }))
            .map_err(|e| hf.error(BuildError::TokenizerJson(e)))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..PaddingParams::default()
        }));
        let weights = dir.join("model.safetensors");
        // Read into memory rather than mapped: no unsafe code here.
        let bytes = hf.read("model.safetensors")?;
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, device).map_err(|e| {
            hf.error(BuildError::Shard {
                path: weights.clone(),
                source: e.into(),
            })
        })?;
        let model = BertModel::load(vb, &config).map_err(|e| {
            hf.error(BuildError::Shard {
                path: weights,
                source: e.into(),
            })
        })?;
        Ok(Self {
            model,
            tokenizer,
            device: device.clone(),
            pooling,
            normalize,
            dimensions,
            max_tokens,
        })
    }

    /// Embed `inputs`: one vector per input, in order, and the tokens they
    /// counted (after truncation). They run in batches of [`BATCH`], each
    /// padded to its longest: the attention scores of a batch take
    /// `BATCH x heads x window²` floats (100 MB for all-MiniLM-L6-v2 at its
    /// 256-token window), which bounds what one request holds at once.
    pub fn embed(&self, inputs: &[String]) -> Result<(Vec<Vec<f32>>, usize), EmbedError> {
        let mut vectors = Vec::with_capacity(inputs.len());
        let mut tokens = 0;
        for batch in inputs.chunks(BATCH) {
            let (v, t) = self.embed_batch(batch)?;
            vectors.extend(v);
            tokens += t;
        }
        Ok((vectors, tokens))
    }

    fn embed_batch(&self, inputs: &[String]) -> Result<(Vec<Vec<f32>>, usize), EmbedError> {
        let encodings = self
            .tokenizer
            .encode_batch(inputs.to_vec(), true)
            .map_err(|e| EmbedError::Tokenize(e.to_string()))?;
        let batch = encodings.len();
        let len = encodings.first().map_or(0, |e| e.get_ids().len());
        let mut ids = Vec::with_capacity(batch * len);
        let mut mask = Vec::with_capacity(batch * len);
        let mut tokens = 0;
        for e in &encodings {
            ids.extend_from_slice(e.get_ids());
            mask.extend_from_slice(e.get_attention_mask());
            tokens += e.get_attention_mask().iter().filter(|&&m| m == 1).count();
        }
        let ids = Tensor::from_vec(ids, (batch, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (batch, len), &self.device)?;
        let types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?;
        let pooled = match self.pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => {
                let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
                let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
                let counts = mask.sum(1)?.clamp(1e-9, f32::MAX)?;
                summed.broadcast_div(&counts)?
            }
        };
        let pooled = if self.normalize {
            let norms = pooled
                .sqr()?
                .sum_keepdim(1)?
                .sqrt()?
                .clamp(1e-12, f32::MAX)?;
            pooled.broadcast_div(&norms)?
        } else {
            pooled
        };
        Ok((pooled.to_vec2::<f32>()?, tokens))
    }
}
