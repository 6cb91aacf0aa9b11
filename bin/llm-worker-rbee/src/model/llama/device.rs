//! The forward pass on a candle device (CUDA, Metal), with candle's own
//! quantized and dense matrix products.
//!
//! The same architecture and batch contract as the CPU model: the KV cache
//! is one tensor per layer, `blocks x KV_BLOCK` rows allocated at load and
//! written in place (`slice_set`), a sequence's rows gathered from its
//! block table for its attention; grouped-query attention reads each
//! key/value head once for all the query heads that share it (queries are
//! regrouped, keys and values are never repeated). Runs on the CPU device
//! too, which is how the tests check it against the CPU kernels.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor, D};

use super::{
    check_batch, check_copy, BlockTables, Forward, ForwardError, Limits, LlamaConfig, Logits,
    RopeTable, Row, KV_BLOCK,
};

/// A weight matrix on the device.
#[derive(Debug)]
pub enum DeviceMatrix {
    /// Quantized (GGUF), through candle's quantized kernels.
    Quantized(QMatMul),
    /// Dense, `(rows, k)`.
    Dense(Tensor),
}

impl DeviceMatrix {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Quantized(q) => q.forward(x),
            Self::Dense(w) => x.matmul(&w.t()?),
        }
    }
}

/// One transformer block on the device.
#[derive(Debug)]
pub struct DeviceLayer {
    pub(crate) attn_norm: Tensor,
    pub(crate) ffn_norm: Tensor,
    pub(crate) q: DeviceMatrix,
    pub(crate) k: DeviceMatrix,
    pub(crate) v: DeviceMatrix,
    pub(crate) o: DeviceMatrix,
    pub(crate) gate: DeviceMatrix,
    pub(crate) up: DeviceMatrix,
    pub(crate) down: DeviceMatrix,
}

/// The model's weights on the device.
#[derive(Debug)]
pub struct DeviceWeights {
    pub(crate) embed: Tensor,
    pub(crate) head: DeviceMatrix,
    pub(crate) norm: Tensor,
    pub(crate) layers: Vec<DeviceLayer>,
}

/// The device model; see the module documentation.
#[derive(Debug)]
pub struct DeviceModel {
    config: LlamaConfig,
    weights: DeviceWeights,
    /// Per layer, `(blocks * KV_BLOCK, kv_heads, head_dim)`.
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    cos: Tensor,
    sin: Tensor,
    dtype: DType,
    device: Device,
    limits: Limits,
    logits: Vec<f32>,
}

fn device_err(e: candle_core::Error) -> ForwardError {
    ForwardError::Device(crate::model::first_line(&e))
}

