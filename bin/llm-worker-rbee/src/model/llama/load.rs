//! Reading a llama-family model's shape and weights from a GGUF file or a
//! safetensors directory, for the CPU kernels or a candle device.
//!
//! Both files name the same tensors differently, and Hugging Face stores
//! the query and key rows of each head in two halves (`rotate_half`), where
//! GGUF interleaves them; the loader interleaves Hugging Face's rows as
//! llama.cpp's converter does, so one rotation serves both.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::kernels::packed::{PackedMatrix, SourceType};
use crate::model::error::BuildError;

use super::cpu::{CpuLayer, CpuWeights};
use super::device::{DeviceLayer, DeviceMatrix, DeviceWeights};
use super::{LlamaConfig, RopeScaling};

/// A weight of the model, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Weight {
    Embed,
    Head,
    Norm,
    AttnNorm,
    FfnNorm,
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Weight {
    fn gguf_name(self, layer: usize) -> String {
        let block = |s: &str| format!("blk.{layer}.{s}.weight");
        match self {
            Self::Embed => "token_embd.weight".to_owned(),
            Self::Head => "output.weight".to_owned(),
            Self::Norm => "output_norm.weight".to_owned(),
            Self::AttnNorm => block("attn_norm"),
            Self::FfnNorm => block("ffn_norm"),
            Self::Q => block("attn_q"),
            Self::K => block("attn_k"),
            Self::V => block("attn_v"),
            Self::O => block("attn_output"),
            Self::Gate => block("ffn_gate"),
            Self::Up => block("ffn_up"),
            Self::Down => block("ffn_down"),
        }
    }

    fn hf_name(self, layer: usize) -> String {
        let block = |s: &str| format!("model.layers.{layer}.{s}.weight");
        match self {
            Self::Embed => "model.embed_tokens.weight".to_owned(),
            Self::Head => "lm_head.weight".to_owned(),
            Self::Norm => "model.norm.weight".to_owned(),
            Self::AttnNorm => block("input_layernorm"),
            Self::FfnNorm => block("post_attention_layernorm"),
            Self::Q => block("self_attn.q_proj"),
            Self::K => block("self_attn.k_proj"),
            Self::V => block("self_attn.v_proj"),
            Self::O => block("self_attn.o_proj"),
            Self::Gate => block("mlp.gate_proj"),
            Self::Up => block("mlp.up_proj"),
            Self::Down => block("mlp.down_proj"),
        }
    }

    /// The matrix shape `(rows, k)` the forward pass expects.
    fn shape(self, c: &LlamaConfig) -> (usize, usize) {
        match self {
            Self::Embed | Self::Head => (c.vocab, c.hidden),
            Self::Q => (c.q_dim(), c.hidden),
            Self::K | Self::V => (c.kv_dim(), c.hidden),
            Self::O => (c.hidden, c.q_dim()),
            Self::Gate | Self::Up => (c.ffn, c.hidden),
            Self::Down => (c.hidden, c.ffn),
            Self::Norm | Self::AttnNorm | Self::FfnNorm => (c.hidden, 1),
        }
    }
}

/// Where the weights come from.
pub(crate) enum Source<'a> {
    /// A GGUF file: its header and the file.
    Gguf {
        content: &'a gguf_file::Content,
        file: &'a mut std::fs::File,
        /// Dequantize every weight to f32 instead of packing it as stored.
        dequantize: bool,
    },
    /// The tensors of a safetensors directory, all shards.
    Safetensors(HashMap<String, Tensor>),
}

fn metadata_u64(content: &gguf_file::Content, key: &str) -> Option<u64> {
    content.metadata.get(key).and_then(|v| v.to_u64().ok())
}

fn metadata_f32(content: &gguf_file::Content, key: &str) -> Option<f32> {
    use gguf_file::Value;
    match content.metadata.get(key)? {
        Value::F32(v) => Some(*v),
        Value::F64(v) => Some(*v as f32),
        other => other.to_u64().ok().map(|v| v as f32),
    }
}

