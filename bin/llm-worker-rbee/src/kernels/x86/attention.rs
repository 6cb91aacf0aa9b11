//! Attention over the KV cache (see `kernels::math::Attention`).

use std::arch::x86_64::*;

use super::super::math::{Attention, KvRows, KEY_BLOCK, LANES};
use super::super::Isa;
use super::check;
use super::math::{exp_256, exp_512, mask_256, reduce_256, reduce_512};

/// Prefetch the line at `p` into L1 (never faults, whatever it names).
#[inline(always)]
fn prefetch_line(p: *const u8) {
    // SAFETY: a prefetch has no architectural effect and cannot fault.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) };
}

/// Query vectors a score or weighted-value body takes at once.
const VECTORS: usize = 6;

/// Partial attention of the query rows and heads sharing one key/value
/// head; `head_dim` is a multiple of 16 and the slices were checked by the
/// caller.
pub(in crate::kernels) fn attention(
    isa: Isa,
    a: &Attention<'_>,
    scores: &mut [f32],
    part: &mut [f32],
) {
    check(isa);
    let (hd, np, heads, rows) = (a.head_dim, a.padded(), a.heads, a.positions.len());
    let vectors = a.vectors();
    let len = heads * (hd + 2);
    assert!(hd.is_multiple_of(LANES) && part.len() == rows * len);
    assert!(a.q_stride >= heads * hd && a.q.len() >= (rows - 1) * a.q_stride + heads * hd);
    assert!(scores.len() >= vectors * np);
    assert!(a.keys.len() >= np * hd && a.values.len() >= a.longest() * hd);
    let blocks = np / KEY_BLOCK;
    // Vector `v` is head `v % heads` of row `v / heads`.
    let query = |v: usize| a.q[(v / heads) * a.q_stride + (v % heads) * hd..].as_ptr();
    // One pointer into the scores for the whole loop, offsets from it.
    let base = scores.as_mut_ptr();
    for v0 in (0..vectors).step_by(VECTORS) {
        let n = (vectors - v0).min(VECTORS);
        let mut qs = [std::ptr::null::<f32>(); VECTORS];
        let mut ss = [std::ptr::null_mut::<f32>(); VECTORS];
        for k in 0..n {
            qs[k] = query(v0 + k);
            ss[k] = base.wrapping_add((v0 + k) * np);
        }
        // The CPU has `isa`; the first `n` pointers name query
        // vectors of `hd` and score rows of `np` inside their slices, and
        // the `blocks` key blocks of `hd * 16` elements are inside the keys
        // (checked above).
        // SAFETY: the CPU has `isa` and every pointer's range was checked.
        unsafe {
            macro_rules! run {
                ($f:ident, $k:expr) => {
                    match n {
                        1 => $f::<1>(&qs, hd, $k, blocks, a.scale, &ss),
                        2 => $f::<2>(&qs, hd, $k, blocks, a.scale, &ss),
                        3 => $f::<3>(&qs, hd, $k, blocks, a.scale, &ss),
                        4 => $f::<4>(&qs, hd, $k, blocks, a.scale, &ss),
                        5 => $f::<5>(&qs, hd, $k, blocks, a.scale, &ss),
                        _ => $f::<6>(&qs, hd, $k, blocks, a.scale, &ss),
                    }
                };
            }
            match (isa, a.keys) {
                (Isa::Avx512, KvRows::F32(k)) => run!(scores_512_f32, k.as_ptr()),
                (Isa::Avx512, KvRows::F16(k)) => run!(scores_512_f16, k.as_ptr()),
                (_, KvRows::F32(k)) => run!(scores_256_f32, k.as_ptr()),
                (_, KvRows::F16(k)) => run!(scores_256_f16, k.as_ptr()),
            }
        }
    }
    for v in 0..vectors {
        let (r, g) = (v / heads, v % heads);
        let n = a.positions[r];
        let row = &mut scores[v * np..(v + 1) * np];
        // SAFETY: as above; this vector's first `n` scores.
        let (max, sum) = unsafe {
            if isa == Isa::Avx512 {
                softmax_512(row.as_mut_ptr(), n)
            } else {
                softmax_256(row.as_mut_ptr(), n)
            }
        };
        // Past its own positions a row weighs nothing: adding 0 * v keeps
        // its sums exactly as if it stopped there.
        row[n..].fill(0.0);
        let stats = &mut part[r * len + heads * hd..(r + 1) * len];
        stats[g] = max;
        stats[heads + g] = sum;
    }
    let (scores, outs) = (scores.as_ptr(), part.as_mut_ptr());
    for v0 in (0..vectors).step_by(VECTORS) {
        let n = (vectors - v0).min(VECTORS);
        let mut ps = [std::ptr::null::<f32>(); VECTORS];
        let mut os = [std::ptr::null_mut::<f32>(); VECTORS];
        let mut positions = 0;
        for k in 0..n {
            let v = v0 + k;
            ps[k] = scores.wrapping_add(v * np);
            os[k] = outs.wrapping_add((v / heads) * len + (v % heads) * hd);
            positions = positions.max(a.positions[v / heads]);
        }
        // As above; the first `n` pointers name probability rows
        // of at least `positions` values (zero past each row's own) and
        // output rows of `hd` inside `part`, distinct per vector.
        // SAFETY: the CPU has `isa` and every pointer's range was checked.
        unsafe {
            macro_rules! run {
                ($f:ident, $v:expr) => {
                    match n {
                        1 => $f::<1>(&ps, $v, hd, positions, &os),
                        2 => $f::<2>(&ps, $v, hd, positions, &os),
                        3 => $f::<3>(&ps, $v, hd, positions, &os),
                        4 => $f::<4>(&ps, $v, hd, positions, &os),
                        5 => $f::<5>(&ps, $v, hd, positions, &os),
                        _ => $f::<6>(&ps, $v, hd, positions, &os),
                    }
                };
            }
            match (isa, a.values) {
                (Isa::Avx512, KvRows::F32(v)) => run!(weighted_512_f32, v.as_ptr()),
                (Isa::Avx512, KvRows::F16(v)) => run!(weighted_512_f16, v.as_ptr()),
                (_, KvRows::F32(v)) => run!(weighted_256_f32, v.as_ptr()),
                (_, KvRows::F16(v)) => run!(weighted_256_f16, v.as_ptr()),
            }
        }
    }
}

