//! The forward pass on the CPU, with the project's kernels.
//!
//! Everything is allocated at load: packed weights, the KV cache ([`kv`])
//! and scratch buffers for the largest batch. A pass is a fixed sequence of
//! operations ([`ops`]), each one run of the compute threads over the tiles
//! of its output:
//!
//! 1. the embedding rows;
//! 2. per layer: Q, K and V in one run from the normalized input (rotation
//!    applied, K and V written straight into the cache); attention per row
//!    and key/value head; the output projection added to the residual; gate
//!    and up in one run with SiLU, the product and the quantization for the
//!    down projection fused; down added to the residual;
//! 3. the final norm and the output head for the rows that want logits.
//!
//! Each output element is computed by one thread with the same arithmetic
//! whatever the batch, so results are identical alone or batched.

mod kv;
mod ops;

use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::kernels::acts::{ActBlock, BLOCK};
use crate::kernels::math::partial_len;
use crate::kernels::matmul::Input;
use crate::kernels::packed::{PackedMatrix, GROUP};
use crate::kernels::pool::ThreadPool;

use self::kv::KvStore;
pub use self::kv::{KvCache, KvType};
use self::ops::{Partials, Qkv, Source, ThreadScratch, PER_THREAD_ROWS};
use super::{
    check_batch, check_copy, BlockTables, Forward, ForwardError, Limits, LlamaConfig, Logits,
    RopeTable, Row,
};

/// One transformer block's weights.
#[derive(Debug)]
pub struct CpuLayer {
    pub(crate) attn_norm: Vec<f32>,
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) q: PackedMatrix,
    pub(crate) k: PackedMatrix,
    pub(crate) v: PackedMatrix,
    pub(crate) o: PackedMatrix,
    pub(crate) gate: PackedMatrix,
    pub(crate) up: PackedMatrix,
    pub(crate) down: PackedMatrix,
}

/// The model's weights, packed for the kernels.
#[derive(Debug)]
pub struct CpuWeights {
    pub(crate) embed: PackedMatrix,
    /// The output head; `None` when tied to the embedding.
    pub(crate) head: Option<PackedMatrix>,
    pub(crate) norm: Vec<f32>,
    pub(crate) layers: Vec<CpuLayer>,
}

impl CpuWeights {
    /// Bytes of packed weights.
    pub fn size_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
                    .iter()
                    .map(|m| m.size_bytes())
                    .sum::<usize>()
            })
            .sum();
        layers + self.embed.size_bytes() + self.head.as_ref().map_or(0, PackedMatrix::size_bytes)
    }
}

#[derive(Debug)]
struct Scratch {
    x: Vec<f32>,
    xq: Vec<ActBlock>,
    xn: Vec<f32>,
    q: Vec<f32>,
    /// Partial attention results (see `ops::Partials`).
    parts: Vec<f32>,
    hq: Vec<ActBlock>,
    h: Vec<f32>,
    logit_rows: Vec<usize>,
    head_x: Vec<f32>,
    logits: Vec<f32>,
    threads: Vec<Mutex<ThreadScratch>>,
}

/// The operations timed when profiling is on.
#[derive(Debug, Clone, Copy)]
enum Op {
    Embed,
    Norm,
    Qkv,
    Attention,
    OProj,
    GateUp,
    Down,
    Head,
}

const OPS: [&str; 8] = [
    "embed",
    "norm",
    "qkv",
    "attention",
    "o_proj",
    "gate_up",
    "down",
    "head",
];

/// Wall time per operation, summed over passes (`RBEE_WORKER_PROFILE=1`).
#[derive(Debug, Default)]
struct Profile {
    on: bool,
    spent: [Duration; OPS.len()],
}

impl Profile {
    fn start(&self) -> Option<Instant> {
        self.on.then(Instant::now)
    }

    fn stop(&mut self, op: Op, started: Option<Instant>) {
        if let Some(t) = started {
            self.spent[op as usize] += t.elapsed();
        }
    }
}