/// The model's shape from a GGUF header (architecture `llama`).
pub fn config_from_gguf(content: &gguf_file::Content) -> Result<LlamaConfig, BuildError> {
    let need = |key: &str| {
        metadata_u64(content, &format!("llama.{key}"))
            .map(|v| v as usize)
            .ok_or_else(|| BuildError::MissingMetadata(format!("llama.{key}")))
    };
    let hidden = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let kv_heads = need("attention.head_count_kv").unwrap_or(heads);
    let head_dim = need("attention.key_length").unwrap_or(hidden / heads.max(1));
    let vocab = content
        .tensor_infos
        .get("token_embd.weight")
        .map(|t| t.shape.dims()[0])
        .ok_or_else(|| BuildError::MissingTensor("token_embd.weight".to_owned()))?;
    let scaling = match content
        .metadata
        .get("llama.rope.scaling.type")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
    {
        None | Some("none") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear(
            metadata_f32(content, "llama.rope.scaling.factor")
                .ok_or(BuildError::LinearRopeFactor)?,
        ),
        Some(other) => return Err(BuildError::RopeKind(other.to_owned())),
    };
    let mut config = LlamaConfig {
        vocab,
        hidden,
        ffn: need("feed_forward_length")?,
        layers: need("block_count")?,
        heads,
        kv_heads,
        head_dim,
        rope_dim: need("rope.dimension_count").unwrap_or(head_dim),
        rope_theta: metadata_f32(content, "llama.rope.freq_base").unwrap_or(10_000.0),
        rope_scaling: scaling,
        rms_eps: metadata_f32(content, "llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        max_context: need("context_length").unwrap_or(4096),
    };
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        // Llama 3.1 files carry their frequency divisors as a tensor.
        config.rope_scaling = RopeScaling::Factors(Vec::new());
    }
    Ok(config)
}

/// The model's shape from a Hugging Face `config.json`.
pub fn config_from_json(json: &serde_json::Value) -> Result<LlamaConfig, BuildError> {
    let need = |key: &str| {
        json.get(key)
            .and_then(serde_json::Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| BuildError::MissingConfig(key.to_owned()))
    };
    let float = |key: &str, default: f64| {
        json.get(key)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(default)
    };
    let hidden = need("hidden_size")?;
    let heads = need("num_attention_heads")?;
    let head_dim = need("head_dim").unwrap_or(hidden / heads.max(1));
    let scaling = match json.get("rope_scaling").filter(|v| !v.is_null()) {
        None => RopeScaling::None,
        Some(s) => {
            let kind = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(serde_json::Value::as_str)
                .unwrap_or("default");
            let f = |key: &str| {
                s.get(key)
                    .and_then(serde_json::Value::as_f64)
                    .map(|v| v as f32)
                    .ok_or_else(|| BuildError::RopeKey {
                        kind: kind.to_owned(),
                        key: key.to_owned(),
                    })
            };
            match kind {
                "default" => RopeScaling::None,
                "linear" => RopeScaling::Linear(f("factor")?),
                "llama3" => RopeScaling::Llama3 {
                    factor: f("factor")?,
                    low_freq_factor: f("low_freq_factor")?,
                    high_freq_factor: f("high_freq_factor")?,
                    original_max_position: f("original_max_position_embeddings")? as usize,
                },
                other => return Err(BuildError::RopeKind(other.to_owned())),
            }
        }
    };
    Ok(LlamaConfig {
        vocab: need("vocab_size")?,
        hidden,
        ffn: need("intermediate_size")?,
        layers: need("num_hidden_layers")?,
        heads,
        kv_heads: need("num_key_value_heads").unwrap_or(heads),
        head_dim,
        rope_dim: head_dim,
        rope_theta: float("rope_theta", 10_000.0) as f32,
        rope_scaling: scaling,
        rms_eps: float("rms_norm_eps", 1e-5) as f32,
        max_context: need("max_position_embeddings").unwrap_or(4096),
    })
}

