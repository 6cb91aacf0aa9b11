//! The operations of the CPU forward pass, each one run of the compute
//! threads over the tiles of its output.
//!
//! A product's input rows (RMS-normalized, quantized) are made once for
//! all threads by a run of their own when the batch is large; for a few
//! rows every thread makes them itself at the start of the product's run,
//! which costs less than another run and its barrier. Both give the same
//! bits.

use parking_lot::{Mutex, MutexGuard};

use crate::kernels::acts::{quantize_row, ActBlock, BLOCK};
use crate::kernels::math::{attention, merge, partial_len, rms_norm, silu_mul, Attention};
use crate::kernels::matmul::{matmul_group, Input};
use crate::kernels::packed::{PackedMatrix, GROUP};
use crate::kernels::pool::{ThreadPool, Tiles};

use super::super::{BlockTables, RopeTable, Row, KV_BLOCK};
use super::kv::{KvCache, KvLayout};
use super::CpuLayer;

/// Batches of at most this many rows have their inputs made per thread.
pub(super) const PER_THREAD_ROWS: usize = 4;

/// One compute thread's scratch.
#[derive(Debug)]
pub(super) struct ThreadScratch {
    /// Attention scores: query vectors of one unit times one run.
    pub(super) scores: Vec<f32>,
    /// Positions each row of an attention unit attends to in its run.
    pub(super) positions: Vec<usize>,
    /// One normalized row.
    pub(super) row: Vec<f32>,
    /// Quantized input rows made by this thread (small batches).
    pub(super) xq: Vec<ActBlock>,
    /// f32 input rows made by this thread (small batches, dense weights).
    pub(super) xn: Vec<f32>,
    /// 32 hidden activations per batch row.
    pub(super) hidden: Vec<f32>,
    pub(super) gate: Vec<[f32; GROUP]>,
    pub(super) up: Vec<[f32; GROUP]>,
    pub(super) out: Vec<[f32; GROUP]>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A thread that panicked mid-pass leaves only scratch behind.
    m.lock()
}

/// Where a product's input rows come from.
#[derive(Debug, Clone, Copy)]
pub(super) enum Source<'a> {
    /// Made already, for all threads.
    Ready(Input<'a>),
    /// RMS-normalize rows of `x` with `weight`.
    Normalize {
        x: &'a [f32],
        weight: &'a [f32],
        eps: f32,
    },
    /// The attention output, merged from the partial results of the runs
    /// each row's positions were cut into.
    Attention(Partials<'a>),
}

/// The partial attention results of a pass: per key/value head, run of
/// [`RUN`] positions and row (in that order), [`partial_len`] values.
#[derive(Debug, Clone, Copy)]
pub(super) struct Partials<'a> {
    pub(super) parts: &'a [f32],
    pub(super) rows: &'a [Row],
    pub(super) kv_heads: usize,
    /// Query heads per key/value head.
    pub(super) group: usize,
    pub(super) head_dim: usize,
    /// Runs per head in `parts` (the most a row can have).
    pub(super) runs: usize,
}

impl Partials<'_> {
    /// Row `i`'s attention output (`kv_heads * group * head_dim` values).
    fn merge_row(&self, i: usize, out: &mut [f32]) {
        let (hd, g, m) = (self.head_dim, self.group, self.rows.len());
        let len = partial_len(g, hd);
        let runs = (self.rows[i].pos + 1).div_ceil(RUN);
        for h in 0..self.kv_heads {
            let at = |r: usize| ((h * self.runs + r) * m + i) * len;
            let parts = (0..runs).map(|r| &self.parts[at(r)..at(r) + len]);
            merge(parts, g, hd, &mut out[h * g * hd..(h + 1) * g * hd]);
        }
    }
}