/// The CPU model; see the module documentation.
#[derive(Debug)]
pub struct CpuModel {
    config: LlamaConfig,
    weights: CpuWeights,
    rope: RopeTable,
    kv: KvCache,
    limits: Limits,
    pool: ThreadPool,
    s: Scratch,
    profile: Profile,
}

/// How big a CPU model is made.
#[derive(Debug, Clone, Copy)]
pub struct CpuShape {
    /// Blocks of KV cache in the pool.
    pub blocks: usize,
    /// Positions per sequence.
    pub context: usize,
    /// Rows per forward pass.
    pub max_rows: usize,
    /// Compute threads.
    pub threads: usize,
    /// KV cache element type.
    pub kv: KvType,
}

impl CpuModel {
    /// A model over `weights` with the room `shape` asks for.
    pub fn new(config: LlamaConfig, weights: CpuWeights, shape: CpuShape) -> std::io::Result<Self> {
        let pool = ThreadPool::new(shape.threads)?;
        let c = &config;
        let rows = shape.max_rows.max(1);
        let kv = KvCache::new(shape.kv, c.layers, c.kv_heads, c.head_dim, shape.blocks);
        let group = c.heads / c.kv_heads;
        let width = c.hidden.max(c.q_dim());
        let threads = (0..pool.threads())
            .map(|_| {
                Mutex::new(ThreadScratch {
                    scores: vec![0.0; ops::ROWS_PER_UNIT * group * ops::RUN],
                    positions: Vec::with_capacity(ops::ROWS_PER_UNIT),
                    row: vec![0.0; width],
                    xq: vec![ActBlock::default(); PER_THREAD_ROWS * width / BLOCK],
                    xn: vec![0.0; PER_THREAD_ROWS * width],
                    hidden: vec![0.0; rows * BLOCK],
                    gate: vec![[0.0; GROUP]; rows],
                    up: vec![[0.0; GROUP]; rows],
                    out: vec![[0.0; GROUP]; rows],
                })
            })
            .collect();
        let s = Scratch {
            x: vec![0.0; rows * c.hidden],
            xq: vec![ActBlock::default(); rows * width / BLOCK],
            xn: vec![0.0; rows * width],
            q: vec![0.0; rows * c.q_dim()],
            parts: vec![
                0.0;
                c.kv_heads
                    * shape.context.div_ceil(ops::RUN)
                    * rows
                    * partial_len(group, c.head_dim)
            ],
            hq: vec![ActBlock::default(); rows * c.ffn / BLOCK],
            h: vec![0.0; rows * c.ffn],
            logit_rows: Vec::with_capacity(rows),
            head_x: vec![0.0; rows * c.hidden],
            logits: vec![0.0; rows * c.vocab],
            threads,
        };
        Ok(Self {
            rope: RopeTable::new(c, shape.context),
            kv,
            limits: Limits {
                blocks: shape.blocks,
                context: shape.context,
                max_rows: rows,
                vocab: c.vocab,
            },
            config,
            weights,
            pool,
            s,
            profile: Profile {
                on: std::env::var_os("RBEE_WORKER_PROFILE").is_some_and(|v| v == "1"),
                ..Profile::default()
            },
        })
    }

    /// Compute threads.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }
}

impl Forward for CpuModel {
    fn limits(&self) -> Limits {
        self.limits
    }

    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn timings(&self) -> Vec<(&'static str, Duration)> {
        if self.profile.on {
            OPS.iter().copied().zip(self.profile.spent).collect()
        } else {
            Vec::new()
        }
    }

    fn copy_block(&mut self, from: usize, to: usize, positions: usize) -> Result<(), ForwardError> {
        check_copy(from, to, positions, &self.limits)?;
        self.kv.copy_block(from, to, positions);
        Ok(())
    }

