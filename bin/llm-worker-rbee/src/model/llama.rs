//! The worker's llama-family forward pass (llama, SmolLM2, Llama 3.x,
//! Mistral): one architecture, read from GGUF or safetensors, run on the
//! CPU by the project's own kernels ([`cpu`]) or on a candle GPU device
//! ([`device`]).
//!
//! The forward pass takes a batch of [`Row`]s, each one token of some
//! sequence at some position, and returns logits for the rows that ask for
//! them. The KV cache is a pool of blocks of [`KV_BLOCK`] positions
//! allocated at load; a sequence's K/V rows live in the blocks its block
//! table ([`BlockTables`]) names, in order, so sequences share one pool and
//! a block of a common prefix can be read by several sequences. A row's
//! result depends only on its token, its sequence's cached K/V and its
//! position, never on the other rows in the batch, on how a prompt was cut
//! into chunks or on which blocks hold its K/V.

pub mod cpu;
pub(crate) mod device;
pub(crate) mod load;

use std::fmt;

use crate::model::error::ShapeError;

/// How rotary position frequencies are scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// As trained.
    None,
    /// Positions divided by a factor (`linear`).
    Linear(f32),
    /// Llama 3.x: low frequencies divided by `factor`, high ones kept,
    /// a smooth blend between.
    Llama3 {
        /// Division of the low frequencies.
        factor: f32,
        /// Wavelengths above `original / low_freq_factor` are scaled.
        low_freq_factor: f32,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f32,
        /// The context the model was first trained on.
        original_max_position: usize,
    },
    /// One divisor per frequency, as GGUF files carry in `rope_freqs.weight`.
    Factors(Vec<f32>),
}

/// The shape of a llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab: usize,
    /// Model width.
    pub hidden: usize,
    /// Feed-forward width.
    pub ffn: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Leading dimensions of a head that are rotated (usually all).
    pub rope_dim: usize,
    /// Rotary base.
    pub rope_theta: f32,
    /// Rotary scaling.
    pub rope_scaling: RopeScaling,
    /// RMS norm epsilon.
    pub rms_eps: f32,
    /// The context the model was trained for.
    pub max_context: usize,
}

impl LlamaConfig {
    /// Width of the queries of one token.
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Width of the keys (and values) of one token.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Check the shape is one the forward pass runs.
    pub fn validate(&self) -> Result<(), ShapeError> {
        let positive = [
            ("vocab", self.vocab),
            ("hidden", self.hidden),
            ("ffn", self.ffn),
            ("layers", self.layers),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(ShapeError::Zero(name));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(ShapeError::Groups {
                heads: self.heads,
                kv_heads: self.kv_heads,
            });
        }
        if !self.head_dim.is_multiple_of(16) {
            return Err(ShapeError::HeadDim(self.head_dim));
        }
        if self.rope_dim > self.head_dim || !self.rope_dim.is_multiple_of(2) {
            return Err(ShapeError::RopeDim {
                rope_dim: self.rope_dim,
                head_dim: self.head_dim,
            });
        }
        if let RopeScaling::Factors(f) = &self.rope_scaling {
            if f.len() != self.rope_dim / 2 {
                return Err(ShapeError::RopeFactors {
                    got: f.len(),
                    want: self.rope_dim / 2,
                });
            }
        }
        for (name, width) in [
            ("hidden size", self.hidden),
            ("feed-forward size", self.ffn),
        ] {
            if width % 32 != 0 {
                return Err(ShapeError::Width { name, width });
            }
        }
        Ok(())
    }

    /// Rotary frequencies (radians per position), scaling applied. In f32
    /// as candle's and llama.cpp's tables are made, so angles agree with
    /// the reference implementation to the last bit.
    pub fn rope_frequencies(&self) -> Vec<f32> {
        let half = self.rope_dim / 2;
        (0..half)
            .map(|i| {
                let base = 1f32 / self.rope_theta.powf((2 * i) as f32 / self.rope_dim as f32);
                match &self.rope_scaling {
                    RopeScaling::None => base,
                    RopeScaling::Linear(f) => base / f,
                    RopeScaling::Factors(f) => base / f[i],
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position,
                    } => {
                        let original = *original_max_position as f32;
                        let wavelen = 2.0 * std::f32::consts::PI / base;
                        if wavelen < original / high_freq_factor {
                            base
                        } else if wavelen > original / low_freq_factor {
                            base / factor
                        } else {
                            let smooth = (original / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * base / factor + smooth * base
                        }
                    }
                }
            })
            .collect()
    }
}

/// Positions per KV cache block: one run of the CPU attention, so a run's
/// keys and values are contiguous in memory.
pub const KV_BLOCK: usize = 128;