/// 16 cached elements as f32.
macro_rules! load16_f32 {
    ($p:expr) => {
        _mm512_loadu_ps($p)
    };
}
macro_rules! load16_f16 {
    ($p:expr) => {
        _mm512_cvtph_ps(_mm256_loadu_si256($p.cast()))
    };
}
/// 8 cached elements as f32.
macro_rules! load8_f32 {
    ($p:expr) => {
        _mm256_loadu_ps($p)
    };
}
macro_rules! load8_f16 {
    ($p:expr) => {
        _mm256_cvtph_ps(_mm_loadu_si128($p.cast()))
    };
}

/// The AVX-512 score and weighted-value bodies for one cache element type.
macro_rules! attention_512 {
    ($scores:ident, $weighted:ident, $t:ty, $load:ident) => {
        /// The scores of `NV` query vectors, 16 positions per key block, two
        /// blocks at a time (each score is a chain of dependent FMAs, so
        /// more chains in flight keep the units busy).
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        unsafe fn $scores<const NV: usize>(
            q: &[*const f32; VECTORS],
            hd: usize,
            keys: *const $t,
            blocks: usize,
            scale: f32,
            scores: &[*mut f32; VECTORS],
        ) {
            // SAFETY: see `attention`.
            unsafe {
                let scale = _mm512_set1_ps(scale);
                let mut b = 0;
                while b < blocks {
                    let two = b + 1 < blocks;
                    let k0 = keys.add(b * hd * KEY_BLOCK);
                    let k1 = if two { k0.add(hd * KEY_BLOCK) } else { k0 };
                    let mut a0 = [_mm512_setzero_ps(); NV];
                    let mut a1 = [_mm512_setzero_ps(); NV];
                    for e in 0..hd {
                        prefetch_line(
                            k0.add(e * KEY_BLOCK)
                                .wrapping_add(2 * hd * KEY_BLOCK)
                                .cast(),
                        );
                        let kv0 = $load!(k0.add(e * KEY_BLOCK));
                        let kv1 = $load!(k1.add(e * KEY_BLOCK));
                        for v in 0..NV {
                            let qe = _mm512_set1_ps(*q[v].add(e));
                            a0[v] = _mm512_fmadd_ps(qe, kv0, a0[v]);
                            a1[v] = _mm512_fmadd_ps(qe, kv1, a1[v]);
                        }
                    }
                    for v in 0..NV {
                        let at = scores[v].add(b * KEY_BLOCK);
                        _mm512_storeu_ps(at, _mm512_mul_ps(a0[v], scale));
                        if two {
                            _mm512_storeu_ps(at.add(KEY_BLOCK), _mm512_mul_ps(a1[v], scale));
                        }
                    }
                    b += 2;
                }
            }
        }

        /// `out[v] = sum_j p[v][j] v_j` for `NV` vectors, in column slices
        /// of 64 so the accumulators stay in registers.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        unsafe fn $weighted<const NV: usize>(
            p: &[*const f32; VECTORS],
            values: *const $t,
            hd: usize,
            positions: usize,
            out: &[*mut f32; VECTORS],
        ) {
            // SAFETY: see `attention`.
            unsafe {
                for d0 in (0..hd).step_by(4 * LANES) {
                    let chunks = ((hd - d0) / LANES).min(4);
                    let mut acc = [[_mm512_setzero_ps(); 4]; NV];
                    for j in 0..positions {
                        let row = values.add(j * hd + d0);
                        prefetch_line(row.wrapping_add(8 * hd).cast());
                        for c in 0..chunks {
                            let vv = $load!(row.add(c * LANES));
                            for v in 0..NV {
                                acc[v][c] =
                                    _mm512_fmadd_ps(_mm512_set1_ps(*p[v].add(j)), vv, acc[v][c]);
                            }
                        }
                    }
                    for v in 0..NV {
                        for c in 0..chunks {
                            _mm512_storeu_ps(out[v].add(d0 + c * LANES), acc[v][c]);
                        }
                    }
                }
            }
        }
    };
}

