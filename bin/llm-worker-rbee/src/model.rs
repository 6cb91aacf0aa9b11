//! Loading a model: weights, tokenizer, chat template, limits.
//!
//! GGUF files carry everything: quantized llama-family weights, the
//! tokenizer ([`tokenizer`]) and the chat template ([`chat`]).
//! Safetensors llama-family directories ([`safetensors`]) carry
//! `config.json`, the weights and `tokenizer.json`. Both load into the one
//! forward pass of [`llama`]: the project's kernels on the CPU, candle's on
//! a GPU device.

pub mod chat;
pub mod embed;
pub(crate) mod error;
pub mod grammar;
pub mod llama;
pub(crate) mod safetensors;
pub(crate) mod tokenizer;
pub mod tools;

use std::path::Path;
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device};

use self::chat::ChatTemplate;
use self::error::BuildError;
use self::llama::cpu::{CpuModel, CpuShape, KvType};
use self::llama::device::DeviceModel;
use self::llama::load::{self as weights, Source};
use self::llama::{Forward, LlamaConfig, RopeScaling, KV_BLOCK};

/// Prompt tokens one forward pass takes at most: a longer prompt is run in
/// chunks of this many, each a step of the engine.
pub const PREFILL_CHUNK: usize = 256;

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
    /// Not a model the worker can build: its format, shape or tensors, or
    /// the host's limits.
    #[error("cannot load model {path}: {}", rbee_api::error::chain(source))]
    Build {
        /// The model path.
        path: String,
        /// What is wrong.
        source: BuildError,
    },
    /// The model's chat template does not compile.
    #[error("cannot load model {path}: {}", rbee_api::error::chain(source))]
    Template {
        /// The model path.
        path: String,
        /// The cause.
        source: chat::TemplateError,
    },
}

/// How to load a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Positions the KV cache pool holds, all sequences together; rounded
    /// up to whole blocks, and at least one full context.
    pub cache_positions: usize,
    /// Positions per sequence; capped at what the model was trained for.
    pub context: usize,
    /// Compute threads on the CPU.
    pub threads: usize,
    /// The KV cache's element type (CPU only; devices cache in the
    /// activations' type).
    pub kv: KvType,
    /// Run candle's device path even on the CPU device, instead of the
    /// project's kernels (for comparing the two).
    pub candle_on_cpu: bool,
    /// Dequantize a GGUF file's weights to f32 at load for the CPU kernels
    /// (candle devices ignore it), so every product takes f32 activations:
    /// about 8 times the weights' memory and a fraction of the speed, for
    /// measuring the forward pass against a reference without the 8-bit
    /// rounding of activations.
    pub dequantize: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            cache_positions: 0,
            context: 4096,
            threads: default_threads(),
            kv: KvType::default(),
            candle_on_cpu: false,
            dequantize: false,
        }
    }
}

/// Refuse a KV cache larger than the host's memory: it is reserved at load
/// (its pages become resident as they are written), and a reservation the
/// host cannot back would end the process when the allocator gives up.
fn check_cache_fits(
    per_position: usize,
    positions: usize,
    host: Option<u64>,
) -> Result<(), BuildError> {
    let needed = per_position as u64 * positions as u64;
    match host {
        Some(host) if needed > host => Err(BuildError::CacheTooLarge {
            positions,
            needed,
            host,
        }),
        _ => Ok(()),
    }
}