/// The block tables of the sequences in a forward pass: sequence `i`'s
/// position `p` lives in block `table(i)[p / KV_BLOCK]`. Reused between
/// passes (clearing keeps the allocations).
#[derive(Debug, Clone, Default)]
pub struct BlockTables {
    blocks: Vec<u32>,
    starts: Vec<usize>,
}

impl BlockTables {
    /// No tables.
    pub fn new() -> Self {
        Self::default()
    }

    /// `sequences` tables of `per_sequence` consecutive blocks each
    /// (sequence `i` owns blocks `i * per_sequence..`), for callers that
    /// give each sequence a fixed region.
    pub fn contiguous(sequences: usize, per_sequence: usize) -> Self {
        let mut t = Self::new();
        for i in 0..sequences {
            let first = (i * per_sequence) as u32;
            t.push(first..first + per_sequence as u32);
        }
        t
    }

    /// Forget every table, keeping the memory.
    pub fn clear(&mut self) {
        self.blocks.clear();
        self.starts.clear();
    }

    /// Add a table; returns its index (the `seq` of its rows).
    pub fn push(&mut self, blocks: impl IntoIterator<Item = u32>) -> usize {
        self.starts.push(self.blocks.len());
        self.blocks.extend(blocks);
        self.starts.len() - 1
    }

    /// Tables held.
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Table `i`.
    pub fn table(&self, i: usize) -> &[u32] {
        let end = self.starts.get(i + 1).copied().unwrap_or(self.blocks.len());
        &self.blocks[self.starts[i]..end]
    }

    /// The block holding position `pos` of sequence `seq` (checked by
    /// [`check_batch`] before a pass).
    pub fn block(&self, seq: usize, pos: usize) -> usize {
        self.table(seq)[pos / KV_BLOCK] as usize
    }
}

/// One token of one sequence in a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    /// The token id.
    pub token: u32,
    /// The sequence: an index into the pass's [`BlockTables`].
    pub seq: usize,
    /// The token's position in its sequence. Positions before it must
    /// already be in the cache, or earlier in the same batch.
    pub pos: usize,
    /// Whether the caller wants this row's logits (the last token of a
    /// prompt, or a generated token).
    pub logits: bool,
}

/// What a model can take in one forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Blocks of [`KV_BLOCK`] positions in the KV cache pool.
    pub blocks: usize,
    /// Positions per sequence.
    pub context: usize,
    /// Rows per forward pass.
    pub max_rows: usize,
    /// Vocabulary size (the width of a logits row).
    pub vocab: usize,
}

/// The logits of the rows that asked for them, in row order.
#[derive(Debug)]
pub struct Logits<'a> {
    values: &'a [f32],
    vocab: usize,
}

impl<'a> Logits<'a> {
    pub(crate) fn new(values: &'a [f32], vocab: usize) -> Self {
        Self { values, vocab }
    }

    /// Rows of logits.
    pub fn len(&self) -> usize {
        self.values.len() / self.vocab.max(1)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The `i`th logits row.
    pub fn row(&self, i: usize) -> &'a [f32] {
        &self.values[i * self.vocab..(i + 1) * self.vocab]
    }
}

/// Why a forward pass failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The batch breaks the model's limits.
    #[error("invalid batch: {0}")]
    Batch(String),
    /// The device failed.
    #[error("device error: {0}")]
    Device(String),
}

/// A forward pass over batches of rows; see the module documentation.
pub trait Forward: Send + fmt::Debug {
    /// Run one forward pass: each row's K/V is written to its sequence's
    /// block in `tables` and it attends to its sequence's earlier positions.
    fn forward(&mut self, rows: &[Row], tables: &BlockTables) -> Result<Logits<'_>, ForwardError>;

    /// Copy the K/V of the first `positions` positions of block `from` into
    /// block `to` (a prefix shared only in part: the copy is the new
    /// sequence's own block).
    fn copy_block(&mut self, from: usize, to: usize, positions: usize) -> Result<(), ForwardError>;

    /// What one pass can take.
    fn limits(&self) -> Limits;

    /// The model's shape.
    fn config(&self) -> &LlamaConfig;

    /// Wall time spent per operation so far, when profiling is on
    /// (`RBEE_WORKER_PROFILE=1`, CPU model only); empty otherwise.
    fn timings(&self) -> Vec<(&'static str, std::time::Duration)> {
        Vec::new()
    }
}