/// The AVX2 score and weighted-value bodies for one cache element type.
macro_rules! attention_256 {
    ($scores:ident, $weighted:ident, $t:ty, $load:ident) => {
        /// As the AVX-512 body, positions 0..8 and 8..16 of a block in two registers.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $scores<const NV: usize>(
            q: &[*const f32; VECTORS],
            hd: usize,
            keys: *const $t,
            blocks: usize,
            scale: f32,
            scores: &[*mut f32; VECTORS],
        ) {
            // SAFETY: see `attention`.
            unsafe {
                let scale = _mm256_set1_ps(scale);
                for b in 0..blocks {
                    let kb = keys.add(b * hd * KEY_BLOCK);
                    let mut lo = [_mm256_setzero_ps(); NV];
                    let mut hi = [_mm256_setzero_ps(); NV];
                    for e in 0..hd {
                        let k0 = $load!(kb.add(e * KEY_BLOCK));
                        let k1 = $load!(kb.add(e * KEY_BLOCK + 8));
                        for v in 0..NV {
                            let qe = _mm256_set1_ps(*q[v].add(e));
                            lo[v] = _mm256_fmadd_ps(qe, k0, lo[v]);
                            hi[v] = _mm256_fmadd_ps(qe, k1, hi[v]);
                        }
                    }
                    for v in 0..NV {
                        let at = scores[v].add(b * KEY_BLOCK);
                        _mm256_storeu_ps(at, _mm256_mul_ps(lo[v], scale));
                        _mm256_storeu_ps(at.add(8), _mm256_mul_ps(hi[v], scale));
                    }
                }
            }
        }

        /// As the AVX-512 body, column slices of 16.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $weighted<const NV: usize>(
            p: &[*const f32; VECTORS],
            values: *const $t,
            hd: usize,
            positions: usize,
            out: &[*mut f32; VECTORS],
        ) {
            // SAFETY: see `attention`.
            unsafe {
                for d0 in (0..hd).step_by(16) {
                    let mut acc = [[_mm256_setzero_ps(); 2]; NV];
                    for j in 0..positions {
                        let row = values.add(j * hd + d0);
                        let v0 = $load!(row);
                        let v1 = $load!(row.add(8));
                        for v in 0..NV {
                            let pj = _mm256_set1_ps(*p[v].add(j));
                            acc[v][0] = _mm256_fmadd_ps(pj, v0, acc[v][0]);
                            acc[v][1] = _mm256_fmadd_ps(pj, v1, acc[v][1]);
                        }
                    }
                    for v in 0..NV {
                        _mm256_storeu_ps(out[v].add(d0), acc[v][0]);
                        _mm256_storeu_ps(out[v].add(d0 + 8), acc[v][1]);
                    }
                }
            }
        }
    };
}