fn source_type(dtype: GgmlDType) -> Option<SourceType> {
    Some(match dtype {
        GgmlDType::Q4_0 => SourceType::Q4_0,
        GgmlDType::Q4_1 => SourceType::Q4_1,
        GgmlDType::Q8_0 => SourceType::Q8_0,
        GgmlDType::Q4K => SourceType::Q4K,
        GgmlDType::Q6K => SourceType::Q6K,
        GgmlDType::F32 => SourceType::F32,
        GgmlDType::F16 => SourceType::F16,
        GgmlDType::BF16 => SourceType::BF16,
        _ => return None,
    })
}

impl Source<'_> {
    fn name(&self, w: Weight, layer: usize) -> String {
        match self {
            Self::Gguf { .. } => w.gguf_name(layer),
            Self::Safetensors(_) => w.hf_name(layer),
        }
    }

    /// Whether the file has this weight (the head is absent when tied).
    pub(crate) fn has(&self, w: Weight) -> bool {
        let name = self.name(w, 0);
        match self {
            Self::Gguf { content, .. } => content.tensor_infos.contains_key(&name),
            Self::Safetensors(t) => t.contains_key(&name),
        }
    }

    /// Read a GGUF tensor's stored bytes.
    fn gguf_bytes(&mut self, name: &str) -> Result<(GgmlDType, Vec<usize>, Vec<u8>), BuildError> {
        let Self::Gguf { content, file, .. } = self else {
            unreachable!("GGUF only")
        };
        let info = content
            .tensor_infos
            .get(name)
            .ok_or_else(|| BuildError::MissingTensor(name.to_owned()))?;
        let dims = info.shape.dims().to_vec();
        let elems = info.shape.elem_count();
        let block = info.ggml_dtype.block_size();
        let size = elems / block * info.ggml_dtype.type_size();
        let mut bytes = vec![0u8; size];
        file.seek(SeekFrom::Start(content.tensor_data_offset + info.offset))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(|source| BuildError::Read {
                name: name.to_owned(),
                source,
            })?;
        Ok((info.ggml_dtype, dims, bytes))
    }

    /// A safetensors weight as f32 on the CPU, query/key rows interleaved.
    fn hf_tensor(&self, w: Weight, layer: usize, c: &LlamaConfig) -> Result<Tensor, BuildError> {
        let Self::Safetensors(tensors) = self else {
            unreachable!("safetensors only")
        };
        let name = w.hf_name(layer);
        let t = tensors
            .get(&name)
            .ok_or_else(|| BuildError::MissingTensor(name.clone()))?
            .to_dtype(DType::F32)
            .map_err(BuildError::tensor(&name))?;
        let heads = match w {
            Weight::Q => c.heads,
            Weight::K => c.kv_heads,
            _ => return Ok(t),
        };
        interleave_halves(&t, heads, c.head_dim).map_err(BuildError::tensor(&name))
    }

    /// A weight matrix packed for the CPU kernels.
    pub(crate) fn cpu_matrix(
        &mut self,
        w: Weight,
        layer: usize,
        c: &LlamaConfig,
    ) -> Result<PackedMatrix, BuildError> {
        let (rows, k) = w.shape(c);
        let name = self.name(w, layer);
        let packed = match self {
            Self::Gguf { dequantize, .. } => {
                let dequantize = *dequantize;
                let (dtype, dims, bytes) = self.gguf_bytes(&name)?;
                check_dims(&name, &dims, rows, k)?;
                match source_type(dtype) {
                    Some(ty) if !dequantize => PackedMatrix::pack(ty, &bytes, rows, k),
                    _ => {
                        let Self::Gguf { content, file, .. } = self else {
                            unreachable!("GGUF")
                        };
                        let values = content
                            .tensor(*file, &name, &Device::Cpu)
                            .and_then(|t| t.dequantize(&Device::Cpu))
                            .map_err(BuildError::tensor(&name))?;
                        if dequantize {
                            let bytes = f32_bytes(&values).map_err(BuildError::tensor(&name))?;
                            PackedMatrix::pack(SourceType::F32, &bytes, rows, k)
                        } else {
                            tracing::warn!(tensor = %name, dtype = ?dtype, "no CPU kernel for this type; repacked as Q8_0");
                            let q8 = QTensor::quantize(&values, GgmlDType::Q8_0)
                                .and_then(|t| t.data().map(|d| d.into_owned()))
                                .map_err(BuildError::tensor(&name))?;
                            PackedMatrix::pack(SourceType::Q8_0, &q8, rows, k)
                        }
                    }
                }
            }
            Self::Safetensors(_) => {
                let t = self.hf_tensor(w, layer, c)?;
                check_dims(&name, t.dims(), rows, k)?;
                let bytes = f32_bytes(&t).map_err(BuildError::tensor(&name))?;
                PackedMatrix::pack(SourceType::F32, &bytes, rows, k)
            }
        };
        packed.map_err(|source| BuildError::Pack { name, source })
    }

    /// A vector (norm weights, rope factors) as f32.
    pub(crate) fn vector(&mut self, name_of: Weight, layer: usize) -> Result<Vec<f32>, BuildError> {
        let name = self.name(name_of, layer);
        self.vector_named(&name)
    }

    fn vector_named(&mut self, name: &str) -> Result<Vec<f32>, BuildError> {
        let t = match self {
            Self::Gguf { content, file, .. } => content
                .tensor(*file, name, &Device::Cpu)
                .and_then(|t| t.dequantize(&Device::Cpu)),
            Self::Safetensors(tensors) => tensors
                .get(name)
                .ok_or_else(|| BuildError::MissingTensor(name.to_owned()))?
                .to_dtype(DType::F32),
        };
        t.and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(BuildError::tensor(name))
    }

    /// A weight matrix for a candle device: quantized from GGUF, dense
    /// (`dtype`) from safetensors.
    pub(crate) fn device_matrix(
        &mut self,
        w: Weight,
        layer: usize,
        c: &LlamaConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<DeviceMatrix, BuildError> {
        let (rows, k) = w.shape(c);
        let name = self.name(w, layer);
        let err = BuildError::tensor(&name);
        match self {
            Self::Gguf { content, file, .. } => {
                let q = content.tensor(*file, &name, device).map_err(err)?;
                check_dims(&name, q.shape().dims(), rows, k)?;
                Ok(DeviceMatrix::Quantized(
                    QMatMul::from_arc(std::sync::Arc::new(q)).map_err(err)?,
                ))
            }
            Self::Safetensors(_) => {
                let t = self.hf_tensor(w, layer, c)?;
                check_dims(&name, t.dims(), rows, k)?;
                Ok(DeviceMatrix::Dense(
                    t.to_dtype(dtype)
                        .and_then(|t| t.to_device(device))
                        .map_err(err)?,
                ))
            }
        }
    }

    /// The embedding table as a dense tensor on `device`.
    pub(crate) fn device_embedding(
        &mut self,
        c: &LlamaConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor, BuildError> {
        let name = self.name(Weight::Embed, 0);
        let err = BuildError::tensor(&name);
        let t = match self {
            Self::Gguf { content, file, .. } => content
                .tensor(*file, &name, &Device::Cpu)
                .and_then(|q| q.dequantize(&Device::Cpu))
                .map_err(err)?,
            Self::Safetensors(_) => self.hf_tensor(Weight::Embed, 0, c)?,
        };
        check_dims(&name, t.dims(), c.vocab, c.hidden)?;
        t.to_dtype(dtype)
            .and_then(|t| t.to_device(device))
            .map_err(err)
    }

    /// Llama 3.1 GGUF rope frequency divisors, when the file has them.
    pub(crate) fn rope_factors(&mut self) -> Result<Option<Vec<f32>>, BuildError> {
        match self {
            Self::Gguf { content, .. }
                if content.tensor_infos.contains_key("rope_freqs.weight") =>
            {
                self.vector_named("rope_freqs.weight").map(Some)
            }
            _ => Ok(None),
        }
    }
}

/// A tensor's values as little-endian f32 bytes.
fn f32_bytes(t: &Tensor) -> candle_core::Result<Vec<u8>> {
    let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

fn check_dims(name: &str, dims: &[usize], rows: usize, k: usize) -> Result<(), BuildError> {
    let ok = match dims {
        [r, kk] => *r == rows && *kk == k,
        [n] => k == 1 && *n == rows,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(BuildError::TensorShape {
            name: name.to_owned(),
            dims: dims.to_vec(),
            rows,
            k,
        })
    }
}

/// Hugging Face keeps each head's query/key rows as two halves (rotated
/// against each other); interleave them, as GGUF converters do.
fn interleave_halves(t: &Tensor, heads: usize, head_dim: usize) -> candle_core::Result<Tensor> {
    let (rows, k) = t.dims2()?;
    t.reshape((heads, 2, head_dim / 2, k))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, k))
}

