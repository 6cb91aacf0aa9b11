//! The forward pass on the CPU, with the project's kernels.
//!
//! Everything is allocated at load: packed weights, the KV cache (one
//! region of `context` positions per sequence, f16), and scratch buffers
//! for the largest batch. A pass is a fixed sequence of operations, each
//! one run of the compute threads over the tiles of its output:
//!
//! 1. embedding rows;
//! 2. per layer: RMS norm and quantization of the input; Q, K and V in one
//!    run (rotation applied, K and V written straight into the cache);
//!    attention per row and head; quantization of the attention output;
//!    the output projection added to the residual; RMS norm and
//!    quantization; gate and up in one run with SiLU, the product and the
//!    quantization for the down projection fused; down added to the residual;
//! 3. the final norm and the output head for the rows that want logits.
//!
//! Each output element is computed by one thread with the same arithmetic
//! whatever the batch, so results are identical alone or batched.

use std::sync::Mutex;

use crate::kernels::acts::{quantize_row, ActBlock, BLOCK};
use crate::kernels::math::{attention, rms_norm, silu_mul, Attention, KvRows};
use crate::kernels::matmul::{matmul_group, Input};
use crate::kernels::packed::{PackedMatrix, GROUP};
use crate::kernels::pool::{ThreadPool, Tiles};

use super::{check_batch, Forward, ForwardError, Limits, LlamaConfig, Logits, RopeTable, Row};

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

/// The element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KvType {
    /// f32: the reference implementation's arithmetic.
    #[default]
    F32,
    /// f16: half the memory and the bytes read per token, as llama.cpp's
    /// default; logits move by a few hundredths.
    F16,
}

/// Per layer, `sequences x context` rows of `kv_dim` keys and as many values.
#[derive(Debug)]
enum KvStore {
    F32 {
        keys: Vec<Vec<f32>>,
        values: Vec<Vec<f32>>,
    },
    F16 {
        keys: Vec<Vec<u16>>,
        values: Vec<Vec<u16>>,
    },
}

/// The K/V rows of every sequence, per layer: `sequences x context` rows of
/// `kv_dim` values each, allocated zeroed (so not resident until written)
/// at load.
#[derive(Debug)]
pub struct KvCache {
    store: KvStore,
    context: usize,
    kv_dim: usize,
}

impl KvCache {
    fn new(kind: KvType, layers: usize, sequences: usize, context: usize, kv_dim: usize) -> Self {
        let size = sequences * context * kv_dim;
        let store = match kind {
            KvType::F32 => KvStore::F32 {
                keys: (0..layers).map(|_| vec![0f32; size]).collect(),
                values: (0..layers).map(|_| vec![0f32; size]).collect(),
            },
            KvType::F16 => KvStore::F16 {
                keys: (0..layers).map(|_| vec![0u16; size]).collect(),
                values: (0..layers).map(|_| vec![0u16; size]).collect(),
            },
        };
        Self {
            store,
            context,
            kv_dim,
        }
    }

    /// A sequence's K and V rows of one layer, from its first position.
    fn sequence(&self, layer: usize, seq: usize) -> (KvRows<'_>, KvRows<'_>) {
        let start = seq * self.context * self.kv_dim;
        let end = start + self.context * self.kv_dim;
        match &self.store {
            KvStore::F32 { keys, values } => (
                KvRows::F32(&keys[layer][start..end]),
                KvRows::F32(&values[layer][start..end]),
            ),
            KvStore::F16 { keys, values } => (
                KvRows::F16(&keys[layer][start..end]),
                KvRows::F16(&values[layer][start..end]),
            ),
        }
    }
}

/// Per-thread scratch.
#[derive(Debug)]
struct ThreadScratch {
    /// Attention scores, one per position.
    scores: Vec<f32>,
    /// One normalized row.
    row: Vec<f32>,
    /// 32 hidden activations per row.
    hidden: Vec<f32>,
    gate: Vec<[f32; GROUP]>,
    up: Vec<[f32; GROUP]>,
    out: Vec<[f32; GROUP]>,
}

#[derive(Debug)]
struct Scratch {
    x: Vec<f32>,
    xq: Vec<ActBlock>,
    xn: Vec<f32>,
    q: Vec<f32>,
    att: Vec<f32>,
    attq: Vec<ActBlock>,
    hq: Vec<ActBlock>,
    h: Vec<f32>,
    logit_rows: Vec<usize>,
    head_x: Vec<f32>,
    logits: Vec<f32>,
    threads: Vec<Mutex<ThreadScratch>>,
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
}

