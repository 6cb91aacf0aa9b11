//! Safetensors llama-family directories: `config.json`, `model.safetensors`
//! (or `model-XXXXX-of-YYYYY.safetensors` shards), `tokenizer.json`, and the
//! chat template from `tokenizer_config.json` when it has one.
//!
//! Weights run in f32 on the CPU (candle's bf16 CPU kernels are slower) and
//! in bf16 on GPUs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama::{Cache, Config, Llama, LlamaConfig, LlamaEosToks};

use super::chat::ChatTemplate;
use super::{first_line, LoadError, LoadedModel, Weights};

/// A dense llama model with one sequence's cache.
#[derive(Debug)]
pub struct DenseLlama {
    model: Llama,
    cache: Cache,
    config: Config,
    dtype: DType,
    device: Device,
}

impl DenseLlama {
    pub(crate) fn forward(&mut self, input: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        self.model.forward(input, pos, &mut self.cache)?.squeeze(0)
    }

    pub(crate) fn reset(&mut self) -> candle_core::Result<()> {
        self.cache = Cache::new(true, self.dtype, &self.config, &self.device)?;
        Ok(())
    }

    pub(crate) fn fork(&self) -> candle_core::Result<Self> {
        Ok(Self {
            model: self.model.clone(),
            cache: Cache::new(true, self.dtype, &self.config, &self.device)?,
            config: self.config.clone(),
            dtype: self.dtype,
            device: self.device.clone(),
        })
    }
}

/// Load a safetensors llama directory onto `device`.
pub fn load_safetensors(dir: &Path, device: &Device) -> Result<LoadedModel, LoadError> {
    let started = Instant::now();
    let shown = dir.display().to_string();
    let format = |reason: String| LoadError::Format {
        path: shown.clone(),
        reason,
    };
    let read = |name: &str| {
        std::fs::read(dir.join(name)).map_err(|source| LoadError::Io {
            path: dir.join(name).display().to_string(),
            source,
        })
    };
    let config: LlamaConfig = serde_json::from_slice(&read("config.json")?)
        .map_err(|e| format(format!("config.json is not a llama config: {e}")))?;
    let config = config.into_config(false);
    let files = weight_files(dir).map_err(format)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for file in &files {
        let part = candle_core::safetensors::load(file, device)
            .map_err(|e| format(format!("{}: {}", file.display(), first_line(&e))))?;
        tensors.extend(part);
    }
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    let model = Llama::load(vb, &config).map_err(|e| format(first_line(&e)))?;
    let cache = Cache::new(true, dtype, &config, device).map_err(|e| format(first_line(&e)))?;

    let tokenizer = tokenizers::Tokenizer::from_bytes(read("tokenizer.json")?)
        .map_err(|e| format(format!("tokenizer.json: {e}")))?;
    let template = std::fs::read(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|v| v.get("chat_template")?.as_str().map(str::to_owned));
    let chat_template = match template {
        Some(source) => ChatTemplate::new(source, false),
        None => ChatTemplate::chatml(),
    }
    .map_err(format)?;

    let mut eos_token_ids = match &config.eos_token_id {
        Some(LlamaEosToks::Single(id)) => vec![*id],
        Some(LlamaEosToks::Multiple(ids)) => ids.clone(),
        None => Vec::new(),
    };
    for name in ["<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>"] {
        if let Some(id) = tokenizer.token_to_id(name) {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
    }
    Ok(LoadedModel {
        context_length: config.max_position_embeddings,
        vocab_size: config.vocab_size,
        weights: Weights::Dense(Box::new(DenseLlama {
            model,
            cache,
            config,
            dtype,
            device: device.clone(),
        })),
        tokenizer,
        chat_template,
        eos_token_ids,
        load_seconds: started.elapsed().as_secs_f64(),
        device: device.clone(),
    })
}

/// `model.safetensors`, else every `model-*-of-*.safetensors` shard in order.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("model-") && n.ends_with(".safetensors"))
        })
        .collect();
    shards.sort();
    if shards.is_empty() {
        return Err("no model.safetensors or model-*.safetensors shards".to_owned());
    }
    Ok(shards)
}