impl Source<'_> {
    fn width(&self) -> usize {
        match self {
            Self::Ready(_) => 0,
            Self::Normalize { weight, .. } => weight.len(),
            Self::Attention(p) => p.kv_heads * p.group * p.head_dim,
        }
    }

    /// Row `i`, prepared into `xq` (quantized) or `xn`.
    fn prepare(
        &self,
        i: usize,
        quantized: bool,
        xq: &mut [ActBlock],
        xn: &mut [f32],
        tmp: &mut [f32],
    ) {
        let w = self.width();
        match *self {
            Self::Ready(_) => unreachable!("ready inputs are not prepared"),
            Self::Normalize { x, weight, eps } => {
                let x = &x[i * w..(i + 1) * w];
                if quantized {
                    rms_norm(x, weight, eps, &mut tmp[..w]);
                    quantize_row(&tmp[..w], xq);
                } else {
                    rms_norm(x, weight, eps, xn);
                }
            }
            Self::Attention(p) => {
                if quantized {
                    p.merge_row(i, &mut tmp[..w]);
                    quantize_row(&tmp[..w], xq);
                } else {
                    p.merge_row(i, xn);
                }
            }
        }
    }
}

/// The input of a product for one thread: ready, or made into its scratch.
fn thread_input<'t>(
    source: Source<'t>,
    quantized: bool,
    m: usize,
    xq: &'t mut [ActBlock],
    xn: &'t mut [f32],
    tmp: &mut [f32],
) -> Input<'t> {
    if let Source::Ready(input) = source {
        return input;
    }
    let w = source.width();
    for i in 0..m {
        source.prepare(
            i,
            quantized,
            &mut xq[i * w / BLOCK..(i + 1) * w / BLOCK],
            &mut xn[i * w..(i + 1) * w],
            tmp,
        );
    }
    if quantized {
        Input::Quantized(&xq[..m * w / BLOCK])
    } else {
        Input::Dense(&xn[..m * w])
    }
}

/// The input for a product over `m` rows: made by a run of its own into
/// `xq`/`xn` for large batches, left to each thread for small ones.
#[allow(clippy::too_many_arguments)]
pub(super) fn input<'a>(
    pool: &mut ThreadPool,
    source: Source<'a>,
    quantized: bool,
    m: usize,
    xq: &'a mut [ActBlock],
    xn: &'a mut [f32],
    scratch: &[Mutex<ThreadScratch>],
) -> Source<'a> {
    if m <= PER_THREAD_ROWS {
        return source;
    }
    let w = source.width();
    if quantized {
        let tiles = Tiles::new(&mut xq[..m * w / BLOCK], m, w / BLOCK, 1, w / BLOCK);
        pool.run(&|t| {
            let mut ts = lock(&scratch[t]);
            let ThreadScratch { row, xn, .. } = &mut *ts;
            while let Some(mut tile) = tiles.next() {
                let i = tile.rows().start;
                source.prepare(i, true, tile.row(i), &mut xn[..w], row);
            }
        });
        Source::Ready(Input::Quantized(&xq[..m * w / BLOCK]))
    } else {
        let tiles = Tiles::new(&mut xn[..m * w], m, w, 1, w);
        pool.run(&|t| {
            let mut ts = lock(&scratch[t]);
            let ThreadScratch { row, xq, .. } = &mut *ts;
            while let Some(mut tile) = tiles.next() {
                let i = tile.rows().start;
                source.prepare(i, false, &mut xq[..w / BLOCK], tile.row(i), row);
            }
        });
        Source::Ready(Input::Dense(&xn[..m * w]))
    }
}

/// Tile width, in groups of 16 columns, that gives each thread several
/// tiles to balance with.
pub(super) fn tile_groups(groups: usize, threads: usize) -> usize {
    (groups / (threads * 4)).max(1)
}

/// The `m` rows' products with the groups of `w` covering `cols`, handed
/// to `emit(row, first column, 16 values)` group by group.
fn project(
    w: &PackedMatrix,
    input: Input<'_>,
    m: usize,
    cols: std::ops::Range<usize>,
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

/// The (up to) 16 values of a tile row from `at`: a group's outputs,
/// fewer when the matrix ends inside the group.
fn clipped<T>(row: &mut [T], at: usize) -> &mut [T] {
    let row = &mut row[at..];
    let len = row.len().min(GROUP);
    &mut row[..len]
}

/// Q, K and V of one layer in one run: Q rotated into `q`, K rotated and
/// V written straight into the cache, one key/value head per tile.
pub(super) struct Qkv<'a> {
    pub(super) layer: &'a CpuLayer,
    pub(super) source: Source<'a>,
    pub(super) rows: &'a [Row],
    pub(super) tables: &'a BlockTables,
    pub(super) rope: &'a RopeTable,
    pub(super) kv: KvLayout,
}