/// How big a CPU model is made.
#[derive(Debug, Clone, Copy)]
pub struct CpuShape {
    /// Sequences with a KV region each.
    pub sequences: usize,
    /// Positions per sequence.
    pub context: usize,
    /// Rows per forward pass.
    pub max_rows: usize,
    /// Compute threads.
    pub threads: usize,
    /// KV cache element type.
    pub kv: KvType,
}

/// Tile width, in groups of 16 columns, that gives each thread several
/// tiles to balance with.
fn tile_groups(groups: usize, threads: usize) -> usize {
    (groups / (threads * 4)).max(1)
}

impl CpuModel {
    /// A model over `weights` with room for `sequences` sequences of
    /// `context` positions (cache elements of `kv`), `max_rows` rows per
    /// pass, on `threads` threads.
    pub fn new(config: LlamaConfig, weights: CpuWeights, shape: CpuShape) -> std::io::Result<Self> {
        let CpuShape {
            sequences,
            context,
            max_rows,
            threads,
            kv,
        } = shape;
        let pool = ThreadPool::new(threads)?;
        let c = &config;
        let rows = max_rows.max(1);
        let threads = (0..pool.threads())
            .map(|_| {
                Mutex::new(ThreadScratch {
                    scores: vec![0.0; context],
                    row: vec![0.0; c.hidden],
                    hidden: vec![0.0; rows * BLOCK],
                    gate: vec![[0.0; GROUP]; rows],
                    up: vec![[0.0; GROUP]; rows],
                    out: vec![[0.0; GROUP]; rows],
                })
            })
            .collect();
        let s = Scratch {
            x: vec![0.0; rows * c.hidden],
            xq: vec![ActBlock::default(); rows * c.hidden / BLOCK],
            xn: vec![0.0; rows * c.hidden],
            q: vec![0.0; rows * c.q_dim()],
            att: vec![0.0; rows * c.q_dim()],
            attq: vec![ActBlock::default(); rows * c.q_dim() / BLOCK],
            hq: vec![ActBlock::default(); rows * c.ffn / BLOCK],
            h: vec![0.0; rows * c.ffn],
            logit_rows: Vec::with_capacity(rows),
            head_x: vec![0.0; rows * c.hidden],
            logits: vec![0.0; rows * c.vocab],
            threads,
        };
        Ok(Self {
            rope: RopeTable::new(c, context),
            kv: KvCache::new(kv, c.layers, sequences, context, c.kv_dim()),
            limits: Limits {
                sequences,
                context,
                max_rows: rows,
                vocab: c.vocab,
            },
            config,
            weights,
            pool,
            s,
        })
    }

