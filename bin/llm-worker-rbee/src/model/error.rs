//! Why a model file cannot become a forward pass: its format, its shape,
//! its tensors, or the host's limits. [`super::LoadError`] names the path
//! and holds one of these as its source.

use crate::kernels::packed::PackError;

/// One candle error as its first line: candle appends a backtrace to some
/// errors' text, which has no place in a log line or a message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CandleError(String);

impl From<candle_core::Error> for CandleError {
    fn from(e: candle_core::Error) -> Self {
        Self(super::first_line(&e))
    }
}

/// A boxed error of a library that returns one (the tokenizers crate).
type Boxed = Box<dyn std::error::Error + Send + Sync>;

/// Why a model could not be built from its files.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The GGUF header cannot be read.
    #[error("not a readable GGUF file")]
    Gguf(#[source] CandleError),
    /// Not a llama-family model.
    #[error("architecture `{0}` is not supported (llama family only)")]
    Architecture(String),
    /// The GGUF tokenizer is not byte-level BPE.
    #[error("tokenizer model `{0}` is not supported (byte-level BPE `gpt2` only)")]
    TokenizerModel(String),
    /// A required GGUF metadata key is absent.
    #[error("no `{0}` in the GGUF metadata")]
    MissingMetadata(String),
    /// A GGUF metadata value has the wrong type.
    #[error("`{key}`")]
    BadMetadata {
        key: String,
        #[source]
        source: CandleError,
    },
    /// The GGUF vocabulary and merges do not make a BPE model.
    #[error("cannot build the BPE")]
    Bpe(#[source] Boxed),
    /// `config.json` is not JSON.
    #[error("config.json is not JSON")]
    ConfigJson(#[source] serde_json::Error),
    /// A required `config.json` key is absent.
    #[error("config.json has no `{0}`")]
    MissingConfig(String),
    /// `tokenizer.json` is not a tokenizer.
    #[error("tokenizer.json")]
    TokenizerJson(#[source] Boxed),
    /// A safetensors directory without weights.
    #[error("no model.safetensors or model-*.safetensors shards")]
    NoShards,
    /// A safetensors file cannot be read.
    #[error("{}", .path.display())]
    Shard {
        path: std::path::PathBuf,
        #[source]
        source: CandleError,
    },
    /// Linear rope scaling without its factor.
    #[error("linear rope scaling without `llama.rope.scaling.factor`")]
    LinearRopeFactor,
    /// A rope scaling block without one of its keys.
    #[error("rope_scaling `{kind}` has no `{key}`")]
    RopeKey { kind: String, key: String },
    /// A rope scaling kind the forward pass does not implement.
    #[error("rope scaling `{0}` is not supported")]
    RopeKind(String),
    /// The model's dimensions are not ones the forward pass runs.
    #[error(transparent)]
    Shape(#[from] ShapeError),
    /// A tensor the model needs is absent.
    #[error("no tensor `{0}`")]
    MissingTensor(String),
    /// A tensor's bytes cannot be read.
    #[error("reading `{name}`")]
    Read {
        name: String,
        #[source]
        source: std::io::Error,
    },
    /// candle failed on a tensor.
    #[error("`{name}`")]
    Tensor {
        name: String,
        #[source]
        source: CandleError,
    },
    /// candle failed building the device model.
    #[error("the device model")]
    Device(#[source] CandleError),
    /// A tensor's shape is not the one the config implies.
    #[error("`{name}` has shape {dims:?}, expected [{rows}, {k}]")]
    TensorShape {
        name: String,
        dims: Vec<usize>,
        rows: usize,
        k: usize,
    },
    /// A weight cannot be packed for the CPU kernels.
    #[error("`{name}`")]
    Pack {
        name: String,
        #[source]
        source: PackError,
    },
    /// The KV cache cannot fit the host's memory.
    #[error(
        "the KV cache of {positions} positions needs {:.1} GiB, more than this host's {:.1} \
         GiB of memory: lower --kv-memory or --ctx, or use --kv-cache f16",
        *needed as f64 / f64::from(1u32 << 30),
        *host as f64 / f64::from(1u32 << 30)
    )]
    CacheTooLarge {
        positions: usize,
        needed: u64,
        host: u64,
    },
    /// The CPU model's threads could not start.
    #[error("cannot start the compute threads")]
    Threads(#[source] std::io::Error),
}

impl BuildError {
    /// candle's error on the tensor `name`.
    pub(crate) fn tensor(name: &str) -> impl Fn(candle_core::Error) -> Self + Copy + '_ {
        move |e| Self::Tensor {
            name: name.to_owned(),
            source: e.into(),
        }
    }
}

/// Dimensions the forward pass does not run.
#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    /// A dimension is zero.
    #[error("{0} is 0")]
    Zero(&'static str),
    /// Grouped-query attention needs whole groups.
    #[error("{heads} query heads are not a multiple of {kv_heads} key/value heads")]
    Groups { heads: usize, kv_heads: usize },
    /// The attention kernels work on multiples of 16.
    #[error("head dimension {0} is not a multiple of 16")]
    HeadDim(usize),
    /// The rotary part must be even and within a head.
    #[error("rotary dimension {rope_dim} does not fit head dimension {head_dim}")]
    RopeDim { rope_dim: usize, head_dim: usize },
    /// Llama 3.1 frequency factors, one per rotary frequency.
    #[error("{got} rope frequency factors for {want} frequencies")]
    RopeFactors { got: usize, want: usize },
    /// The CPU kernels work on rows of whole 32-element blocks.
    #[error("{name} {width} is not a multiple of 32")]
    Width { name: &'static str, width: usize },
}