impl Qkv<'_> {
    /// Run with the cache's K and V rows of this layer (`keys`, `values`:
    /// one row per key/value head), elements made by `cast`.
    pub(super) fn run<T: Send>(
        &self,
        pool: &mut ThreadPool,
        q: &mut [f32],
        keys: &mut [T],
        values: &mut [T],
        scratch: &[Mutex<ThreadScratch>],
        cast: impl Fn(f32) -> T + Sync,
    ) {
        let Self {
            layer,
            source,
            rows,
            tables,
            rope,
            kv,
        } = *self;
        let m = rows.len();
        let hd = kv.head_dim;
        let quantized = layer.q.format().is_quantized();
        let q_dim = layer.q.rows();
        let q_tiles = Tiles::new(
            &mut q[..m * q_dim],
            m,
            q_dim,
            m,
            GROUP * tile_groups(layer.q.groups(), scratch.len()),
        );
        let row_len = keys.len() / kv.kv_heads;
        let k_tiles = Tiles::new(keys, kv.kv_heads, row_len, 1, row_len);
        let v_tiles = Tiles::new(values, kv.kv_heads, row_len, 1, row_len);
        pool.run(&|t| {
            let mut ts = lock(&scratch[t]);
            let ThreadScratch {
                xq, xn, row, out, ..
            } = &mut *ts;
            let input = thread_input(source, quantized, m, xq, xn, row);
            while let Some(mut tile) = q_tiles.next() {
                project(&layer.q, input, m, tile.cols(), out, |i, col, vals| {
                    let at = col - tile.cols().start;
                    let out = clipped(tile.row(i), at);
                    out.copy_from_slice(&vals[..out.len()]);
                    rope.rotate(out, col, hd, rows[i].pos);
                });
            }
            while let Some(mut tile) = k_tiles.next() {
                let h = tile.rows().start;
                let head_row = tile.row(h);
                project(
                    &layer.k,
                    input,
                    m,
                    h * hd..(h + 1) * hd,
                    out,
                    |i, col, vals| {
                        let mut v = *vals;
                        let (pos, seq) = (rows[i].pos, rows[i].seq);
                        rope.rotate(&mut v, col, hd, pos);
                        let block = tables.block(seq, pos);
                        for (j, &x) in v.iter().enumerate() {
                            head_row[kv.key_index(block, pos % KV_BLOCK, col - h * hd + j)] =
                                cast(x);
                        }
                    },
                );
            }
            while let Some(mut tile) = v_tiles.next() {
                let h = tile.rows().start;
                let head_row = tile.row(h);
                project(
                    &layer.v,
                    input,
                    m,
                    h * hd..(h + 1) * hd,
                    out,
                    |i, col, vals| {
                        let (pos, seq) = (rows[i].pos, rows[i].seq);
                        let block = tables.block(seq, pos);
                        let at = kv.value_index(block, pos % KV_BLOCK, col - h * hd);
                        for (o, &x) in head_row[at..at + GROUP].iter_mut().zip(vals) {
                            *o = cast(x);
                        }
                    },
                );
            }
        });
    }
}

/// Positions per run of the attention: rows are cut into runs by position
/// alone, so each unit of work is bounded and a long context spreads over
/// all threads, while the result stays the same whatever the batch. A run
/// is one KV block.
pub(super) const RUN: usize = KV_BLOCK;

/// Batch rows one unit of attention work takes: consecutive rows of one
/// sequence (a prompt chunk) share every key and value they read.
pub(super) const ROWS_PER_UNIT: usize = 4;