    /// The packed weights.
    pub fn weights(&self) -> &CpuWeights {
        &self.weights
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

    fn forward(&mut self, rows: &[Row]) -> Result<Logits<'_>, ForwardError> {
        check_batch(rows, &self.limits)?;
        let m = rows.len();
        let c = &self.config;
        let d = c.hidden;
        let Self {
            weights,
            rope,
            kv,
            pool,
            s,
            ..
        } = self;
        for (row, x) in rows.iter().zip(s.x.chunks_exact_mut(d)) {
            weights.embed.dequantize_row(row.token as usize, x);
        }
        let threads = pool.threads();
        for (li, layer) in weights.layers.iter().enumerate() {
            // Attention.
            let input = normalized(
                pool,
                &s.x[..m * d],
                &layer.attn_norm,
                c.rms_eps,
                layer.q.format().is_quantized(),
                &mut s.xq,
                &mut s.xn,
                &s.threads,
            );
            let input = match input {
                Prepared::Quantized => Input::Quantized(&s.xq[..m * d / BLOCK]),
                Prepared::Dense => Input::Dense(&s.xn[..m * d]),
            };
            let qkv = Qkv {
                layer,
                input,
                rows,
                rope,
                head_dim: c.head_dim,
                context: kv.context,
                kv_dim: c.kv_dim(),
            };
            match &mut kv.store {
                KvStore::F32 { keys, values } => qkv.run(
                    pool,
                    &mut s.q,
                    &mut keys[li],
                    &mut values[li],
                    &s.threads,
                    |out, v| {
                        out.copy_from_slice(&v[..out.len()]);
                    },
                ),
                KvStore::F16 { keys, values } => qkv.run(
                    pool,
                    &mut s.q,
                    &mut keys[li],
                    &mut values[li],
                    &s.threads,
                    store_f16,
                ),
            }
            {
                let att_tiles = Tiles::new(&mut s.att, m, c.q_dim(), 1, c.head_dim);
                let (q, kvc, scratch) = (&s.q, &*kv, &s.threads);
                let group = c.heads / c.kv_heads;
                let (hd, q_dim, kv_dim) = (c.head_dim, c.q_dim(), c.kv_dim());
                let scale = 1.0 / (hd as f32).sqrt();
                pool.run(&|t| {
                    let mut ts = lock(&scratch[t]);
                    while let Some(mut tile) = att_tiles.next() {
                        let i = tile.rows().start;
                        let head = tile.cols().start / hd;
                        let (keys, values) = kvc.sequence(li, rows[i].seq);
                        let off = (head / group) * hd;
                        let a = Attention {
                            q: &q[i * q_dim + head * hd..][..hd],
                            keys: keys.offset(off),
                            values: values.offset(off),
                            stride: kv_dim,
                            positions: rows[i].pos + 1,
                            scale,
                        };
                        attention(&a, &mut ts.scores, tile.row(i));
                    }
                });
            }
            let o_input = if layer.o.format().is_quantized() {
                quantize_rows(
                    pool,
                    &s.att[..m * c.q_dim()],
                    &mut s.attq[..m * c.q_dim() / BLOCK],
                    c.q_dim(),
                );
                Input::Quantized(&s.attq[..m * c.q_dim() / BLOCK])
            } else {
                Input::Dense(&s.att[..m * c.q_dim()])
            };
            add_projection(pool, &layer.o, o_input, &mut s.x[..m * d], m, &s.threads);

            // Feed-forward.
            let input = normalized(
                pool,
                &s.x[..m * d],
                &layer.ffn_norm,
                c.rms_eps,
                layer.gate.format().is_quantized(),
                &mut s.xq,
                &mut s.xn,
                &s.threads,
            );
            let input = match input {
                Prepared::Quantized => Input::Quantized(&s.xq[..m * d / BLOCK]),
                Prepared::Dense => Input::Dense(&s.xn[..m * d]),
            };
            let down_quantized = layer.down.format().is_quantized();
            {
                let scratch = &s.threads;
                // Tiles of 32 columns of the hidden activation: one
                // quantization block, two groups each of gate and up.
                let blocks = c.ffn / BLOCK;
                let per_tile = (blocks / (threads * 4)).max(1);
                if down_quantized {
                    let tiles = Tiles::new(&mut s.hq, m, blocks, m, per_tile);
                    pool.run(&|t| {
                        let mut ts = lock(&scratch[t]);
                        while let Some(mut tile) = tiles.next() {
                            let cols = tile.cols();
                            for b in cols.clone() {
                                gate_up(layer, input, m, b, &mut ts, |i, h| {
                                    tile.row(i)[b - cols.start] =
                                        crate::kernels::acts::quantize_block(h);
                                });
                            }
                        }
                    });
                } else {
                    let tiles = Tiles::new(&mut s.h, m, c.ffn, m, per_tile * BLOCK);
                    pool.run(&|t| {
                        let mut ts = lock(&scratch[t]);
                        while let Some(mut tile) = tiles.next() {
                            let cols = tile.cols();
                            for b in cols.start / BLOCK..cols.end / BLOCK {
                                gate_up(layer, input, m, b, &mut ts, |i, h| {
                                    tile.row(i)[b * BLOCK - cols.start..][..BLOCK]
                                        .copy_from_slice(h);
                                });
                            }
                        }
                    });
                }
            }
            let down_input = if down_quantized {
                Input::Quantized(&s.hq[..m * c.ffn / BLOCK])
            } else {
                Input::Dense(&s.h[..m * c.ffn])
            };
            add_projection(
                pool,
                &layer.down,
                down_input,
                &mut s.x[..m * d],
                m,
                &s.threads,
            );
        }

        // The head, for the rows that want logits.
        s.logit_rows.clear();
        s.logit_rows.extend(
            rows.iter()
                .enumerate()
                .filter(|(_, r)| r.logits)
                .map(|(i, _)| i),
        );
        let n = s.logit_rows.len();
        if n == 0 {
            return Ok(Logits::new(&[], c.vocab));
        }
        for (k, &i) in s.logit_rows.iter().enumerate() {
            s.head_x[k * d..(k + 1) * d].copy_from_slice(&s.x[i * d..(i + 1) * d]);
        }
        let head = weights.head.as_ref().unwrap_or(&weights.embed);
        let input = normalized(
            pool,
            &s.head_x[..n * d],
            &weights.norm,
            c.rms_eps,
            head.format().is_quantized(),
            &mut s.xq,
            &mut s.xn,
            &s.threads,
        );
        let input = match input {
            Prepared::Quantized => Input::Quantized(&s.xq[..n * d / BLOCK]),
            Prepared::Dense => Input::Dense(&s.xn[..n * d]),
        };
        {
            let tiles = Tiles::new(
                &mut s.logits,
                n,
                c.vocab,
                n,
                GROUP * tile_groups(head.groups(), threads),
            );
            let scratch = &s.threads;
            pool.run(&|t| {
                let mut ts = lock(&scratch[t]);
                while let Some(mut tile) = tiles.next() {
                    let cols = tile.cols();
                    project(head, input, n, &cols, &mut ts.out, |i, col, vals| {
                        let out = clipped(tile.row(i), col - cols.start);
                        out.copy_from_slice(&vals[..out.len()]);
                    });
                }
            });
        }
        Ok(Logits::new(&s.logits[..n * c.vocab], c.vocab))
    }
}