impl DeviceModel {
    /// A model over `weights` (activations in `dtype`) with a KV cache of
    /// `blocks` blocks, sequences of up to `context` positions.
    pub fn new(
        config: LlamaConfig,
        weights: DeviceWeights,
        blocks: usize,
        context: usize,
        max_rows: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let shape = (blocks * KV_BLOCK, config.kv_heads, config.head_dim);
        let mut keys = Vec::with_capacity(config.layers);
        let mut values = Vec::with_capacity(config.layers);
        for _ in 0..config.layers {
            keys.push(Tensor::zeros(shape, dtype, device)?);
            values.push(Tensor::zeros(shape, dtype, device)?);
        }
        let table = RopeTable::new(&config, context);
        let (cos, sin, half) = table.tables();
        let cos = Tensor::from_slice(cos, (context, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_slice(sin, (context, half), device)?.to_dtype(dtype)?;
        Ok(Self {
            limits: Limits {
                blocks,
                context,
                max_rows: max_rows.max(1),
                vocab: config.vocab,
            },
            config,
            weights,
            keys,
            values,
            cos,
            sin,
            dtype,
            device: device.clone(),
            logits: Vec::new(),
        })
    }

    /// Rotate `x` `(m, heads, head_dim)` by each row's position.
    fn rotate(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let x = x.transpose(0, 1)?.contiguous()?.unsqueeze(0)?;
        let x = if c.rope_dim == c.head_dim {
            candle_nn::rotary_emb::rope_i(&x, cos, sin)?
        } else {
            let rotated = candle_nn::rotary_emb::rope_i(
                &x.narrow(D::Minus1, 0, c.rope_dim)?.contiguous()?,
                cos,
                sin,
            )?;
            let rest = x.narrow(D::Minus1, c.rope_dim, c.head_dim - c.rope_dim)?;
            Tensor::cat(&[&rotated, &rest], D::Minus1)?
        };
        x.squeeze(0)?.transpose(0, 1)?.contiguous()
    }

    fn run(&mut self, rows: &[Row], tables: &BlockTables) -> candle_core::Result<()> {
        let c = self.config.clone();
        let m = rows.len();
        let dev = &self.device;
        let tokens: Vec<u32> = rows.iter().map(|r| r.token).collect();
        let positions: Vec<u32> = rows.iter().map(|r| r.pos as u32).collect();
        let positions = Tensor::new(positions.as_slice(), dev)?;
        let cos = self.cos.index_select(&positions, 0)?;
        let sin = self.sin.index_select(&positions, 0)?;
        let mut x = self
            .weights
            .embed
            .index_select(&Tensor::new(tokens.as_slice(), dev)?, 0)?;
        let segments = segments(rows);
        let group = c.heads / c.kv_heads;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        for (l, layer) in self.weights.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let q = layer.q.forward(&h)?.reshape((m, c.heads, c.head_dim))?;
            let k = layer.k.forward(&h)?.reshape((m, c.kv_heads, c.head_dim))?;
            let v = layer.v.forward(&h)?.reshape((m, c.kv_heads, c.head_dim))?;
            let q = self.rotate(&q, &cos, &sin)?;
            let k = self.rotate(&k, &cos, &sin)?.to_dtype(self.dtype)?;
            let v = v.to_dtype(self.dtype)?.contiguous()?;
            let mut outputs = Vec::with_capacity(segments.len());
            for s in &segments {
                let (first, len) = (s.start, s.end - s.start);
                let (seq, pos0) = (rows[first].seq, rows[first].pos);
                // The segment's K/V, written block by block.
                let mut pos = pos0;
                while pos < pos0 + len {
                    let n = (KV_BLOCK - pos % KV_BLOCK).min(pos0 + len - pos);
                    let at = tables.block(seq, pos) * KV_BLOCK + pos % KV_BLOCK;
                    let from = first + pos - pos0;
                    self.keys[l].slice_set(&k.narrow(0, from, n)?.contiguous()?, 0, at)?;
                    self.values[l].slice_set(&v.narrow(0, from, n)?.contiguous()?, 0, at)?;
                    pos += n;
                }
                let total = pos0 + len;
                // The sequence's rows, gathered from its blocks:
                // (kv_heads, L, head_dim).
                let index: Vec<u32> = (0..total)
                    .map(|p| (tables.block(seq, p) * KV_BLOCK + p % KV_BLOCK) as u32)
                    .collect();
                let index = Tensor::new(index.as_slice(), dev)?;
                let keys = self.keys[l]
                    .index_select(&index, 0)?
                    .transpose(0, 1)?
                    .contiguous()?;
                let values = self.values[l]
                    .index_select(&index, 0)?
                    .transpose(0, 1)?
                    .contiguous()?;
                // Queries regrouped by the key/value head they share:
                // (kv_heads, group * len, head_dim).
                let qs = q
                    .narrow(0, first, len)?
                    .transpose(0, 1)?
                    .contiguous()?
                    .reshape((c.kv_heads, group * len, c.head_dim))?
                    .to_dtype(self.dtype)?;
                let att = (qs.matmul(&keys.t()?)? * scale)?;
                let att = att.reshape((c.kv_heads, group, len, total))?;
                let mask = causal_mask(len, pos0, dev)?.to_dtype(att.dtype())?;
                let att = att.broadcast_add(&mask)?;
                let att = candle_nn::ops::softmax_last_dim(&att.to_dtype(DType::F32)?)?
                    .to_dtype(self.dtype)?
                    .reshape((c.kv_heads, group * len, total))?;
                let out = att
                    .matmul(&values)?
                    .reshape((c.heads, len, c.head_dim))?
                    .transpose(0, 1)?
                    .reshape((len, c.q_dim()))?;
                outputs.push(out);
            }
            let att = Tensor::cat(&outputs, 0)?.to_dtype(x.dtype())?;
            x = (x + layer.o.forward(&att)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let gate = candle_nn::ops::silu(&layer.gate.forward(&h)?)?;
            let hidden = (gate * layer.up.forward(&h)?)?;
            x = (x + layer.down.forward(&hidden)?)?;
        }
        let wanted: Vec<u32> = rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r.logits)
            .map(|(i, _)| i as u32)
            .collect();
        self.logits.clear();
        if !wanted.is_empty() {
            let x = x.index_select(&Tensor::new(wanted.as_slice(), dev)?, 0)?;
            let x = candle_nn::ops::rms_norm(&x, &self.weights.norm, c.rms_eps)?;
            let logits = self.weights.head.forward(&x)?.to_dtype(DType::F32)?;
            self.logits = logits.flatten_all()?.to_vec1::<f32>()?;
        }
        Ok(())
    }
}

/// Runs of consecutive rows of one sequence at consecutive positions.
fn segments(rows: &[Row]) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        match out.last_mut() {
            Some(s) if rows[s.end - 1].seq == r.seq && rows[s.end - 1].pos + 1 == r.pos => {
                s.end = i + 1;
            }
            _ => out.push(i..i + 1),
        }
    }
    out
}

/// `(len, pos0 + len)`: 0 where query `t` (at `pos0 + t`) may look, -inf after.
fn causal_mask(len: usize, pos0: usize, device: &Device) -> candle_core::Result<Tensor> {
    let total = pos0 + len;
    let mask: Vec<f32> = (0..len)
        .flat_map(|t| {
            (0..total).map(move |j| {
                if j <= pos0 + t {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (len, total), device)
}

impl Forward for DeviceModel {
    fn forward(&mut self, rows: &[Row], tables: &BlockTables) -> Result<Logits<'_>, ForwardError> {
        check_batch(rows, tables, &self.limits)?;
        self.run(rows, tables).map_err(device_err)?;
        Ok(Logits::new(&self.logits, self.config.vocab))
    }

    fn copy_block(&mut self, from: usize, to: usize, positions: usize) -> Result<(), ForwardError> {
        check_copy(from, to, positions, &self.limits)?;
        if positions == 0 {
            return Ok(());
        }
        for cache in self.keys.iter_mut().chain(self.values.iter_mut()) {
            // A copy of its own: `slice_set` refuses a source that shares
            // the destination's storage.
            let rows = cache
                .narrow(0, from * KV_BLOCK, positions)
                .and_then(|t| t.copy())
                .map_err(device_err)?;
            cache
                .slice_set(&rows, 0, to * KV_BLOCK)
                .map_err(device_err)?;
        }
        Ok(())
    }

    fn limits(&self) -> Limits {
        self.limits
    }

    fn config(&self) -> &LlamaConfig {
        &self.config
    }
}