/// Partial attention for every key/value head, run of positions and up to
/// [`ROWS_PER_UNIT`] rows: the query heads of those rows sharing the
/// key/value head attend together over the run's cached positions, into
/// `parts` (see [`Partials`]). Returns the runs per head in `parts`.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend(
    pool: &mut ThreadPool,
    layer: usize,
    rows: &[Row],
    tables: &BlockTables,
    q: &[f32],
    kv: &KvCache,
    heads: usize,
    parts: &mut [f32],
    scratch: &[Mutex<ThreadScratch>],
) -> usize {
    let m = rows.len();
    let hd = kv.layout.head_dim;
    let kv_heads = kv.layout.kv_heads;
    let group = heads / kv_heads;
    let q_dim = heads * hd;
    let runs = rows.iter().map(|r| r.pos / RUN + 1).max().unwrap_or(1);
    let len = partial_len(group, hd);
    let tiles = Tiles::new(
        &mut parts[..kv_heads * runs * m * len],
        kv_heads * runs,
        m * len,
        1,
        ROWS_PER_UNIT * len,
    );
    let scale = 1.0 / (hd as f32).sqrt();
    pool.run(&|t| {
        let mut ts = lock(&scratch[t]);
        let ThreadScratch {
            scores, positions, ..
        } = &mut *ts;
        while let Some(mut tile) = tiles.next() {
            let unit = tile.rows().start;
            let (h, r) = (unit / runs, unit % runs);
            let first = tile.cols().start / len;
            let last = tile.cols().end / len;
            let start = r * RUN;
            let out = tile.row(unit);
            // Runs of consecutive rows of one sequence within the tile.
            let mut i = first;
            while i < last {
                let mut end = i + 1;
                while end < last
                    && rows[end].seq == rows[i].seq
                    && rows[end].pos == rows[end - 1].pos + 1
                {
                    end += 1;
                }
                // Rows whose prefix reaches into this run, and how far.
                positions.clear();
                positions.extend(
                    rows[i..end]
                        .iter()
                        .map(|row| (row.pos + 1).saturating_sub(start).min(RUN)),
                );
                let skip = positions.iter().take_while(|&&n| n == 0).count();
                if skip < positions.len() {
                    let block = tables.table(rows[i].seq)[r] as usize;
                    let (keys, values) = kv.block(layer, h, block);
                    let a = Attention {
                        q: &q[(i + skip) * q_dim + h * group * hd..],
                        q_stride: q_dim,
                        heads: group,
                        keys,
                        values,
                        head_dim: hd,
                        positions: &positions[skip..],
                        scale,
                    };
                    let at = (i + skip - first) * len;
                    attention(&a, scores, &mut out[at..(end - first) * len]);
                }
                i = end;
            }
        }
    });
    runs
}

/// `x += w * input` for the `m` rows.
pub(super) fn add_projection(
    pool: &mut ThreadPool,
    w: &PackedMatrix,
    source: Source<'_>,
    x: &mut [f32],
    m: usize,
    scratch: &[Mutex<ThreadScratch>],
) {
    product(pool, w, source, m, x, scratch, |o, v| *o += v);
}

/// The logits of the `n` rows (already gathered): the head's product over
/// the vocabulary.
pub(super) fn head(
    pool: &mut ThreadPool,
    w: &PackedMatrix,
    source: Source<'_>,
    n: usize,
    logits: &mut [f32],
    scratch: &[Mutex<ThreadScratch>],
) {
    product(pool, w, source, n, logits, scratch, |o, v| *o = v);
}