attention_512!(scores_512_f32, weighted_512_f32, f32, load16_f32);
attention_512!(scores_512_f16, weighted_512_f16, u16, load16_f16);
attention_256!(scores_256_f32, weighted_256_f32, f32, load8_f32);
attention_256!(scores_256_f16, weighted_256_f16, u16, load8_f16);

/// `math::softmax_in_place` on the `n` scores at `s`: the maximum, then
/// `exp(s - max)` in place and their sum; the last partial vector is
/// masked, so every score takes the vector path.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn softmax_512(s: *mut f32, n: usize) -> (f32, f32) {
    // SAFETY: `n` scores at `s`; the tail accesses are masked to them.
    unsafe {
        let full = n / LANES * LANES;
        let tail: u16 = ((1u32 << (n - full)) - 1) as u16;
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        for j in (0..full).step_by(LANES) {
            m = _mm512_max_ps(m, _mm512_loadu_ps(s.add(j)));
        }
        if tail != 0 {
            m = _mm512_mask_max_ps(m, tail, m, _mm512_maskz_loadu_ps(tail, s.add(full)));
        }
        let top = _mm512_reduce_max_ps(m);
        let max = _mm512_set1_ps(top);
        let mut acc = _mm512_setzero_ps();
        for j in (0..full).step_by(LANES) {
            let e = exp_512(_mm512_sub_ps(_mm512_loadu_ps(s.add(j)), max));
            _mm512_storeu_ps(s.add(j), e);
            acc = _mm512_add_ps(acc, e);
        }
        if tail != 0 {
            let e = exp_512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s.add(full)), max));
            _mm512_mask_storeu_ps(s.add(full), tail, e);
            acc = _mm512_mask_add_ps(acc, tail, acc, e);
        }
        (top, reduce_512(acc))
    }
}

/// [`softmax_512`] on 8-lane halves.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn softmax_256(s: *mut f32, n: usize) -> (f32, f32) {
    // SAFETY: `n` scores at `s`; the tail accesses are masked to them.
    unsafe {
        let full = n / LANES * LANES;
        let rest = n - full;
        let (mask_lo, mask_hi) = (mask_256(rest), mask_256(rest.saturating_sub(8)));
        let neg = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut m = neg;
        for j in (0..full).step_by(8) {
            m = _mm256_max_ps(m, _mm256_loadu_ps(s.add(j)));
        }
        if rest > 0 {
            let lo = _mm256_blendv_ps(
                neg,
                _mm256_maskload_ps(s.add(full), mask_lo),
                _mm256_castsi256_ps(mask_lo),
            );
            let hi = _mm256_blendv_ps(
                neg,
                _mm256_maskload_ps(s.add(full + 8), mask_hi),
                _mm256_castsi256_ps(mask_hi),
            );
            m = _mm256_max_ps(m, _mm256_max_ps(lo, hi));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        let top = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let max = _mm256_set1_ps(top);
        let mut lo = _mm256_setzero_ps();
        let mut hi = _mm256_setzero_ps();
        for j in (0..full).step_by(LANES) {
            let e0 = exp_256(_mm256_sub_ps(_mm256_loadu_ps(s.add(j)), max));
            let e1 = exp_256(_mm256_sub_ps(_mm256_loadu_ps(s.add(j + 8)), max));
            _mm256_storeu_ps(s.add(j), e0);
            _mm256_storeu_ps(s.add(j + 8), e1);
            lo = _mm256_add_ps(lo, e0);
            hi = _mm256_add_ps(hi, e1);
        }
        if rest > 0 {
            let e0 = exp_256(_mm256_sub_ps(_mm256_maskload_ps(s.add(full), mask_lo), max));
            let e1 = exp_256(_mm256_sub_ps(
                _mm256_maskload_ps(s.add(full + 8), mask_hi),
                max,
            ));
            _mm256_maskstore_ps(s.add(full), mask_lo, e0);
            _mm256_maskstore_ps(s.add(full + 8), mask_hi, e1);
            lo = _mm256_add_ps(lo, _mm256_and_ps(e0, _mm256_castsi256_ps(mask_lo)));
            hi = _mm256_add_ps(hi, _mm256_and_ps(e1, _mm256_castsi256_ps(mask_hi)));
        }
        (top, reduce_256(lo, hi))
    }
}
