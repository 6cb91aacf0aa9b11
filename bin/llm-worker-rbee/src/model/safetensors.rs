//! Safetensors llama-family directories: `config.json`, `model.safetensors`
//! (or `model-XXXXX-of-YYYYY.safetensors` shards), `tokenizer.json`, and the
//! chat template from `tokenizer_config.json` when it has one.
//!
//! Weights run in f32 on the CPU (the kernels' dense format) and in bf16 on
//! GPUs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::chat::ChatTemplate;
use super::error::BuildError;
use super::llama::load::{config_from_json, Source};
use super::{build, LoadError, LoadOptions, LoadedModel};

/// A Hugging Face model directory: its files, read with the model's path in
/// every error. Shared by the llama and the sentence-encoder loaders.
pub(super) struct HfDir<'a> {
    dir: &'a Path,
    shown: String,
}

impl<'a> HfDir<'a> {
    pub(super) fn new(dir: &'a Path) -> Self {
        Self {
            dir,
            shown: dir.display().to_string(),
        }
    }

    /// `source` as the load error of this directory.
    pub(super) fn error(&self, source: BuildError) -> LoadError {
        LoadError::Build {
            path: self.shown.clone(),
            source,
        }
    }

    /// The bytes of `name`, which must be there.
    pub(super) fn read(&self, name: &str) -> Result<Vec<u8>, LoadError> {
        let path = self.dir.join(name);
        std::fs::read(&path).map_err(|source| LoadError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// `name` read as JSON, when it is there and is the JSON expected.
    pub(super) fn optional_json<T: serde::de::DeserializeOwned>(&self, name: &str) -> Option<T> {
        let bytes = std::fs::read(self.dir.join(name)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// `config.json`, which must be there.
    pub(super) fn config<T: serde::de::DeserializeOwned>(&self) -> Result<T, LoadError> {
        serde_json::from_slice(&self.read("config.json")?)
            .map_err(|e| self.error(BuildError::ConfigJson(e)))
    }

    /// `tokenizer.json`.
    pub(super) fn tokenizer(&self) -> Result<tokenizers::Tokenizer, LoadError> {
        tokenizers::Tokenizer::from_bytes(self.read("tokenizer.json")?)
            .map_err(|e| self.error(BuildError::TokenizerJson(e)))
    }
}

/// Load a safetensors llama directory onto `device`.
pub fn load_safetensors(
    dir: &Path,
    device: &Device,
    options: LoadOptions,
) -> Result<LoadedModel, LoadError> {
    let started = Instant::now();
    let hf = HfDir::new(dir);
    let format = |source: BuildError| hf.error(source);
    let json: serde_json::Value = hf.config()?;
    let config = config_from_json(&json).map_err(format)?;
    let files = weight_files(dir)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for file in &files {
        let part = candle_core::safetensors::load(file, &Device::Cpu).map_err(|e| {
            format(BuildError::Shard {
                path: file.clone(),
                source: e.into(),
            })
        })?;
        tensors.extend(part);
    }
    let tokenizer = hf.tokenizer()?;
    let template = hf
        .optional_json::<serde_json::Value>("tokenizer_config.json")
        .and_then(|v| v.get("chat_template")?.as_str().map(str::to_owned));
    let chat_template = match template {
        Some(source) => ChatTemplate::new(source, false),
        None => ChatTemplate::chatml(),
    }
    .map_err(|source| LoadError::Template {
        path: hf.shown.clone(),
        source,
    })?;
    let mut eos_token_ids: Vec<u32> = match json.get("eos_token_id") {
        Some(serde_json::Value::Array(ids)) => ids
            .iter()
            .filter_map(|v| v.as_u64().map(|v| v as u32))
            .collect(),
        Some(v) => v.as_u64().map(|v| v as u32).into_iter().collect(),
        None => Vec::new(),
    };
    for name in ["<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>"] {
        if let Some(id) = tokenizer.token_to_id(name) {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
    }
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let mut source = Source::Safetensors(tensors);
    let built = build(config, &mut source, device, dtype, options).map_err(format)?;
    Ok(built.loaded(tokenizer, chat_template, eos_token_ids, started))
}

/// `model.safetensors`, else every `model-*-of-*.safetensors` shard in order.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| LoadError::Io {
            path: dir.display().to_string(),
            source,
        })?
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
        return Err(LoadError::Build {
            path: dir.display().to_string(),
            source: BuildError::NoShards,
        });
    }
    Ok(shards)
}