/// `w * input` for the `m` rows, each value combined into `out` (rows of
/// `w.rows()`) by `combine`, in one run over tiles of columns.
fn product(
    pool: &mut ThreadPool,
    w: &PackedMatrix,
    source: Source<'_>,
    m: usize,
    out: &mut [f32],
    scratch: &[Mutex<ThreadScratch>],
    combine: impl Fn(&mut f32, f32) + Sync,
) {
    let quantized = w.format().is_quantized();
    let width = w.rows();
    let tile_cols = GROUP * tile_groups(w.groups(), scratch.len());
    let tiles = Tiles::new(&mut out[..m * width], m, width, m, tile_cols);
    pool.run(&|t| {
        let mut ts = lock(&scratch[t]);
        let ThreadScratch {
            xq, xn, row, out, ..
        } = &mut *ts;
        let input = thread_input(source, quantized, m, xq, xn, row);
        while let Some(mut tile) = tiles.next() {
            project(w, input, m, tile.cols(), out, |i, col, vals| {
                let at = col - tile.cols().start;
                // A group past the matrix's last row gives fewer values.
                for (o, &v) in tile.row(i)[at..].iter_mut().zip(vals) {
                    combine(o, v);
                }
            });
        }
    });
}

/// `silu(gate x) * (up x)` for the `m` rows, 32 columns (one quantization
/// block, two groups each of gate and up) at a time: quantized into `hq`
/// when the down projection is quantized, else as f32 into `h`.
#[allow(clippy::too_many_arguments)]
pub(super) fn gate_up(
    pool: &mut ThreadPool,
    layer: &CpuLayer,
    source: Source<'_>,
    m: usize,
    hq: &mut [ActBlock],
    h: &mut [f32],
    scratch: &[Mutex<ThreadScratch>],
) {
    let blocks = layer.gate.rows() / BLOCK;
    if layer.down.format().is_quantized() {
        hidden(
            pool,
            layer,
            source,
            m,
            &mut hq[..m * blocks],
            1,
            scratch,
            |h, out| {
                quantize_row(h, out);
            },
        );
    } else {
        hidden(
            pool,
            layer,
            source,
            m,
            &mut h[..m * blocks * BLOCK],
            BLOCK,
            scratch,
            |h, out| {
                out.copy_from_slice(h);
            },
        );
    }
}

/// The gate/up run writing `out`, `per_block` elements for every 32
/// hidden columns of each row, made by `store` from the 32 values.
#[allow(clippy::too_many_arguments)]
fn hidden<T: Send>(
    pool: &mut ThreadPool,
    layer: &CpuLayer,
    source: Source<'_>,
    m: usize,
    out: &mut [T],
    per_block: usize,
    scratch: &[Mutex<ThreadScratch>],
    store: impl Fn(&[f32], &mut [T]) + Sync,
) {
    let quantized = layer.gate.format().is_quantized();
    let blocks = layer.gate.rows() / BLOCK;
    let per_tile = (blocks / (scratch.len() * 4)).max(1);
    let tiles = Tiles::new(out, m, blocks * per_block, m, per_tile * per_block);
    pool.run(&|t| {
        let mut ts = lock(&scratch[t]);
        let ThreadScratch {
            xq,
            xn,
            row,
            gate,
            up,
            hidden,
            ..
        } = &mut *ts;
        let input = thread_input(source, quantized, m, xq, xn, row);
        while let Some(mut tile) = tiles.next() {
            let cols = tile.cols();
            for b in cols.start / per_block..cols.end / per_block {
                hidden_block(layer, input, m, b, gate, up, hidden);
                for i in 0..m {
                    let at = b * per_block - cols.start;
                    store(
                        &hidden[i * BLOCK..(i + 1) * BLOCK],
                        &mut tile.row(i)[at..at + per_block],
                    );
                }
            }
        }
    });
}

/// Columns `32 b..32 b + 32` of `silu(gate x) * (up x)` for the `m` rows,
/// into `hidden` (32 per row).
fn hidden_block(
    layer: &CpuLayer,
    input: Input<'_>,
    m: usize,
    b: usize,
    gate: &mut [[f32; GROUP]],
    up: &mut [[f32; GROUP]],
    hidden: &mut [f32],
) {
    for half in 0..2 {
        let g = 2 * b + half;
        matmul_group(&layer.gate, g, input, &mut gate[..m]);
        matmul_group(&layer.up, g, input, &mut up[..m]);
        for i in 0..m {
            let at = i * BLOCK + half * GROUP;
            silu_mul(&gate[i], &up[i], &mut hidden[at..at + GROUP]);
        }
    }
}