/// Check a batch against the limits and its block tables.
pub(crate) fn check_batch(
    rows: &[Row],
    tables: &BlockTables,
    limits: &Limits,
) -> Result<(), ForwardError> {
    if rows.is_empty() || rows.len() > limits.max_rows {
        return Err(ForwardError::Batch(format!(
            "{} rows (1 to {} per pass)",
            rows.len(),
            limits.max_rows
        )));
    }
    for r in rows {
        if r.seq >= tables.len() || r.pos >= limits.context || r.token as usize >= limits.vocab {
            return Err(ForwardError::Batch(format!(
                "row {r:?} outside {} tables x {} positions, vocabulary {}",
                tables.len(),
                limits.context,
                limits.vocab
            )));
        }
        let table = tables.table(r.seq);
        // Every block up to the row's is read by its attention.
        let needed = r.pos / KV_BLOCK + 1;
        if table.len() < needed || table[..needed].iter().any(|&b| b as usize >= limits.blocks) {
            return Err(ForwardError::Batch(format!(
                "row {r:?}: its block table {table:?} does not cover position {} within {} blocks",
                r.pos, limits.blocks
            )));
        }
    }
    Ok(())
}

/// Check a block copy against the limits.
pub(crate) fn check_copy(
    from: usize,
    to: usize,
    positions: usize,
    limits: &Limits,
) -> Result<(), ForwardError> {
    if from >= limits.blocks || to >= limits.blocks || from == to || positions > KV_BLOCK {
        return Err(ForwardError::Batch(format!(
            "cannot copy {positions} positions from block {from} to block {to} of {}",
            limits.blocks
        )));
    }
    Ok(())
}

/// Rotary cos/sin per position and frequency.
#[derive(Debug, Clone)]
pub(crate) struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    pub(crate) fn new(config: &LlamaConfig, positions: usize) -> Self {
        let freqs = config.rope_frequencies();
        let half = freqs.len();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for &f in &freqs {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self { half, cos, sin }
    }

    /// Rotate pairs `(x[2i], x[2i+1])` of a row whose first value is head
    /// column `col0` (even), at position `pos`; columns at or past the
    /// rotary dimension stay as they are.
    pub(crate) fn rotate(&self, x: &mut [f32], col0: usize, head_dim: usize, pos: usize) {
        let base = pos * self.half;
        for (j, pair) in x.chunks_exact_mut(2).enumerate() {
            let c = (col0 + 2 * j) % head_dim;
            let i = c / 2;
            if i >= self.half {
                continue;
            }
            let (cos, sin) = (self.cos[base + i], self.sin[base + i]);
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * cos - b * sin;
            pair[1] = a * sin + b * cos;
        }
    }

    /// cos and sin tables, `(positions, rope_dim / 2)`, for candle devices.
    pub(crate) fn tables(&self) -> (&[f32], &[f32], usize) {
        (&self.cos, &self.sin, self.half)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(scaling: RopeScaling) -> LlamaConfig {
        LlamaConfig {
            vocab: 10,
            hidden: 64,
            ffn: 128,
            layers: 1,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            rope_dim: 16,
            rope_theta: 500_000.0,
            rope_scaling: scaling,
            rms_eps: 1e-5,
            max_context: 128,
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let plain = config(RopeScaling::None).rope_frequencies();
        let scaled = config(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 8192,
        })
        .rope_frequencies();
        assert_eq!(plain[0], scaled[0]);
        let last = plain.len() - 1;
        assert_eq!(scaled[last], plain[last] / 8.0);
        let linear = config(RopeScaling::Linear(2.0)).rope_frequencies();
        assert_eq!(linear[3], plain[3] / 2.0);
    }

    #[test]
    fn rotation_turns_pairs_by_position_times_frequency() {
        let c = config(RopeScaling::None);
        let table = RopeTable::new(&c, 8);
        let mut x: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let orig = x.clone();
        table.rotate(&mut x, 0, 16, 0);
        assert_eq!(x, orig);
        table.rotate(&mut x, 0, 16, 3);
        let f = c.rope_frequencies();
        let angle = 3.0 * f64::from(f[1]);
        let want = f64::from(orig[2]) * angle.cos() - f64::from(orig[3]) * angle.sin();
        assert!((f64::from(x[2]) - want).abs() < 1e-4);
        // Norms are kept.
        let n0: f32 = orig.iter().map(|v| v * v).sum();
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-2);
    }

    #[test]
    fn bad_shapes_are_named() {
        let mut c = config(RopeScaling::None);
        c.kv_heads = 3;
        assert!(c.validate().unwrap_err().to_string().contains("multiple"));
        let mut c = config(RopeScaling::None);
        c.head_dim = 24;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("multiple of 16"));
        let mut c = config(RopeScaling::Factors(vec![1.0; 3]));
        assert!(c.validate().unwrap_err().to_string().contains("factors"));
        c.rope_scaling = RopeScaling::None;
        c.layers = 0;
        assert!(c.validate().unwrap_err().to_string().contains("layers"));
    }
}