/// The CPU model's weights.
pub(crate) fn cpu_weights(
    source: &mut Source<'_>,
    c: &LlamaConfig,
) -> Result<CpuWeights, BuildError> {
    let mut layers = Vec::with_capacity(c.layers);
    for l in 0..c.layers {
        let mut m = |w| source.cpu_matrix(w, l, c);
        let (q, k, v, o) = (m(Weight::Q)?, m(Weight::K)?, m(Weight::V)?, m(Weight::O)?);
        let (gate, up, down) = (m(Weight::Gate)?, m(Weight::Up)?, m(Weight::Down)?);
        layers.push(CpuLayer {
            attn_norm: source.vector(Weight::AttnNorm, l)?,
            ffn_norm: source.vector(Weight::FfnNorm, l)?,
            q,
            k,
            v,
            o,
            gate,
            up,
            down,
        });
    }
    let head = if source.has(Weight::Head) {
        Some(source.cpu_matrix(Weight::Head, 0, c)?)
    } else {
        None
    };
    Ok(CpuWeights {
        embed: source.cpu_matrix(Weight::Embed, 0, c)?,
        head,
        norm: source.vector(Weight::Norm, 0)?,
        layers,
    })
}

/// A candle device model's weights.
pub(crate) fn device_weights(
    source: &mut Source<'_>,
    c: &LlamaConfig,
    device: &Device,
    dtype: DType,
) -> Result<DeviceWeights, BuildError> {
    let vector = |source: &mut Source<'_>, w: Weight, l| -> Result<Tensor, BuildError> {
        let v = source.vector(w, l)?;
        Tensor::new(v.as_slice(), device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| BuildError::tensor(&source.name(w, l))(e))
    };
    let mut layers = Vec::with_capacity(c.layers);
    for l in 0..c.layers {
        let mut m = |w| source.device_matrix(w, l, c, device, dtype);
        let (q, k, v, o) = (m(Weight::Q)?, m(Weight::K)?, m(Weight::V)?, m(Weight::O)?);
        let (gate, up, down) = (m(Weight::Gate)?, m(Weight::Up)?, m(Weight::Down)?);
        layers.push(DeviceLayer {
            attn_norm: vector(source, Weight::AttnNorm, l)?,
            ffn_norm: vector(source, Weight::FfnNorm, l)?,
            q,
            k,
            v,
            o,
            gate,
            up,
            down,
        });
    }
    let embed = source.device_embedding(c, device, dtype)?;
    let head = if source.has(Weight::Head) {
        source.device_matrix(Weight::Head, 0, c, device, dtype)?
    } else {
        match source {
            // Tied: the quantized embedding is the head.
            Source::Gguf { .. } => source.device_matrix(Weight::Embed, 0, c, device, dtype)?,
            // Tied and dense: the same tensor (a clone shares its storage).
            Source::Safetensors(_) => DeviceMatrix::Dense(embed.clone()),
        }
    };
    Ok(DeviceWeights {
        embed,
        head,
        norm: vector(source, Weight::Norm, 0)?,
        layers,
    })
}