/// The host's memory (`MemTotal`), where `/proc/meminfo` says.
pub fn host_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The CPUs this process may run on (affinity and cgroup quota aware).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// A model ready for the engine.
pub struct LoadedModel {
    /// The forward pass, with its KV cache for every sequence.
    pub model: Box<dyn Forward>,
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
    /// What runs the forward pass, for the log: kernels, threads, weight bytes.
    pub engine_summary: String,
    /// Bytes of weights a token's forward pass reads (CPU; 0 on devices).
    pub weight_bytes: usize,
    /// Bytes of KV cache a token reads per cached position (CPU; 0 on devices).
    pub kv_bytes_per_position: usize,
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

/// The candle device for `backend` and `ordinal`, when this build has the backend.
pub fn device(backend: rbee_api::worker::Backend, ordinal: u32) -> Result<Device, DeviceError> {
    use rbee_api::worker::Backend;
    let _ = ordinal;
    match backend {
        Backend::Cpu => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        Backend::Cuda => Device::new_cuda(ordinal as usize).map_err(|e| DeviceError::Open {
            backend,
            ordinal,
            source: e.into(),
        }),
        #[cfg(feature = "metal")]
        Backend::Metal => Device::new_metal(ordinal as usize).map_err(|e| DeviceError::Open {
            backend,
            ordinal,
            source: e.into(),
        }),
        #[cfg(not(feature = "cuda"))]
        Backend::Cuda => Err(DeviceError::NotBuilt(backend)),
        #[cfg(not(feature = "metal"))]
        Backend::Metal => Err(DeviceError::NotBuilt(backend)),
    }
}

/// Why the worker cannot use the device it was given.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// This binary was built without the backend.
    #[error("backend `{0}` is not built into this binary (build with --features {0})")]
    NotBuilt(rbee_api::worker::Backend),
    /// The device could not be opened.
    #[error("cannot open {backend} device {ordinal}")]
    Open {
        /// The backend.
        backend: rbee_api::worker::Backend,
        /// The device index.
        ordinal: u32,
        /// candle's error.
        source: error::CandleError,
    },
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
pub fn load(path: &Path, device: &Device, options: LoadOptions) -> Result<LoadedModel, LoadError> {
    if path.is_dir() {
        safetensors::load_safetensors(path, device, options)
    } else {
        load_gguf(path, device, options)
    }
}

/// Load a GGUF llama-family model onto `device`.
pub fn load_gguf(
    path: &Path,
    device: &Device,
    options: LoadOptions,
) -> Result<LoadedModel, LoadError> {
    let started = Instant::now();
    let shown = path.display().to_string();
    let format = |source: BuildError| LoadError::Build {
        path: shown.clone(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(|source| LoadError::Io {
        path: shown.clone(),
        source,
    })?;
    let content =
        gguf_file::Content::read(&mut file).map_err(|e| format(BuildError::Gguf(e.into())))?;
    let arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if arch != "llama" {
        return Err(format(BuildError::Architecture(arch)));
    }
    let tokenizer = tokenizer::from_gguf(&content).map_err(format)?;
    let chat_template =
        ChatTemplate::from_gguf(&content).map_err(|source| LoadError::Template {
            path: shown.clone(),
            source,
        })?;
    let eos_token_ids = tokenizer::eos_ids(&content, &tokenizer);
    let config = weights::config_from_gguf(&content).map_err(format)?;
    let mut source = Source::Gguf {
        content: &content,
        file: &mut file,
        dequantize: options.dequantize,
    };
    let built = build(config, &mut source, device, DType::F32, options).map_err(format)?;
    Ok(built.loaded(tokenizer, chat_template, eos_token_ids, started))
}

pub(crate) struct Built {
    pub(crate) model: Box<dyn Forward>,
    pub(crate) summary: String,
    pub(crate) weight_bytes: usize,
    pub(crate) kv_bytes_per_position: usize,
}

impl Built {
    /// The loaded model, with what the file said besides the weights.
    pub(crate) fn loaded(
        self,
        tokenizer: tokenizers::Tokenizer,
        chat_template: ChatTemplate,
        eos_token_ids: Vec<u32>,
        started: Instant,
    ) -> LoadedModel {
        LoadedModel {
            vocab_size: self.model.config().vocab,
            context_length: self.model.limits().context,
            model: self.model,
            tokenizer,
            chat_template,
            eos_token_ids,
            load_seconds: started.elapsed().as_secs_f64(),
            engine_summary: self.summary,
            weight_bytes: self.weight_bytes,
            kv_bytes_per_position: self.kv_bytes_per_position,
        }
    }
}

/// The forward pass for `config` from `source`: the CPU kernels on the
/// CPU, candle on other devices (activations in `dtype` there).
pub(crate) fn build(
    mut config: LlamaConfig,
    source: &mut Source<'_>,
    device: &Device,
    dtype: DType,
    options: LoadOptions,
) -> Result<Built, BuildError> {
    if let Some(factors) = source.rope_factors()? {
        config.rope_scaling = RopeScaling::Factors(factors);
    }
    config.validate()?;
    let context = options.context.min(config.max_context).max(1);
    let blocks = options.cache_positions.max(context).div_ceil(KV_BLOCK);
    if device.is_cpu() && !options.candle_on_cpu {
        let kv_bytes_per_position =
            2 * config.layers * config.kv_dim() * options.kv.element_bytes();
        check_cache_fits(
            kv_bytes_per_position,
            blocks * KV_BLOCK,
            host_memory_bytes(),
        )?;
        let weights = weights::cpu_weights(source, &config)?;
        let bytes = weights.size_bytes();
        let shape = CpuShape {
            blocks,
            context,
            max_rows: PREFILL_CHUNK,
            threads: options.threads,
            kv: options.kv,
        };
        let model = CpuModel::new(config, weights, shape).map_err(BuildError::Threads)?;
        let summary = format!(
            "cpu kernels {}, {} threads, {:.1} MB of weights, {:?} KV cache of {} blocks of {} \
             positions ({:.1} MB)",
            crate::kernels::isa().name(),
            model.threads(),
            bytes as f64 / 1e6,
            options.kv,
            blocks,
            KV_BLOCK,
            (blocks * KV_BLOCK * kv_bytes_per_position) as f64 / 1e6
        );
        Ok(Built {
            model: Box::new(model),
            summary,
            weight_bytes: bytes,
            kv_bytes_per_position,
        })
    } else {
        let weights = weights::device_weights(source, &config, device, dtype)?;
        let model = DeviceModel::new(
            config,
            weights,
            blocks,
            context,
            PREFILL_CHUNK,
            dtype,
            device,
        )
        .map_err(|e| BuildError::Device(e.into()))?;
        Ok(Built {
            model: Box::new(model),
            summary: format!("candle {device:?}, {dtype:?} activations"),
            weight_bytes: 0,
            kv_bytes_per_position: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_larger_than_the_host_is_refused_with_the_knobs_to_turn() {
        // The default model: 23,040 bytes per position in f16.
        assert!(check_cache_fits(23_040, 4096 * 64, Some(24 << 30)).is_ok());
        let err = check_cache_fits(23_040, 8192 * 64, Some(8 << 30))
            .expect_err("too big")
            .to_string();
        assert!(err.contains("524288 positions needs 11.2 GiB"), "{err}");
        assert!(err.contains("--kv-memory or --ctx"), "{err}");
        assert!(check_cache_fits(23_040, 8192 * 64, None).is_ok());
    }
}