    fn forward(&mut self, rows: &[Row], tables: &BlockTables) -> Result<Logits<'_>, ForwardError> {
        check_batch(rows, tables, &self.limits)?;
        let m = rows.len();
        let Self {
            config: c,
            weights,
            rope,
            kv,
            pool,
            s,
            profile,
            ..
        } = self;
        let Scratch {
            x,
            xq,
            xn,
            q,
            parts,
            hq,
            h,
            logit_rows,
            head_x,
            logits,
            threads: scratch,
        } = s;
        let (d, eps) = (c.hidden, c.rms_eps);
        let t = profile.start();
        for (row, x) in rows.iter().zip(x.chunks_exact_mut(d)) {
            weights.embed.dequantize_row(row.token as usize, x);
        }
        profile.stop(Op::Embed, t);
        for (li, layer) in weights.layers.iter().enumerate() {
            // Attention.
            let t = profile.start();
            let normalize = Source::Normalize {
                x: &x[..m * d],
                weight: &layer.attn_norm,
                eps,
            };
            let quantized = layer.q.format().is_quantized();
            let source = ops::input(pool, normalize, quantized, m, xq, xn, scratch);
            profile.stop(Op::Norm, t);
            let t = profile.start();
            let qkv = Qkv {
                layer,
                source,
                rows,
                tables,
                rope,
                kv: kv.layout,
            };
            match &mut kv.store {
                KvStore::F32 { keys, values } => {
                    qkv.run(pool, q, &mut keys[li], &mut values[li], scratch, |v| v);
                }
                KvStore::F16 { keys, values } => {
                    qkv.run(pool, q, &mut keys[li], &mut values[li], scratch, |v| {
                        half::f16::from_f32(v).to_bits()
                    });
                }
            }
            profile.stop(Op::Qkv, t);
            let t = profile.start();
            let runs = ops::attend(pool, li, rows, tables, q, kv, c.heads, parts, scratch);
            profile.stop(Op::Attention, t);
            let t = profile.start();
            let attended = Source::Attention(Partials {
                parts,
                rows,
                kv_heads: c.kv_heads,
                group: c.heads / c.kv_heads,
                head_dim: c.head_dim,
                runs,
            });
            let quantized = layer.o.format().is_quantized();
            let source = ops::input(pool, attended, quantized, m, xq, xn, scratch);
            ops::add_projection(pool, &layer.o, source, x, m, scratch);
            profile.stop(Op::OProj, t);

            // Feed-forward.
            let t = profile.start();
            let normalize = Source::Normalize {
                x: &x[..m * d],
                weight: &layer.ffn_norm,
                eps,
            };
            let quantized = layer.gate.format().is_quantized();
            let source = ops::input(pool, normalize, quantized, m, xq, xn, scratch);
            profile.stop(Op::Norm, t);
            let t = profile.start();
            ops::gate_up(pool, layer, source, m, hq, h, scratch);
            profile.stop(Op::GateUp, t);
            let t = profile.start();
            let down = if layer.down.format().is_quantized() {
                Source::Ready(Input::Quantized(&hq[..m * c.ffn / BLOCK]))
            } else {
                Source::Ready(Input::Dense(&h[..m * c.ffn]))
            };
            ops::add_projection(pool, &layer.down, down, x, m, scratch);
            profile.stop(Op::Down, t);
        }

        // The head, for the rows that want logits.
        logit_rows.clear();
        logit_rows.extend(
            rows.iter()
                .enumerate()
                .filter(|(_, r)| r.logits)
                .map(|(i, _)| i),
        );
        let n = logit_rows.len();
        if n == 0 {
            return Ok(Logits::new(&[], c.vocab));
        }
        let t = profile.start();
        for (k, &i) in logit_rows.iter().enumerate() {
            head_x[k * d..(k + 1) * d].copy_from_slice(&x[i * d..(i + 1) * d]);
        }
        let head = weights.head.as_ref().unwrap_or(&weights.embed);
        let normalize = Source::Normalize {
            x: &head_x[..n * d],
            weight: &weights.norm,
            eps,
        };
        let quantized = head.format().is_quantized();
        let source = ops::input(pool, normalize, quantized, n, xq, xn, scratch);
        ops::head(pool, head, source, n, logits, scratch);
        profile.stop(Op::Head, t);
        Ok(Logits::new(&logits[..n * c.vocab], c.vocab))
    }
}