/// Q, K and V of one layer in one run: Q rotated into its buffer, K
/// rotated and V written straight into the cache rows of each row's
/// sequence and position.
struct Qkv<'a> {
    layer: &'a CpuLayer,
    input: Input<'a>,
    rows: &'a [Row],
    rope: &'a RopeTable,
    head_dim: usize,
    context: usize,
    kv_dim: usize,
}

impl Qkv<'_> {
    #[allow(clippy::too_many_arguments)]
    fn run<T: Send>(
        &self,
        pool: &mut ThreadPool,
        q: &mut [f32],
        keys: &mut [T],
        values: &mut [T],
        scratch: &[Mutex<ThreadScratch>],
        store: impl Fn(&mut [T], &[f32]) + Sync,
    ) {
        let Self {
            layer,
            input,
            rows,
            rope,
            head_dim,
            context,
            kv_dim,
        } = *self;
        let m = rows.len();
        let threads = scratch.len();
        let q_dim = layer.q.rows();
        let q_tiles = Tiles::new(
            q,
            m,
            q_dim,
            m,
            GROUP * tile_groups(layer.q.groups(), threads),
        );
        let kv_rows = keys.len() / kv_dim;
        let kv_tile = GROUP * tile_groups(layer.k.groups(), threads);
        let k_tiles = Tiles::new(keys, kv_rows, kv_dim, kv_rows, kv_tile);
        let v_tiles = Tiles::new(values, kv_rows, kv_dim, kv_rows, kv_tile);
        pool.run(&|t| {
            let mut ts = lock(&scratch[t]);
            let ts = &mut *ts;
            while let Some(mut tile) = q_tiles.next() {
                let cols = tile.cols();
                project(&layer.q, input, m, &cols, &mut ts.out, |i, col, vals| {
                    let out = clipped(tile.row(i), col - cols.start);
                    out.copy_from_slice(&vals[..out.len()]);
                    rope.rotate(out, col, head_dim, rows[i].pos);
                });
            }
            while let Some(mut tile) = k_tiles.next() {
                let cols = tile.cols();
                project(&layer.k, input, m, &cols, &mut ts.out, |i, col, vals| {
                    let mut v = *vals;
                    rope.rotate(&mut v, col, head_dim, rows[i].pos);
                    let r = rows[i].seq * context + rows[i].pos;
                    store(clipped(tile.row(r), col - cols.start), &v);
                });
            }
            while let Some(mut tile) = v_tiles.next() {
                let cols = tile.cols();
                project(&layer.v, input, m, &cols, &mut ts.out, |i, col, vals| {
                    let r = rows[i].seq * context + rows[i].pos;
                    store(clipped(tile.row(r), col - cols.start), vals);
                });
            }
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A thread that panicked mid-pass leaves only scratch behind.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

enum Prepared {
    Quantized,
    Dense,
}

/// RMS-normalize each of the `m` rows of `x` into `xq` (quantized) or `xn`.
#[allow(clippy::too_many_arguments)]
fn normalized(
    pool: &mut ThreadPool,
    x: &[f32],
    weight: &[f32],
    eps: f32,
    quantized: bool,
    xq: &mut [ActBlock],
    xn: &mut [f32],
    scratch: &[Mutex<ThreadScratch>],
) -> Prepared {
    let d = weight.len();
    let m = x.len() / d;
    if quantized {
        let tiles = Tiles::new(xq, m, d / BLOCK, 1, d / BLOCK);
        pool.run(&|t| {
            let mut ts = lock(&scratch[t]);
            while let Some(mut tile) = tiles.next() {
                let i = tile.rows().start;
                rms_norm(&x[i * d..(i + 1) * d], weight, eps, &mut ts.row);
                quantize_row(&ts.row, tile.row(i));
            }
        });
        Prepared::Quantized
    } else {
        let tiles = Tiles::new(xn, m, d, 1, d);
        pool.run(&|_| {
            while let Some(mut tile) = tiles.next() {
                let i = tile.rows().start;
                rms_norm(&x[i * d..(i + 1) * d], weight, eps, tile.row(i));
            }
        });
        Prepared::Dense
    }
}

/// Quantize the `m` rows of `x` (rows of `width`) into `out`.
fn quantize_rows(pool: &mut ThreadPool, x: &[f32], out: &mut [ActBlock], width: usize) {
    let m = x.len() / width;
    let tiles = Tiles::new(out, m, width / BLOCK, 1, width / BLOCK);
    pool.run(&|_| {
        while let Some(mut tile) = tiles.next() {
            let i = tile.rows().start;
            quantize_row(&x[i * width..(i + 1) * width], tile.row(i));
        }
    });
}

/// `x += w * input` for the `m` rows.
fn add_projection(
    pool: &mut ThreadPool,
    w: &PackedMatrix,
    input: Input<'_>,
    x: &mut [f32],
    m: usize,
    scratch: &[Mutex<ThreadScratch>],
) {
    let d = w.rows();
    let tiles = Tiles::new(x, m, d, m, GROUP * tile_groups(w.groups(), scratch.len()));
    pool.run(&|t| {
        let mut ts = lock(&scratch[t]);
        while let Some(mut tile) = tiles.next() {
            let cols = tile.cols();
            project(w, input, m, &cols, &mut ts.out, |i, col, vals| {
                let out = &mut tile.row(i)[col - cols.start..];
                for (o, v) in out.iter_mut().zip(vals) {
                    *o += v;
                }
            });
        }
    });
}

/// The `m` rows' products with the groups of `w` covering `cols`, handed
/// to `emit(row, first column, 16 values)` group by group.
fn project(
    w: &PackedMatrix,
    input: Input<'_>,
    m: usize,
    cols: &std::ops::Range<usize>,
    out: &mut [[f32; GROUP]],
    mut emit: impl FnMut(usize, usize, &[f32; GROUP]),
) {
    for g in cols.start / GROUP..cols.end.div_ceil(GROUP) {
        matmul_group(w, g, input, &mut out[..m]);
        for (i, vals) in out[..m].iter().enumerate() {
            emit(i, g * GROUP, vals);
        }
    }
}

/// Columns `32 b..32 b + 32` of `silu(gate x) * (up x)` for each row,
/// handed to `emit(row, 32 values)`.
fn gate_up(
    layer: &CpuLayer,
    input: Input<'_>,
    m: usize,
    b: usize,
    ts: &mut ThreadScratch,
    mut emit: impl FnMut(usize, &[f32]),
) {
    for half in 0..2 {
        let g = 2 * b + half;
        matmul_group(&layer.gate, g, input, &mut ts.gate[..m]);
        matmul_group(&layer.up, g, input, &mut ts.up[..m]);
        for i in 0..m {
            let at = i * BLOCK + half * GROUP;
            silu_mul(&ts.gate[i], &ts.up[i], &mut ts.hidden[at..at + GROUP]);
        }
    }
    for i in 0..m {
        emit(i, &ts.hidden[i * BLOCK..(i + 1) * BLOCK]);
    }
}

/// The (up to) 16 values of a tile row from `at`: a group's outputs,
/// fewer when the matrix ends inside the group.
fn clipped<T>(row: &mut [T], at: usize) -> &mut [T] {
    let row = &mut row[at..];
    let len = row.len().min(GROUP);
    &mut row[..len]
}

fn store_f16(out: &mut [u16], values: &[f32]) {
    for (o, &v) in out.iter_mut().zip(values) {
        *o = half::f16::from_f32(v).to_bits();
    }
}
